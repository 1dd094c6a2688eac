"""count_ops on adderjax.models against hand counts and the AdderNet paper's figures.

The paper (Chen et al., CVPR 2020, Tables 1, 3, 4) counts per image the
multiplications of the CNN and the additions of the AdderNet (twice the
CNN's MACs: every layer an adder layer). Our AdderNets and BNNs keep the
stem and the classifier multiplicative (as the official code), so their
figure to compare is additions + multiplications, resp. XNOR +
multiplications. The tolerance of each model is its documented gap
(adderjax.profiling's docstring works each out by hand), rounded up.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from adderjax import models
from adderjax.profiling import count_ops, estimate_energy, estimate_latency

# name: (paper CNN multiplications, paper AdderNet additions, relative tolerance)
PAPER = {
    "lenet5_bn": (435e3, 870e3, 0.045),   # LeNet-5 at 28x28: 416,520 (-4.2%)
    "vgg_small": (0.65e9, 1.30e9, 0.07),  # LQ-Nets VGG-small: 607.6M (-6.5%)
    "resnet20": (41.17e6, 82.34e6, 0.01),  # the paper's ResNet-32 implies 40.81M (-0.9%)
    "resnet32": (69.12e6, 138.24e6, 0.001),  # equal
    "resnet18": (1.8e9, 3.6e9, 0.01),     # 1.814G, rounded to 1.8G (+0.8%)
    "resnet50": (3.9e9, 7.7e9, 0.065),    # ResNet v1.5 against v1: +4.9%, +6.2%
}

# The CNN's MACs per image, worked out by hand in adderjax.profiling.
MACS = {
    "lenet5_bn": 117_600 + 240_000 + 48_000 + 10_080 + 840,
    "lenet_pp": 627_200 + 2 * 20_070_400 + 10_035_200 + 20_070_400 + 10_035_200 + 2_304 + 20,
    "vgg_small": 1024 * (27 + 1152) * 128 + 256 * (1152 + 2304) * 256
                 + 64 * (2304 + 4608) * 512 + 8192 * 10,
    "resnet20": 442_368 + 16 * 2_359_296 + 2 * 1_179_648 + 2 * 131_072 + 640,
    "resnet32": 442_368 + 28 * 2_359_296 + 2 * 1_179_648 + 2 * 131_072 + 640,
    "resnet18": 1_814_073_344,
    "resnet50": 4_089_184_256,
}

# The MACs of the layers that stay multiplicative in the AdderNet, resp. the BNN.
FULL_PRECISION = {
    "lenet5_bn": (0, 117_600 + 840),
    "lenet_pp": (0, 627_200 + 20),
    "vgg_small": (3_538_944 + 81_920,) * 2,
    "resnet20": (442_368 + 640,) * 2,
    "resnet32": (442_368 + 640,) * 2,
    "resnet18": (118_013_952 + 512_000,) * 2,
    "resnet50": (118_013_952 + 2_048_000,) * 2,
}


@functools.cache
def _counts(name, kind):
  model = nnx.eval_shape(lambda: models.get(name, kind=kind, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
  return count_ops(model, x)


@pytest.mark.parametrize("name", list(MACS))
def test_cnn(name):
  counts = _counts(name, "conv")
  assert counts.multiplications == counts.additions == counts.macs == MACS[name]
  assert counts.xnor == 0
  if name in PAPER:
    paper, _, tolerance = PAPER[name]
    assert counts.multiplications == pytest.approx(paper, rel=tolerance)


@pytest.mark.parametrize("name", list(MACS))
def test_addernet(name):
  counts = _counts(name, "adder")
  full_precision = FULL_PRECISION[name][0]
  assert counts.macs == MACS[name]
  assert counts.multiplications == full_precision
  assert counts.additions == 2 * MACS[name] - full_precision
  assert counts.xnor == 0
  # "Almost no multiplication": the stem and the classifier only.
  assert counts.multiplications < 0.07 * MACS[name]
  if name in PAPER:
    _, paper, tolerance = PAPER[name]
    assert counts.additions + counts.multiplications == pytest.approx(paper, rel=tolerance)


@pytest.mark.parametrize("name", list(MACS))
def test_bnn(name):
  counts = _counts(name, "binary")
  full_precision = FULL_PRECISION[name][1]
  assert counts.macs == counts.additions == MACS[name]
  assert counts.multiplications == full_precision
  assert counts.xnor == MACS[name] - full_precision
  if name in PAPER:
    paper, _, tolerance = PAPER[name]
    assert counts.xnor + counts.multiplications == pytest.approx(paper, rel=tolerance)


def test_resnet50_v1_gives_the_papers_figures():
  # With the stride on the first 1x1 convolution (v1), the first block of stages 2-4 runs it on
  # a quarter of the pixels.
  counts = _counts("resnet50", "conv")
  first = {r.path: r.macs for r in counts.layers
           if r.path in ("layer2/0/conv1", "layer3/0/conv1", "layer4/0/conv1")}
  assert list(first.values()) == [102_760_448] * 3
  v1 = counts.macs - sum(first.values()) * 3 // 4
  assert v1 == 3_857_973_248
  assert round(v1 / 1e8) / 10 == 3.9 and round(2 * v1 / 1e8) / 10 == 7.7


@pytest.mark.parametrize("name, params, paper", [
    ("resnet20", 272_484, 0.27e6), ("resnet18", 11_691_512, 11.7e6),
    ("resnet50", 25_559_032, 25.6e6),
])
def test_params(name, params, paper):
  for kind in ("conv", "adder", "binary"):
    assert _counts(name, kind).params == params
  assert params == pytest.approx(paper, rel=0.01)


def test_layers_of_resnet20():
  rows = _counts("resnet20", "adder").layers
  assert [r.path for r in rows[:3]] == ["conv1", "layer1/0/conv1", "layer1/0/conv2"]
  assert [r.op for r in rows].count("adder") == 20
  assert (rows[0].op, rows[-1].op, rows[-1].path) == ("mac", "mac", "fc")
  shortcut = next(r for r in rows if r.path == "layer2/0/downsample/conv")
  assert (shortcut.output_shape, shortcut.macs) == ((1, 16, 16, 32), 131_072)


def test_lenet_pp_returns_a_tuple():
  model = nnx.eval_shape(lambda: models.get("lenet_pp", kind="conv", rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  embedding, logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                     jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32))
  assert (embedding.shape, logits.shape) == ((2, 2), (2, 10))
  assert _counts("lenet_pp", "conv").layers[-1].path == "classifier"


def test_lenet5_latency_and_energy():
  cnn, adder = _counts("lenet5_bn", "conv"), _counts("lenet5_bn", "adder")
  # The paper: 2.6M cycles against 1.7M (435K MACs); ours 416,520 MACs.
  assert estimate_latency(cnn).total == 416_520 * (4 + 2) == 2_499_120
  assert estimate_latency(adder).total == 833_040 * 2 == 1_666_080
  assert estimate_latency(cnn).total / estimate_latency(adder).total == pytest.approx(2.6 / 1.7,
                                                                                    rel=0.02)
  assert estimate_energy(cnn).total == pytest.approx(416_520 * (3.7 + 0.9))
  assert estimate_energy(adder).total == pytest.approx(833_040 * 0.9)


def test_resnet56():
  # Not in the paper: four blocks per stage more than ResNet-32, 24 3x3 convs of 2,359,296.
  assert _counts("resnet56", "conv").macs == 69_124_736 + 24 * 2_359_296 == 125_747_840
