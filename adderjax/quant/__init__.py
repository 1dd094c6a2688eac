"""Post-training quantization of AdderNets to integer arithmetic.

`quantize` replaces each adder layer of a trained model by an integer layer
(:class:`QuantizedAdderConv`, :class:`QuantizedAdderDense`) that sums
``|a_q - 2 w_q|`` in int32, with Nie et al.'s grouped scales and lossless
weight clamp (NeurIPS 2022) or the single shared scale of QSSF, and
re-estimates the BatchNorm statistics.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from adderjax import models, quant
  >>> model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  >>> qmodel, report = quant.quantize(model, [jnp.ones((2, 28, 28, 1))], bits=6)
  >>> [r.path for r in report.layers]
  ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
"""

from adderjax.quant.calibration import DEFAULT_PERCENTILE, RANGE_FLOOR, InputRange
from adderjax.quant.grouping import kmeans_1d
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
    "quantize",
    "quantize_activations",
    "quantize_weights",
]
