"""Bilinear resizing, numpy and Pillow, against a from-the-definition reference."""

import jax
import numpy as np
import pytest

from adderjax.data import resize
from tests.data import resize_reference

needs_pil = pytest.mark.skipif(resize.default_backend() != "pil", reason="Pillow is not installed")


def jax_reference(image, height, width, box, *, antialias):
  top, left, box_h, box_w = box
  scale = np.array([height / box_h, width / box_w])
  resize_fn = jax.jit(jax.image.scale_and_translate,
                      static_argnames=("shape", "spatial_dims", "method", "antialias"))
  out = resize_fn(image.astype(np.float32), shape=(height, width, image.shape[2]),
                  spatial_dims=(0, 1), scale=scale, translation=-np.array([top, left]) * scale,
                  method="linear", antialias=antialias)
  return np.asarray(out)


@pytest.mark.parametrize("antialias", [False, True])
def test_the_reference_agrees_with_jax(antialias):
  image = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
  box = (3.5, 7.25, 30, 40)
  np.testing.assert_allclose(resize_reference.resize(image, 16, 48, box, antialias=antialias),
                             jax_reference(image, 16, 48, box, antialias=antialias), atol=1e-3)


CASES = [
    ((37, 50, 3), (224, 224), None), ((37, 50, 3), (20, 30), None), ((37, 50, 3), (37, 50), None),
    ((9, 70, 1), (31, 7), None), ((1, 1, 3), (4, 4), None),
    ((37, 50, 3), (24, 24), (10.5, 20.25, 20, 25)), ((37, 50, 3), (64, 40), (0, 0, 37, 20)),
    ((37, 50, 3), (8, 8), (5, 7, 30, 40)),
]


@pytest.mark.parametrize("in_shape, out_shape, box", CASES)
def test_numpy_matches_jax_without_antialiasing(in_shape, out_shape, box):
  image = np.random.default_rng(2).integers(0, 256, in_shape, dtype=np.uint8)
  out = resize.resize_numpy(image, *out_shape, box=box)
  assert out.dtype == np.float32 and out.shape == (*out_shape, in_shape[2])
  np.testing.assert_allclose(out, resize_reference.resize(image, *out_shape, box, antialias=False),
                             atol=2e-3)
  np.testing.assert_array_equal(resize.resize(image, *out_shape, box=box, backend="numpy"), out)


@needs_pil
@pytest.mark.parametrize("in_shape, out_shape, box", CASES)
def test_pil_matches_jax_with_antialiasing(in_shape, out_shape, box):
  image = np.random.default_rng(2).integers(0, 256, in_shape, dtype=np.uint8)
  out = resize.resize_pil(image, *out_shape, box=box)
  assert out.dtype == np.uint8 and out.shape == (*out_shape, in_shape[2])
  # Pillow rounds to uint8.
  np.testing.assert_allclose(out, resize_reference.resize(image, *out_shape, box, antialias=True),
                             atol=1.0)
  as_float = resize.resize(image, *out_shape, box=box, backend="pil")
  assert as_float.dtype == np.float32
  np.testing.assert_array_equal(as_float, out)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("pil", marks=needs_pil)])
def test_constant_stays_constant_and_ramp_is_interpolated(backend):
  image = np.full((10, 12, 3), 77, np.uint8)
  np.testing.assert_array_equal(resize.resize(image, 5, 9, backend=backend), 77.0)
  ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 5, (6, 1, 1))
  # Columns 10..29 stretched to 40: half-pixel centres 0.5 apart, values 2.5 apart.
  boxed = resize.resize(ramp, 6, 40, box=(0, 10, 6, 20), backend=backend)
  np.testing.assert_allclose(boxed[0, :, 0], 50 + 2.5 * np.arange(40) - 1.25, atol=0.5)


def test_default_backend_and_bad_backend():
  assert resize.default_backend() in resize.BACKENDS
  with pytest.raises(ValueError, match="backend="):
    resize.resize(np.zeros((2, 2, 3), np.uint8), 1, 1, backend="cv2")
