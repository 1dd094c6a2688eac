"""The seeded inputs and weights shared by `record_official_logits.py` and the tests.

Everything here is NumPy: the recording script (run once, with PyTorch and the
official code) and the tests (without PyTorch) draw the same arrays from the
same seeds. NumPy's ``Generator`` streams are stable in practice but not
promised across versions, so the fixtures keep a SHA-256 of what was drawn
(`digest`), and the tests check it before comparing anything.

- `cifar_images`: CIFAR-like uint8 NHWC images (smooth colour fields with
  pixel noise), and `cifar_normalize`, the official ``test.py``'s CIFAR-10
  normalisation (``transforms.ToTensor`` then ``transforms.Normalize``).
- `resnet50_state_dict`: a state dict in the layout of the official
  ``resnet50.py``, drawn as the official code initialises it (adder kernels
  N(0, 1), the stem and the classifier Kaiming-normal with ``mode="fan_out"``)
  plus a classifier bias and random BatchNorm scales and biases. Its
  BatchNorm running statistics cannot be drawn: an adder layer's output has a
  mean of about minus the sum over its inputs of ``|x - w|``, which depends
  on the activations of every layer before it, so the recording script
  measures them on `resnet50_calibration_images` with the official model in
  float64 and stores them in the fixture as float16 means and standard
  deviations (`resnet50_with_statistics`).
"""

from __future__ import annotations

import hashlib

import numpy as np

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
"""The official ``test.py``'s ``transforms.Normalize`` mean for CIFAR-10."""

CIFAR_STD = (0.2023, 0.1994, 0.2010)
"""The official ``test.py``'s ``transforms.Normalize`` std for CIFAR-10."""

RESNET20_SEED = 20
RESNET50_SEED = 50
RESNET50_NUM_CLASSES = 10
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
"""The official ``resnet50.py``'s stages: (planes, blocks, stride)."""


def digest(*arrays: np.ndarray) -> str:
  """The SHA-256 of the arrays' dtypes, shapes and bytes, in order."""
  sha = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    sha.update(f"{array.dtype.str}{array.shape}".encode())
    sha.update(array.tobytes())
  return sha.hexdigest()


def cifar_images(seed: int, count: int, size: int = 32) -> np.ndarray:
  """``count`` CIFAR-like ``(size, size, 3)`` uint8 images, NHWC.

  Each is a random 4x4 colour field upsampled to ``size`` (blocks of colour,
  as a photo has regions), plus uniform pixel noise of +-24.
  """
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, size=(count, 4, 4, 3))
  smooth = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
  noise = rng.uniform(-24, 24, size=(count, size, size, 3))
  return np.clip(np.rint(smooth + noise), 0, 255).astype(np.uint8)


def cifar_normalize(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC images as the official ``test.py`` feeds them, float32 NHWC."""
  x = images.astype(np.float32) / np.float32(255)
  return (x - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)


def resnet50_calibration_images(seed: int = RESNET50_SEED) -> np.ndarray:
  """8 normalised 64x64 images for the BatchNorm statistics, float32 NHWC."""
  return cifar_normalize(cifar_images(seed + 1, 8, 64))


def resnet50_test_images(seed: int = RESNET50_SEED) -> np.ndarray:
  """2 normalised 64x64 images whose logits are compared, float32 NHWC."""
  return cifar_normalize(cifar_images(seed + 2, 2, 64))


def resnet50_shapes(num_classes: int = RESNET50_NUM_CLASSES) -> dict[str, tuple[int, ...]]:
  """The official ``resnet50.py``'s state dict: key -> shape, in its order.

  ``num_batches_tracked`` is left out (the official model is built with it;
  the recording script loads this dict with ``strict=False`` and checks that
  only those keys are missing).
  """
  shapes: dict[str, tuple[int, ...]] = {}

  def batch_norm(prefix, features):
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{name}"] = (features,)

  shapes["conv1.weight"] = (64, 3, 7, 7)
  batch_norm("bn1", 64)
  inplanes = 64
  for stage, (planes, blocks, _) in enumerate(RESNET50_STAGES, 1):
    for block in range(blocks):
      prefix = f"layer{stage}.{block}"
      shapes[f"{prefix}.conv1.adder"] = (planes, inplanes, 1, 1)
      batch_norm(f"{prefix}.bn1", planes)
      shapes[f"{prefix}.conv2.adder"] = (planes, planes, 3, 3)
      batch_norm(f"{prefix}.bn2", planes)
      shapes[f"{prefix}.conv3.adder"] = (planes * 4, planes, 1, 1)
      batch_norm(f"{prefix}.bn3", planes * 4)
      if block == 0:  # stride != 1 or inplanes != planes * 4: the first block of each stage
        shapes[f"{prefix}.downsample.0.adder"] = (planes * 4, inplanes, 1, 1)
        batch_norm(f"{prefix}.downsample.1", planes * 4)
      inplanes = planes * 4
  shapes["fc.weight"] = (num_classes, 2048, 1, 1)
  shapes["fc.bias"] = (num_classes,)
  batch_norm("bn2", num_classes)
  return shapes


def resnet50_state_dict(seed: int = RESNET50_SEED,
                        num_classes: int = RESNET50_NUM_CLASSES) -> dict[str, np.ndarray]:
  """Random float32 weights for the official ``resnet50.py``, without running statistics.

  One ``np.random.default_rng(seed)`` draws, key by key in `resnet50_shapes`'
  order: adder kernels (``.adder``) from N(0, 1); ``conv1.weight`` and
  ``fc.weight`` from N(0, 2 / fan_out), fan_out = out_channels * kh * kw;
  ``fc.bias`` from U(-0.1, 0.1); BatchNorm ``weight`` from U(0.5, 1.5) and
  ``bias`` from U(-0.2, 0.4). The ``running_mean`` and ``running_var`` keys are
  left out: see the module docstring.
  """
  rng = np.random.default_rng(seed)
  state: dict[str, np.ndarray] = {}
  for key, shape in resnet50_shapes(num_classes).items():
    if key.endswith(".adder"):
      value = rng.standard_normal(shape)
    elif key in ("conv1.weight", "fc.weight"):
      fan_out = shape[0] * shape[2] * shape[3]
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)
    elif key == "fc.bias":
      value = rng.uniform(-0.1, 0.1, shape)
    elif key.endswith(".weight"):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(".bias"):
      value = rng.uniform(-0.2, 0.4, shape)
    else:
      continue  # running statistics
    state[key] = value.astype(np.float32)
  return state


def resnet50_batch_norms(num_classes: int = RESNET50_NUM_CLASSES) -> list[tuple[str, int]]:
  """``(prefix, features)`` of each BatchNorm of the official ResNet-50, in its order."""
  return [(key[:-len(".running_mean")], shape[0])
          for key, shape in resnet50_shapes(num_classes).items() if key.endswith(".running_mean")]


def resnet50_with_statistics(state: dict[str, np.ndarray], running_mean: np.ndarray,
                             running_std: np.ndarray) -> dict[str, np.ndarray]:
  """``state`` with the BatchNorm running statistics, given as the fixture stores them.

  The fixture keeps float16 means and standard deviations; the variance is
  the float32 square of the latter, which is exact (a float16 has 11
  significant bits, a float32 24), so the official model in float64 and
  adderjax in float32 or float64 read the same statistics.

  Args:
    state: `resnet50_state_dict`'s weights.
    running_mean: every BatchNorm's running mean, float16, concatenated in the
      order of `resnet50_batch_norms`.
    running_std: the square roots of their running variances, likewise.

  Returns:
    The full state dict (without ``num_batches_tracked``), float32, in the
    order of `resnet50_shapes`.
  """
  num_classes = state["fc.bias"].shape[0]
  statistics = {}
  start = 0
  for prefix, features in resnet50_batch_norms(num_classes):
    std = running_std[start:start + features].astype(np.float32)
    statistics[f"{prefix}.running_mean"] = running_mean[start:start + features]
    statistics[f"{prefix}.running_var"] = std * std
    start += features
  if start != running_mean.size or start != running_std.size:
    raise ValueError(f"running_mean and running_std must hold {start} values, got "
                     f"{running_mean.size} and {running_std.size}.")
  full = dict(state, **statistics)
  return {key: full[key].astype(np.float32) for key in resnet50_shapes(num_classes)}
