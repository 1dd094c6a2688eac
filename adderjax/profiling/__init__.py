"""Operation counts, energy and latency of Flax NNX models, as the AdderNet paper reports them.

:func:`count_ops` traces a model abstractly and counts, per example, the
multiplications, additions and XNORs of its convolution and fully connected
layers (``nnx.Conv``/``nnx.Linear``: one multiplication and one addition per
multiply-accumulate; ``AdderConv``/``AdderDense``: two additions;
``BinaryConv``/``BinaryDense``: one XNOR and one addition), with a row per
layer call; the projections and the attention of ``nnx.MultiHeadAttention``
too (the query-key scores as additions for
:func:`adderjax.nn.adder_attention`, as products otherwise). :func:`estimate_energy` prices
them with the 45 nm figures of
Horowitz (ISSCC 2014), :func:`estimate_latency` with the paper's VIA Nano 2000
cycles. ``python -m adderjax.profiling MODEL [--compare]`` prints both for the
models of :mod:`adderjax.models`.

Example:
  >>> from flax import nnx
  >>> import jax, jax.numpy as jnp
  >>> from adderjax import models
  >>> from adderjax.profiling import count_ops, estimate_latency, human
  >>> model = nnx.eval_shape(lambda: models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0)))
  >>> counts = count_ops(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  >>> human(counts.multiplications), human(estimate_latency(counts).total)
  ('416.52K', '2.50M')

Our counts against the paper's
------------------------------

Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
Learning?", CVPR 2020, Tables 1, 3 and 4, per image. "CNN" is the
multiplications (= additions) of the CNN; "AdderNet" the additions of the
AdderNet, which the paper counts as twice the CNN's MACs, every layer an
adder layer, with no multiplication. Our models (:mod:`adderjax.models`) keep
the stem and the classifier multiplicative in the AdderNet and BNN kinds, as
the official code does, so their AdderNet figure is ``additions +
multiplications`` (2 operations per MAC either way), and their
multiplications are those two layers (0 for LeNet-5-BN, all adder):

=============  ========  ==========  =========  =========  ======================
model          paper     ours        paper      ours       ours: AdderNet muls
               CNN       CNN         AdderNet   AdderNet   (stem + classifier)
=============  ========  ==========  =========  =========  ======================
LeNet-5-BN     435K      416,520     870K       833,040    0
VGG-small      0.65G     607.60M     1.30G      1.2152G    3.62M (0.6%)
ResNet-20      41.17M    40,813,184  82.34M     81.63M     443,008 (1.1%)
ResNet-32      69.12M    69,124,736  138.24M    138.25M    443,008 (0.6%)
ResNet-18      1.8G      1.8141G     3.6G       3.6281G    118.53M (6.5%)
ResNet-50      3.9G      4.0892G     7.7G       8.1784G    120.06M (2.9%)
=============  ========  ==========  =========  =========  ======================

Where and why they differ, worked out by hand (MACs = output pixels x kernel
size x filters):

- LeNet-5-BN, -4.2%. The paper gives no layer sizes. Ours is LeNet-5 on
  28x28 MNIST with the first convolution padded to keep 28x28 (as LeNet-5 on
  the 32x32 padded digits): conv1 28*28*25*6 = 117,600; conv2 on 14x14, no
  padding, 10*10*150*16 = 240,000; fc 400*120 = 48,000, 120*84 = 10,080,
  84*10 = 840; in all 416,520. No variant we tried gives 435K (the bias adds
  bring it to 423,038 only). The latency follows: 416,520 * (4 + 2) =
  2.50M cycles for the CNN and 833,040 * 2 = 1.67M for the AdderNet, against
  the paper's 2.6M and 1.7M, the same ratio of 1.5.
- VGG-small, -6.5%. The LQ-Nets VGG-small the paper cites: six 3x3
  convolutions (128, 128, 256, 256, 512, 512) with a 2x2 max pool after
  every second, and one fc layer: 32*32*(27 + 1152)*128 = 154.53M,
  16*16*(1152 + 2304)*256 = 226.49M, 8*8*(2304 + 4608)*512 = 226.49M,
  8192*10 = 81,920; 607,600,640 in all, 0.61G. The paper's 0.65G is
  not reached by BinaryNet's variant with two 1024-wide fc layers either
  (617M); the paper does not say how it counted.
- ResNet-20, -0.9%. Ours has 1x1 projection shortcuts, as the official code:
  stem 442,368; 18 3x3 convolutions, 16 of 2,359,296 and 2 (the strided
  ones) of 1,179,648; shortcuts 2 * 131,072; fc 640; 40,813,184. He et al.'s
  parameter-free shortcuts would give 40,551,040. The paper's own ResNet-32
  figure, which ours matches exactly, implies ours: ResNet-32 is ResNet-20
  plus twelve 3x3 convolutions of 2,359,296 MACs, 28.31M, and 69.12M -
  28.31M = 40.81M, not 41.17M.
- ResNet-32: equal (69,124,736).
- ResNet-18, +0.8%: stem 7*7*3*64 at 112x112 = 118.01M, 16 3x3
  convolutions, 3 projections of 6.42M, fc 512,000; 1,814,073,344, which the
  paper rounds to 1.8G.
- ResNet-50, +4.9%: ours, like the official AdderNet ``resnet50.py`` and
  torchvision, puts a bottleneck's stride on its 3x3 convolution (ResNet
  v1.5): 4,089,184,256. The paper's 3.9G and 7.7G are ResNet v1's, with the
  stride on the first 1x1 convolution, which then runs on a quarter of the
  pixels in the first block of stages 2, 3 and 4: 3 * (3/4) * 102,760,448 =
  231,211,008 fewer, 3,857,973,248 (3.86G, 2x = 7.72G).
- Multiplications of the AdderNets and BNNs: the paper's tables list none;
  ours count the stem and the classifier, which stay full precision in the
  official code and in ours (the BatchNorms' multiplications are left out
  by both). Likewise our BNN XNORs are the CNN's MACs less those two layers.

Parameters count every :class:`flax.nnx.Param`, BatchNorm scales and biases
included: ResNet-20 272,484 (0.27M: the 269,722 of He et al.'s, with
parameter-free shortcuts and an fc bias, plus 2,752 for the two projections
and their BatchNorms, plus 10 for a BatchNorm on the logits in place of the
fc bias), ResNet-18 11,691,512 (11.7M) and ResNet-50 25,559,032
(25.6M): torchvision's plus the 2,000 of the BatchNorm on the logits that the
official code adds.
"""

from adderjax.profiling.cli import main, profile
from adderjax.profiling.costs import (
                                      CYCLE_TABLES,
                                      ENERGY_TABLES,
                                      Cost,
                                      EnergyTable,
                                      estimate_energy,
                                      estimate_latency,
)
from adderjax.profiling.counting import COUNTED_LAYERS, OPS, LayerCount, OpCounts, count_ops
from adderjax.profiling.report import (
                                      format_comparison,
                                      format_cost,
                                      format_layers,
                                      format_totals,
                                      human,
)

__all__ = [
    "COUNTED_LAYERS",
    "CYCLE_TABLES",
    "Cost",
    "ENERGY_TABLES",
    "EnergyTable",
    "LayerCount",
    "OpCounts",
    "OPS",
    "count_ops",
    "estimate_energy",
    "estimate_latency",
    "format_comparison",
    "format_cost",
    "format_layers",
    "format_totals",
    "human",
    "main",
    "profile",
]
