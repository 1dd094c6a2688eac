"""The AdderNet paper's figures, drawn with matplotlib (``pip install 'adderjax[plot]'``).

Each function takes the numbers of :mod:`adderjax.analysis` or
:mod:`adderjax.profiling` and returns a new :class:`matplotlib.figure.Figure`,
made without pyplot (no global figure state): show it in a notebook by ending
a cell with it, or write it with ``fig.savefig("name.png")``. Where a function
takes a mapping, each entry (a network, a run) becomes a panel or a series, in
the mapping's order.

- :func:`feature_scatter`: 2-D or 3-D features coloured by class (Figure 1);
- :func:`filter_grid`: the filters of a convolution kernel, one image each;
- :func:`weight_histograms`: weight histograms with the fitted Laplace and
  Gaussian densities;
- :func:`bar_chart` and :func:`gradient_norm_bars`: grouped bars, such as the
  per-layer gradient norms of two networks;
- :func:`learning_curves`: metrics of one or more trainer workdirs by step,
  accuracies with their test set's noise (:func:`metric_label` names them);
- :func:`cost_bars`: operations, energy and latency from
  :mod:`adderjax.profiling`;
- :func:`attack_curves`: accuracy under attack against the attack's size, from
  :func:`adderjax.analysis.fgsm` and :func:`adderjax.analysis.pgd`.

Example:
  >>> import numpy as np
  >>> from adderjax import plotting
  >>> rng = np.random.default_rng(0)
  >>> fig = plotting.weight_histograms({"AdderNet": rng.laplace(size=1000),
  ...                                   "CNN": rng.normal(size=1000)})
  >>> len(fig.axes)
  2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import pathlib
from typing import Any

import numpy as np

from adderjax import analysis

__all__ = [
    "attack_curves",
    "bar_chart",
    "cost_bars",
    "feature_scatter",
    "filter_grid",
    "gradient_norm_bars",
    "learning_curves",
    "metric_label",
    "weight_histograms",
]

try:
  import matplotlib
  from matplotlib.figure import Figure
  import matplotlib.patches
except ImportError as e:  # pragma: no cover - exercised by the message test only
  raise ImportError(
      "adderjax.plotting needs matplotlib, which the optional extra 'plot' installs: "
      "pip install 'adderjax[plot]'") from e

_PANEL = 4.0  # inches per panel side


def _named(values: Any, default: str) -> dict[str, Any]:
  """A mapping stays as it is; a single value becomes ``{default: value}``."""
  if isinstance(values, Mapping):
    if not values:
      raise ValueError(f"Nothing to plot: got an empty mapping for {default!r}.")
    return dict(values)
  return {default: values}


def _panels(n: int, *, projection: str | None = None, width: float = _PANEL,
            height: float = _PANEL) -> tuple[Figure, list[Any]]:
  fig = Figure(figsize=(width * n, height), layout="constrained")
  axes = [fig.add_subplot(1, n, i + 1, projection=projection) for i in range(n)]
  return fig, axes


def _class_colors(num: int) -> list[Any]:
  cmap = matplotlib.colormaps["tab10" if num <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(num)]


def feature_scatter(features: np.ndarray | Mapping[str, np.ndarray], labels: Any, *,
                    max_points: int | None = 2000, title: str | None = None,
                    point_size: float = 4.0) -> Figure:
  """Scatters 2-D or 3-D features coloured by class, one panel per network.

  3-D features are drawn on 3-D axes (a perspective projection), as the
  paper's Figure 1 shows its 3-D LeNet++ embeddings.

  Example:
    >>> import numpy as np
    >>> from adderjax import plotting
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 10, size=200)
    >>> fig = plotting.feature_scatter({"CNN": rng.normal(size=(200, 2)),
    ...                                 "AdderNet": rng.normal(size=(200, 3))}, labels)
    >>> [ax.name for ax in fig.axes]
    ['rectilinear', '3d']

  Args:
    features: ``(n, 2)`` or ``(n, 3)`` features, or a mapping of panel titles
      to such arrays (each panel 2-D or 3-D by its own width).
    labels: the ``n`` integer class labels, shared by every panel.
    max_points: draw at most this many points per panel (the first ones), or
      None for all.
    title: the figure's title.
    point_size: the marker area.

  Returns:
    The figure.

  Raises:
    ValueError: for features that are not ``(n, 2)`` or ``(n, 3)`` or do not
      match ``labels``.
  """
  panels = _named(features, "features")
  labels = np.asarray(labels).astype(int).ravel()
  classes = np.unique(labels)
  colors = _class_colors(int(classes.max()) + 1 if classes.size else 1)
  fig = Figure(figsize=(_PANEL * len(panels), _PANEL), layout="constrained")
  for i, (name, values) in enumerate(panels.items()):
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] not in (2, 3) or len(values) != len(labels):
      raise ValueError(f"features[{name!r}] must be ({len(labels)}, 2) or ({len(labels)}, 3) "
                       f"to match the labels, got shape {values.shape}.")
    n = len(values) if max_points is None else min(len(values), max_points)
    three_d = values.shape[1] == 3
    ax = fig.add_subplot(1, len(panels), i + 1, projection="3d" if three_d else None)
    for c in classes:
      points = values[:n][labels[:n] == c]
      ax.scatter(*points.T, s=point_size, color=colors[c], label=str(c))
    ax.set_title(name)
  fig.axes[-1].legend(markerscale=3, fontsize="small", loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), title="class")
  if title:
    fig.suptitle(title)
  return fig


def filter_grid(kernels: np.ndarray | Mapping[str, np.ndarray], *, channel: int | None = 0,
                cmap: str = "gray", title: str | None = None) -> Figure:
  """Draws each filter of convolution kernels as an image: one row per kernel.

  Example:
    >>> import numpy as np
    >>> from adderjax import plotting
    >>> kernel = np.random.default_rng(0).normal(size=(5, 5, 1, 6))  # HWIO
    >>> fig = plotting.filter_grid({"CNN": kernel, "AdderNet": kernel})
    >>> len(fig.axes)  # 2 rows of 6 filters
    12

  Args:
    kernels: a ``(height, width, in_channels, filters)`` kernel or a mapping of
      row titles to kernels.
    channel: the input channel to draw, or None for the mean over channels.
    cmap: the colormap; each filter is scaled to its own range.
    title: the figure's title.

  Returns:
    The figure.

  Raises:
    ValueError: for a kernel that is not 4-D or a ``channel`` out of range.
  """
  rows = _named(kernels, "filters")
  width = max(np.shape(k)[-1] for k in rows.values())
  fig = Figure(figsize=(min(1.0 * width, 16), 1.3 * len(rows) + 0.4), layout="constrained")
  subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
  for subfig, (name, kernel) in zip(subfigs, rows.items()):
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
      raise ValueError(f"kernels[{name!r}] must be (height, width, in_channels, filters), "
                       f"got shape {kernel.shape}.")
    if channel is None:
      images = kernel.mean(axis=2)
    elif not 0 <= channel < kernel.shape[2]:
      raise ValueError(f"channel must be in [0, {kernel.shape[2]}) for kernels[{name!r}], "
                       f"got channel={channel!r}.")
    else:
      images = kernel[:, :, channel]
    axes = subfig.subplots(1, width, squeeze=False)[0]
    for j, ax in enumerate(axes):
      ax.set_axis_off()
      if j < images.shape[-1]:
        ax.imshow(images[..., j], cmap=cmap, interpolation="nearest")
    subfig.suptitle(name)
  if title:
    fig.suptitle(title)
  return fig


def weight_histograms(weights: np.ndarray | Mapping[str, np.ndarray], *, bins: int = 100,
                      clip: float = 4.0, title: str | None = None) -> Figure:
  """Histograms of weights with their fitted Laplace and Gaussian densities, one panel each.

  The legend gives each fit's Kolmogorov-Smirnov distance and the excess
  kurtosis (:func:`adderjax.analysis.weight_stats`).

  Example:
    >>> import numpy as np
    >>> from adderjax import plotting
    >>> fig = plotting.weight_histograms(np.random.default_rng(0).laplace(size=500))
    >>> [line.get_label().split(" ")[0] for line in fig.axes[0].get_lines()]
    ['Laplace', 'Gaussian']

  Args:
    weights: an array of weights (flattened), or a mapping of panel titles to
      arrays.
    bins: the number of histogram bins.
    clip: the x range shown is the mean +- ``clip`` standard deviations (the
      statistics use every weight).
    title: the figure's title.

  Returns:
    The figure.
  """
  panels = _named(weights, "weights")
  fig, axes = _panels(len(panels), height=3.2)
  for ax, (name, values) in zip(axes, panels.items()):
    values = np.asarray(values, np.float64).ravel()
    stats = analysis.weight_stats(values)
    lo, hi = stats.mean - clip * stats.std, stats.mean + clip * stats.std
    ax.hist(values, bins=bins, range=(lo, hi), density=True, color="0.75", label="weights")
    x = np.linspace(lo, hi, 400)
    ax.plot(x, stats.density("laplace", x), label=f"Laplace (KS {stats.laplace_ks:.3f})")
    ax.plot(x, stats.density("gaussian", x), label=f"Gaussian (KS {stats.gaussian_ks:.3f})")
    ax.set_title(f"{name}\nexcess kurtosis {stats.excess_kurtosis:.2f}")
    ax.set_xlabel("weight")
    ax.legend(fontsize="small")
  axes[0].set_ylabel("density")
  if title:
    fig.suptitle(title)
  return fig


def bar_chart(values: Mapping[str, Mapping[str, float]], *, ylabel: str = "",
              log: bool = False, title: str | None = None) -> Figure:
  """Grouped bars: one group per inner key, one coloured bar per outer key.

  Example:
    >>> from adderjax import plotting
    >>> fig = plotting.bar_chart({"CNN": {"conv1": 2.0, "fc1": 1.0},
    ...                           "AdderNet": {"conv1": 0.1, "fc1": 0.3}}, log=True)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['conv1', 'fc1']

  Args:
    values: ``{series: {group: value}}``; the groups are those of every series,
      in first-seen order (a series without a group has no bar there).
    ylabel: the y axis label.
    log: a logarithmic y axis.
    title: the axes' title.

  Returns:
    The figure.

  Raises:
    ValueError: for an empty mapping, or a value that is not finite (or not
      positive on a log axis).
  """
  series = _named(values, "values")
  groups = list(dict.fromkeys(g for s in series.values() for g in s))
  for name, row in series.items():
    for group, v in row.items():
      if not math.isfinite(v) or (log and v <= 0):
        raise ValueError(f"values[{name!r}][{group!r}] must be finite"
                         f"{' and > 0 on a log axis' if log else ''}, got {v!r}.")
  fig = Figure(figsize=(max(4.0, 0.9 * len(groups) * max(1, len(series) / 2) + 1.5), 3.4),
               layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / len(series)
  x = np.arange(len(groups))
  for i, (name, row) in enumerate(series.items()):
    present = [j for j, g in enumerate(groups) if g in row]
    ax.bar(x[present] + (i - (len(series) - 1) / 2) * width, [row[groups[j]] for j in present],
           width, label=name)
  ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6
                else "center")
  if log:
    ax.set_yscale("log")
  ax.set_ylabel(ylabel)
  if len(series) > 1:
    ax.legend(fontsize="small")
  if title:
    ax.set_title(title)
  return fig


def gradient_norm_bars(norms: Mapping[str, Mapping[str, float]], *, log: bool = True,
                       title: str | None = "l2 norm of the gradient per layer") -> Figure:
  """The per-layer gradient norms of one or more networks
  (:func:`adderjax.analysis.gradient_norms`).

  The layer names drop a trailing ``/kernel``.

  Example:
    >>> from adderjax import plotting
    >>> fig = plotting.gradient_norm_bars({"CNN": {"conv1/kernel": 0.5, "fc1/kernel": 0.2}})
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['conv1', 'fc1']

  Args:
    norms: ``{network: {parameter path: norm}}``.
    log: a logarithmic y axis (the norms span orders of magnitude).
    title: the axes' title.

  Returns:
    The figure.
  """
  renamed = {name: {path.removesuffix("/kernel"): v for path, v in row.items()}
             for name, row in _named(norms, "norms").items()}
  return bar_chart(renamed, ylabel="gradient l2 norm", log=log, title=title)


Run = str | pathlib.Path | Sequence[Mapping[str, Any]]


_METRIC_NAMES = {"train": "training", "eval": "test"}


def metric_label(key: str) -> str:
  """A readable name for a trainer metric: ``"eval_accuracy"`` -> ``"test accuracy"``."""
  words = key.split("_")
  return " ".join([_METRIC_NAMES.get(words[0], words[0]), *words[1:]])


def _accuracy_band(rows: Sequence[Mapping[str, Any]], key: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
  """Steps, low, high of +-2 binomial standard errors of an accuracy, and the example count.

  None unless ``key`` is an accuracy whose records give their number of
  examples (``eval_examples`` beside ``eval_accuracy``, as the trainer writes).
  """
  if not key.endswith("accuracy"):
    return None
  count_key = key[:-len("accuracy")] + "examples"
  points = [(r["step"], r[key], r[count_key]) for r in rows
            if key in r and r.get(count_key)]
  if not points:
    return None
  steps, p, n = (np.asarray(v, np.float64) for v in zip(*points))
  error = 2 * np.sqrt(p * (1 - p) / n)
  return steps, np.clip(p - error, 0, 1), np.clip(p + error, 0, 1), int(n[-1])


def attack_curves(accuracies: Mapping[str, Mapping[str, Mapping[float, float]]], *,
                  xlabel: str = "epsilon (pixel units)",
                  title: str | None = None) -> Figure:
  """Accuracy under attack against its size: one panel per attack, one line per model.

  Example:
    >>> from adderjax import plotting
    >>> fig = plotting.attack_curves({"FGSM": {"CNN": {0.0: 0.99, 0.1: 0.7},
    ...                                         "AdderNet": {0.0: 0.99, 0.1: 0.8}}})
    >>> fig.axes[0].get_lines()[1].get_ydata().tolist()
    [0.99, 0.8]

  Args:
    accuracies: ``{attack: {model: {epsilon: accuracy}}}``; each line is drawn
      in increasing ``epsilon``, accuracies as fractions.
    xlabel: the x axes' label.
    title: the figure's title.

  Returns:
    The figure.

  Raises:
    ValueError: for an empty mapping, or an accuracy outside [0, 1].
  """
  attacks = _named(accuracies, "attack")
  fig, axes = _panels(len(attacks), width=4.2, height=3.4)
  for ax, (attack, lines) in zip(axes, attacks.items()):
    for name, curve in _named(lines, attack).items():
      points = sorted(curve.items())
      for epsilon, value in points:
        if not 0 <= value <= 1:
          raise ValueError(f"accuracies[{attack!r}][{name!r}][{epsilon!r}] must lie in [0, 1], "
                           f"got {value!r}.")
      ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_title(attack)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy under attack")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return fig


def learning_curves(runs: Run | Mapping[str, Run], *,
                    keys: Sequence[str] = ("train_loss", "eval_accuracy"),
                    title: str | None = None, x_axis: str = "step",
                    noise_band: bool = True) -> Figure:
  """Metrics by step of one or more runs: one panel per metric, one line per run.

  Each panel is titled and its y axis labelled with the metric's readable
  name (`metric_label`: ``"eval_accuracy"`` is "test accuracy", losses on a
  log scale), and carries the legend. Around an accuracy whose records give
  their number of examples (the trainer's ``eval_examples``), a shaded band
  of +-2 binomial standard errors, ``2 sqrt(p (1 - p) / n)``, shows the noise
  of a test set that size: two runs whose bands overlap are not shown apart.

  Example:
    >>> from adderjax import plotting
    >>> records = [{"step": s, "train_loss": 1 / s} for s in (1, 2, 3)]
    >>> fig = plotting.learning_curves({"adaptive": records}, keys=["train_loss"])
    >>> fig.axes[0].get_lines()[0].get_ydata().tolist()
    [1.0, 0.5, 0.3333333333333333]
    >>> fig.axes[0].get_title(), fig.axes[0].get_ylabel()
    ('training loss', 'training loss (log scale)')

  Args:
    runs: a trainer workdir (or its ``metrics.jsonl``), records as
      :func:`adderjax.analysis.read_metrics` returns them, or a mapping of run
      names to either.
    keys: the metrics to plot.
    title: the figure's title.
    x_axis: ``"step"``, or ``"epoch"`` (steps over the steps per epoch that
      the trainer's ``epoch`` records give; evaluations marked with dots).
    noise_band: draw the band of +-2 standard errors around accuracies.

  Returns:
    The figure.

  Raises:
    ValueError: if a run lacks one of ``keys`` (its metrics are listed),
      ``keys`` is empty, ``x_axis`` is neither choice, or ``"epoch"`` is asked
      of a run with no ``epoch`` records.
  """
  runs = _named(runs, "run") if isinstance(runs, Mapping) else {"run": runs}
  keys = [keys] if isinstance(keys, str) else list(keys)
  if not keys:
    raise ValueError("keys must name at least one metric, got keys=[].")
  if x_axis not in ("step", "epoch"):
    raise ValueError(f"x_axis must be 'step' or 'epoch', got x_axis={x_axis!r}.")
  records = {name: analysis.read_metrics(run) if isinstance(run, (str, pathlib.Path)) else run
             for name, run in runs.items()}
  fig, axes = _panels(len(keys), width=4.5, height=3.4)
  for ax, key in zip(axes, keys):
    banded = None
    for name, rows in records.items():
      try:
        steps, values = analysis.metric_history(rows, key)
        scale = 1.0
        if x_axis == "epoch":
          epoch_steps, epochs = analysis.metric_history(rows, "epoch")
          scale = epochs[-1] / epoch_steps[-1]
      except ValueError as e:
        raise ValueError(f"run {name!r}: {e}") from e
      line, = ax.plot(steps * scale, values, label=name,
                      marker="o" if key.startswith("eval") else None)
      band = _accuracy_band(rows, key) if noise_band else None
      if band is not None:
        band_steps, low, high, banded = band
        ax.fill_between(band_steps * scale, low, high, color=line.get_color(), alpha=0.15,
                        linewidth=0)
    ax.set_xlabel(x_axis)
    label = metric_label(key)
    ax.set_title(label)
    if "loss" in key:
      ax.set_yscale("log")
      label += " (log scale)"
    ax.set_ylabel(label)
    handles, labels = ax.get_legend_handles_labels()
    if banded is not None:
      handles.append(matplotlib.patches.Patch(color="grey", alpha=0.3, linewidth=0))
      labels.append(f"±2 standard errors ({banded:,} test images)")
    if len(records) > 1 or banded is not None:
      ax.legend(handles, labels, fontsize="small")
  if title:
    fig.suptitle(title)
  return fig


def cost_bars(columns: Mapping[str, Mapping[str, tuple[Any, Any, Any]]], *,
              title: str | None = None) -> Figure:
  """Operations, energy and latency per example of models as CNN, AdderNet, BNN (log axes).

  Three panels: the operations (multiplications + additions + XNORs), the
  energy and the latency, each a group of bars per model with a bar per kind.
  A cost whose table has no figure for some of its operations (the XNORs of a
  BNN in the default tables: ``Cost.complete`` is False) is hatched: its bar
  leaves them out.

  Example:
    >>> from adderjax import plotting
    >>> from adderjax.profiling import estimate_energy, estimate_latency, profile
    >>> columns = {}
    >>> for kind, label in [("conv", "CNN"), ("adder", "AdderNet")]:
    ...   counts = profile("lenet5_bn", kind=kind, input_shape=(28, 28, 1))
    ...   columns.setdefault("LeNet-5-BN", {})[label] = (
    ...       counts, estimate_energy(counts), estimate_latency(counts))
    >>> fig = plotting.cost_bars(columns)
    >>> [ax.get_title() for ax in fig.axes]
    ['operations', 'energy (pJ)', 'latency (cycles)']

  Args:
    columns: ``{model: {kind: (OpCounts, energy Cost, latency Cost)}}``, the
      triples of :func:`adderjax.profiling.count_ops`,
      :func:`~adderjax.profiling.estimate_energy` and
      :func:`~adderjax.profiling.estimate_latency`.
    title: the figure's title.

  Returns:
    The figure.
  """
  columns = _named(columns, "model")
  kinds = list(dict.fromkeys(k for row in columns.values() for k in row))
  panels = {
      "operations": lambda c, e, l: c.multiplications + c.additions + c.xnor,
      f"energy ({_unit(columns, 1)})": lambda c, e, l: e.total,
      f"latency ({_unit(columns, 2)})": lambda c, e, l: l.total,
  }
  if len(columns) > 3:  # many models: the panels one above the other
    fig = Figure(figsize=(0.9 * len(columns) + 2, 2.8 * len(panels)), layout="constrained")
    axes = [fig.add_subplot(len(panels), 1, i + 1) for i in range(len(panels))]
  else:
    fig, axes = _panels(len(panels), width=1.2 * len(columns) + 2, height=3.4)
  width = 0.8 / len(kinds)
  x = np.arange(len(columns))
  rows = list(columns.values())
  incomplete = False
  for panel, (ax, (name, value)) in enumerate(zip(axes, panels.items())):
    for i, kind in enumerate(kinds):
      present = [j for j, row in enumerate(rows) if kind in row]
      bars = ax.bar(x[present] + (i - (len(kinds) - 1) / 2) * width,
                    [value(*rows[j][kind]) for j in present], width, label=kind)
      for bar, j in zip(bars, present):
        if panel and not rows[j][kind][panel].complete:
          bar.set_hatch("//")
          incomplete = True
    ax.set_xticks(x, list(columns))
    ax.set_yscale("log")
    ax.set_title(name)
  axes[0].legend(fontsize="small")
  if incomplete:
    fig.supxlabel("hatched: some operations (XNORs) have no cost in the table and are left out",
                  fontsize="small")
  if title:
    fig.suptitle(title)
  return fig


def _unit(columns: Mapping[str, Mapping[str, tuple[Any, Any, Any]]], index: int) -> str:
  units = {triple[index].unit for row in columns.values() for triple in row.values()}
  return "/".join(sorted(units))
