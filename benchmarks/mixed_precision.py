"""Half precision against float32 on the official trained ResNet-20, piece by piece.

A trained adder layer's output is an offset near ``-sum |w|`` (the official
CIFAR-10 ResNet-20: -100 to -3,221) plus a signal whose spread is 1.7-15.
This script runs `adderjax.models.pretrained("resnet20_cifar10")` in float32
and in bfloat16 / float16 compute on the same inputs and prints, for each
formulation, how many predictions agree with float32 and the logits' relative
error. The formulations other than adderjax's own are ablations made by
patching one piece at a time:

- ``adderjax``: inputs in the compute dtype; kernels, adder outputs and
  BatchNorm's normalisation in float32 (what the layers do);
- ``bf16 kernels``: the kernels rounded to the compute dtype first (Flax's
  promotion for a convolution);
- ``half outputs``: the adder outputs rounded to the compute dtype;
- ``half BatchNorm``: Flax's BatchNorm promotion (input and running
  statistics cast to the compute dtype before normalising);
- ``centred half outputs``: ``-sum(|x - w| - |w|)`` rounded to the compute
  dtype and ``-sum |w|`` added in float32 (the exact alternative);
- ``all of Flax's defaults``: kernels, outputs and BatchNorm in half precision
  (adderjax before this measurement).

The inputs are smooth random colour images (no CIFAR-10 on the machine where
it was written), normalised as the official ``test.py`` does.

    python benchmarks/mixed_precision.py [--images 512]
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import adderjax._layer_common as layer_common
from adderjax.models import PRETRAINED, layers, pretrained
import adderjax.nn
import adderjax.ops.dispatch as dispatch


def cifar_like_images(n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, (n, 4, 4, 3))
  smooth = np.asarray(jax.image.resize(jnp.asarray(coarse), (n, 32, 32, 3), "cubic"))
  images = np.clip(smooth + rng.normal(0, 0.08, smooth.shape), 0, 1).astype(np.float32)
  return np.asarray(PRETRAINED["resnet20_cifar10"].normalize(images), np.float32)


def _rounded_kernels(dtype):
  return mock.patch.object(layer_common, "keep_full_precision",
                           lambda p, promoted: None if p is None else p.astype(dtype))


def _half_outputs(dtype):
  return mock.patch.object(dispatch, "_output_dtype", lambda x, w, preferred: dtype)


def _flax_batch_norm():
  return mock.patch.object(layers, "float32_statistics", adderjax.nn.dtypes.promote_dtype)


def _centred_half_outputs(dtype):
  conv = layer_common.adder_conv

  def centred(x, w, **options):
    offset = -jnp.sum(jnp.abs(w), axis=(0, 1, 2))
    return (conv(x, w, **options) - offset).astype(dtype).astype(jnp.float32) + offset

  return mock.patch.object(layer_common, "adder_conv", centred)


@contextlib.contextmanager
def _all_flax_defaults(dtype):
  with _rounded_kernels(dtype), _half_outputs(dtype), _flax_batch_norm():
    yield


FORMULATIONS = {
    "adderjax": lambda dtype: contextlib.nullcontext(),
    "bf16 kernels": _rounded_kernels,
    "half outputs": _half_outputs,
    "half BatchNorm": lambda dtype: _flax_batch_norm(),
    "centred half outputs": _centred_half_outputs,
    "all of Flax's defaults": _all_flax_defaults,
}


def logits(dtype, images: np.ndarray) -> np.ndarray:
  model = pretrained("resnet20_cifar10", dtype=dtype)
  forward = nnx.jit(lambda model, x: model(x))
  return np.asarray(forward(model, jnp.asarray(images, dtype)).astype(jnp.float32), np.float64)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  images = cifar_like_images(args.images, args.seed)
  want = logits(jnp.float32, images)
  print(f"{args.images} images; float32 predictions per class: "
        f"{np.bincount(want.argmax(1), minlength=10).tolist()}")
  print(f"{'formulation':<24} {'dtype':<9} {'agreement':>9} {'logits rel err':>14}")
  for name, patch in FORMULATIONS.items():
    for dtype in (jnp.bfloat16, jnp.float16):
      with patch(dtype):
        got = logits(dtype, images)
      agreement = np.mean(got.argmax(1) == want.argmax(1))
      error = np.linalg.norm(got - want) / np.linalg.norm(want)
      print(f"{name:<24} {jnp.dtype(dtype).name:<9} {agreement:9.2%} {error:14.4f}")


if __name__ == "__main__":
  main()
