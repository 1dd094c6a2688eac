"""White-box robustness: FGSM and PGD attacks through the exact or the training gradient.

An AdderNet trains with surrogate gradients (the full-precision and HardTanh
rules of :func:`adderjax.ops.adder_conv`), which are not the gradient of its
forward pass. An attack that follows them can overstate the network's
robustness; an honest evaluation attacks the exact gradient
(``grad_mode="sign"``, exact away from the kinks of ``|x - f|``) and reports
both (issue 23; the official AdderNet README reports FGSM / PGD-7 accuracies
of ResNet-20 on CIFAR-10 without saying which gradient they follow).

- :func:`fgsm`: the fast gradient sign method (Goodfellow et al., ICLR 2015),
  one step of ``epsilon``.
- :func:`pgd`: projected gradient descent (Madry et al., ICLR 2018): from a
  random start in the ``epsilon``-ball, ``steps`` signed steps of
  ``step_size``, each projected back onto the ball and the pixel range.
- :func:`with_grad_mode`: a copy of a model whose adder layers use another
  ``grad_mode``, what ``gradient="exact"`` attacks.

The attacks work on the pixel scale: inputs come normalised as the model sees
them, ``(pixel - mean) / std``, and ``epsilon`` and ``step_size`` are in the
units of ``pixel_range``. With :mod:`adderjax.data`'s normalisation
(``pixel / 255`` in [0, 1], then the dataset's ``mean`` and ``std``), pass
that ``mean`` and ``std`` and the default ``pixel_range=(0, 1)``:
``epsilon=8 / 255`` is eight grey levels. Both functions run the model in
evaluation mode (running BatchNorm statistics, no dropout) on a copy, compile
the attack once per model structure and batch shape, and take the inputs in
batches.

Example (a two-pixel AdderNet; any :mod:`adderjax.models` network is attacked alike):
  >>> import numpy as np
  >>> from flax import nnx
  >>> from adderjax.analysis import pgd
  >>> from adderjax.nn import AdderDense
  >>> flatten = lambda x: x.reshape(len(x), -1)
  >>> model = nnx.Sequential(flatten, AdderDense(2, 2, rngs=nnx.Rngs(0)))
  >>> pixels = np.array([[[[0.2], [0.9]]], [[[0.7], [0.1]]]], np.float32)  # 2 images, 1x2
  >>> images, labels = (pixels - 0.5) / 0.25, np.array([0, 1])  # as the model takes them
  >>> result = pgd(model, images, labels, epsilon=0.1, steps=3, mean=0.5, std=0.25)
  >>> result.adversarial.shape  # attacked through the exact gradient; gradient="surrogate" too
  (2, 1, 2, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax._checks import is_int, positive_int
from adderjax.nn import AdderConv, AdderDense
from adderjax.ops.spec import GradMode, check_grad_mode

__all__ = ["GRADIENTS", "AttackResult", "Gradient", "fgsm", "pgd", "with_grad_mode"]

Gradient = Literal["exact", "surrogate"]
"""The type of ``gradient`` arguments; :data:`GRADIENTS` lists its values."""

GRADIENTS: tuple[str, ...] = ("exact", "surrogate")
"""The gradients an attack can follow: the forward pass's own (adder layers
switched to ``grad_mode="sign"``), or the model's training gradient as it is."""

Apply = Callable[[nnx.Module, jax.Array], Any]


def _call(model: nnx.Module, inputs: jax.Array) -> Any:
  return model(inputs)


def with_grad_mode(model: nnx.Module, grad_mode: GradMode) -> nnx.Module:
  """A copy of ``model`` in which every adder layer has the backward pass ``grad_mode``.

  Every :class:`adderjax.nn.AdderConv` and :class:`adderjax.nn.AdderDense`
  reachable from ``model`` (see :func:`flax.nnx.iter_modules`) gets the new
  ``grad_mode``; the forward pass, the parameters and ``model`` itself are
  unchanged.

  Example:
    >>> from flax import nnx
    >>> from adderjax import models
    >>> from adderjax.analysis import with_grad_mode
    >>> model = nnx.eval_shape(lambda: models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0)))
    >>> with_grad_mode(model, "sign").conv2.grad_mode, model.conv2.grad_mode
    ('sign', 'full_precision')

  Args:
    model: a Flax NNX module.
    grad_mode: ``"full_precision"``, ``"unclipped"`` or ``"sign"`` (exact
      away from kinks).

  Returns:
    The copy (:func:`flax.nnx.clone`).

  Raises:
    ValueError: for an unknown ``grad_mode``.
  """
  check_grad_mode(grad_mode)
  copy = nnx.clone(model)
  for _, module in nnx.iter_modules(copy):
    if isinstance(module, (AdderConv, AdderDense)):
      module.grad_mode = grad_mode
  return copy


@dataclasses.dataclass(frozen=True)
class AttackResult:
  """What :func:`fgsm` and :func:`pgd` return.

  Attributes:
    adversarial: the adversarial inputs, normalised as the inputs were (feed
      them to the model as they are).
    accuracy: the accuracy on ``adversarial``.
    clean_accuracy: the accuracy on the inputs.
    loss: the mean softmax cross-entropy on ``adversarial``.
    clean_loss: the mean softmax cross-entropy on the inputs.
  """

  adversarial: np.ndarray
  accuracy: float
  clean_accuracy: float
  loss: float
  clean_loss: float


def _logits(outputs: Any) -> jax.Array:
  return outputs[-1] if isinstance(outputs, tuple) else outputs  # LeNet++: (embedding, logits)


def _check_number(value: Any, name: str, *, positive: bool = False) -> float:
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{name} must be a finite number {bound}, got {name}={value!r}.")
  return float(value)


def _check_channels(value: Any, name: str, channels: int, *, positive: bool) -> np.ndarray:
  array = np.asarray(value, np.float64)
  if (array.ndim > 1 or (array.ndim == 1 and len(array) not in (1, channels))
      or not np.all(np.isfinite(array)) or (positive and not np.all(array > 0))):
    what = "positive numbers" if positive else "finite numbers"
    raise ValueError(f"{name} must be a number or one per channel ({channels}), {what}, "
                     f"got {name}={value!r}.")
  return array.astype(np.float32)


def _check_pixel_range(pixel_range: Any) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in pixel_range)
  except (TypeError, ValueError):
    low = high = math.nan
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise ValueError(f"pixel_range must be a pair (low, high) of finite numbers with low < high, "
                     f"got pixel_range={pixel_range!r}.")
  return low, high


@functools.lru_cache(maxsize=32)
def _attack_fn(graphdef: Any, steps: int, random_start: bool, apply: Apply) -> Callable[..., Any]:
  """The compiled attack of one model structure (reused across calls and batches)."""

  def cross_entropy(state, pixels, labels, mean, std):
    logits = _logits(apply(nnx.merge(graphdef, state), (pixels - mean) / std))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

  @jax.jit
  def run(state, images, labels, epsilon, step_size, mean, std, low, high, key):
    clean = images * std + mean
    total_loss = lambda x: cross_entropy(state, x, labels, mean, std).sum()

    def step(_, x):
      x = x + step_size * jnp.sign(jax.grad(total_loss)(x))
      return jnp.clip(jnp.clip(x, clean - epsilon, clean + epsilon), low, high)

    x = clean
    if random_start:
      x = jnp.clip(clean + jax.random.uniform(key, clean.shape, clean.dtype, -epsilon, epsilon),
                   low, high)
    x = jax.lax.fori_loop(0, steps, step, x)
    adversarial = ((x - mean) / std).astype(images.dtype)
    results = []
    for inputs in (images, adversarial):
      logits = _logits(apply(nnx.merge(graphdef, state), inputs))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      results += [jnp.argmax(logits, -1) == labels, loss]
    return adversarial, *results

  return run


def _attack(model: nnx.Module, images: Any, labels: Any, *, epsilon: Any, steps: int,
            step_size: float, random_start: bool, seed: int, mean: Any, std: Any,
            pixel_range: Any, gradient: Any, apply: Apply | None, batch_size: Any
            ) -> AttackResult:
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got gradient={gradient!r}.")
  batch_size = positive_int(batch_size, "batch_size")
  if not is_int(seed):
    raise ValueError(f"seed must be an int, got seed={seed!r}.")
  low, high = _check_pixel_range(pixel_range)
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim < 2 or not len(images) or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be a non-empty float batch, got shape {images.shape} and "
                     f"dtype {images.dtype}.")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be {len(images)} integer labels, one per image, got shape "
                     f"{labels.shape} and dtype {labels.dtype}.")
  channels = images.shape[-1]
  mean = _check_channels(mean, "mean", channels, positive=False)
  std = _check_channels(std, "std", channels, positive=True)

  attacked = model if gradient == "surrogate" else with_grad_mode(model, "sign")
  copy = nnx.clone(attacked) if attacked is model else attacked
  copy.eval()
  graphdef, state = nnx.split(copy)
  run = _attack_fn(graphdef, steps, random_start, apply or _call)

  size = min(batch_size, len(images))
  key = jax.random.key(seed)
  outputs = []
  for index, start in enumerate(range(0, len(images), size)):
    batch, batch_labels = images[start:start + size], labels[start:start + size]
    n = len(batch)
    if n < size:  # Padded to the batch shape the attack was compiled for.
      batch = np.concatenate([batch, np.repeat(batch[:1], size - n, 0)])
      batch_labels = np.concatenate([batch_labels, np.repeat(batch_labels[:1], size - n)])
    out = run(state, jnp.asarray(batch), jnp.asarray(batch_labels, jnp.int32),
              jnp.float32(epsilon), jnp.float32(step_size), mean, std, jnp.float32(low),
              jnp.float32(high), jax.random.fold_in(key, index))
    outputs.append([np.asarray(o)[:n] for o in jax.device_get(out)])
  adversarial, clean_correct, clean_loss, correct, loss = (np.concatenate(o) for o in zip(*outputs))
  return AttackResult(adversarial=adversarial, accuracy=float(correct.mean()),
                      clean_accuracy=float(clean_correct.mean()), loss=float(loss.mean()),
                      clean_loss=float(clean_loss.mean()))


def fgsm(model: nnx.Module, images: Any, labels: Any, *, epsilon: float,
         mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
         pixel_range: tuple[float, float] = (0.0, 1.0), gradient: Gradient = "exact",
         apply: Apply | None = None, batch_size: int = 256) -> AttackResult:
  """The fast gradient sign method (Goodfellow et al., ICLR 2015) against ``model``.

  Each input moves by ``epsilon`` in the direction of the sign of the
  gradient of its softmax cross-entropy, on the pixel scale, and is clipped
  to ``pixel_range``.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from adderjax.analysis import fgsm
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> images = np.full((2, 2, 2, 1), 0.5, np.float32)  # pixels, already in [0, 1]
    >>> result = fgsm(model, images, np.array([0, 2]), epsilon=0.1)
    >>> bool(np.abs(result.adversarial - images).max() <= 0.1 + 1e-6)
    True

  Args:
    model: a Flax NNX module returning logits (or a tuple ending with them),
      such as any network of :mod:`adderjax.models`. It runs in evaluation
      mode, on a copy.
    images: a float batch, normalised as the model takes it:
      ``(pixel - mean) / std``.
    labels: the integer labels, one per image.
    epsilon: the largest change of a pixel (l-infinity), in the units of
      ``pixel_range``; 0 leaves the inputs as they are.
    mean: the mean the inputs were normalised with: a number, or one per
      channel (the last axis), in the units of ``pixel_range``.
    std: the std they were divided by, likewise.
    pixel_range: the valid ``(low, high)`` pixel values.
    gradient: ``"exact"`` (default: every adder layer's ``grad_mode``
      switched to ``"sign"``, the gradient of the forward pass away from
      kinks; see :func:`with_grad_mode`) or ``"surrogate"`` (the model's
      training gradient as it is).
    apply: how to run the model, ``apply(model, inputs)`` (default:
      ``model(inputs)``).
    batch_size: how many inputs to attack at once.

  Returns:
    An :class:`AttackResult`.

  Raises:
    ValueError: for an argument out of its range, naming it.
  """
  epsilon = _check_number(epsilon, "epsilon")
  return _attack(model, images, labels, epsilon=epsilon, steps=1, step_size=epsilon,
                 random_start=False, seed=0, mean=mean, std=std, pixel_range=pixel_range,
                 gradient=gradient, apply=apply, batch_size=batch_size)


def pgd(model: nnx.Module, images: Any, labels: Any, *, epsilon: float, steps: int = 7,
        step_size: float | None = None, random_start: bool = True, seed: int = 0,
        mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
        pixel_range: tuple[float, float] = (0.0, 1.0), gradient: Gradient = "exact",
        apply: Apply | None = None, batch_size: int = 256) -> AttackResult:
  """Projected gradient descent (Madry et al., ICLR 2018) against ``model``, l-infinity.

  From the inputs, or from a uniform random point of the ``epsilon``-ball
  around them (``random_start``), ``steps`` times: a step of ``step_size``
  along the sign of the gradient of the softmax cross-entropy, then the
  projection back onto the ball and ``pixel_range``. PGD-7 on CIFAR-10 is
  ``epsilon=8/255, steps=7, step_size=2/255``.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from adderjax.analysis import pgd
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> images = np.full((2, 2, 2, 1), 0.5, np.float32)
    >>> result = pgd(model, images, np.array([0, 2]), epsilon=0.1, steps=3)
    >>> result.loss >= result.clean_loss
    True

  Args:
    model: as in :func:`fgsm`.
    images: as in :func:`fgsm`.
    labels: as in :func:`fgsm`.
    epsilon: the radius of the l-infinity ball, in the units of
      ``pixel_range``.
    steps: the number of steps.
    step_size: the size of a step, in the units of ``pixel_range``
      (default: ``2.5 * epsilon / steps``, Madry et al.'s ratio).
    random_start: whether to start from a uniform random point of the ball.
    seed: the seed of the random start.
    mean: as in :func:`fgsm`.
    std: as in :func:`fgsm`.
    pixel_range: as in :func:`fgsm`.
    gradient: ``"exact"`` (default) or ``"surrogate"``, as in :func:`fgsm`.
    apply: as in :func:`fgsm`.
    batch_size: how many inputs to attack at once.

  Returns:
    An :class:`AttackResult`.

  Raises:
    ValueError: for an argument out of its range, naming it.
  """
  epsilon = _check_number(epsilon, "epsilon")
  steps = positive_int(steps, "steps")
  step_size = (2.5 * epsilon / steps if step_size is None
               else _check_number(step_size, "step_size", positive=True))
  if not isinstance(random_start, bool):
    raise ValueError(f"random_start must be a bool, got random_start={random_start!r}.")
  return _attack(model, images, labels, epsilon=epsilon, steps=steps, step_size=step_size,
                 random_start=random_start, seed=seed, mean=mean, std=std,
                 pixel_range=pixel_range, gradient=gradient, apply=apply, batch_size=batch_size)
