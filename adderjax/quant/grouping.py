"""Deterministic 1-D k-means, to group an adder layer's output channels by their weight range."""

from __future__ import annotations

import numpy as np

from adderjax._checks import positive_int

__all__ = ["kmeans_1d"]


def kmeans_1d(values: np.ndarray, clusters: int, *, max_iterations: int = 100
              ) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means on a 1-D array, started from evenly spaced quantiles.

  Deterministic: the centres start at the quantiles ``(2k + 1) / (2K)`` of the
  values (no random restarts), a value goes to its nearest centre (the lower
  one on a tie), and the iteration stops when the assignment no longer
  changes. Clusters are numbered by increasing centre. Asked for more clusters
  than there are distinct values, it makes one cluster per distinct value;
  a cluster that empties is dropped.

  Args:
    values: a 1-D array of finite numbers (e.g. each output channel's
      ``max |w|``).
    clusters: the number of clusters wanted, a positive int.
    max_iterations: a bound on Lloyd's iterations.

  Returns:
    ``(labels, centres)``: an int array with each value's cluster in
    ``0..K-1``, and the ``K`` centres (the means of their clusters), increasing.

  Raises:
    ValueError: for an empty, non-1-D or non-finite ``values``, or a
      ``clusters`` that is not a positive int.

  Example:
    >>> import numpy as np
    >>> from adderjax.quant import kmeans_1d
    >>> labels, centres = kmeans_1d(np.array([0.1, 0.2, 5.0, 5.2, 9.0]), 3)
    >>> labels.tolist(), np.round(centres, 2).tolist()
    ([0, 0, 1, 1, 2], [0.15, 5.1, 9.0])
  """
  clusters = positive_int(clusters, "clusters")
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
    raise ValueError(f"values must be a non-empty 1-D array of finite numbers, got shape "
                     f"{values.shape}.")
  distinct = np.unique(values)
  if clusters >= distinct.size:
    return np.searchsorted(distinct, values), distinct
  centres = np.quantile(values, (2 * np.arange(clusters) + 1) / (2 * clusters))
  labels = None
  for _ in range(max_iterations):
    # argmin takes the first (lower) centre on a tie.
    new_labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
    if labels is not None and np.array_equal(new_labels, labels):
      break
    labels = new_labels
    used = np.unique(labels)
    centres = np.array([values[labels == k].mean() for k in used])
    labels = np.searchsorted(used, labels)
  order = np.argsort(centres, kind="stable")
  return np.argsort(order)[labels], centres[order]
