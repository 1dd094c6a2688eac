"""Post-training quantization of an AdderNet's adder layers to integers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
import dataclasses
from typing import Any, Literal, NamedTuple, get_args

from flax import nnx
import jax.numpy as jnp
import numpy as np

from adderjax._checks import positive_int
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats, shift_batch_norm_stats
from adderjax.nn import AdderConv, AdderDense
from adderjax.quant.calibration import (
    DEFAULT_PERCENTILE,
    RANGE_FLOOR,
    adder_layers,
    observe_inputs,
    replace_module,
)
from adderjax.quant.grouping import kmeans_1d
from adderjax.quant.layers import QuantizedAdderConv, QuantizedAdderDense
from adderjax.quant.quantizers import check_bits, clamp_weights, quantize_weights

__all__ = ["METHODS", "LayerReport", "Method", "QuantizationReport", "Quantized", "quantize"]

Method = Literal["nie2022", "shared_scale"]
METHODS = get_args(Method)
"""``"nie2022"``: Nie et al., NeurIPS 2022 (grouped scales, lossless clamp);
``"shared_scale"``: QSSF, one scale per layer for weights and activations."""


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """How one adder layer was quantized.

  Attributes:
    path: where the layer is in the model, e.g. ``"layer1/0/conv1"``.
    connectivity: ``"conv"`` (an `AdderConv`) or ``"dense"`` (an `AdderDense`).
    input_range: the calibrated range of ``|x|``.
    signed_inputs: whether inputs were negative in calibration (signed quantizer).
    scales: each scale group's scale ``s_g``.
    group_sizes: the number of output channels in each scale group.
    weight_clipped_fraction: the fraction of weights clipped (exactly
      compensated by ``b_c`` for inputs within the scale).
    activation_clipped_fraction: the fraction of the layer's inputs, in the
      quantized model on the calibration batches, above their group's scale
      (averaged over the scale groups by their number of channels).
  """

  path: str
  connectivity: str
  input_range: float
  signed_inputs: bool
  scales: tuple[float, ...]
  group_sizes: tuple[int, ...]
  weight_clipped_fraction: float
  activation_clipped_fraction: float

  @property
  def scale_groups(self) -> int:
    """The number of scale groups of the layer's output channels."""
    return len(self.scales)


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
  """The settings of a quantization and a `LayerReport` per adder layer."""

  method: str
  bits: int
  layers: tuple[LayerReport, ...]

  def format(self) -> str:
    """A plain-text table, one line per layer."""
    lines = [f"{self.method}, {self.bits} bits",
             f"{'layer':<22} {'conn':<5} {'range':>8} {'sign':>4} {'scale groups':>12} "
             f"{'scales':<32} {'w clip':>7} {'a clip':>7}"]
    for r in self.layers:
      scales = ", ".join(f"{s:.3g}" for s in r.scales)
      lines.append(f"{r.path:<22} {r.connectivity:<5} {r.input_range:>8.3g} "
                   f"{'+-' if r.signed_inputs else '+':>4} {r.scale_groups:>12} {scales:<32} "
                   f"{r.weight_clipped_fraction:>7.2%} {r.activation_clipped_fraction:>7.2%}")
    return "\n".join(lines)


class Quantized(NamedTuple):
  """What `quantize` returns: the integer model and its report."""

  model: nnx.Module
  report: QuantizationReport


def _check_method(method: Any) -> Method:
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got method={method!r}.")
  return method


def _group_scales(max_abs: np.ndarray, input_range: float, scale_groups: int,
                  method: Method) -> tuple[np.ndarray, np.ndarray]:
  """``(channel_group, scales)`` of one layer from each output channel's ``max |w|``."""
  if method == "shared_scale":
    labels = np.zeros(max_abs.shape, np.int64)
    return labels, np.array([max(float(max_abs.max()), RANGE_FLOOR)])
  labels, _ = kmeans_1d(max_abs, scale_groups)
  group_max = np.array([max_abs[labels == g].max() for g in range(labels.max() + 1)])
  # A group whose weights reach beyond the inputs' range takes that range, and
  # the clamp of its weights is compensated exactly.
  return labels, np.maximum(np.minimum(group_max, input_range), RANGE_FLOOR)


def _path_name(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def _model_inputs(batch: Any, index: int) -> Any:
  """A calibration batch as the model takes it: an `adderjax.data` batch's (unpadded) images."""
  if not isinstance(batch, Mapping):
    return batch
  if "image" not in batch:
    raise ValueError(f"calibration_batches[{index}] is a mapping with keys {sorted(batch)}; "
                     "pass the model's inputs (arrays), batches of adderjax.data (with an "
                     "'image'), or apply=.")
  images = batch["image"]
  if "mask" in batch:  # Evaluation batches: the padding examples of the last batch are dropped.
    images = images[np.asarray(batch["mask"]).astype(bool)]
  return images


def quantize(
    model: nnx.Module,
    calibration_batches: Iterable[Any],
    *,
    bits: int = 8,
    scale_groups: int = 4,
    method: Method = "nie2022",
    percentile: float = DEFAULT_PERCENTILE,
    keep_float: Collection[str] = (),
    recompute_batch_norm: bool | Literal["shift"] = "shift",
    apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> Quantized:
  """Quantizes every adder layer of a trained model to integer arithmetic.

  ``method="nie2022"`` (Nie et al., "Redistribution of Weights and
  Activations for AdderNet Quantization", NeurIPS 2022), for each
  :class:`adderjax.nn.AdderConv` and :class:`adderjax.nn.AdderDense`:

  1. the range of its inputs: per calibration batch (model in eval mode) the
     ``percentile`` of ``|x|``, the running max over batches, floored at 1e-3;
  2. its output channels grouped into ``scale_groups`` groups by their
     ``max |w|`` (`kmeans_1d`), one scale ``s_g`` per group for its weights and the
     inputs it sees: the group's ``max |w|``, or the input range where that
     is smaller, the weights then clipped to ``[-s_g, s_g]`` and the exact
     correction ``b_c = -sum max(|w| - s_g, 0)`` added to each output channel;
  3. weights and inputs quantized (`quantize_weights`,
     `quantize_activations`), the layer replaced by a
     :class:`QuantizedAdderConv` / :class:`QuantizedAdderDense` that sums
     ``|a_q - 2 w_q|`` in int32 and scales the sum once per group;
  4. the BatchNorm statistics moved by what quantization changes in their
     inputs on the calibration batches (`shift_batch_norm_stats`: the
     quantized model's mean minus the float model's, its variance over the
     float model's, both on the same images, so the trained statistics stay
     exactly where quantization changes nothing).

  ``method="shared_scale"`` is the QSSF baseline: one scale per layer, the
  layer's ``max |w|``, for weights and inputs (inputs above it clip), no
  scale groups and no clamp.

  Inputs that can be negative: the method assumes inputs in ``[0, s_g]``
  (after a ReLU). A layer whose calibration inputs include a negative value
  (LeNet-5-BN's first layer sees the normalized image) gets the signed
  quantizer instead, with the weights' step on ``[-s_g, s_g]``, and the
  integer sum ``|a_q - w_q|``; the clamp stays exact. Its `LayerReport` says
  ``signed_inputs=True``. Every other layer (the adder layers of all the
  ResNets and VGG-small follow a ReLU) uses the unsigned quantizer.

  Other layers (the multiplicative stem and classifier of the ResNets and
  VGG-small, BatchNorm), and the adder layers named in ``keep_float``, stay
  in floating point (the released code of Nie et al. keeps the stem and the
  classifier in float; LeNet-5-BN's are adder layers: ``keep_float=("conv1",
  "fc3")`` does the same). The model passed in is not changed.

  Args:
    model: a trained model with adder layers.
    calibration_batches: model inputs (e.g. a few training batches with the
      evaluation preprocessing), or batches of `adderjax.data` (dicts with
      ``"image"``, whose images are taken, without the padding a ``"mask"``
      marks); iterated up to three times (calibration, BatchNorm statistics,
      the clipping report).
    bits: the bits of weights and activations, 2 to 16.
    scale_groups: the number of scale groups per layer (``"nie2022"``).
    method: ``"nie2022"`` or ``"shared_scale"``.
    percentile: the percentile of ``|x|`` taken per calibration batch.
    keep_float: the paths of adder layers to leave in floating point, as
      the report writes them (``"conv1"``, ``"layer1/0/conv2"``).
    recompute_batch_norm: how the BatchNorm statistics follow the
      quantization: ``"shift"`` (default, step 4), ``True`` to recompute them
      outright on the calibration batches (`recompute_batch_norm_stats`:
      noisier, a few batches against the running averages of training; on
      LeNet-5-BN at 16 bits it costs what it costs the float model), ``False``
      to keep the trained ones (at 4 bits LeNet-5-BN then loses 10 points).
    apply: ``apply(model, batch)`` runs the model on each batch as given;
      defaults to ``model(images)``.

  Returns:
    `Quantized` ``(model, report)``: the quantized model, in eval mode, and a
    `QuantizationReport` with one `LayerReport` per adder layer.

  Raises:
    ValueError: for ``bits`` outside 2..16, a bad ``scale_groups``, ``method``,
      ``percentile`` or ``recompute_batch_norm``, no calibration batch, a
      mapping batch without ``"image"`` (and no ``apply``), a model without
      adder layers, a ``keep_float`` path that is not an adder layer, or a
      layer whose int32 sum could overflow.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax import nn, quant
    >>> model = nnx.Sequential(nn.AdderDense(4, 3, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nn.AdderDense(3, 2, rngs=nnx.Rngs(1)))
    >>> batches = [jnp.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4)]
    >>> qmodel, report = quant.quantize(model, batches, bits=8, scale_groups=2)
    >>> [(r.path, r.signed_inputs, r.scale_groups) for r in report.layers]
    [('layers/0', True, 2), ('layers/2', False, 2)]
    >>> type(qmodel.layers[0]).__name__, qmodel(batches[0]).shape
    ('QuantizedAdderDense', (8, 2))
  """
  bits = check_bits(bits)
  scale_groups = positive_int(scale_groups, "scale_groups")
  if not isinstance(recompute_batch_norm, bool) and recompute_batch_norm != "shift":
    raise ValueError(f"recompute_batch_norm must be 'shift', True or False, got "
                     f"recompute_batch_norm={recompute_batch_norm!r}.")
  method = _check_method(method)
  if not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
    raise ValueError(f"percentile must be a number in (0, 100], got percentile={percentile!r}.")
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty: at least one batch is needed.")
  if apply is None:
    batches = [_model_inputs(batch, i) for i, batch in enumerate(batches)]
  quantized = nnx.clone(model)
  found = adder_layers(quantized, (AdderConv, AdderDense))
  if not found:
    raise ValueError(f"model ({type(model).__name__}) has no adder layer (adderjax.nn.AdderConv "
                     "or AdderDense) to quantize.")
  keep = {keep_float} if isinstance(keep_float, str) else set(keep_float)
  unknown = keep - {_path_name(path) for path, _ in found}
  if unknown:
    raise ValueError(f"keep_float names {sorted(unknown)}, which are not adder layers of the "
                     f"model; its adder layers are {[_path_name(p) for p, _ in found]}.")
  found = [(path, layer) for path, layer in found if _path_name(path) not in keep]
  if not found:
    raise ValueError(f"keep_float={sorted(keep)} leaves no adder layer to quantize.")
  for path, layer in found:
    # The integer layers sum |a - w|: an lp layer (p != 1) would be quantized as another model.
    if layer.p is not None and float(layer.p[...]) != 1.0:
      raise ValueError(f"layer {_path_name(path)} has p={float(layer.p[...])}: only L1 adder "
                       "layers (p=1) can be quantized; keep it in float with keep_float.")
  paths = [path for path, _ in found]
  ranges, _ = observe_inputs(quantized, paths, batches, percentile=percentile, apply=apply)

  partial = []
  for (path, layer), input_range in zip(found, ranges):
    w = np.asarray(layer.kernel[...], np.float64)
    fan_in = int(np.prod(w.shape[:-1]))
    if fan_in * (2 ** (bits + 1)) >= 2 ** 31:
      raise ValueError(f"layer {_path_name(path)} sums {fan_in} terms of up to 2^{bits + 1}: "
                       f"bits={bits} could overflow int32.")
    max_abs = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    labels, scales = _group_scales(max_abs, input_range.range, scale_groups, method)
    channel_scale = scales[labels]
    clipped, correction = clamp_weights(jnp.asarray(w), jnp.asarray(channel_scale))
    codes = np.asarray(quantize_weights(clipped, jnp.asarray(channel_scale), bits))
    layer_class = QuantizedAdderConv if isinstance(layer, AdderConv) else QuantizedAdderDense
    replace_module(quantized, path, layer_class(
        layer, codes, labels, scales, np.asarray(correction), bits=bits,
        signed_inputs=input_range.signed))
    partial.append(dict(
        path=_path_name(path), connectivity="conv" if isinstance(layer, AdderConv) else "dense",
        input_range=input_range.range, signed_inputs=input_range.signed,
        scales=tuple(float(s) for s in scales),
        group_sizes=tuple(int(np.sum(labels == g)) for g in range(len(scales))),
        weight_clipped_fraction=float(np.mean(np.abs(w) > channel_scale))))

  if recompute_batch_norm is not False and any(isinstance(m, nnx.BatchNorm)
                                               for _, m in nnx.iter_modules(quantized)):
    if recompute_batch_norm == "shift":
      shift_batch_norm_stats(quantized, model, batches, apply=apply)
    else:
      recompute_batch_norm_stats(quantized, batches, apply=apply)
  _, clipped = observe_inputs(quantized, paths, batches, percentile=percentile,
                              thresholds=[jnp.asarray(p["scales"]) for p in partial], apply=apply)
  quantized.eval()
  layers = tuple(
      LayerReport(**p, activation_clipped_fraction=float(
          np.dot(np.asarray(c), p["group_sizes"]) / sum(p["group_sizes"])))
      for p, c in zip(partial, clipped))
  return Quantized(quantized, QuantizationReport(method=method, bits=bits, layers=layers))
