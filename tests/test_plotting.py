"""adderjax.plotting: every figure renders with Agg and draws the numbers it is given."""

import importlib
import io
import json
import sys

import matplotlib
import numpy as np
import pytest

from adderjax import analysis, plotting
from adderjax.profiling import estimate_energy, estimate_latency, profile

matplotlib.use("Agg")


def _render(fig):
  assert isinstance(fig, matplotlib.figure.Figure)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  assert buffer.getvalue().startswith(b"\x89PNG")


def test_feature_scatter_2d_and_3d():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), [5, 7, 8])
  flat, deep = rng.normal(size=(20, 2)), rng.normal(size=(20, 3))
  fig = plotting.feature_scatter({"CNN": flat, "AdderNet": deep}, labels, max_points=15,
                                 title="Figure 1")
  _render(fig)
  ax2, ax3 = fig.axes
  assert (ax2.name, ax3.name) == ("rectilinear", "3d")
  # One collection per class, holding that class's points among the first 15.
  offsets = [c.get_offsets() for c in ax2.collections]
  assert [len(o) for o in offsets] == [5, 7, 3]
  np.testing.assert_allclose(offsets[1], flat[5:12])
  xs, ys, zs = ax3.collections[2]._offsets3d
  np.testing.assert_allclose(np.stack([xs, ys, zs], 1), deep[12:15])
  assert fig.get_suptitle() == "Figure 1"
  with pytest.raises(ValueError,
                     match=r"features\['x'\] must be \(20, 2\) or \(20, 3\).*\(20, 4\)"):
    plotting.feature_scatter({"x": rng.normal(size=(20, 4))}, labels)


def test_filter_grid_draws_each_filter():
  kernel = np.random.default_rng(0).normal(size=(5, 5, 2, 4))
  fig = plotting.filter_grid({"CNN": kernel, "AdderNet": kernel[..., :3]}, channel=1)
  _render(fig)
  images = [ax.get_images() for ax in fig.axes]
  assert len(images) == 8 and sum(len(i) for i in images) == 7  # 4 + 3 filters
  np.testing.assert_allclose(images[2][0].get_array(), kernel[:, :, 1, 2])
  mean = plotting.filter_grid(kernel, channel=None)
  np.testing.assert_allclose(mean.axes[0].get_images()[0].get_array(), kernel[:, :, :, 0].mean(-1))
  with pytest.raises(ValueError, match=r"channel must be in \[0, 2\).*channel=2"):
    plotting.filter_grid(kernel, channel=2)
  with pytest.raises(ValueError, match=r"must be \(height, width, in_channels, filters\)"):
    plotting.filter_grid(kernel[0])


def test_weight_histograms_draw_the_fits():
  rng = np.random.default_rng(0)
  weights = {"AdderNet": rng.laplace(size=3000), "CNN": rng.normal(size=3000)}
  fig = plotting.weight_histograms(weights, bins=40)
  _render(fig)
  for ax, values in zip(fig.axes, weights.values()):
    stats = analysis.weight_stats(values)
    laplace, gauss = ax.get_lines()
    np.testing.assert_allclose(laplace.get_ydata(), stats.density("laplace", laplace.get_xdata()))
    np.testing.assert_allclose(gauss.get_ydata(), stats.density("gaussian", gauss.get_xdata()))
    assert f"{stats.excess_kurtosis:.2f}" in ax.get_title()
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 40
    lo, hi = stats.mean - 4 * stats.std, stats.mean + 4 * stats.std
    counts, _ = np.histogram(values, bins=40, range=(lo, hi), density=True)
    np.testing.assert_allclose(heights, counts)


def test_bar_chart_and_gradient_norm_bars():
  norms = {"CNN": {"conv1/kernel": 2.0, "fc1/kernel": 1.0},
           "AdderNet": {"conv1/kernel": 0.1, "fc1/kernel": 0.3, "fc2/kernel": 0.05}}
  fig = plotting.gradient_norm_bars(norms)
  _render(fig)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "fc1", "fc2"]
  assert ax.get_yscale() == "log"
  assert [p.get_height() for p in ax.patches] == [2.0, 1.0, 0.1, 0.3, 0.05]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CNN", "AdderNet"]
  with pytest.raises(ValueError, match=r"values\['a'\]\['x'\] must be finite and > 0 on a log"):
    plotting.bar_chart({"a": {"x": 0.0}}, log=True)
  with pytest.raises(ValueError, match="Nothing to plot"):
    plotting.bar_chart({})


def test_learning_curves_from_workdirs(tmp_path):
  for name, scale in (("adaptive", 1.0), ("none", 2.0)):
    (tmp_path / name).mkdir()
    lines = [{"step": s, "train_loss": scale / s} for s in (10, 20, 30)]
    lines.append({"step": 30, "eval_accuracy": 0.9 / scale})
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  fig = plotting.learning_curves({"adaptive": tmp_path / "adaptive",
                                  "none": str(tmp_path / "none")})
  _render(fig)
  loss_ax, accuracy_ax = fig.axes
  assert loss_ax.get_title() == "training loss" and loss_ax.get_yscale() == "log"
  assert loss_ax.get_ylabel() == "training loss (log scale)"
  assert accuracy_ax.get_title() == accuracy_ax.get_ylabel() == "test accuracy"
  # The legend on every panel; no band where the records give no number of examples.
  assert all(ax.get_legend() is not None for ax in fig.axes) and not accuracy_ax.collections
  np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), [0.2, 0.1, 2 / 30])
  np.testing.assert_allclose(loss_ax.get_lines()[0].get_xdata(), [10, 20, 30])
  assert accuracy_ax.get_lines()[1].get_ydata().tolist() == [0.45]
  with pytest.raises(ValueError, match=r"run 'adaptive': No record holds key='eval_loss'"):
    plotting.learning_curves({"adaptive": tmp_path / "adaptive"}, keys=["eval_loss"])


def test_learning_curves_band_accuracies_by_their_test_set_noise():
  runs = {name: [{"step": 10, "train_loss": 1.0},
                 {"step": 10, "eval_accuracy": p, "eval_examples": 2000.0},
                 {"step": 20, "eval_accuracy": p, "eval_examples": 2000.0}]
          for name, p in (("AdderNet", 0.99), ("CNN", 0.5))}
  fig = plotting.learning_curves(runs, keys=["eval_accuracy", "train_loss"])
  _render(fig)
  accuracy_ax, loss_ax = fig.axes
  assert len(accuracy_ax.collections) == 2 and not loss_ax.collections
  for band, p in zip(accuracy_ax.collections, (0.99, 0.5)):
    y = band.get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([y.min(), y.max()],
                               p + np.array([-2, 2]) * np.sqrt(p * (1 - p) / 2000))
  legend = [t.get_text() for t in accuracy_ax.get_legend().get_texts()]
  assert legend == ["AdderNet", "CNN", "±2 standard errors (2,000 test images)"]
  assert plotting.metric_label("eval_loss") == "test loss"
  fig = plotting.learning_curves(runs, keys=["eval_accuracy"], noise_band=False)
  assert not fig.axes[0].collections


def test_cost_bars_draw_the_profiles():
  columns = {}
  for model, shape in (("lenet5_bn", (28, 28, 1)), ("resnet20", (32, 32, 3))):
    for kind, label in (("conv", "CNN"), ("adder", "AdderNet"), ("binary", "BNN")):
      counts = profile(model, kind=kind, input_shape=shape)
      columns.setdefault(model, {})[label] = (counts, estimate_energy(counts),
                                              estimate_latency(counts))
  fig = plotting.cost_bars(columns, title="costs")
  _render(fig)
  ops, energy, latency = fig.axes
  assert energy.get_title() == "energy (pJ)" and latency.get_title() == "latency (cycles)"
  # Bars by kind, then by model: CNN lenet, CNN resnet, AdderNet lenet, ...
  expected = [c.multiplications + c.additions + c.xnor
              for kind in ("CNN", "AdderNet", "BNN") for c, _, _ in
              (columns[m][kind] for m in columns)]
  assert [p.get_height() for p in ops.patches] == expected
  assert [p.get_height() for p in latency.patches][1] == columns["resnet20"]["CNN"][2].total
  # The BNN's XNORs have no energy in the default table: its bars (the last two) are hatched.
  assert [bool(p.get_hatch()) for p in energy.patches] == [False] * 4 + [True] * 2
  assert not any(p.get_hatch() for p in ops.patches)
  assert "hatched" in fig.get_supxlabel()


def test_import_error_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  monkeypatch.delitem(sys.modules, "adderjax.plotting")
  with pytest.raises(ImportError, match=r"pip install 'adderjax\[plot\]'"):
    importlib.import_module("adderjax.plotting")


def test_attack_curves_draw_each_model_in_increasing_epsilon():
  fig = plotting.attack_curves(
      {"FGSM": {"CNN": {0.2: 0.1, 0.0: 0.99, 0.1: 0.6}, "AdderNet": {0.0: 0.98, 0.1: 0.7}},
       "PGD-7": {"CNN": {0.0: 0.99, 0.1: 0.3}}}, title="attacks")
  _render(fig)
  fgsm_ax, pgd_ax = fig.axes
  cnn, adder = fgsm_ax.get_lines()
  assert (cnn.get_xdata().tolist() == [0.0, 0.1, 0.2]
          and cnn.get_ydata().tolist() == [0.99, 0.6, 0.1])
  assert adder.get_ydata().tolist() == [0.98, 0.7]
  assert [t.get_text() for t in fgsm_ax.get_legend().get_texts()] == ["CNN", "AdderNet"]
  assert (fgsm_ax.get_title(), pgd_ax.get_title()) == ("FGSM", "PGD-7")
  with pytest.raises(ValueError, match=r"accuracies\['FGSM'\]\['CNN'\]\[0.1\] must lie in"):
    plotting.attack_curves({"FGSM": {"CNN": {0.1: 60.0}}})
  with pytest.raises(ValueError, match="Nothing to plot"):
    plotting.attack_curves({})
