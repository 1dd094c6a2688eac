"""adderjax.quant against numpy: quantizers, clamp, k-means, calibration, the integer layers."""

import itertools

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import models, quant
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
from adderjax.nn import AdderConv, AdderDense, set_exponent
from adderjax.quant import QuantizedAdderConv, QuantizedAdderDense


def _np_activation_codes(x, s, bits, signed):
  """The codes in float32 arithmetic, as the layers compute them."""
  x, s, levels = np.asarray(x, np.float32), np.float32(s), np.float32(2 ** bits - 1)
  if signed:
    return np.clip(np.round(x * (levels / (2 * s))), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  return np.clip(np.round(x * (levels / s)), 0, levels)


def _np_weight_codes(w, s, bits):
  w, s, levels = np.asarray(w, np.float32), np.float32(s), np.float32(2 ** bits - 1)
  return np.clip(np.round(w * (levels / (2 * s))), -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def _np_adder_conv(x, w, stride, pad):
  """-sum |x_pad - w| over each patch, by brute force (any dtype, NHWC/HWIO)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, out = w.shape
  ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, out), x.dtype)
  for i, j in itertools.product(range(ho), range(wo)):
    patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
    y[:, i, j] = -np.abs(patch[..., None] - w[None]).sum(axis=(1, 2, 3))
  return y


@pytest.mark.parametrize("bits", [2, 5, 8, 16])
def test_quantizers_match_numpy(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=1000).astype(np.float32) * 2
  w = rng.normal(size=1000).astype(np.float32)
  s = np.float32(1.7)
  for signed in (False, True):
    got = np.asarray(quant.quantize_activations(jnp.asarray(x), s, bits, signed=signed))
    np.testing.assert_array_equal(got, _np_activation_codes(x, s, bits,
                                                            signed))
  got = np.asarray(quant.quantize_weights(jnp.asarray(w), s, bits))
  np.testing.assert_array_equal(got, _np_weight_codes(w, s, bits))
  assert got.min() >= -2 ** (bits - 1) and got.max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("signed", [False, True])
def test_clamp_is_lossless_for_inputs_within_the_scale(signed):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 4, 6)) * 2
  scale = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
  x = rng.uniform(-1.0 if signed else 0.0, 1.0, size=(2, 5, 5, 4)) * 0.5
  clipped, correction = quant.clamp_weights(jnp.asarray(w, jnp.float32), jnp.asarray(scale))
  clipped, correction = np.asarray(clipped, np.float64), np.asarray(correction, np.float64)
  assert np.all(np.abs(clipped) <= scale)
  np.testing.assert_allclose(correction, -np.maximum(np.abs(w) - scale, 0).sum(axis=(0, 1, 2)),
                             rtol=1e-6)
  # Each input is within the smallest scale, 0.5: the identity holds for every channel.
  exact = _np_adder_conv(x, w, 1, 1)
  np.testing.assert_allclose(_np_adder_conv(x, clipped, 1, 1) + correction, exact, rtol=1e-5)


def _optimal_partition_cost(values, k):
  """The least k-means cost over contiguous partitions of the sorted values (brute force)."""
  v = np.sort(values)
  best = np.inf
  for cuts in itertools.combinations(range(1, len(v)), k - 1):
    parts = np.split(v, cuts)
    best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
  return best


def test_kmeans_finds_the_optimal_grouping_of_separated_values():
  rng = np.random.default_rng(1)
  values = np.concatenate([rng.normal(c, 0.1, 4) for c in (1.0, 3.0, 6.0, 10.0)])
  rng.shuffle(values)
  labels, centres = quant.kmeans_1d(values, 4)
  cost = sum(((values[labels == g] - centres[g]) ** 2).sum() for g in range(4))
  np.testing.assert_allclose(cost, _optimal_partition_cost(values, 4), rtol=1e-12)
  assert np.all(np.diff(centres) > 0)
  # Deterministic: the same input gives the same labels.
  np.testing.assert_array_equal(quant.kmeans_1d(values, 4)[0], labels)


def test_kmeans_is_a_lloyd_fixed_point_and_handles_few_values():
  values = np.random.default_rng(2).gamma(2.0, 1.0, 50)
  labels, centres = quant.kmeans_1d(values, 3)
  np.testing.assert_allclose(centres, [values[labels == g].mean() for g in range(3)])
  np.testing.assert_array_equal(labels, np.argmin(np.abs(values[:, None] - centres), axis=1))
  labels, centres = quant.kmeans_1d(np.array([2.0, 1.0, 2.0]), 4)
  assert labels.tolist() == [1, 0, 1] and centres.tolist() == [1.0, 2.0]
  with pytest.raises(ValueError, match="clusters"):
    quant.kmeans_1d(values, 0)


def _layer_constants(out, groups, rng):
  channel_group = np.arange(out) % groups
  rng.shuffle(channel_group)
  scales = np.linspace(0.6, 1.8, groups)
  return channel_group, scales


@pytest.mark.parametrize("bits,signed", [(8, False), (4, True), (12, False)])
def test_integer_conv_is_exact_against_numpy(bits, signed):
  rng = np.random.default_rng(bits)
  layer = AdderConv(5, 7, 3, strides=2, padding=1, rngs=nnx.Rngs(0))
  channel_group, scales = _layer_constants(7, 3, rng)
  w = np.asarray(layer.kernel[...], np.float64)
  channel_scale = scales[channel_group]
  clipped, correction = quant.clamp_weights(jnp.asarray(w), jnp.asarray(channel_scale))
  codes = np.asarray(quant.quantize_weights(clipped, jnp.asarray(channel_scale), bits))
  qlayer = QuantizedAdderConv(layer, codes, channel_group, scales, np.asarray(correction),
                              bits=bits, signed_inputs=signed)
  np.testing.assert_array_equal(qlayer.integer_kernel(), codes)
  x = rng.uniform(-1.0 if signed else 0.0, 2.0, size=(2, 9, 9, 5)).astype(np.float32)

  acc = np.asarray(qlayer.accumulate(jnp.asarray(x)))
  assert acc.dtype == np.int32
  m = 1 if signed else 2
  expected = np.zeros_like(acc, dtype=np.int64)
  for g in range(len(scales)):
    a_q = _np_activation_codes(x, scales[g], bits, signed).astype(np.int64)
    channels = channel_group == g
    expected[..., channels] = _np_adder_conv(a_q, m * codes[..., channels].astype(np.int64), 2, 1)
  np.testing.assert_array_equal(acc, expected)

  # The float output is the dequantized computation: -sum |a_hat - w_hat| + b_c.
  levels = 2 ** bits - 1
  y = np.asarray(qlayer(jnp.asarray(x)), np.float64)
  reference = np.zeros_like(y)
  for g in range(len(scales)):
    step_a = scales[g] * (2 if signed else 1) / levels
    a_hat = _np_activation_codes(x, scales[g], bits, signed) * step_a
    channels = channel_group == g
    w_hat = codes[..., channels] * (2 * scales[g] / levels)
    reference[..., channels] = _np_adder_conv(a_hat, w_hat, 2, 1)
  np.testing.assert_allclose(y, reference + np.asarray(correction), rtol=1e-5, atol=1e-4)


def test_integer_dense_is_exact_against_numpy():
  rng = np.random.default_rng(3)
  layer = AdderDense(6, 5, use_bias=True, bias_init=nnx.initializers.ones, rngs=nnx.Rngs(1))
  channel_group, scales = _layer_constants(5, 2, rng)
  w = np.asarray(layer.kernel[...], np.float64)
  clipped, correction = quant.clamp_weights(jnp.asarray(w), jnp.asarray(scales[channel_group]))
  codes = np.asarray(quant.quantize_weights(clipped, jnp.asarray(scales[channel_group]), 8))
  qlayer = QuantizedAdderDense(layer, codes, channel_group, scales, np.asarray(correction),
                               bits=8, signed_inputs=False)
  x = rng.uniform(0, 1.5, size=(3, 4, 6)).astype(np.float32)
  acc = np.asarray(qlayer.accumulate(jnp.asarray(x)))
  a_q = np.stack([_np_activation_codes(x, s, 8, False) for s in scales])
  expected = np.stack([-np.abs(a_q[channel_group[n]] - 2 * codes[:, n]).sum(-1)
                       for n in range(5)], axis=-1)
  np.testing.assert_array_equal(acc, expected)
  step = scales[channel_group] / 255
  np.testing.assert_allclose(np.asarray(qlayer(jnp.asarray(x))),
                             acc * step + np.asarray(correction) + 1.0, rtol=1e-6)


class _Small(nnx.Module):
  """An adder conv net small enough to calibrate by hand."""

  def __init__(self, rngs):
    self.conv1 = AdderConv(1, 6, 3, rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
    # In a list, as the blocks of the ResNets: the path has an index.
    self.convs = nnx.List([AdderConv(6, 8, 3, strides=2, rngs=rngs)])
    self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.fc = AdderDense(8, 3, rngs=rngs)

  def features(self, x):
    h1 = nnx.relu(self.bn1(self.conv1(x)))
    h2 = jnp.mean(nnx.relu(self.bn2(self.convs[0](h1))), axis=(1, 2))
    return x, h1, h2

  def __call__(self, x):
    return self.fc(self.features(x)[2])


def _small_model_and_batches():
  model = _Small(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32) for _ in range(3)]
  recompute_batch_norm_stats(model, batches)
  model.eval()
  return model, batches


@pytest.mark.parametrize("method", ["nie2022", "shared_scale"])
def test_calibration_and_grouping_match_numpy(method):
  model, batches = _small_model_and_batches()
  qmodel, report = quant.quantize(model, batches, bits=8, scale_groups=2, method=method,
                                  recompute_batch_norm=False)
  assert isinstance(model.conv1, AdderConv), "the model passed in is left as it was"
  inputs = [[np.asarray(f) for f in model.features(b)] for b in batches]
  kernels = [model.conv1.kernel, model.convs[0].kernel, model.fc.kernel]
  for i, (layer_report, kernel) in enumerate(zip(report.layers, kernels)):
    seen = [batch[i] for batch in inputs]
    want_range = max(max(np.percentile(np.abs(s), 99.94) for s in seen), 1e-3)
    np.testing.assert_allclose(layer_report.input_range, want_range, rtol=1e-5)
    assert layer_report.signed_inputs == (i == 0)
    max_abs = np.abs(np.asarray(kernel[...])).reshape(-1, kernel.shape[-1]).max(axis=0)
    if method == "shared_scale":
      np.testing.assert_allclose(layer_report.scales, [max_abs.max()], rtol=1e-6)
      assert layer_report.weight_clipped_fraction == 0.0
    else:
      lo, hi = np.sort(max_abs)[:-1], np.sort(max_abs)[1:]
      # Two groups of a 1-D k-means split the sorted values at one cut; the
      # scales are each group's max |w|, capped at the input range.
      labels, _ = quant.kmeans_1d(max_abs, 2)
      want = [min(max_abs[labels == g].max(), want_range) for g in range(2)]
      np.testing.assert_allclose(layer_report.scales, want, rtol=1e-5)
      assert len(lo) == len(hi) and sorted(layer_report.group_sizes) == sorted(
          np.bincount(labels).tolist())
      w = np.abs(np.asarray(kernel[...]))
      np.testing.assert_allclose(layer_report.weight_clipped_fraction,
                                 np.mean(w > np.asarray(want)[labels]), rtol=1e-6)
  assert isinstance(qmodel.conv1, QuantizedAdderConv)
  assert isinstance(qmodel.fc, QuantizedAdderDense)
  # Activation clipping: the fraction of inputs above the scale, in the (here
  # unchanged) first layer, whose inputs are the batches themselves.
  s = np.asarray(report.layers[0].scales)
  sizes = np.asarray(report.layers[0].group_sizes)
  above = np.mean([[np.mean(np.abs(np.asarray(b)) > si) for si in s] for b in batches], axis=0)
  np.testing.assert_allclose(report.layers[0].activation_clipped_fraction,
                             np.dot(above, sizes) / sizes.sum(), rtol=1e-5)


def test_sixteen_bit_model_is_close_to_float():
  model, batches = _small_model_and_batches()
  # One scale per layer at max |w| (about 3): inputs rarely clip, weights never.
  qmodel, report = quant.quantize(model, batches, bits=16, scale_groups=1, method="shared_scale",
                                  recompute_batch_norm=False)
  assert [r.path for r in report.layers] == ["conv1", "convs/0", "fc"]
  assert isinstance(qmodel.convs[0], QuantizedAdderConv)
  assert all(r.activation_clipped_fraction < 0.02 for r in report.layers)
  assert "shared_scale, 16 bits" in report.format()
  y, y_float = np.asarray(qmodel(batches[0])), np.asarray(model(batches[0]))
  assert np.max(np.abs(y - y_float)) < 0.1 * np.max(np.abs(y_float))


def test_resnet_block_with_adder_shortcut_is_quantized():
  block = models.BasicBlock(models.layers.Layers(kind="adder", rngs=nnx.Rngs(0)), 3, 4,
                            strides=2)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 3)), jnp.float32)
  qblock, report = quant.quantize(block, [x], bits=8, scale_groups=1, keep_float=["conv1"],
                                  recompute_batch_norm=False)
  assert [r.path for r in report.layers] == ["conv2", "downsample/conv"]
  assert [r.signed_inputs for r in report.layers] == [False, False]
  assert isinstance(qblock.conv1, AdderConv)
  assert isinstance(qblock.downsample.conv, QuantizedAdderConv)
  assert qblock(x).shape == (2, 3, 3, 4)


def test_batch_norm_statistics_move_only_by_what_quantization_changes():
  """Recomputed outright on a few batches, they would carry those batches' sampling noise."""
  model, _ = _small_model_and_batches()
  rng = np.random.default_rng(1)
  calibration = [jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32) for _ in range(2)]
  # conv1 stays float: bn1's inputs do not change, so its statistics stay the trained ones.
  qmodel, _ = quant.quantize(model, calibration, bits=16, scale_groups=1, keep_float=("conv1",))
  recomputed = nnx.clone(model)
  recompute_batch_norm_stats(recomputed, calibration)
  np.testing.assert_array_equal(qmodel.bn1.mean[...], model.bn1.mean[...])
  np.testing.assert_array_equal(qmodel.bn1.var[...], model.bn1.var[...])
  assert np.abs(np.asarray(recomputed.bn1.mean[...] - model.bn1.mean[...])).max() > 0.05
  # bn2 follows the quantized layer: moved, by little at 16 bits.
  np.testing.assert_allclose(qmodel.bn2.mean[...], model.bn2.mean[...], rtol=0.01)
  with pytest.raises(ValueError, match="recompute_batch_norm must be 'shift', True or False"):
    quant.quantize(model, calibration, recompute_batch_norm="recompute")


def test_batches_of_the_data_pipeline_are_taken_as_their_images():
  """adderjax.data yields {"image", "label"}, and "mask" in evaluation batches."""
  model, batches = _small_model_and_batches()
  want = quant.quantize(model, batches[:1], bits=8, scale_groups=2)
  image = np.asarray(batches[0])
  padded = {"image": np.concatenate([image, np.full_like(image[:3], 50.0)]),
            "label": np.zeros(11, np.int32), "mask": np.array([1] * 8 + [0] * 3)}
  got = quant.quantize(model, [padded], bits=8, scale_groups=2)
  assert got.report == want.report  # The padding examples (here huge) changed no range.
  with pytest.raises(ValueError, match=r"calibration_batches\[0\] is a mapping with keys "
                     r"\['images', 'label'\]; pass the model's inputs"):
    quant.quantize(model, [{"images": image, "label": padded["label"]}])


def test_bad_arguments_are_named():
  model, batches = _small_model_and_batches()
  for bits in (1, 17, 8.5, "8"):
    with pytest.raises(ValueError, match="bits"):
      quant.quantize(model, batches, bits=bits)
  with pytest.raises(ValueError, match="scale_groups=0"):
    quant.quantize(model, batches, scale_groups=0)
  with pytest.raises(ValueError, match="method"):
    quant.quantize(model, batches, method="qssf")
  with pytest.raises(ValueError, match=r"keep_float names \['conv9'\].*'convs/0'"):
    quant.quantize(model, batches, keep_float=("conv9",))
  with pytest.raises(ValueError, match="leaves no adder layer"):
    quant.quantize(model, batches, keep_float=("conv1", "convs/0", "fc"))
  with pytest.raises(ValueError, match="calibration_batches is empty"):
    quant.quantize(model, [])
  cnn = nnx.eval_shape(lambda: models.lenet5_bn(kind="conv", rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no adder layer"):
    quant.quantize(cnn, batches)
  lp_model = nnx.clone(model)
  set_exponent(lp_model, 1.5)
  with pytest.raises(ValueError, match=r"layer conv1 has p=1.5: only L1"):
    quant.quantize(lp_model, batches)
