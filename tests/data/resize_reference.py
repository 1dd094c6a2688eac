"""A dense, from-the-definition bilinear resize for tests: the triangle filter, normalised.

Output pixel ``i`` of an axis samples the input at ``start + (i + 0.5) *
extent / out - 0.5`` (half-pixel centres); input pixel ``j`` weighs
``max(0, 1 - |j - x| / s)``, with ``s = 1``, or with antialiasing ``s =
max(1, extent / out)`` (the filter widens as the image shrinks); the weights
of the pixels inside the image are normalised to sum to 1.
"""

import numpy as np


def weights(size: int, out_size: int, start: float, extent: float, *,
            antialias: bool) -> np.ndarray:
  """The ``(out_size, size)`` matrix of one axis."""
  centres = start + (np.arange(out_size) + 0.5) * extent / out_size - 0.5
  width = max(1.0, extent / out_size) if antialias else 1.0
  distance = np.abs(np.arange(size)[None, :] - centres[:, None]) / width
  matrix = np.maximum(0.0, 1.0 - distance)
  return matrix / matrix.sum(1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int, box=None, *,
           antialias: bool) -> np.ndarray:
  """``box`` (top, left, height, width) of ``image`` (H, W, C) resized, in float64."""
  top, left, box_h, box_w = (0, 0, *image.shape[:2]) if box is None else box
  rows = weights(image.shape[0], height, top, box_h, antialias=antialias)
  cols = weights(image.shape[1], width, left, box_w, antialias=antialias)
  resized_cols = np.einsum("bj,ijc->ibc", cols, image.astype(np.float64), optimize=True)
  return np.einsum("ai,ibc->abc", rows, resized_cols, optimize=True)
