"""Bilinear resizing of one image, with Pillow if it is installed, else in numpy.

The two differ where an image shrinks: Pillow's filter widens with the
scale (antialiasing, as ``jax.image.resize`` by default), the numpy one
always interpolates between the two nearest pixels (as TensorFlow's
default). Pillow is also 2-3x faster and lets threads run in parallel. Both
take a box of the image, so that a crop and its resize are one step.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["BACKENDS", "default_backend", "resize", "resize_numpy", "resize_pil"]

BACKENDS = ("pil", "numpy")

Box = tuple[float, float, float, float]


@functools.cache
def _pil_image():
  try:
    from PIL import Image  # An optional dependency.
  except ImportError:
    return None
  return Image


def default_backend() -> str:
  """``"pil"`` if Pillow is installed, else ``"numpy"``."""
  return "numpy" if _pil_image() is None else "pil"


def resize(image: np.ndarray, height: int, width: int, *, box: Box | None = None,
           backend: str | None = None) -> np.ndarray:
  """Resizes ``image`` (or the ``box`` of it) to ``height`` x ``width``, bilinearly.

  Args:
    image: ``(H, W, C)`` uint8 pixels, ``C`` 1 or 3.
    height: The output height.
    width: The output width.
    box: ``(top, left, box_height, box_width)``: the part of ``image``, in
      its pixels (possibly fractional), stretched to the output; the whole
      image if None. Pixels outside it still weigh in at its edges.
    backend: ``"pil"`` (:func:`resize_pil`) or ``"numpy"``
      (:func:`resize_numpy`); :func:`default_backend` if None.

  Returns:
    A float32 ``(height, width, C)`` array of values in 0..255.

  Raises:
    ValueError: If ``backend`` is not one of :data:`BACKENDS`.
  """
  backend = default_backend() if backend is None else backend
  if backend == "numpy":
    return resize_numpy(image, height, width, box=box)
  if backend == "pil":
    return resize_pil(image, height, width, box=box).astype(np.float32)
  raise ValueError(f"backend must be one of {BACKENDS} or None, got backend={backend!r}.")


def resize_pil(image: np.ndarray, height: int, width: int, *,
               box: Box | None = None) -> np.ndarray:
  """Pillow's bilinear resize (antialiased when shrinking).

  Args:
    image: ``(H, W, C)`` uint8 pixels, ``C`` 1 or 3.
    height: The output height.
    width: The output width.
    box: As for :func:`resize`.

  Returns:
    A uint8 ``(height, width, C)`` array.

  Raises:
    ImportError: If Pillow is not installed.
  """
  pil = _pil_image()
  if pil is None:
    raise ImportError("resize_pil needs Pillow: pip install pillow")
  in_h, in_w, channels = image.shape
  top, left, box_h, box_w = (0, 0, in_h, in_w) if box is None else box
  source = pil.fromarray(image[..., 0] if channels == 1 else image)
  out = source.resize((width, height), pil.Resampling.BILINEAR,
                      box=(left, top, left + box_w, top + box_h))
  out = np.asarray(out)
  return out[..., None] if channels == 1 else out


def _interpolation(size: int, out_size: int, start: float, extent: float):
  """Source indices and weights of a linear resize with half-pixel centres along one axis."""
  coords = start + (np.arange(out_size) + 0.5) * (extent / out_size) - 0.5
  coords = np.clip(coords, 0, size - 1)
  lower = np.floor(coords).astype(np.intp)
  upper = np.minimum(lower + 1, size - 1)
  weight = (coords - lower).astype(np.float32)
  return lower, upper, weight


def resize_numpy(image: np.ndarray, height: int, width: int, *,
                 box: Box | None = None) -> np.ndarray:
  """Bilinear resize in numpy, without antialiasing.

  Pixel centres are at half-integers and coordinates are clamped to the
  image, as in ``jax.image.scale_and_translate(..., "linear",
  antialias=False)`` (and TensorFlow's resize without antialiasing).

  Args:
    image: ``(H, W, C)`` pixels.
    height: The output height.
    width: The output width.
    box: ``(top, left, box_height, box_width)``: the part of ``image``, in
      its pixels (possibly fractional), stretched to the output; the whole
      image if None.

  Returns:
    A float32 ``(height, width, C)`` array.
  """
  in_h, in_w, channels = image.shape
  top, left, box_h, box_w = (0, 0, in_h, in_w) if box is None else box
  row0, row1, row_w = _interpolation(in_h, height, top, box_h)
  col0, col1, col_w = _interpolation(in_w, width, left, box_w)
  rows, where = np.unique(np.concatenate([row0, row1]), return_inverse=True)
  # Columns first, on the rows the output needs only. Indexing rows of
  # values (a pixel is `channels` of them) keeps numpy's inner loops long.
  values = image[rows].reshape(len(rows), in_w * channels)
  pixel = np.arange(channels)
  lefts = values[:, (col0[:, None] * channels + pixel).ravel()].astype(np.float32)
  rights = values[:, (col1[:, None] * channels + pixel).ravel()].astype(np.float32)
  rights -= lefts
  rights *= np.repeat(col_w, channels)
  lefts += rights
  tops, bottoms = lefts[where[:height]], lefts[where[height:]]
  bottoms -= tops
  bottoms *= row_w[:, None]
  tops += bottoms
  return tops.reshape(height, width, channels)
