"""Adder operations: `adder_conv` and `adder_dense`, with the paper's gradients."""

from adderjax.ops.adder_conv import IMPLEMENTATIONS, adder_conv, adder_dense
from adderjax.ops.spec import GRAD_MODES, ConvSpec

__all__ = ["GRAD_MODES", "IMPLEMENTATIONS", "ConvSpec", "adder_conv", "adder_dense"]
