"""The Pallas kernels of adderjax.ops.pallas_gpu, their dispatch and their multi-device wrapper.

On CPU the kernels run in Pallas' interpreter (``implementation="pallas_interpret"``)
on a few shapes, since the interpreter compiles slowly; the compiled kernels
(``"pallas"``) run the whole shared test base when a GPU is present. Without a
GPU, the kernels are still lowered for CUDA (Pallas' Triton lowering runs on a
CPU jaxlib), which catches what only the Triton lowering rejects.
"""

import re

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from adderjax.ops import adder_conv, pallas_gpu, pallas_kernels, reference, window_geometry
from adderjax.ops.spec import conv_spec
from tests.ops.test_adder_conv import (
    HAND_PICKED,
    AdderConvTestBase,
    _case_id,
    assert_like_the_xla_loops,
)

ON_GPU = jax.default_backend() == "gpu"

# The interpreter compiles each kernel for about a second: two shapes that
# cover strides, phases, dilation, groups and ragged tiles (the option tests
# below add a stride-1 SAME layer with 5 -> 6 channels).
INTERPRET_CASES = [
    HAND_PICKED[2],   # stride 2, asymmetric padding, 2 groups: 4 input-gradient phases
    HAND_PICKED[7],   # (1, 2) strides, (2, 1) dilation, 35 -> 17 channels: ragged tiles
]


def _case_operands(case, seed=0):
  x_shape, w_shape, strides, padding, dilation, groups = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(0.7 * rng.normal(size=w_shape), jnp.float32)
  spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=dilation,
                   feature_group_count=groups)
  return x, w, spec, rng


class TestPallasInterpret(AdderConvTestBase):
  implementation = "pallas_interpret"

  @pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
  def test_forward_and_gradients_match_loop_reference(self, case):
    super().test_forward_and_gradients_match_loop_reference(case)

  def test_vmap_matches_a_loop(self):
    # The base test at stride 1 and with fewer compilations: the same vmap
    # rules (both operands batched, only the input batched) with one
    # input-gradient kernel instead of four, which the interpreter would
    # compile for 20 s.
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(2, 2, 5, 5, 3)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(2, 3, 3, 3, 4)), jnp.float32)
    loss = lambda x, w: (jnp.sum(jnp.sin(y := self.conv(x, w))), y)
    step = jax.value_and_grad(loss, (0, 1), has_aux=True)
    batched = jax.jit(jax.vmap(step))(xs, ws)
    single = jax.jit(step)
    for k in range(2):
      chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], batched),
                                  single(xs[k], ws[k]), rtol=1e-5, atol=1e-4)
    # Only the input batched, a shared kernel: the usual per-example case.
    y = jax.jit(jax.vmap(lambda x: self.conv(x, ws[0])))(xs)
    np.testing.assert_allclose(y[0], batched[0][1][0], rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend")
class TestPallasGpu(AdderConvTestBase):
  implementation = "pallas"


# The kernels' index arithmetic, in plain jnp, on every shared case.


@pytest.mark.parametrize("case", INTERPRET_CASES[:1], ids=_case_id)
def test_jnp_references_of_the_kernels_match_the_oracle(case):
  x, w, spec, rng = _case_operands(case)
  g = jnp.asarray(rng.normal(size=reference.forward(x, w, spec).shape), jnp.float32)

  @jax.jit  # one compilation instead of one per eager op
  def both(x, w, g):
    return ((window_geometry.forward_reference(x, w, spec=spec), reference.forward(x, w, spec)),
            (window_geometry.input_grad_reference(x, w, g, spec=spec),
             reference.input_grad(x, w, g, spec, "full_precision")))

  (y, want_y), (dx, want_dx) = both(x, w, g)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_y).max()))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=2e-6 * float(jnp.abs(want_dx).max()))


@pytest.mark.parametrize("options, kernels", [
    (dict(method="max"), ("forward",)),
    (dict(block_m=16, block_n=4, num_warps=2, num_stages=1), ("forward", "input_grad")),
    (dict(fused_saturate=True), ("input_grad",)),  # interpreted: falls back to min/max
], ids=["max", "small-tiles", "fused-saturate"])
def test_kernel_options_give_the_same_result(options, kernels):
  # Ragged in every tile dimension: 2*9*7 = 126 rows, 6 output and 5 input channels.
  x, w, spec, rng = _case_operands(HAND_PICKED[0])
  implementation = pallas_gpu.PallasAdderConv(interpret=True, **options)
  y = reference.forward(x, w, spec)
  if "forward" in kernels:
    np.testing.assert_allclose(implementation.forward(x, w, spec), y, rtol=1e-5, atol=2e-5)
  if "input_grad" in kernels:
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    np.testing.assert_allclose(implementation.input_grad(x, w, g, spec, "full_precision"),
                               reference.input_grad(x, w, g, spec, "full_precision"),
                               rtol=1e-5, atol=1e-5)


def _gpu_saturate(v_scale, v_offset, fused):
  """The saturation as compiled for a GPU: ``fma.rn.sat.f32`` and PTX's min/max make NaN 0."""
  del fused
  v = 0.5 * v_scale + v_offset
  return jnp.where(jnp.isnan(v), 0, jnp.clip(v, 0, 1))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=str)
def test_input_gradient_keeps_the_nans_that_a_gpus_saturation_drops(monkeypatch, value):
  # The interpreter's jnp.minimum/maximum carry NaN, a GPU's do not (the H200 run of
  # TestPallasGpu failed here): the kernel runs interpreted with a GPU's saturation. Its
  # options are this test's alone, so that no earlier trace of the kernel is reused.
  monkeypatch.setattr(pallas_kernels, "_saturate", _gpu_saturate)
  implementation = pallas_gpu.PallasAdderConv(interpret=True, num_stages=5)
  if np.isnan(value):
    assert_like_the_xla_loops(implementation, value)  # NaN in x, then in w
  # inf - inf: an infinite pixel meets a filter of the same infinity.
  rng = np.random.default_rng(1)
  x, w = rng.normal(size=(1, 5, 5, 3)).astype(np.float32), rng.normal(size=(3, 3, 3, 4))
  x[0, 2, 2, 1], w = value, w.astype(np.float32)
  w[0, 0, 1, 2] = value
  layer = lambda impl: jax.vjp(lambda x: adder_conv(x, w, implementation=impl), x)[1]
  g = jnp.ones((1, 5, 5, 4), jnp.float32)
  got, want = layer(implementation)(g)[0], layer("xla")(g)[0]
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_m=48), "block_m must be None or a power of 2"),
    (dict(block_n=0), "block_n must be None or a power of 2"),
    (dict(num_warps=0), "num_warps must be None or a positive int"),
    (dict(method="l2"), "method must be one of"),
])
def test_bad_kernel_options_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pallas_gpu.PallasAdderConv(**kwargs)


# Dispatch.


def _jaxpr_text(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


def test_default_implementation_is_pallas_on_gpu(monkeypatch):
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
  uses_pallas = lambda: "pallas_call" in _jaxpr_text(lambda x, w: adder_conv(x, w), x, w)
  assert uses_pallas() == ON_GPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what every implementation asks
  assert uses_pallas()
  # A layer the kernels cannot run falls back to XLA: shapes only, nothing allocated.
  big_x = jax.ShapeDtypeStruct((2**16, 128, 128, 1), jnp.float32)
  big_w = jax.ShapeDtypeStruct((1, 1, 1, 4), jnp.float32)
  assert "pallas_call" not in _jaxpr_text(lambda x, w: adder_conv(x, w), big_x, big_w)
  with pytest.raises(ValueError, match="int32 offsets"):
    jax.eval_shape(lambda x, w: adder_conv(x, w, implementation="pallas"), big_x, big_w)


@pytest.mark.skipif(ON_GPU, reason="checks the error on a backend without GPU")
def test_explicit_pallas_without_a_gpu_says_why():
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match="default backend is 'cpu'.*pallas_interpret"):
    adder_conv(x, w, implementation="pallas")


def test_unknown_implementation_lists_every_choice():
  with pytest.raises(ValueError, match="'xla', 'cpu', 'reference', 'pallas', 'pallas_interpret'"):
    adder_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), implementation="cuda")


# The Triton lowering, on any backend.


@pytest.mark.parametrize("case, options", [
    (HAND_PICKED[0], {}),
    (HAND_PICKED[2], dict(method="max", fused_saturate=True)),
    (HAND_PICKED[5], dict(block_m=32, num_warps=8, num_stages=3)),  # depthwise, 1 channel a group
], ids=["ragged", "strided-groups-max-sat", "depthwise"])
def test_kernels_lower_for_cuda(monkeypatch, case, options):
  # Lowering runs Pallas' Triton lowering (shapes of powers of 2, supported
  # ops, inline PTX) but not Triton's compiler, which needs the CUDA jaxlib.
  x, w, _, _ = _case_operands(case)
  kernels = pallas_gpu.PallasAdderConv(**options)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  _, _, strides, padding, dilation, groups = case
  layer = lambda x, w: adder_conv(x, w, strides=strides, padding=padding, rhs_dilation=dilation,
                                  feature_group_count=groups, implementation=kernels)
  step = jax.jit(lambda x, w: jax.vjp(layer, x, w)[1](layer(x, w)))
  text = step.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") >= 2, "forward and input-gradient kernels"


# Several devices (tests/conftest.py gives the CPU backend 8).


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_batch_sharded_step_runs_the_kernels_per_shard(axis_type):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices; run under tests/conftest.py")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)
  layer = lambda x, w, impl="pallas_interpret": adder_conv(x, w, implementation=impl)
  loss = lambda x, w, impl="pallas_interpret": jnp.sum(layer(x, w, impl) ** 2)
  want = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "xla"), (0, 1)))(x, w)

  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8], axis_types=(axis_type,))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ws = jax.device_put(w, NamedSharding(mesh, P()))
  got = jax.jit(jax.value_and_grad(loss, (0, 1)))(xs, ws)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * float(jnp.abs(b).max()))
  assert got[1][0].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
  # Each device runs the kernel on its 2 images; no collective moves the batch.
  hlo = jax.jit(layer).lower(xs, ws).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
  assert "f32[2,5,5,8]" in hlo


def test_implementation_takes_a_pallas_instance_with_its_options():
  x, w, spec, _ = _case_operands(HAND_PICKED[0])
  _, _, strides, padding, dilation, groups = HAND_PICKED[0]
  kernels = pallas_gpu.PallasAdderConv(interpret=True, block_m=16, block_n=4)
  layer = lambda x, w, impl: adder_conv(x, w, strides=strides, padding=padding,
                                        rhs_dilation=dilation, feature_group_count=groups,
                                        implementation=impl)
  np.testing.assert_allclose(layer(x, w, kernels), reference.forward(x, w, spec),
                             rtol=1e-5, atol=2e-5)
  # A compiled instance needs a GPU, as "pallas" does.
  if not ON_GPU:
    with pytest.raises(ValueError, match=r"implementation=PallasAdderConv\(.*default backend"):
      layer(x, w, pallas_gpu.PallasAdderConv(block_m=16))


# A JAX without Pallas' Triton lowering (deprecated since JAX 0.11), simulated
# in a fresh interpreter where importing it fails.
_WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # import raises ImportError
import jax
import jax.numpy as jnp
import adderjax
from adderjax.nn import AdderConv
from adderjax.ops import adder_conv, pallas_gpu
from flax import nnx

assert "Triton lowering" in pallas_gpu.UNAVAILABLE_REASON, pallas_gpu.UNAVAILABLE_REASON
assert "adderjax.ops.pallas_kernels" not in sys.modules
x, w = jnp.ones((2, 6, 6, 2)), jnp.zeros((3, 3, 2, 4))
jax.default_backend = lambda: "gpu"  # None would pick the kernels on a GPU
assert float(adder_conv(x, w, padding="VALID")[0, 0, 0, 0]) == -18.0
layer = AdderConv(2, 4, 3, rngs=nnx.Rngs(0))
assert layer(x).shape == (2, 6, 6, 4)
for impl in ("pallas", "pallas_interpret", pallas_gpu.PallasAdderConv(interpret=True)):
  try:
    adder_conv(x, w, implementation=impl)
  except ValueError as e:
    assert "Triton lowering" in str(e) and "implementation='xla'" in str(e), str(e)
  else:
    raise AssertionError(f"implementation={impl!r} ran without Triton")
print("ok")
"""


def test_a_jax_without_the_triton_lowering_falls_back_to_xla():
  import subprocess
  import sys
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
