"""The numpy transforms against straightforward references."""

import math

import numpy as np
import pytest

from adderjax.data import augment as aug
from adderjax.data import resize
from tests.data import resize_reference

BACKENDS = ["numpy", pytest.param("pil", marks=pytest.mark.skipif(
    resize.default_backend() != "pil", reason="Pillow is not installed"))]


def box_resize(image: np.ndarray, height: int, width: int, box, *, antialias: bool) -> np.ndarray:
  return resize_reference.resize(image, height, width, box, antialias=antialias)


def full_resize(image: np.ndarray, height: int, width: int, *, antialias: bool) -> np.ndarray:
  return resize_reference.resize(image, height, width, antialias=antialias)


def test_normalize():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
  out = aug.normalize(images, mean, std)
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert aug.normalize(np.full((1, 1, 1), 255, np.uint8), (0.5,), (0.5,))[0, 0, 0] == 1.0
  pixels = images.astype(np.float32)
  assert aug.normalize(pixels, mean, std, out=pixels) is pixels
  np.testing.assert_array_equal(pixels, out)
  np.testing.assert_allclose(aug.normalize(np.array([0.0, 51.0]), (0.2,), (0.2,)), [-1, 0],
                             atol=1e-6)


def reference_crop_flip(image: np.ndarray, offset, flip: bool, pad: int = 4) -> np.ndarray:
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  height, width = image.shape[:2]
  crop = padded[offset[0]:offset[0] + height, offset[1]:offset[1] + width]
  return crop[:, ::-1] if flip else crop


def test_cifar_crop_flip_matches_per_image_reference():
  rng = np.random.default_rng(1)
  images = rng.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
  offsets, flips = aug.draw_cifar_params(rng, 64)
  assert offsets.min() == 0 and offsets.max() == 8 and 0 < flips.mean() < 1
  out = aug.apply_cifar_crop_flip(images, offsets, flips)
  for i in range(64):
    np.testing.assert_array_equal(out[i], reference_crop_flip(images[i], offsets[i], flips[i]))
  # Offsets (4, 4) without a flip are the identity; (0, 0) shifts in 4 rows and columns of zeros.
  same = aug.apply_cifar_crop_flip(images[:1], np.array([[4, 4]]), np.array([False]))
  np.testing.assert_array_equal(same, images[:1])
  corner = aug.apply_cifar_crop_flip(images[:1], np.array([[0, 0]]), np.array([False]))
  assert np.all(corner[0, :4] == 0) and np.all(corner[0, :, :4] == 0)
  np.testing.assert_array_equal(corner[0, 4:, 4:], images[0, :28, :28])


def test_random_resized_crop_box_within_bounds_and_ranges():
  rng = np.random.default_rng(3)
  for height, width in [(375, 500), (500, 333), (64, 64), (13, 200)]:
    uniforms, _ = aug.draw_imagenet_params(rng, 200)
    for row in uniforms:
      top, left, h, w = aug.random_resized_crop_box(height, width, row)
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
  # With room for the box, the first attempt is used and its area and ratio are in range.
  uniforms, _ = aug.draw_imagenet_params(rng, 500)
  areas, ratios = [], []
  for row in uniforms:
    top, left, h, w = aug.random_resized_crop_box(1000, 1000, row[:1])
    areas.append(h * w / 1e6)
    ratios.append(w / h)
  assert (0.079 <= min(areas) and max(areas) <= 1.0
          and np.mean(areas) == pytest.approx(0.54, abs=0.05))
  assert 0.74 <= min(ratios) and max(ratios) <= 1.34


def test_random_resized_crop_box_fallback_is_a_centre_crop():
  never_fits = np.tile([0.999, 0.999, 0.5, 0.5], (aug.CROP_ATTEMPTS, 1))  # Whole area, ratio 4/3.
  assert aug.random_resized_crop_box(100, 50, never_fits) == (16, 0, 67, 50)  # Clamped to 3/4.
  assert aug.random_resized_crop_box(40, 200, never_fits) == (0, 73, 40, 53)  # Clamped to 4/3.
  assert aug.random_resized_crop_box(90, 100, never_fits) == (0, 0, 90, 100)
  # An attempt that fits is placed by its uniforms.
  fits = np.array([[0.0, 0.5, 0.0, 0.999]])  # Area 8%, ratio 1: 28x28 of 100x100.
  assert aug.random_resized_crop_box(100, 100, fits) == (0, 72, 28, 28)


@pytest.mark.parametrize("backend", BACKENDS)
def test_imagenet_train_transform_shapes_and_flip(backend):
  image = np.random.default_rng(4).integers(0, 256, (75, 100, 3), dtype=np.uint8)
  uniforms, _ = aug.draw_imagenet_params(np.random.default_rng(5), 1)
  plain = aug.imagenet_train_transform(image, uniforms[0], False, 32, backend=backend)
  flipped = aug.imagenet_train_transform(image, uniforms[0], True, 32, backend=backend)
  assert plain.shape == (32, 32, 3) and plain.dtype == np.float32
  np.testing.assert_array_equal(flipped, plain[:, ::-1])
  box = aug.random_resized_crop_box(75, 100, uniforms[0])
  np.testing.assert_allclose(plain, box_resize(image, 32, 32, box, antialias=backend == "pil"),
                             atol=1.0 if backend == "pil" else 2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_crop_of_a_known_image(backend):
  # 256 rows, 320 columns of value 10 * column // 32 + row // 32: size 224 crops
  # the centre 224x224 after a resize to 256 x 320, here the identity.
  rows, cols = np.meshgrid(np.arange(256), np.arange(320), indexing="ij")
  image = (10 * (cols // 32) + rows // 32).astype(np.uint8)[..., None].repeat(3, 2)
  out = aug.imagenet_eval_transform(image, 224, backend=backend)
  np.testing.assert_array_equal(out, image[16:240, 48:272])
  # A 2x larger image: resize to 256 x 320, then the same crop.
  antialias, atol = (True, 1.0) if backend == "pil" else (False, 2e-3)
  big = image.repeat(2, 0).repeat(2, 1)
  expected = full_resize(big, 256, 320, antialias=antialias)[16:240, 48:272]
  np.testing.assert_allclose(aug.imagenet_eval_transform(big, 224, backend=backend), expected,
                             atol=atol)
  # A portrait image, size 32: shorter side 37 (= round(32 / 0.875)).
  tall = np.random.default_rng(6).integers(0, 256, (90, 60, 3), dtype=np.uint8)
  resized = full_resize(tall, 56, 37, antialias=antialias)  # round(90 * 37 / 60) = 56 rows.
  np.testing.assert_allclose(aug.imagenet_eval_transform(tall, 32, backend=backend),
                             resized[12:44, 2:34], atol=atol)


def test_center_crop_box():
  assert aug.center_crop_box(90, 60, 32) == pytest.approx(
      (12 * 90 / 56, 2 * 60 / 37, 32 * 90 / 56, 32 * 60 / 37))
  assert aug.center_crop_box(375, 500, 224) == pytest.approx(
      (16 * 375 / 256, 58 * 500 / 341, 224 * 375 / 256, 224 * 500 / 341))
  assert math.isclose(aug.EVAL_CROP_FRACTION, 0.875)
