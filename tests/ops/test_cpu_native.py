"""The native CPU kernels of adderjax.ops.cpu_native: the shared test base, the build and its
fallback."""

import logging
import os
import pathlib
import re
import stat
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from adderjax.ops import adder_conv, cpu_native, native_build, xla
from adderjax.ops.spec import conv_spec
from tests.ops.loop_reference import adder_conv_and_grads
from tests.ops.test_adder_conv import AdderConvTestBase

NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
REPO = pathlib.Path(__file__).parents[2]


@pytest.mark.skipif(not NATIVE, reason="native kernels unavailable: "
                    + (cpu_native.unavailable_reason() if jax.default_backend() == "cpu"
                       else "not a CPU backend"))
class TestCpuNative(AdderConvTestBase):
  implementation = "cpu"

  def test_the_native_kernels_run(self):
    """Forward, input gradient (strided too) and weight gradient are custom calls, not XLA's."""
    x = jnp.ones((2, 6, 6, 5), jnp.float32)
    w = jnp.ones((3, 3, 5, 7), jnp.float32)
    grad = jax.value_and_grad(lambda x, w: self.conv(x, w).sum(), (0, 1))
    text = jax.jit(grad).lower(x, w).as_text()
    for target in ("forward", "input_grad", "weight_grad"):
      assert f"adderjax_adder_{target}" in text
    assert "convolution" not in text
    sign = jax.grad(lambda w: self.conv(x, w, grad_mode="sign").sum())
    assert "adderjax_adder_weight_grad" not in jax.jit(sign).lower(w).as_text()
    strided = jax.value_and_grad(lambda x: self.conv(x, w, strides=2).sum())
    strided = jax.jit(strided).lower(x).as_text()
    assert "adderjax_adder_forward" in strided and "adderjax_adder_input_grad" in strided

  def test_none_picks_the_native_kernels_on_cpu(self):
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    w = jnp.ones((3, 3, 2, 3), jnp.float32)
    assert "adderjax_adder_forward" in jax.jit(adder_conv).lower(x, w).as_text()

  @pytest.mark.parametrize("channels", [1, 15, 16, 17, 33, 64])
  def test_every_channel_tail_and_pixel_tail(self, channels):
    """Output and input channels around the vector widths, rows not a multiple of 8 pixels."""
    rng = np.random.default_rng(channels)
    x = jnp.asarray(rng.normal(size=(2, 5, 11, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels + 2)), jnp.float32)
    spec = conv_spec(x, w, strides=1, padding="SAME", rhs_dilation=1, feature_group_count=1)
    y_shape = jax.eval_shape(lambda x, w: xla.forward(x, w, spec), x, w).shape
    g = jnp.asarray(rng.normal(size=y_shape), jnp.float32)

    @jax.jit  # One compilation for the three native kernels and their XLA loops.
    def native_and_loops(x, w, g):
      return ((cpu_native.forward(x, w, spec), xla.forward(x, w, spec)),
              (cpu_native.input_grad_full_precision(x, w, g, spec),
               xla.input_grad(x, w, g, spec, "full_precision")),
              (cpu_native.weight_grad_full_precision(x, w, g, spec),
               xla.weight_grad(x, w, g, spec, "full_precision")))

    for got, want in native_and_loops(x, w, g):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

  @pytest.mark.parametrize("batch, width, out_channels, strides, dilation, groups, padding", [
      (9, 32, 16, 1, 1, 1, "SAME"),             # ResNet-20's first stage, an image per item
      (1, 37, 13, (2, 1), 1, 1, "SAME"),        # pixel and channel tails, strided rows
      (2, 40, 10, 1, 2, 2, ((2, 0), (1, 3))),   # dilation, groups, asymmetric padding
      (2, 35, 5, 1, 1, 1, "VALID"),
  ])
  def test_forward_with_pixels_in_the_lanes(self, batch, width, out_channels, strides, dilation,
                                            groups, padding):
    """Rows of 32+ outputs and at most a vector of output channels per group take that tile.

    Small batches split each image's rows across the threads.
    """
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.normal(size=(batch, 6, width, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 6 // groups, out_channels * groups)), jnp.float32)
    spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=dilation,
                     feature_group_count=groups)
    y = jax.jit(lambda x, w: cpu_native.forward(x, w, spec))(x, w)
    assert y.shape[2] >= 32
    with jax.enable_x64(True):
      want = np.asarray(xla.forward(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64),
                                    spec))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

  @pytest.mark.parametrize("strides, dilation, groups", [(1, 1, 1), (2, 1, 2), (1, 2, 1)])
  def test_forward_outputs_do_not_depend_on_the_batch_or_the_row_chunks(self, strides, dilation,
                                                                        groups):
    """An image alone (its rows split over the threads) gives the same bits as in a batch.

    Rows of 600 pixels also split each image of the batch, into chunks that fit in the cache.
    """
    rng = np.random.default_rng(strides + 2 * dilation)
    x = jnp.asarray(rng.normal(size=(3, 9, 600, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 16 // groups, 24)), jnp.float32)
    spec = conv_spec(x, w, strides=strides, padding="SAME", rhs_dilation=dilation,
                     feature_group_count=groups)
    forward = jax.jit(lambda x: cpu_native.forward(x, w, spec))
    batch = np.asarray(forward(x))
    for i in range(3):
      np.testing.assert_array_equal(np.asarray(forward(x[i:i + 1]))[0], batch[i])
    with jax.enable_x64(True):
      want = np.asarray(xla.forward(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64),
                                    spec))
    np.testing.assert_allclose(batch, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

  def test_an_empty_batch_gives_empty_outputs_and_a_zero_weight_gradient(self):
    x = jnp.zeros((0, 6, 6, 16), jnp.float32)
    w = jnp.ones((3, 3, 16, 16), jnp.float32)
    y, (dx, dw) = jax.jit(jax.value_and_grad(lambda x, w: self.conv(x, w).sum(), (0, 1)))(x, w)
    assert float(y) == 0.0 and dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(w.shape, np.float32))

  @pytest.mark.parametrize("batch, channels", [(1, 3), (3, 3), (64, 3), (1, 20), (2, 20)])
  def test_weight_grad_sums_the_batch_in_any_number_of_chunks(self, batch, channels):
    """The batch is split in chunks, and small batches share the tiles out in blocks too: every
    split adds up to the float64 sum."""
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 4, 5, channels))
    w = rng.normal(size=(3, 3, channels, channels + 4))
    spec = conv_spec(x, w, strides=1, padding="SAME", rhs_dilation=1, feature_group_count=1)
    g = rng.normal(size=(batch, 4, 5, channels + 4))
    with jax.enable_x64(True):
      want = np.asarray(xla.weight_grad(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), spec,
                                        "full_precision"))
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, g)]
    dw = jax.jit(lambda x, w, g: cpu_native.weight_grad_full_precision(x, w, g, spec))(*f32)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

  @pytest.mark.parametrize("strides", [2, 3, (3, 2)])
  @pytest.mark.parametrize("kernel, dilation", [(1, 1), (3, 1), (5, 2)],
                           ids=["1x1", "3x3", "5x5-dilated"])
  @pytest.mark.parametrize("padding, channels", [("SAME", 17), ("VALID", 1),
                                                 (((2, 0), (0, 3)), 33)],
                           ids=["SAME-17", "VALID-1", "asymmetric-33"])
  def test_strided_input_grad_equals_the_xla_loops(self, strides, kernel, dilation, padding,
                                                   channels):
    """Every column phase and row tap of a strided layer, odd sizes, channel tails."""
    rng = np.random.default_rng(channels * 10 + kernel)
    x = jnp.asarray(rng.normal(size=(2, 11, 13, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 6)), jnp.float32)
    spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=dilation,
                     feature_group_count=1)
    y_shape = jax.eval_shape(lambda x, w: xla.forward(x, w, spec), x, w).shape
    g = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    dx, want = jax.jit(lambda x, w, g: (cpu_native.input_grad_full_precision(x, w, g, spec),
                                        xla.input_grad(x, w, g, spec, "full_precision")))(x, w, g)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

  @pytest.mark.parametrize("strides, groups", [(1, 1), (2, 2)])
  def test_input_grad_near_and_past_the_bounds_tiles_input_limit(self, strides, groups):
    """AVX2's input gradient sums clip(F, X - 1, X + 1) - X for tiles with every |X| <= 8
    (terms of X's size, then -X sum G) and the direct clip(F - X, -1, 1) elsewhere: inputs up
    to 10 (and rows up to 1000, where the bounds would cancel) give both kinds of tile in one
    layer, each within a few float32 units of float64."""
    rng = np.random.default_rng(8 + strides)
    x = rng.uniform(-10, 10, size=(2, 9, 17, 32))
    x[1, :3] *= 100
    x[0] = np.maximum(rng.normal(size=x[0].shape) * 3, 0)  # Post-ReLU sizes: bounds tiles.
    w = rng.normal(size=(3, 3, 32 // groups, 24))
    padding = ((1, 1), (1, 1))
    spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=1,
                     feature_group_count=groups)
    g = rng.normal(size=jax.eval_shape(lambda x, w: xla.forward(x, w, spec), x, w).shape)
    want = adder_conv_and_grads(x, w, g, strides=(strides, strides), padding=padding,
                                dilation=(1, 1), groups=groups, grad_mode="full_precision")[1]
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, g)]
    dx = jax.jit(lambda x, w, g: cpu_native.input_grad_full_precision(x, w, g, spec))(*f32)
    error = np.abs(np.asarray(dx, np.float64) - want)
    assert error.max() <= 2e-6 * np.abs(want).max(), error.max() / np.abs(want).max()

  @pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=str)
  def test_a_non_finite_cotangent_gives_what_the_xla_loops_give(self, value):
    """An infinite or NaN G sends the input gradient to the direct tiles (-X sum G would turn
    inf into NaN): NaN exactly where the XLA loops give NaN, the same infinities elsewhere."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.float32)
    spec = conv_spec(x, w, strides=1, padding="SAME", rhs_dilation=1, feature_group_count=1)
    g = rng.normal(size=(2, 6, 7, 8)).astype(np.float32)
    g[1, 3, 2, 5] = value
    dx, want = jax.jit(lambda x, w, g: (cpu_native.input_grad_full_precision(x, w, g, spec),
                                        xla.input_grad(x, w, g, spec, "full_precision")))(
                                            x, w, jnp.asarray(g))
    dx, want = np.asarray(dx), np.asarray(want)
    assert not np.isfinite(want).all()
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(want))
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-4)

  @pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
  def test_batch_sharded_over_8_devices_equals_one_device(self, axis_type):
    if jax.device_count() < 8:
      pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(self.conv(x, w)))
    single = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    replicated = NamedSharding(mesh, P())
    step = jax.jit(jax.value_and_grad(loss, (0, 1)), out_shardings=replicated)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = step(x_sharded, jax.device_put(w, replicated))
    chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-4)
    # Each device runs its own shard: the compiled step gathers nothing, and the weight
    # gradient's shards are summed by one all-reduce.
    grad = jax.jit(jax.grad(loss, (0, 1)))
    text = grad.lower(x_sharded, jax.device_put(w, replicated)).compile().as_text()
    assert "all-gather" not in text and "all-reduce" in text


BUILD_CHECK = """
from adderjax.ops import cpu_native
from tests.ops.test_adder_batch_norm import (
    check_normed_kernels_against_the_written_input, check_statistics_against_float64)
from tests.ops.test_adder_conv import NON_FINITE_VALUES, assert_like_the_xla_loops
assert cpu_native.available(), cpu_native.unavailable_reason()
for value in NON_FINITE_VALUES:
  assert_like_the_xla_loops("cpu", value)
check_statistics_against_float64()
check_normed_kernels_against_the_written_input()
"""


def _has_avx512f() -> bool:
  try:
    return " avx512f" in pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


@pytest.mark.skipif(not NATIVE, reason="native kernels unavailable")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-DADDERJAX_PIXEL_LANES=1"],
                         ids=["avx2", "pixel-lanes"])
def test_other_builds_give_what_the_xla_loops_give_for_non_finite_inputs(flags):
  """And the forward's batch statistics, and the kernels reading their input through a
  BatchNorm, right. The build the default one is not: on an AVX-512
  CPU (whose default build has the pixels-in-lanes forward) the AVX2 build, on an AVX2 CPU
  AVX-512's pixels-in-lanes forward tile in AVX2 registers. Its own build, cached like the
  default one, in a subprocess."""
  if (flags == "-mno-avx512f") != _has_avx512f():
    pytest.skip("this CPU's default build is that build; the other tests test it")
  env = {**os.environ, "CXX": f"{os.environ.get('CXX', 'c++')} {flags}"}
  completed = subprocess.run([sys.executable, "-c", BUILD_CHECK], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.skipif(_has_avx512f(), reason="this CPU's default build is the AVX-512 one")
def test_the_avx512_sources_compile_on_an_avx2_machine():
  """The AVX-512 paths (the float and the integer kernels') cannot run here, but they must
  compile: a syntax-only pass over the sources with AVX-512 enabled (a few seconds)."""
  compiler = native_build.compiler()
  if compiler is None:
    pytest.skip("no C++ compiler")
  csrc = REPO / "adderjax" / "ops" / "csrc"
  completed = subprocess.run(
      [*compiler, "-fsyntax-only", "-std=c++17", "-march=x86-64-v4",
       f"-I{jax.ffi.include_dir()}", *(str(csrc / name) for name in native_build.SOURCES)],
      capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]


def test_the_build_compiles_and_keys_every_source_file():
  """Each file of csrc/ is compiled (a .cc) or included (a .h), and is part of the cache key."""
  csrc = {p.name for p in (REPO / "adderjax" / "ops" / "csrc").iterdir() if p.is_file()}
  assert {n for n in csrc if n.endswith(".cc")} == set(native_build.SOURCES)
  assert {n for n in csrc if n.endswith(".h")} == set(native_build.HEADERS)
  assert csrc == set(native_build.SOURCES + native_build.HEADERS)


def test_float64_uses_the_xla_loops():
  """The default (the native kernels for float32 here) and "cpu" run float64 in the loops."""
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(1, 4, 4, 2)), jnp.float64)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float64)
    want, _, _ = adder_conv_and_grads(x, w, None, strides=(1, 1), padding=((1, 1), (1, 1)),
                                      dilation=(1, 1), groups=1, grad_mode="full_precision")
    for implementation in (None, "cpu") if NATIVE else (None,):
      lowered = jax.jit(lambda x, w, i=implementation: adder_conv(x, w, implementation=i)).lower(
          x, w)
      assert "adderjax_adder_forward" not in lowered.as_text()
      y = lowered.compile()(x, w)
      # float32 kernels, or operands rounded to float32, would be ~1e-7 off.
      assert y.dtype == jnp.float64
      np.testing.assert_allclose(y, want, rtol=1e-12, err_msg=str(implementation))


def _fake_compiler(tmp_path: pathlib.Path, body: str) -> str:
  path = tmp_path / "fake-c++"
  path.write_text("#!/bin/sh\n" + body + "\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


@pytest.mark.parametrize("cxx, reason", [
    ("/no/such/compiler", "no C++ compiler was found"),
    ("FAKE:exit 1", "the build failed"),
    # The compiler's own message reaches the reason: every source's compile fails at once
    # (failing the link instead compiled them all for real, 40 s of the suite).
    ("FAKE:case \"$*\" in *\" -c \"*) echo 'adder_forward_cpu.cc:1: error: boom' >&2; exit 1;; "
     "*) exec c++ \"$@\";; esac", "error: boom"),
])
def test_a_failed_build_is_reported_not_raised(tmp_path, monkeypatch, cxx, reason):
  if cxx.startswith("FAKE:"):
    cxx = _fake_compiler(tmp_path, cxx[len("FAKE:"):])
  monkeypatch.setenv("CXX", cxx)
  library, why = native_build.build_and_open(tmp_path / "cache")
  assert library is None and reason in why
  assert not list((tmp_path / "cache").rglob("*.so"))


def test_disabled_by_the_environment(monkeypatch):
  monkeypatch.setenv(native_build.ENV_DISABLE, "0")
  assert native_build.build_and_open() == (None, f"{native_build.ENV_DISABLE}=0 turns them off")


def test_unavailable_kernels_fall_back_to_xla_with_one_warning(monkeypatch):
  monkeypatch.setattr(native_build, "load", lambda: (None, "no C++ compiler was found"))
  cpu_native._warn_once.cache_clear()
  x = jnp.ones((1, 5, 5, 2), jnp.float32)
  w = jnp.ones((3, 3, 2, 3), jnp.float32)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = jax.jit(lambda x, w: adder_conv(x, w)).lower(x, w).as_text()  # A fresh trace.
    jax.jit(lambda x: adder_conv(x, w, padding="VALID")).lower(x)
  assert "adderjax_adder_forward" not in text
  messages = [str(c.message) for c in caught if "native CPU adder kernels" in str(c.message)]
  assert messages == ["adderjax: the native CPU adder kernels are not available (no C++ "
                      "compiler was found); using the XLA loops instead."]
  with pytest.raises(ValueError, match="implementation='cpu' is not available here: no C"):
    adder_conv(x, w, implementation="cpu")
  cpu_native._warn_once.cache_clear()


@pytest.mark.skipif(not NATIVE, reason="native kernels unavailable")
def test_the_build_is_cached_per_machine(tmp_path, caplog, monkeypatch):
  # Unoptimised (-O0 last wins): a few seconds instead of the optimised build's ~30.
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, 'exec c++ "$@" -O0'))
  with caplog.at_level(logging.INFO, logger="adderjax"):
    library, why = native_build.build_and_open(tmp_path)
  assert library is not None and why == ""
  (built,) = list(tmp_path.rglob("libadderjax_cpu.so"))
  # A build says that it starts and how long it took; a cached library says nothing.
  start, end = [r.getMessage() for r in caplog.records if r.name == "adderjax.ops.cpu_native"]
  assert start == "Building the native CPU kernels (first use, ~30 s)..."
  assert re.fullmatch(rf"Built the native CPU kernels in \d+\.\d s \(cached in "
                      rf"{re.escape(str(built.parent))}\)\.", end)
  caplog.clear()
  mtime = built.stat().st_mtime_ns
  with caplog.at_level(logging.INFO, logger="adderjax"):
    again, _ = native_build.build_and_open(tmp_path)
  assert again is not None and built.stat().st_mtime_ns == mtime
  assert not caplog.records
  assert built.parent.parent == tmp_path / "native"
  assert library.AdderjaxVectorWidth() in (8, 16)
