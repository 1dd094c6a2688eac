"""Post-training quantization of AdderNets to integer arithmetic.

`quantize` replaces each adder layer of a trained model by an integer layer
(:class:`QuantizedAdderConv`, :class:`QuantizedAdderDense`) that sums
``|a_q - 2 w_q|`` in int32, with Nie et al.'s grouped scales and lossless
weight clamp (NeurIPS 2022) or the single shared scale of QSSF, and
re-estimates the BatchNorm statistics. `lower` turns the quantized model into
an integer-only `IntegerProgram` (the source of `adderjax.export.save_c`).

Example:
  >>> import jax.numpy as jnp
  >>> from adderjax import quant
  >>> x, w, s = jnp.array([0.0, 0.5, 1.0]), jnp.array([-1.0, 0.25, 1.0]), 1.0
  >>> a_q, w_q = quant.quantize_activations(x, s, 4), quant.quantize_weights(w, s, 4)
  >>> a_q.tolist(), w_q.tolist()
  ([0, 8, 15], [-8, 2, 7])
  >>> # |a_hat - w_hat| = step * |a_q - 2 w_q|, with step = s / (2^4 - 1) = 1/15
  >>> jnp.abs(a_q - 2 * w_q).tolist(), round(float(quant.activation_step(s, 4)) * 15, 6)
  ([16, 4, 1], 1.0)
"""

from adderjax.quant.calibration import DEFAULT_PERCENTILE, RANGE_FLOOR, InputRange
from adderjax.quant.grouping import kmeans_1d
from adderjax.quant.integer_program import IntegerProgram, lower
from adderjax.quant.layers import QuantizedAdderConv, QuantizedAdderDense, QuantizedConstant
from adderjax.quant.ptq import (
    METHODS,
    LayerReport,
    Method,
    QuantizationReport,
    Quantized,
    quantize,
)
from adderjax.quant.quantizers import (
    MAX_BITS,
    MIN_BITS,
    activation_step,
    clamp_weights,
    input_multiplier,
    quantize_activations,
    quantize_weights,
)

__all__ = [
    "DEFAULT_PERCENTILE",
    "MAX_BITS",
    "METHODS",
    "MIN_BITS",
    "RANGE_FLOOR",
    "InputRange",
    "IntegerProgram",
    "LayerReport",
    "Method",
    "QuantizationReport",
    "Quantized",
    "QuantizedAdderConv",
    "QuantizedAdderDense",
    "QuantizedConstant",
    "activation_step",
    "clamp_weights",
    "input_multiplier",
    "kmeans_1d",
    "lower",
    "quantize",
    "quantize_activations",
    "quantize_weights",
]
