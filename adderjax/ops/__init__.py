"""Adder operations: `adder_conv` and `adder_dense`, with the paper's gradients.

`sign_ste`, the binarisation of the BNN baseline, lives here too.
`PallasAdderConv` holds the GPU kernels' options (`adderjax.ops.pallas_gpu`);
an instance is also a value of ``implementation=``.
"""

from adderjax.ops.binary import sign_ste
from adderjax.ops.dispatch import (
    IMPLEMENTATIONS,
    ImplementationLike,
    ImplementationName,
    adder_conv,
    adder_dense,
)
from adderjax.ops.pallas_gpu import PallasAdderConv
from adderjax.ops.spec import GRAD_MODES, ConvSpec, GradMode

__all__ = ["GRAD_MODES", "IMPLEMENTATIONS", "ConvSpec", "GradMode", "ImplementationLike",
           "ImplementationName", "PallasAdderConv", "adder_conv", "adder_dense", "sign_ste"]
