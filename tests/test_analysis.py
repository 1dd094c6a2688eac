"""adderjax.analysis against independent computations (plain Python loops and NumPy)."""

import json
import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import analysis, models


@pytest.fixture(scope="module")
def lenet():
  model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
  model.eval()
  return model


def _images(n, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)).astype(np.float32)


def test_features_are_the_submodule_outputs(lenet):
  x = _images(5)
  expected_conv1 = np.asarray(lenet.conv1(jnp.asarray(x)))
  expected_bn1 = np.asarray(lenet.bn1(jnp.asarray(expected_conv1)))
  np.testing.assert_allclose(analysis.features(lenet, x, "conv1", batch_size=2), expected_conv1,
                             rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(analysis.features(lenet, x, "bn1"), expected_bn1, rtol=1e-4,
                             atol=1e-4)
  logits = np.asarray(lenet(jnp.asarray(x)))
  np.testing.assert_allclose(analysis.features(lenet, x, "bn5", batch_size=3), logits, rtol=1e-4,
                             atol=1e-4)


def test_features_of_a_nested_layer_and_a_tuple_output():
  model = models.get("lenet_pp", kind="conv", embed_dim=3, rngs=nnx.Rngs(1))
  model.eval()
  x = _images(4, seed=1)
  embedding, _ = model(jnp.asarray(x))
  np.testing.assert_allclose(analysis.features(model, x, "embed_act"), np.asarray(embedding),
                             rtol=1e-5, atol=1e-5)
  assert analysis.features(model, x, "convs/3").shape == (4, 14, 14, 64)
  assert "convs/3" in analysis.layer_names(model)


def test_features_leave_a_training_model_unchanged():
  model = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
  model.train()
  before = np.asarray(model.bn1.mean[...]).copy()
  x = _images(4)
  copy = nnx.clone(model)
  batch_stats = np.asarray(copy.bn1(copy.conv1(jnp.asarray(x))))
  np.testing.assert_allclose(analysis.features(model, x, "bn1"), batch_stats, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(model.bn1.mean[...]), before)
  # The same structure in eval mode is another compiled function: the running statistics.
  model.eval()
  running = np.asarray(model.bn1(model.conv1(jnp.asarray(x))))
  np.testing.assert_allclose(analysis.features(model, x, "bn1"), running, rtol=1e-4, atol=1e-4)
  assert not np.allclose(running, batch_stats, atol=1e-2)


def test_features_bad_arguments(lenet):
  with pytest.raises(ValueError, match="layer must be one of .*'conv1'.*got layer='conv9'"):
    analysis.features(lenet, _images(2), "conv9")
  with pytest.raises(ValueError, match="batch_size must be a positive int, got batch_size=0"):
    analysis.features(lenet, _images(2), "conv1", batch_size=0)
  with pytest.raises(ValueError, match="call=1 but the model calls 'conv1' 1 time"):
    analysis.features(lenet, _images(2), "conv1", call=1)
  with pytest.raises(ValueError, match="non-empty batch"):
    analysis.features(lenet, np.zeros((0, 28, 28, 1)), "conv1")


def test_kernels_by_path(lenet):
  conv = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
  got = analysis.kernels(conv)
  assert list(got) == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel", "fc3/kernel"]
  np.testing.assert_array_equal(got["conv1/kernel"], np.asarray(conv.conv1.kernel[...]))
  assert analysis.adder_kernels(conv) == {}
  adder = analysis.adder_kernels(lenet)
  assert list(adder) == list(got)
  np.testing.assert_array_equal(adder["fc2/kernel"], np.asarray(lenet.fc2.kernel[...]))
  # The binary LeNet keeps conv1 and fc3 full precision: no adder kernel, all kernels.
  binary = models.get("lenet5_bn", kind="binary", rngs=nnx.Rngs(0))
  assert list(analysis.kernels(binary)) == list(got)
  assert analysis.adder_kernels(binary) == {}


class _Linear(nnx.Module):

  def __init__(self, w):
    self.kernel = nnx.Param(jnp.asarray(w))

  def __call__(self, x):
    return x @ self.kernel[...]


def test_gradient_norms_against_the_analytic_gradient():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3))
  x = rng.normal(size=(6, 4))
  labels = np.array([0, 1, 2, 2, 1, 0])
  # Softmax cross-entropy, mean over the batch: dL/dW = x^T (softmax(xW) - onehot) / n.
  logits = x @ w
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  grad = x.T @ (probs - np.eye(3)[labels]) / len(x)
  norms = analysis.gradient_norms(_Linear(w.astype(np.float32)), x.astype(np.float32), labels)
  assert list(norms) == ["kernel"]
  np.testing.assert_allclose(norms["kernel"], np.sqrt((grad ** 2).sum()), rtol=1e-5)


def test_gradient_norms_of_a_model_leave_it_unchanged():
  model = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
  model.train()
  before = np.asarray(model.bn3.mean[...]).copy()
  x, labels = _images(4), np.array([0, 1, 2, 3])
  norms = analysis.gradient_norms(model, x, labels)
  everything = analysis.gradient_norms(model, x, labels, kernels_only=False)
  np.testing.assert_array_equal(np.asarray(model.bn3.mean[...]), before)
  assert set(norms) < set(everything) and "bn1/scale" in everything
  assert all(np.isfinite(v) and v > 0 for v in norms.values())
  # The same numbers as a gradient taken by hand.
  grads = nnx.jit(nnx.grad(
      lambda m: analysis._default_loss(m(jnp.asarray(x)), jnp.asarray(labels))))(nnx.clone(model))
  np.testing.assert_allclose(norms["fc1/kernel"],
                             np.linalg.norm(np.asarray(grads["fc1"]["kernel"][...])), rtol=1e-4)
  with pytest.raises(ValueError, match="same length"):
    analysis.gradient_norms(model, x, labels[:3])


def test_nearest_centre_accuracy_against_loops():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=60)
  x = rng.normal(size=(60, 3)) + labels[:, None] * 0.5
  for metric in ("l1", "angle"):
    centres = {}
    for c in range(4):
      members = [v for v, label in zip(x, labels) if label == c]
      if metric == "angle":
        members = [v / math.sqrt(sum(t * t for t in v)) for v in members]
      mean = [sum(v[i] for v in members) / len(members) for i in range(3)]
      if metric == "angle":
        norm = math.sqrt(sum(t * t for t in mean))
        mean = [t / norm for t in mean]
      centres[c] = mean
    correct = 0
    for v, label in zip(x, labels):
      if metric == "l1":
        score = {c: -sum(abs(v[i] - m[i]) for i in range(3)) for c, m in centres.items()}
      else:
        norm = math.sqrt(sum(t * t for t in v))
        score = {c: sum(v[i] / norm * m[i] for i in range(3)) for c, m in centres.items()}
      correct += max(score, key=score.get) == label
    assert analysis.nearest_centre_accuracy(x, labels, metric=metric) == correct / 60
  with pytest.raises(ValueError, match="metric must be 'l1' or 'angle', got metric='l2'"):
    analysis.nearest_centre_accuracy(x, labels, metric="l2")
  with pytest.raises(ValueError, match=r"features must be \(n, d\) with n = 60"):
    analysis.nearest_centre_accuracy(x[:5], labels)


def _reference_stats(values):
  """Moments, median, fits and KS distances with plain Python loops and the math module."""
  xs = sorted(float(v) for v in values)
  n = len(xs)
  mean = sum(xs) / n
  m2 = sum((v - mean) ** 2 for v in xs) / n
  m4 = sum((v - mean) ** 4 for v in xs) / n
  median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
  b = sum(abs(v - median) for v in xs) / n
  std = math.sqrt(m2)

  def laplace(v):
    z = (v - median) / b
    return 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z)

  def gauss(v):
    return 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))

  def ks(cdf):
    return max(max((i + 1) / n - cdf(v), cdf(v) - i / n) for i, v in enumerate(xs))

  return {"mean": mean, "std": std, "excess_kurtosis": m4 / m2 ** 2 - 3, "laplace_loc": median,
          "laplace_scale": b, "laplace_ks": ks(laplace), "gaussian_ks": ks(gauss)}


@pytest.mark.parametrize("n", [2, 7, 100, 301])
def test_weight_stats_against_loops(n):
  values = np.random.default_rng(n).standard_t(df=5, size=n) * 0.3 + 0.1
  stats = analysis.weight_stats(values)
  ref = _reference_stats(values)
  assert stats.count == n
  for name, value in ref.items():
    assert getattr(stats, name) == pytest.approx(value, rel=1e-6, abs=1e-6), name
  assert stats.gaussian_loc == stats.mean and stats.gaussian_scale == stats.std


def test_weight_stats_tell_laplace_from_gaussian():
  rng = np.random.default_rng(0)
  laplace = analysis.weight_stats(rng.laplace(0.0, 0.5, size=(100, 50)))
  gauss = analysis.weight_stats(rng.normal(0.0, 0.5, size=5000))
  assert laplace.excess_kurtosis == pytest.approx(3, abs=0.6)
  assert laplace.laplace_scale == pytest.approx(0.5, rel=0.05)
  assert laplace.closer_fit == "laplace" and laplace.laplace_ks < 0.03
  assert gauss.excess_kurtosis == pytest.approx(0, abs=0.3)
  assert gauss.closer_fit == "gaussian" and gauss.gaussian_ks < 0.03


def test_weight_stats_densities_integrate_to_one():
  stats = analysis.weight_stats(np.random.default_rng(0).normal(1.0, 2.0, size=500))
  x = np.linspace(-60, 60, 200_001)
  for fit in ("laplace", "gaussian"):
    assert np.trapezoid(stats.density(fit, x), x) == pytest.approx(1, abs=1e-6)
  assert stats.density("gaussian", stats.mean) == pytest.approx(
      1 / (stats.std * math.sqrt(2 * math.pi)))
  assert stats.density("laplace", stats.laplace_loc) == pytest.approx(
      1 / (2 * stats.laplace_scale))
  with pytest.raises(ValueError, match="fit must be 'laplace' or 'gaussian', got fit='cauchy'"):
    stats.density("cauchy", 0.0)


@pytest.mark.parametrize("values, match", [
    ([1.0], "at least 2 finite values, got 1"),
    ([1.0, np.nan], "some not finite"),
    ([2.0, 2.0, 2.0], "not be all equal"),
])
def test_weight_stats_bad_input(values, match):
  with pytest.raises(ValueError, match=match):
    analysis.weight_stats(values)


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")


def test_read_metrics_and_history(tmp_path):
  _write(tmp_path / "metrics.jsonl", [
      {"step": 50, "time": 1.0, "train_loss": 2.0},
      {"step": 100, "time": 2.0, "train_loss": 1.0},
      {"step": 100, "time": 2.5, "eval_accuracy": 0.5},
      {"step": 100, "time": 3.0, "train_loss": 0.8},  # a resumed run's later line wins
      {"step": 150, "time": 4.0, "train_loss": 0.6},
  ])
  records = analysis.read_metrics(tmp_path)
  assert records == analysis.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [50, 100, 100, 150]
  steps, losses = analysis.metric_history(tmp_path, "train_loss")
  np.testing.assert_array_equal(steps, [50, 100, 150])
  np.testing.assert_array_equal(losses, [2.0, 0.8, 0.6])
  assert steps.dtype == np.int64 and losses.dtype == np.float64
  steps, accuracy = analysis.metric_history(records, "eval_accuracy")
  assert steps.tolist() == [100] and accuracy.tolist() == [0.5]
  with pytest.raises(ValueError, match=r"key='eval_loss'.*\['eval_accuracy', 'train_loss'\]"):
    analysis.metric_history(tmp_path, "eval_loss")


def test_read_metrics_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    analysis.read_metrics(tmp_path / "missing")
  (tmp_path / "a.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="a.jsonl:2 is not JSON"):
    analysis.read_metrics(tmp_path / "a.jsonl")
  (tmp_path / "b.jsonl").write_text('{"loss": 1}\n')
  with pytest.raises(ValueError, match="b.jsonl:1 is not a JSON object with a 'step'"):
    analysis.read_metrics(tmp_path / "b.jsonl")


def test_read_metrics_skips_an_unfinished_last_line_with_a_warning(tmp_path):
  """What a run killed mid-write left with an older trainer: half a record, no newline."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.0}\n'
                  '{"step": 99, "tra')
  with pytest.warns(RuntimeWarning, match=rf"{path}:3 is an unfinished record .*step.: 99, .tra"):
    records = analysis.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2]
  # The same half line in the middle (an older trainer appended to it) is an error naming it.
  path.write_text('{"step": 1}\n{"step": 99, "tra{"step": 2}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=rf"{path}:2 is not JSON"):
    analysis.read_metrics(path)


def test_experiments_read_the_same_metrics():
  from experiments import metrics
  assert metrics.read_metrics is analysis.read_metrics

