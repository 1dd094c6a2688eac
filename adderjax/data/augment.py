"""Image transforms in numpy: normalisation, CIFAR pad-crop-flip, ImageNet crops.

Random transforms are split in two: drawing the parameters for a whole
(global) batch from an rng, and applying given parameters to some of its
images. The pipeline draws for the global batch and each process applies its
slice, so the images do not depend on how many processes share the batch.

The ImageNet parameters are uniform numbers in [0, 1) rather than boxes,
since a box depends on the size of its image, which only the process that
reads the image knows; :func:`random_resized_crop_box` turns them into a box.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np

from adderjax.data.resize import resize

__all__ = [
    "CROP_ATTEMPTS",
    "EVAL_CROP_FRACTION",
    "apply_cifar_crop_flip",
    "center_crop_box",
    "draw_cifar_params",
    "draw_imagenet_params",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "normalize",
    "random_resized_crop_box",
]

CIFAR_PAD = 4
CROP_ATTEMPTS = 10
CROP_AREA = (0.08, 1.0)
CROP_ASPECT_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875
"""Evaluation resizes the shorter side to ``size / 0.875`` (256 for 224), then crops ``size``."""


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float], *,
              out: np.ndarray | None = None) -> np.ndarray:
  """Maps pixels in 0..255 to ``(pixel / 255 - mean) / std`` per channel, in float32.

  Args:
    images: ``(..., C)`` pixels in 0..255, uint8 or float.
    mean: ``C`` channel means in [0, 1] units.
    std: ``C`` channel stds in [0, 1] units.
    out: A C-contiguous float32 array of the shape of ``images`` to write
      to (``images`` itself to normalise in place); a new one if None.

  Returns:
    The float32 result, ``out`` if given.
  """
  std = np.asarray(std, np.float64)
  scale = (1 / (255 * std)).astype(np.float32)
  offset = (-np.asarray(mean, np.float64) / std).astype(np.float32)
  if out is None:
    out = np.empty(images.shape, np.float32)
  if images.ndim < 2:
    np.multiply(images, scale, out=out)
    out += offset
    return out
  # Over rows of (width * channels) values: broadcasting the per-channel
  # constants over a last axis of 3 would make numpy 10x slower.
  *lead, width, channels = images.shape
  rows = out.reshape(*lead, width * channels)  # A view: `out` is contiguous.
  np.multiply(images.reshape(rows.shape), np.tile(scale, width), out=rows)
  rows += np.tile(offset, width)
  return out


def draw_cifar_params(rng: np.random.Generator, batch_size: int, *,
                      pad: int = CIFAR_PAD) -> tuple[np.ndarray, np.ndarray]:
  """Draws crop offsets and flips for :func:`apply_cifar_crop_flip`.

  Args:
    rng: The generator to draw from.
    batch_size: The number of images.
    pad: The zero padding on each side; offsets are in ``0..2 * pad``.

  Returns:
    ``(offsets, flips)``: int ``(batch_size, 2)`` (row, column) offsets into
    the padded images and bool ``(batch_size,)``.
  """
  offsets = rng.integers(0, 2 * pad + 1, (batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  return offsets, flips


def apply_cifar_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, *,
                          pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pads each image by ``pad``, crops its original size at ``offsets``, flips some.

  Args:
    images: ``(B, H, W, C)`` images.
    offsets: int ``(B, 2)``: the top-left (row, column) of each crop in the
      padded image, in ``0..2 * pad``.
    flips: bool ``(B,)``: which crops to flip left-right.
    pad: The zero padding on each side.

  Returns:
    The crops, of the shape and dtype of ``images``.
  """
  batch, height, width, channels = images.shape
  padded_h, padded_w = height + 2 * pad, width + 2 * pad
  padded = np.zeros((batch, padded_h, padded_w * channels), images.dtype)
  padded[:, pad:pad + height, pad * channels:(pad + width) * channels] = images.reshape(
      batch, height, width * channels)
  rows = offsets[:, 0, None] + np.arange(height)
  cols = np.where(flips[:, None], np.arange(width - 1, -1, -1), np.arange(width))
  cols = cols + offsets[:, 1, None]
  # One gather of single values with flat indices: much faster in numpy than
  # indexing (batch, row, column) with three index arrays.
  values = (cols[:, :, None] * channels + np.arange(channels)).reshape(batch, 1, -1)
  flat = (np.arange(batch)[:, None, None] * padded_h + rows[:, :, None]) * (padded_w * channels)
  return padded.ravel()[flat + values].reshape(images.shape)


def draw_imagenet_params(rng: np.random.Generator,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws the random numbers of :func:`random_resized_crop_box` and the flips.

  Args:
    rng: The generator to draw from.
    batch_size: The number of images.

  Returns:
    ``(uniforms, flips)``: float ``(batch_size, CROP_ATTEMPTS, 4)`` in [0, 1)
    and bool ``(batch_size,)``.
  """
  uniforms = rng.random((batch_size, CROP_ATTEMPTS, 4))
  flips = rng.random(batch_size) < 0.5
  return uniforms, flips


def random_resized_crop_box(height: int, width: int, uniforms: np.ndarray, *,
                            area: tuple[float, float] = CROP_AREA,
                            aspect_ratio: tuple[float, float] = CROP_ASPECT_RATIO,
                            ) -> tuple[int, int, int, int]:
  """The Inception-style random crop of an image, from given random numbers.

  Each attempt takes a fraction of the image's area in ``area`` and an
  aspect ratio (width / height) log-uniform in ``aspect_ratio``; the first
  box that fits is placed uniformly at random. If none of the attempts fits,
  the box is the centred crop of the whole image at the nearest aspect ratio
  in range.

  Args:
    height: The image's height.
    width: The image's width.
    uniforms: ``(attempts, 4)`` numbers in [0, 1): per attempt the area, the
      aspect ratio, the row and the column.
    area: The range of the fraction of the image's area.
    aspect_ratio: The range of width / height.

  Returns:
    ``(top, left, box_height, box_width)``.
  """
  log_lo, log_hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
  for u_area, u_ratio, u_top, u_left in uniforms:
    target = height * width * (area[0] + (area[1] - area[0]) * u_area)
    ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
    box_w = round(math.sqrt(target * ratio))
    box_h = round(math.sqrt(target / ratio))
    if 0 < box_w <= width and 0 < box_h <= height:
      top = int(u_top * (height - box_h + 1))
      left = int(u_left * (width - box_w + 1))
      return top, left, box_h, box_w
  ratio = width / height
  if ratio < aspect_ratio[0]:
    box_w, box_h = width, round(width / aspect_ratio[0])
  elif ratio > aspect_ratio[1]:
    box_w, box_h = round(height * aspect_ratio[1]), height
  else:
    box_w, box_h = width, height
  return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def center_crop_box(height: int, width: int, size: int, *,
                    crop_fraction: float = EVAL_CROP_FRACTION) -> tuple[float, float, float, float]:
  """The centred ``size`` crop after resizing the shorter side to ``size / crop_fraction``.

  Args:
    height: The image's height.
    width: The image's width.
    size: The side of the crop.
    crop_fraction: The fraction of the resized shorter side that is kept.

  Returns:
    ``(top, left, box_height, box_width)`` in the original image's pixels
    (fractional), for :func:`adderjax.data.resize.resize`.
  """
  short = round(size / crop_fraction)
  if height <= width:
    resized_h, resized_w = short, round(width * short / height)
  else:
    resized_h, resized_w = round(height * short / width), short
  scale_h, scale_w = height / resized_h, width / resized_w
  top, left = (resized_h - size) // 2, (resized_w - size) // 2
  return top * scale_h, left * scale_w, size * scale_h, size * scale_w


def imagenet_train_transform(image: np.ndarray, uniforms: np.ndarray, flip: bool, size: int,
                             *, backend: str | None = None) -> np.ndarray:
  """Random resized crop to ``size`` x ``size`` and optional left-right flip.

  Args:
    image: ``(H, W, C)`` uint8 pixels.
    uniforms: The image's ``(CROP_ATTEMPTS, 4)`` row of
      :func:`draw_imagenet_params`.
    flip: Whether to flip the crop.
    size: The output side.
    backend: The resize backend (see :func:`adderjax.data.resize.resize`).

  Returns:
    float32 ``(size, size, C)`` pixels in 0..255.
  """
  box = random_resized_crop_box(*image.shape[:2], uniforms)
  out = resize(image, size, size, box=box, backend=backend)
  return out[:, ::-1] if flip else out


def imagenet_eval_transform(image: np.ndarray, size: int, *,
                            backend: str | None = None) -> np.ndarray:
  """Resizes the shorter side to ``size / 0.875`` and crops the centred ``size`` x ``size``.

  Args:
    image: ``(H, W, C)`` uint8 pixels.
    size: The output side.
    backend: The resize backend (see :func:`adderjax.data.resize.resize`).

  Returns:
    float32 ``(size, size, C)`` pixels in 0..255.
  """
  box = center_crop_box(*image.shape[:2], size)
  return resize(image, size, size, box=box, backend=backend)
