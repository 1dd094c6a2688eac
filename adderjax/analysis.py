"""Numbers behind the AdderNet paper's figures: features, kernels, gradient norms, weight
statistics.

Everything here returns NumPy arrays or plain Python numbers and never draws
(:mod:`adderjax.plotting` draws them):

- :func:`features`: the output of any submodule of a Flax NNX model (for
  example the LeNet++ embedding of the paper's Figure 1), captured with
  :func:`flax.nnx.capture`;
- :func:`kernels` and :func:`adder_kernels`: the convolution and dense kernels
  of a model by path (the first-layer filters, the weight histograms);
- :func:`gradient_norms`: the l2 norm of each kernel's gradient on a batch
  (the paper's motivation for the adaptive learning rate);
- :func:`weight_stats`: mean, std, excess kurtosis and the fit of a Laplace and
  of a Gaussian distribution, with their Kolmogorov-Smirnov distances (AdderNet
  weights Laplacian-like, CNN weights Gaussian-like);
- :func:`read_metrics` and :func:`metric_history`: a trainer workdir's
  ``metrics.jsonl`` as records or as arrays (the learning curves);
- :func:`fgsm` and :func:`pgd`: accuracy under white-box attack, through the
  exact gradient or the training surrogate (:mod:`adderjax.robustness`), and
  :func:`with_grad_mode`, a copy of a model with its adder layers' backward
  pass replaced.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from adderjax import analysis, models
  >>> model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
  >>> model.eval()
  >>> analysis.features(model, jnp.zeros((3, 28, 28, 1)), "fc2").shape
  (3, 84)
  >>> sorted(analysis.adder_kernels(model))[:2]
  ['conv1/kernel', 'conv2/kernel']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import json
import math
import pathlib
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax.nn import AdderKernel, batch_norm_fusion
from adderjax.robustness import GRADIENTS, AttackResult, fgsm, pgd, with_grad_mode

__all__ = [
    "GRADIENTS",
    "AttackResult",
    "WeightStats",
    "adder_kernels",
    "features",
    "fgsm",
    "gradient_norms",
    "kernels",
    "layer_names",
    "metric_history",
    "nearest_centre_accuracy",
    "pgd",
    "read_metrics",
    "weight_stats",
    "with_grad_mode",
]

PathLike = str | pathlib.Path


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def layer_names(model: nnx.Module) -> list[str]:
  """The paths of ``model``'s submodules, as :func:`features` takes them.

  Example:
    >>> from flax import nnx
    >>> from adderjax import analysis, models
    >>> model = models.get("lenet_pp", kind="conv", rngs=nnx.Rngs(0))
    >>> [name for name in analysis.layer_names(model) if name.startswith("embed")]
    ['embed', 'embed_act', 'embed_norm']

  Args:
    model: a Flax NNX module.

  Returns:
    The ``"/"``-joined paths (``"convs/0"``, ``"layer1/0/conv1"``), sorted.
  """
  return sorted(_path_str(path) for path, _ in nnx.iter_modules(model) if path)


def _check_batch_size(batch_size: Any) -> int:
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}.")
  return int(batch_size)


def _batched(fn: Callable[[jax.Array], Any], inputs: Any, batch_size: int) -> list[Any]:
  inputs = np.asarray(inputs)
  if inputs.ndim == 0 or not len(inputs):
    raise ValueError(f"inputs must be a non-empty batch, got shape {inputs.shape}.")
  return [jax.device_get(fn(jnp.asarray(inputs[i:i + batch_size])))
          for i in range(0, len(inputs), batch_size)]


def features(model: nnx.Module, inputs: Any, layer: str, *, batch_size: int = 256,
             call: int = 0) -> np.ndarray:
  """The output of the submodule ``layer`` of ``model`` on ``inputs``.

  The model runs on a copy in its current mode (call ``model.eval()`` first for
  the running BatchNorm statistics): ``model`` itself is left unchanged. The
  forward pass is compiled once and run over ``inputs`` in batches.

  Example (the 2-D embedding of LeNet++, which the paper plots in Figure 1):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax import analysis, models
    >>> model = models.get("lenet_pp", kind="conv", embed_dim=2, rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> analysis.features(model, jnp.zeros((5, 28, 28, 1)), "embed_act").shape
    (5, 2)

  Args:
    model: a Flax NNX module, such as any network of :mod:`adderjax.models`.
    inputs: a batch the model takes, as an array.
    layer: the submodule's path, ``"/"``-joined (see :func:`layer_names`).
    batch_size: how many inputs to run at once.
    call: which call of the submodule, where the model calls it several times.

  Returns:
    The submodule's output, concatenated over the batches (for a submodule that
    returns a tuple, the tuple's first array).

  Raises:
    ValueError: for an unknown ``layer`` (the known ones are listed), a bad
      ``batch_size`` or ``call``, or empty ``inputs``.
  """
  names = layer_names(model)
  if layer not in names:
    raise ValueError(f"layer must be one of the model's submodules {names}, got layer={layer!r}.")
  batch_size = _check_batch_size(batch_size)
  if isinstance(call, bool) or not isinstance(call, int) or call < 0:
    raise ValueError(f"call must be an int >= 0, got call={call!r}.")
  graphdef, state = nnx.split(model)
  run = _feature_fn(graphdef, layer, call)
  return np.concatenate(_batched(lambda x: run(state, x), inputs, batch_size))


@functools.lru_cache(maxsize=64)
def _feature_fn(graphdef: Any, layer: str, call: int) -> Callable[[Any, jax.Array], jax.Array]:
  """The compiled forward pass to ``layer``, one per model structure (reused across calls)."""
  key = tuple(int(p) if p.isdigit() else p for p in layer.split("/")) + ("__call__",)

  @jax.jit
  def run(state, x):
    copy = nnx.merge(graphdef, state)
    # The fused BatchNorm+ReLU of training mode does not call the BatchNorm modules.
    with batch_norm_fusion(False):
      _, captured = nnx.capture(copy, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
    calls = dict(nnx.to_flat_state(captured))[key].get_value()
    if call >= len(calls):
      raise ValueError(f"call={call} but the model calls {layer!r} {len(calls)} time(s).")
    return jax.tree.leaves(calls[call])[0]

  return run


def kernels(model: nnx.Module, *, adder_only: bool = False) -> dict[str, np.ndarray]:
  """The kernels of ``model``'s convolution and dense layers, by path.

  Example:
    >>> from flax import nnx
    >>> from adderjax import analysis, models
    >>> model = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
    >>> {path: k.shape for path, k in analysis.kernels(model).items()}["conv1/kernel"]
    (5, 5, 1, 6)

  Args:
    model: a Flax NNX module.
    adder_only: only the :class:`adderjax.nn.AdderKernel` parameters.

  Returns:
    ``{"conv1/kernel": array, ...}`` for every parameter named ``kernel``, in
    path order.
  """
  kind = AdderKernel if adder_only else nnx.Param
  flat = nnx.to_flat_state(nnx.state(model, kind))
  return {_path_str(path): np.asarray(variable.get_value())
          for path, variable in flat if path[-1] == "kernel"}


def adder_kernels(model: nnx.Module) -> dict[str, np.ndarray]:
  """The adder layers' kernels of ``model``, by path; ``kernels(model, adder_only=True)``.

  Example:
    >>> from flax import nnx
    >>> from adderjax import analysis, models
    >>> model = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
    >>> analysis.adder_kernels(model)  # a CNN has none
    {}
  """
  return kernels(model, adder_only=True)


def _default_loss(outputs: Any, labels: jax.Array) -> jax.Array:
  logits = outputs[-1] if isinstance(outputs, tuple) else outputs  # LeNet++: (embedding, logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def gradient_norms(model: nnx.Module, inputs: Any, labels: Any, *,
                   loss_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
                   kernels_only: bool = True) -> dict[str, float]:
  """The l2 norm of the gradient of each parameter of ``model`` on one batch.

  The gradient is taken on a copy of the model in its current mode
  (``model.train()``: BatchNorm on the batch's statistics, as in training);
  ``model`` itself, its BatchNorm statistics included, is left unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax import analysis, models
    >>> model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
    >>> images, labels = jnp.ones((4, 28, 28, 1)), jnp.arange(4)
    >>> norms = analysis.gradient_norms(model, images, labels)
    >>> list(norms)
    ['conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'fc2/kernel', 'fc3/kernel']

  Args:
    model: a Flax NNX module.
    inputs: the batch.
    labels: its integer labels.
    loss_fn: ``loss_fn(outputs, labels) -> scalar``; default: the mean softmax
      cross-entropy of the logits (of the last output, for a model returning a
      tuple).
    kernels_only: only the parameters named ``kernel``, else every
      :class:`flax.nnx.Param` (biases, BatchNorm scales).

  Returns:
    ``{path: norm}`` in path order.

  Raises:
    ValueError: if ``inputs`` and ``labels`` differ in length.
  """
  inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
  if inputs.ndim == 0 or labels.ndim == 0 or len(inputs) != len(labels):
    raise ValueError(f"inputs and labels must be batches of the same length, got shapes "
                     f"{inputs.shape} and {labels.shape}.")
  loss_fn = _default_loss if loss_fn is None else loss_fn
  graphdef, state = nnx.split(model)

  @jax.jit
  def grads(state, inputs, labels):  # the batch as arguments: not constants XLA would fold
    copy = nnx.merge(graphdef, state)
    return nnx.grad(lambda m: loss_fn(m(inputs), labels), argnums=nnx.DiffState(0, nnx.Param))(copy)

  flat = nnx.to_flat_state(jax.device_get(grads(state, inputs, labels)))
  return {_path_str(path): float(np.sqrt(np.sum(np.square(np.asarray(v.get_value(), np.float64)))))
          for path, v in flat if not kernels_only or path[-1] == "kernel"}


def nearest_centre_accuracy(features: Any, labels: Any, *, metric: str = "l1") -> float:
  """How well classes separate by distance to a centre or by angle: the paper's Figure 1 in a
  number.

  Each class gets a centre from its own features; a feature counts as correct
  when its own class's centre is the nearest one. With ``metric="l1"`` the
  centre is the class mean and "nearest" the smallest L1 distance (AdderNet
  features cluster around centres); with ``metric="angle"`` the centre is the
  mean of the class's unit vectors and "nearest" the largest cosine
  similarity (CNN features spread along rays, by angle). The centres come
  from the same features (an in-sample measure).

  Example:
    >>> import numpy as np
    >>> from adderjax.analysis import nearest_centre_accuracy
    >>> features = np.array([[1.0, 0.0], [20.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    >>> labels = np.array([0, 0, 1, 1])
    >>> nearest_centre_accuracy(features, labels, metric="angle")  # two rays
    1.0
    >>> nearest_centre_accuracy(features, labels, metric="l1")  # (1, 0) is nearer (0, 2.5)
    0.75

  Args:
    features: ``(n, d)`` features.
    labels: the ``n`` integer labels.
    metric: ``"l1"`` or ``"angle"``.

  Returns:
    The fraction of features whose nearest centre is their class's.

  Raises:
    ValueError: for a bad ``metric`` or shapes that do not match.
  """
  x = np.asarray(features, np.float64)
  labels = np.asarray(labels).ravel()
  if x.ndim != 2 or len(x) != len(labels) or not len(x):
    raise ValueError(f"features must be (n, d) with n = {len(labels)} labels, got shape {x.shape}.")
  classes = np.unique(labels)
  if metric == "l1":
    centres = np.stack([x[labels == c].mean(0) for c in classes])
    scores = -np.abs(x[:, None, :] - centres[None]).sum(-1)
  elif metric == "angle":
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centres = np.stack([unit[labels == c].mean(0) for c in classes])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    scores = unit @ centres.T
  else:
    raise ValueError(f"metric must be 'l1' or 'angle', got metric={metric!r}.")
  return float(np.mean(classes[scores.argmax(1)] == labels))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.scipy.special.ndtr(jnp.asarray(x, jnp.float32)), np.float64)


def _laplace_cdf(x: np.ndarray, loc: float, scale: float) -> np.ndarray:
  z = (x - loc) / scale
  return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0)), 1 - 0.5 * np.exp(-np.maximum(z, 0)))


def _ks_distance(sorted_values: np.ndarray, cdf: np.ndarray) -> float:
  """The Kolmogorov-Smirnov distance between the empirical CDF of sorted values and ``cdf`` at
  them."""
  n = len(sorted_values)
  above = np.arange(1, n + 1) / n - cdf
  below = cdf - np.arange(n) / n
  return float(max(above.max(), below.max()))


@dataclasses.dataclass(frozen=True)
class WeightStats:
  """Summary of a set of weights and its best Laplace and Gaussian fits (:func:`weight_stats`).

  Attributes:
    count: the number of weights.
    mean: their mean.
    std: their standard deviation (population, ``ddof=0``).
    excess_kurtosis: ``m4 / m2**2 - 3`` from the central moments: 0 for a
      Gaussian, 3 for a Laplace distribution.
    laplace_loc: the maximum-likelihood Laplace location (the median).
    laplace_scale: the maximum-likelihood Laplace scale ``b`` (the mean absolute
      deviation from the median).
    laplace_ks: the Kolmogorov-Smirnov distance from that Laplace distribution.
    gaussian_loc: the Gaussian fit's mean (= ``mean``).
    gaussian_scale: the Gaussian fit's standard deviation (= ``std``).
    gaussian_ks: the Kolmogorov-Smirnov distance from that Gaussian.
  """

  count: int
  mean: float
  std: float
  excess_kurtosis: float
  laplace_loc: float
  laplace_scale: float
  laplace_ks: float
  gaussian_loc: float
  gaussian_scale: float
  gaussian_ks: float

  @property
  def closer_fit(self) -> str:
    """``"laplace"`` or ``"gaussian"``: the fit with the smaller KS distance."""
    return "laplace" if self.laplace_ks < self.gaussian_ks else "gaussian"

  def density(self, fit: str, x: Any) -> np.ndarray:
    """The fitted ``"laplace"`` or ``"gaussian"`` probability density at ``x``.

    Example:
      >>> import numpy as np
      >>> from adderjax.analysis import weight_stats
      >>> stats = weight_stats(np.array([-1.0, 1.0]))
      >>> float(stats.density("gaussian", 0.0))  # 1 / sqrt(2 pi)
      0.3989422804014327
    """
    x = np.asarray(x, np.float64)
    if fit == "laplace":
      b = self.laplace_scale
      return np.exp(-np.abs(x - self.laplace_loc) / b) / (2 * b)
    if fit == "gaussian":
      s = self.gaussian_scale
      return np.exp(-0.5 * ((x - self.gaussian_loc) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    raise ValueError(f"fit must be 'laplace' or 'gaussian', got fit={fit!r}.")


def weight_stats(weights: Any) -> WeightStats:
  """Mean, std, excess kurtosis and the Laplace and Gaussian fits of ``weights`` (flattened).

  The fits are the maximum-likelihood ones; each one's goodness of fit is the
  Kolmogorov-Smirnov distance (the largest gap between the CDFs, from 0 to 1;
  smaller is closer).

  Example:
    >>> import numpy as np
    >>> from adderjax.analysis import weight_stats
    >>> rng = np.random.default_rng(0)
    >>> stats = weight_stats(rng.laplace(size=20_000))
    >>> round(stats.excess_kurtosis), stats.closer_fit
    (3, 'laplace')
    >>> weight_stats(rng.normal(size=20_000)).closer_fit
    'gaussian'

  Args:
    weights: an array of at least 2 values that are not all equal.

  Returns:
    A :class:`WeightStats`.

  Raises:
    ValueError: for fewer than 2 values, non-finite values, or constant values.
  """
  x = np.sort(np.asarray(weights, np.float64).ravel())
  if x.size < 2 or not np.all(np.isfinite(x)):
    raise ValueError(f"weights must hold at least 2 finite values, got {x.size} value(s)"
                     f"{'' if np.all(np.isfinite(x)) else ', some not finite'}.")
  mean = float(x.mean())
  centred = x - mean
  m2, m4 = float(np.mean(centred ** 2)), float(np.mean(centred ** 4))
  median = float(np.median(x))
  mad = float(np.mean(np.abs(x - median)))
  if m2 == 0 or mad == 0:
    raise ValueError("weights must not be all equal (no distribution to fit).")
  std = math.sqrt(m2)
  return WeightStats(
      count=int(x.size), mean=mean, std=std, excess_kurtosis=m4 / m2 ** 2 - 3,
      laplace_loc=median, laplace_scale=mad,
      laplace_ks=_ks_distance(x, _laplace_cdf(x, median, mad)),
      gaussian_loc=mean, gaussian_scale=std,
      gaussian_ks=_ks_distance(x, _normal_cdf((x - mean) / std)))


def _metrics_file(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  return path / "metrics.jsonl" if path.is_dir() else path


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
  """The records of a trainer's ``metrics.jsonl``, by step; the last one kept for a repeated
  (step, keys).

  After a resume, the steps between the last checkpoint and the interruption
  appear twice in the file; the later line, of the run that continued, wins.

  Example:
    >>> import json, pathlib, tempfile
    >>> from adderjax.analysis import read_metrics
    >>> workdir = pathlib.Path(tempfile.mkdtemp())
    >>> lines = [{"step": 2, "train_loss": 0.5}, {"step": 1, "train_loss": 0.9},
    ...          {"step": 2, "train_loss": 0.4}]
    >>> _ = (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in lines))
    >>> read_metrics(workdir)
    [{'step': 1, 'train_loss': 0.9}, {'step': 2, 'train_loss': 0.4}]

  Args:
    path: a workdir, or its ``metrics.jsonl``.

  Returns:
    The records (dicts with a ``"step"``), sorted by step.

  Raises:
    FileNotFoundError: if there is no such file.
    ValueError: for a line that is not a JSON object with a ``"step"``, naming
      ``file:line``. An unfinished last line (no newline: a run killed while
      writing it, by a version of the trainer that left such lines) is skipped
      with a `RuntimeWarning` naming it instead.
  """
  path = _metrics_file(path)
  records: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        problem = f"is not JSON: {e}"
      else:
        problem = None if isinstance(record, dict) and "step" in record else (
            f"is not a JSON object with a 'step': {line.strip()!r}")
      if problem is None:
        records[(record["step"], tuple(sorted(record)))] = record
      elif line.endswith("\n"):
        raise ValueError(f"{path}:{number} {problem}")
      else:  # Only the last line can lack its newline.
        warnings.warn(f"{path}:{number} is an unfinished record (a run stopped while writing "
                      f"it); skipped: {line[:80]!r}", RuntimeWarning, stacklevel=2)
  return sorted(records.values(), key=lambda r: r["step"])


def metric_history(path: PathLike | Sequence[Mapping[str, Any]], key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The steps and values of one metric of a workdir, as arrays (a learning curve).

  Example:
    >>> from adderjax.analysis import metric_history
    >>> records = [{"step": 50, "train_loss": 0.9}, {"step": 100, "eval_accuracy": 0.9},
    ...            {"step": 100, "train_loss": 0.4}]
    >>> metric_history(records, "train_loss")
    (array([ 50, 100]), array([0.9, 0.4]))

  Args:
    path: a workdir, its ``metrics.jsonl``, or records as :func:`read_metrics`
      returns them.
    key: the metric, such as ``"train_loss"`` or ``"eval_accuracy"``.

  Returns:
    ``(steps, values)``: int64 and float64 arrays over the records holding ``key``.

  Raises:
    ValueError: if no record holds ``key`` (the keys there are are listed).
  """
  records = read_metrics(path) if isinstance(path, (str, pathlib.Path)) else list(path)
  rows = [(r["step"], r[key]) for r in records if key in r]
  if not rows:
    known = sorted({k for r in records for k in r} - {"step", "time"})
    raise ValueError(f"No record holds key={key!r}; the metrics are {known}.")
  steps, values = zip(*rows)
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)
