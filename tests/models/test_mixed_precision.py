"""Half-precision compute keeps a trained AdderNet's predictions.

A trained adder layer's output is a per-channel offset near -sum|w| (the
official ResNet-20: down to -3,221) plus a signal a few units wide: rounding
the kernels, the adder outputs or BatchNorm's statistics to bfloat16 destroys
the model (8-17% agreement with float32 before the layers kept them). The
official CIFAR-10 ResNet-20 must agree with its float32 self.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import models, quant
from adderjax.models import PRETRAINED, pretrained
from adderjax.nn import AdderKernel

RECORD = PRETRAINED["resnet20_cifar10"]


def cifar_like_images(n, seed):
  """Smooth random colour images in [0, 1] with pixel noise, normalised for the model."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, (n, 4, 4, 3))
  smooth = np.asarray(jax.image.resize(jnp.asarray(coarse), (n, 32, 32, 3), "cubic"))
  images = np.clip(smooth + rng.normal(0, 0.08, smooth.shape), 0, 1)
  return np.asarray(RECORD.normalize(images.astype(np.float32)), np.float32)


def logits(model, images, dtype=jnp.float32):
  forward = nnx.jit(lambda model, x: model(x))
  return np.asarray(forward(model, jnp.asarray(images, dtype)).astype(jnp.float32), np.float64)


@pytest.fixture(scope="module")
def images():
  return cifar_like_images(256, seed=1)


@pytest.fixture(scope="module")
def float32_logits(images):
  return logits(pretrained("resnet20_cifar10"), images)


def agreement_and_error(got, want):
  agreement = float(np.mean(got.argmax(1) == want.argmax(1)))
  return agreement, float(np.linalg.norm(got - want) / np.linalg.norm(want))


# The XLA loops and the other implementations return float32 alike (tests/ops); the native
# kernels are the default here.
@pytest.mark.parametrize("dtype, implementation", [(jnp.bfloat16, None), (jnp.float16, None)])
def test_half_precision_keeps_the_official_resnet20(images, float32_logits, dtype,
                                                    implementation):
  model = pretrained("resnet20_cifar10", dtype=dtype, implementation=implementation)
  got = logits(model, images, dtype)
  agreement, error = agreement_and_error(got, float32_logits)
  # Measured: bfloat16 99.2-99.6% and 1.1%; float16 99.8-100% and 0.14%.
  assert agreement >= 0.97, agreement
  assert error <= (0.03 if dtype == jnp.bfloat16 else 0.005), error
  # The predictions are not one class: the agreement says something.
  assert len(np.unique(float32_logits.argmax(1))) >= 4


def test_quantized_bfloat16_model_keeps_large_offsets():
  # LeNet-5-BN with kernels ten times the N(0, 1) init: offsets near -1,000 to
  # -6,000 with spreads of a few units, as in a trained network (quantizing
  # the official ResNet-20 takes a minute: benchmarks/mixed_precision.py).
  images = np.asarray(np.random.default_rng(0).normal(size=(192, 28, 28, 1)), np.float32)

  def quantized(dtype):
    model = models.get("lenet5_bn", rngs=nnx.Rngs(0), dtype=dtype)
    for _, kernel in nnx.iter_graph(model):
      if isinstance(kernel, AdderKernel):
        kernel[...] = kernel[...] * 10.0
    model.train()
    nnx.jit(lambda model, x: model(x))(model, jnp.asarray(images[:128], dtype))  # BN statistics
    model.eval()
    return quant.quantize(model, [images[:128]], bits=16, recompute_batch_norm=False,
                          keep_float=("conv1", "fc1", "fc2", "fc3")).model

  want = logits(quantized(jnp.float32), images[128:])
  got = logits(quantized(jnp.bfloat16), images[128:], jnp.bfloat16)
  agreement, error = agreement_and_error(got, want)
  assert agreement >= 0.97, agreement
  assert error <= 0.03, error
