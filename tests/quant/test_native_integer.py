"""The native integer kernels of the quantized layers against their XLA loops, bit for bit."""

import os
import pathlib
import subprocess
import sys
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import export, quant
from adderjax.nn import AdderConv, AdderDense
from adderjax.ops import cpu_native, cpu_native_int, native_build
from adderjax.quant import QuantizedAdderConv, QuantizedAdderDense

# The float layers only lend their geometry: zeros compile faster than a random init.
ZEROS = nnx.initializers.zeros_init()
NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
REPO = pathlib.Path(__file__).parents[2]
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernels unavailable")


def _codes(rng, shape, bits):
  return rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), size=shape)


def _pair(layer_class, layer, sizes, bits, signed, rng):
  """The same integer layer on the XLA loops and on the native kernels."""
  out = sum(sizes)
  channel_group = np.repeat(np.arange(len(sizes)), sizes)
  rng.shuffle(channel_group)
  scales = np.linspace(0.7, 1.9, len(sizes))
  kernel_shape = layer.kernel.shape
  codes = _codes(rng, kernel_shape, bits)
  correction = rng.normal(size=out).astype(np.float32)
  return [layer_class(layer, codes, channel_group, scales, correction, bits=bits,
                      signed_inputs=signed, implementation=impl) for impl in ("xla", "cpu")]


def _inputs(rng, shape, signed):
  # Past the largest scale, so that the codes reach both ends of their range.
  return jnp.asarray(rng.uniform(-2.2 if signed else -0.3, 2.2, size=shape), jnp.float32)


def _np_sums(codes, kernel, strides, padding, dilation):
  """-sum |a - w| over each patch in int64, by brute force: codes (B, H, W, C), kernel HWIO."""
  (sh, sw), (dh, dw) = strides, dilation
  a = np.pad(codes.astype(np.int64), ((0, 0), *padding, (0, 0)))
  kh, kw, _, _ = kernel.shape
  ho = (a.shape[1] - (kh - 1) * dh - 1) // sh + 1
  wo = (a.shape[2] - (kw - 1) * dw - 1) // sw + 1
  y = 0
  for i in range(kh):
    for j in range(kw):
      patch = a[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
      y = y - np.abs(patch[..., None] - kernel[i, j].astype(np.int64)).sum(axis=3)
  return y


def _assert_exact(layer, x, spec, dense=False):
  """The native int32 sums against numpy, from the codes the layer computes (jitted, as in its
  sums), and the float output against them dequantized, to float32 rounding."""
  pixels = x.reshape(-1, 1, 1, x.shape[-1]) if dense else x
  # One compiled function: each jit compiles in about a second here.
  acc, codes, y = jax.jit(lambda x: (layer.accumulate(x), layer._codes(pixels), layer(x)))(x)
  acc, codes = np.asarray(acc), [np.asarray(c) for c in codes]
  assert acc.dtype == np.int32
  kernel = np.asarray(layer.integer_kernel()).reshape(layer.kernel.shape)
  kernel = kernel * (1 if layer.signed_inputs else 2)
  channel_group = np.asarray(layer.channel_group[...])
  want = np.zeros(acc.shape, np.int64)
  for g, c in enumerate(codes):
    sums = _np_sums(c, kernel, *spec)
    want[..., channel_group == g] = sums.reshape(acc.shape)[..., channel_group == g]
  np.testing.assert_array_equal(acc, want)
  y = np.asarray(y, np.float64)
  bits = int(layer.bits[...])
  step = np.asarray(layer.scales[...], np.float64) * (1 if layer.signed_inputs else 0.5) * 2 / (
      2 ** bits - 1)
  bias = 0 if layer.bias is None else np.asarray(layer.bias[...], np.float64)
  expected = want * step[channel_group] + np.asarray(layer.correction[...]) + bias
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def _assert_same(xla_layer, native_layer, x):
  """The int32 sums and the float outputs equal the XLA loops' bit for bit, both jitted (op by
  op, XLA may round the step s / (2^b - 1) differently)."""
  acc, y = jax.jit(lambda x: (native_layer.accumulate(x), native_layer(x)))(x)
  want_acc, want_y = jax.jit(lambda x: (xla_layer.accumulate(x), xla_layer(x)))(x)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, want_acc)
  np.testing.assert_array_equal(y, want_y)


CONV_CASES = {
    # name: (in, sizes of the groups, kernel, strides, padding, dilation, input shape, bits, signed)
    "u8-im2col-stride2-same": (5, (1, 2, 4), 3, 2, "SAME", 1, (2, 9, 9), 8, False),
    "u8-in-place-valid-tails": (16, (5, 8), 3, 1, "VALID", 1, (2, 7, 13), 4, True),
    "u8-dilated-asymmetric": (8, (9,), 3, 1, ((2, 0), (1, 3)), 2, (1, 8, 11), 2, False),
    "u8-1x1-strided-rows": (24, (3, 3, 3, 3), 1, (2, 1), "SAME", 1, (1, 5, 37), 8, True),
    "u8-5x5-wide-fan-in": (40, (6, 7), 5, 1, "SAME", 1, (1, 6, 10), 8, False),
    # Several bands of rows per image, the last one short; dilated, and with copied patches.
    "u8-bands-dilated": (8, (3, 6), 3, 1, "SAME", 2, (1, 21, 6), 8, False),
    "u8-bands-im2col": (3, (4, 1), 5, 1, "SAME", 1, (2, 19, 7), 7, True),
    "i16-im2col-dilated": (5, (3,), 3, 1, "SAME", 2, (1, 9, 8), 9, False),
    "i16-im2col-signed": (3, (2, 4), 3, 1, "SAME", 1, (2, 6, 7), 10, True),
    "i16-in-place-strided": (4, (5,), 3, (2, 1), "SAME", 1, (1, 9, 9), 12, False),
    "i16-14-bits": (8, (2, 7), 3, 2, "VALID", 1, (2, 7, 7), 14, False),
}


def _conv_case(case):
  cin, sizes, k, strides, padding, dilation, shape, bits, signed = case
  rng = np.random.default_rng(sum(sizes) * 100 + bits)
  layer = AdderConv(cin, sum(sizes), k, strides=strides, padding=padding, kernel_dilation=dilation,
                    kernel_init=ZEROS, rngs=nnx.Rngs(0))
  xla_layer, native_layer = _pair(QuantizedAdderConv, layer, sizes, bits, signed, rng)
  return xla_layer, native_layer, _inputs(rng, (*shape, cin), signed)


@needs_native
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_sums_are_exact(case):
  """Every tail: fan-in past the chunks, pixels past the tile, channels past the vector."""
  _, native_layer, x = _conv_case(case)
  assert native_layer.lanes == ("uint8" if case[-2] <= 8 else "int16")
  layer = native_layer
  spec = layer._padded(x)[1]
  _assert_exact(layer, x, (spec.strides, spec.padding, spec.dilation))


@needs_native
@pytest.mark.parametrize("name", ["u8-in-place-valid-tails", "i16-im2col-signed"])
def test_conv_equals_the_xla_loops(name):
  _assert_same(*_conv_case(CONV_CASES[name]))


DENSE_CASES = [(24, (3, 7), 8, False), (5, (4, 1), 8, True), (12, (6,), 12, False),
               (7, (2, 3), 9, True)]


def _dense_case(features, sizes, bits, signed):
  rng = np.random.default_rng(features)
  layer = AdderDense(features, sum(sizes), use_bias=True, bias_init=nnx.initializers.ones,
                     kernel_init=ZEROS, rngs=nnx.Rngs(1))
  return *_pair(QuantizedAdderDense, layer, sizes, bits, signed, rng), rng


@needs_native
@pytest.mark.parametrize("features, sizes, bits, signed", DENSE_CASES)
def test_dense_sums_are_exact(features, sizes, bits, signed):
  _, native_layer, rng = _dense_case(features, sizes, bits, signed)
  spec = ((1, 1), ((0, 0), (0, 0)), (1, 1))
  for shape in ((3, 5, features), (1, features)):
    _assert_exact(native_layer, _inputs(rng, shape, signed), spec, dense=True)


@needs_native
def test_dense_equals_the_xla_loops():
  xla_layer, native_layer, rng = _dense_case(*DENSE_CASES[0])
  _assert_same(xla_layer, native_layer, _inputs(rng, (3, 5, DENSE_CASES[0][0]), False))


@needs_native
def test_the_native_kernels_run_and_serve_every_bit_width_of_their_lanes():
  rng = np.random.default_rng(0)
  layer = AdderConv(8, 6, 3, kernel_init=ZEROS, rngs=nnx.Rngs(0))
  # The same grouping (one seed) for each: a layer's group order is static.
  built = {bits: _pair(QuantizedAdderConv, layer, (2, 4), bits, False, np.random.default_rng(1))
           for bits in (2, 8, 12)}
  x = _inputs(rng, (1, 6, 6, 8), False)
  text = jax.jit(lambda x: built[8][1](x)).lower(x).as_text()
  assert "adderjax_integer_scaled_u8" in text
  assert "adderjax_integer_sums_u8" in (
      jax.jit(lambda x: built[8][1].accumulate(x)).lower(x).as_text())
  assert "adderjax_integer_scaled_i16" in jax.jit(lambda x: built[12][1](x)).lower(x).as_text()
  assert "adderjax_integer" not in jax.jit(lambda x: built[8][0](x)).lower(x).as_text()
  # The bits stay an array: 2 and 8 bits (both uint8 lanes) share one graph, hence one compile.
  assert nnx.graphdef(built[2][1]) == nnx.graphdef(built[8][1])
  assert nnx.graphdef(built[2][0]) == nnx.graphdef(built[8][0])
  forward = nnx.jit(lambda m, x: m(x))
  for bits in (2, 8):
    np.testing.assert_array_equal(forward(built[bits][1], x), forward(built[bits][0], x))
  # Without native lanes (15 bits, unsigned inputs), "cpu" takes the XLA loops.
  wide = _pair(QuantizedAdderConv, layer, (6,), 15, False, rng)[1]
  assert wide.lanes is None and cpu_native_int.lanes_for(15, signed=True) == "int16"
  assert "adderjax_integer" not in jax.jit(lambda x: wide(x)).lower(x).as_text()


def _small_model(rng):
  """Adder layers only (no BatchNorm to re-estimate), weights from numpy: quick to build."""
  model = nnx.Sequential(
      AdderConv(1, 6, 3, kernel_init=ZEROS, rngs=nnx.Rngs(0)), nnx.relu,
      AdderConv(6, 8, 3, strides=2, kernel_init=ZEROS, rngs=nnx.Rngs(0)), nnx.relu,
      lambda x: x.reshape(x.shape[0], -1),
      AdderDense(4 * 4 * 8, 3, kernel_init=ZEROS, rngs=nnx.Rngs(0)))
  for layer in (model.layers[0], model.layers[2], model.layers[5]):
    layer.kernel[...] = jnp.asarray(rng.normal(size=layer.kernel.shape) * 0.5, jnp.float32)
  return model


@needs_native
def test_the_model_output_equals_the_xla_loops_and_exports_with_them(tmp_path):
  rng = np.random.default_rng(0)
  model = _small_model(rng)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  qmodel, _ = quant.quantize(model, [images], bits=6, scale_groups=2, recompute_batch_norm=False)
  assert qmodel.layers[0].implementation is None and qmodel.layers[0].signed_inputs
  on_xla = nnx.clone(qmodel)
  for _, module in nnx.iter_modules(on_xla):
    if isinstance(module, (QuantizedAdderConv, QuantizedAdderDense)):
      module.implementation = "xla"
  forward = nnx.jit(lambda m, x: m(x))
  assert "adderjax_integer" in jax.jit(lambda x: qmodel(x)).lower(images).as_text()
  want = forward(on_xla, images)
  np.testing.assert_array_equal(forward(qmodel, images), want)
  # export.save switches the integer layers to the XLA loops (custom calls do not export).
  export.save(qmodel, tmp_path / "q.jaxexport", input_shape=(8, 8, 1), platforms=("cpu",))
  function, _ = export.load(tmp_path / "q.jaxexport")
  np.testing.assert_allclose(function(images), want, rtol=1e-6, atol=1e-5)
  assert qmodel.layers[0].implementation is None, "the model passed to save is left as it was"


def test_bad_implementation_values_are_named():
  layer = AdderDense(4, 3, kernel_init=ZEROS, rngs=nnx.Rngs(0))
  args = (np.zeros((4, 3), np.int64), np.zeros(3, np.int64), np.ones(1), np.zeros(3))
  for bad in ("native", "gpu", 1):
    with pytest.raises(ValueError, match=r"implementation must be None or one of \('xla', 'cpu'\)"
                       rf", got implementation={bad!r}"):
      QuantizedAdderDense(layer, *args, bits=8, signed_inputs=False, implementation=bad)
  qlayer = QuantizedAdderDense(layer, *args, bits=8, signed_inputs=False)
  qlayer.implementation = "native"
  with pytest.raises(ValueError, match="implementation="):
    qlayer(jnp.ones((2, 4)))


def test_unavailable_kernels_fall_back_to_the_xla_loops(monkeypatch):
  monkeypatch.setattr(native_build, "load", lambda: (None, "no C++ compiler was found"))
  cpu_native._warn_once.cache_clear()
  layer = AdderConv(4, 3, 3, kernel_init=ZEROS, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  qlayer, native = _pair(QuantizedAdderConv, layer, (3,), 8, False, rng)
  x = jnp.ones((1, 5, 5, 4))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    native.implementation = None
    text = jax.jit(lambda x: native(x)).lower(x).as_text()
    jax.jit(lambda x: native.accumulate(x)).lower(x)
  assert "adderjax_integer" not in text
  assert len([c for c in caught if "native CPU adder kernels" in str(c.message)]) == 1
  native.implementation = "cpu"
  with pytest.raises(ValueError, match="implementation='cpu' is not available here: no C"):
    native(x)
  native.implementation = None
  np.testing.assert_array_equal(jax.jit(lambda x: native(x))(x), jax.jit(lambda x: qlayer(x))(x))
  cpu_native._warn_once.cache_clear()


AVX2_CHECK = """
import sys
sys.argv = ["pytest"]
from tests.quant import test_native_integer as t
from adderjax.ops import cpu_native, native_build
assert cpu_native.available(), cpu_native.unavailable_reason()
assert native_build.load()[0].AdderjaxIntegerChannelsPerVector() == 4
for name in ("u8-in-place-valid-tails", "u8-im2col-stride2-same", "i16-im2col-signed",
             "i16-in-place-strided"):
  t.test_conv_sums_are_exact(t.CONV_CASES[name])
t.test_dense_sums_are_exact(*t.DENSE_CASES[0])
"""


@needs_native
def test_the_avx2_build_is_exact_too():
  """With -mno-avx512f (the build of the float kernels' AVX2 test: one cached library)."""
  env = {**os.environ, "CXX": f"{os.environ.get('CXX', 'c++')} -mno-avx512f"}
  completed = subprocess.run([sys.executable, "-c", AVX2_CHECK], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
