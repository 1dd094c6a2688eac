"""adder_conv and adder_dense against the float64 loop oracle, per implementation.

`AdderConvTestBase` holds every numerical test; each implementation gets a
subclass that names it, so a new kernel is tested by adding three lines.
"""

import functools
import math
import zlib

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from adderjax.ops import GRAD_MODES, adder_conv, adder_dense
from tests._util import chex_variants
from tests.ops.loop_reference import adder_conv_and_grads


def _same_pads(size, k_eff, stride, lower):
  out = -(-size // stride)
  total = max((out - 1) * stride + k_eff - size, 0)
  small, large = total // 2, total - total // 2
  return (large, small) if lower else (small, large)


def _explicit_padding(padding, x_shape, w_shape, strides, dilation):
  if not isinstance(padding, str):
    return tuple(tuple(p) for p in padding)
  if padding == "VALID":
    return ((0, 0), (0, 0))
  return tuple(_same_pads(x_shape[1 + a], (w_shape[a] - 1) * dilation[a] + 1, strides[a],
                          padding == "SAME_LOWER") for a in range(2))


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


# (x shape, kernel shape, strides, padding, dilation, groups)
HAND_PICKED = [
    ((2, 7, 9, 5), (3, 3, 5, 6), 1, "SAME", 1, 1),
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, "SAME", 1, 1),
    ((2, 9, 8, 8), (3, 3, 4, 4), 2, ((1, 0), (2, 1)), 1, 2),
    ((1, 10, 11, 20), (5, 5, 20, 40), 1, "SAME", 2, 1),
    ((3, 6, 6, 4), (1, 1, 1, 4), 1, "VALID", 1, 4),       # depthwise 1x1
    ((2, 7, 7, 6), (3, 3, 1, 12), (2, 1), "SAME_LOWER", 1, 6),  # depthwise, multiplier 2
    ((2, 5, 5, 3), (5, 5, 3, 2), 1, "VALID", 1, 1),       # kernel = whole input
    ((1, 9, 6, 35), (3, 1, 35, 17), (1, 2), ((0, 2), (1, 1)), (2, 1), 1),  # 35 = 3 chunks
    ((4, 4, 4, 33), (1, 1, 33, 5), 1, "VALID", 1, 1),     # 1x1, uneven channel chunks
    ((2, 11, 13, 2), (7, 7, 2, 3), 3, "SAME", 1, 1),
    ((1, 4, 5, 130), (3, 3, 130, 131), 1, "SAME", 1, 1),  # 2 uneven tiles both ways
    ((1, 5, 4, 260), (3, 2, 130, 258), 2, "SAME", 1, 2),  # tiles within groups
]


def _random_cases(count, seed=0):
  rng = np.random.default_rng(seed)
  cases = []
  while len(cases) < count:
    groups = int(rng.choice([1, 1, 2, 3]))
    cg, og = int(rng.integers(1, 12)), int(rng.integers(1, 10))
    kh, kw = int(rng.choice([1, 2, 3, 5])), int(rng.choice([1, 3, 4]))
    strides = (int(rng.integers(1, 3)), int(rng.integers(1, 4)))
    dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    h, w = int(rng.integers(kh * dilation[0], 13)), int(rng.integers(kw * dilation[1], 13))
    padding = rng.choice(["SAME", "VALID", "SAME_LOWER", "explicit"])
    if padding == "explicit":
      padding = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(2))
    cases.append(((int(rng.integers(1, 4)), h, w, cg * groups), (kh, kw, cg, og * groups),
                  strides, str(padding) if isinstance(padding, np.str_) else padding,
                  dilation, groups))
  return cases


CASES = HAND_PICKED + _random_cases(10)

NON_FINITE_VALUES = [math.inf, -math.inf, math.nan, 2e38, -2e38]
"""An infinity or NaN, or a value whose double overflows float32 (the native max trick's trap)."""

# (x shape, w shape, padding): the 3x3 single channel, two vectors of output
# channels with padding, a long row of few channels (the native forward's pixels-in-lanes
# tile on AVX-512).
NON_FINITE_SHAPES = [((1, 5, 5, 1), (3, 3, 1, 1), "VALID"), ((1, 6, 9, 3), (3, 3, 3, 20), "SAME"),
                     ((1, 4, 40, 2), (3, 3, 2, 4), "VALID")]


@functools.cache
def _output_and_grads(implementation, padding):
  def fn(x, w):
    y, vjp = jax.vjp(lambda x, w: adder_conv(x, w, padding=padding,
                                             implementation=implementation), x, w)
    return (y, *vjp(jnp.ones_like(y)))
  return jax.jit(fn)


def assert_like_the_xla_loops(implementation, value):
  """One element of x, then of w, set to ``value``: output and gradients as the XLA loops'.

  The rule every implementation keeps: an output or gradient is what the XLA
  loops give, -sum |x - w| and the paper's formulas term by term, so it is
  -inf where a term is infinite, NaN where a NaN (or inf - inf) enters it,
  and finite where the true sum is (the native forward's max trick would give
  inf - inf or overflow there). One latitude: a NaN in ``w`` makes the x
  gradient NaN where its tap meets x through an output, and may spread further
  (0 * NaN) through the zero cotangents outside the output, as the XLA loops
  and the Pallas kernels spread it over all of x.
  """
  rng = np.random.default_rng(0)
  for x_shape, w_shape, padding in NON_FINITE_SHAPES:
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    for where in ("x", "w"):
      xv, wv = x.copy(), w.copy()
      target = xv if where == "x" else wv
      target[tuple(n // 2 for n in target.shape)] = value
      got = _output_and_grads(implementation, padding)(xv, wv)
      want = _output_and_grads("xla", padding)(xv, wv)
      for name, a, b in zip(("output", "x gradient", "w gradient"), got, want):
        message = f"{name}, {where}={value} at its middle, x {x_shape}, w {w_shape}, {padding}"
        a, b = np.asarray(a), np.asarray(b)
        if where == "w" and math.isnan(value) and name == "x gradient":
          exact = np.isnan(_output_and_grads("reference", padding)(xv, wv)[1])
          assert np.isnan(a)[exact].all(), message
          a, b = a[~np.isnan(a) & ~np.isnan(b)], b[~np.isnan(a) & ~np.isnan(b)]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=message)


def _case_id(case):
  x_shape, w_shape, strides, padding, dilation, groups = case
  return f"x{x_shape}-w{w_shape}-s{strides}-p{padding}-d{dilation}-g{groups}".replace(" ", "")


class AdderConvTestBase:
  """Every numerical property of adder_conv; subclasses set `implementation`."""

  implementation: str

  def conv(self, x, w, **kwargs):
    return adder_conv(x, w, implementation=self.implementation, **kwargs)

  @pytest.mark.parametrize("case", CASES, ids=_case_id)
  def test_forward_and_gradients_match_loop_reference(self, case):
    x_shape, w_shape, strides, padding, dilation, groups = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    x = rng.normal(size=x_shape).astype(np.float32)
    w = (0.7 * rng.normal(size=w_shape)).astype(np.float32)
    kwargs = dict(strides=strides, padding=padding, rhs_dilation=dilation,
                  feature_group_count=groups)
    oracle_kwargs = dict(strides=_pair(strides), dilation=_pair(dilation), groups=groups,
                         padding=_explicit_padding(padding, x_shape, w_shape, _pair(strides),
                                                   _pair(dilation)))
    y_shape = jax.eval_shape(lambda x, w: self.conv(x, w, **kwargs), x, w).shape
    gs = [rng.normal(size=y_shape).astype(np.float32) for _ in GRAD_MODES]

    @jax.jit
    def every_mode(x, w, gs):
      # One program for the three backward passes: one compilation per case, not three.
      results = []
      for grad_mode, g in zip(GRAD_MODES, gs):
        y, vjp = jax.vjp(lambda x, w, m=grad_mode: self.conv(x, w, grad_mode=m, **kwargs), x, w)
        results.append((y, *vjp(g)))
      return results

    expected_y = None
    for grad_mode, g, (y, dx, dw) in zip(GRAD_MODES, gs, every_mode(x, w, gs)):
      ref_y, ref_dx, ref_dw = adder_conv_and_grads(x, w, g, grad_mode=grad_mode, **oracle_kwargs)
      if expected_y is None:
        expected_y = ref_y
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5 * np.abs(ref_y).max())
      scale_dx, scale_dw = np.abs(ref_dx).max() + 1e-6, np.abs(ref_dw).max() + 1e-6
      np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=2e-6 * scale_dx, err_msg=grad_mode)
      np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=2e-6 * scale_dw, err_msg=grad_mode)

  @pytest.mark.parametrize("value", NON_FINITE_VALUES, ids=str)
  def test_non_finite_and_huge_inputs_give_what_the_xla_loops_give(self, value):
    assert_like_the_xla_loops(self.implementation, value)

  def test_an_empty_batch_gives_an_empty_result(self):
    x, w = jnp.ones((0, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    y = self.conv(x, w, padding="VALID")
    assert y.shape == (0, 6, 6, 4) and y.dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: self.conv(x, w, strides=2).sum(), (0, 1))(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and not np.any(dw)  # A sum over nothing.
    dense = adder_dense(jnp.ones((0, 5)), jnp.ones((5, 3)), implementation=self.implementation)
    assert dense.shape == (0, 3)

  def test_sign_mode_is_the_true_gradient_away_from_kinks(self):
    # Inputs in Z + 1/4 and filters in Z + 1/2: every |x - w| and every |0 - w|
    # of the zero padding is at least 1/4 away from its kink.
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 3, size=(2, 5, 6, 4)) + 0.25
    w = rng.integers(-3, 3, size=(3, 3, 2, 4)) + 0.5
    with jax.enable_x64(True):
      fn = lambda x, w: self.conv(x, w, strides=(1, 2), feature_group_count=2, grad_mode="sign")
      check_grads(fn, (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"], eps=1e-3)

  @chex_variants(with_jit=True, without_jit=True)
  def test_default_grad_mode_is_full_precision_with_hardtanh(self, variant):
    x = jnp.asarray([[[[0.0]]]])
    w = jnp.asarray([[[[3.0]]]])
    dx, dw = variant(jax.grad(lambda x, w: self.conv(x, w, padding="VALID").sum(), (0, 1)))(x, w)
    assert float(dx.squeeze()) == 1.0    # HardTanh(3 - 0) = 1
    assert float(dw.squeeze()) == -3.0   # X - F = 0 - 3

  def test_bfloat16_and_float16_accumulate_and_return_float32(self):
    rng = np.random.default_rng(2)
    x32 = rng.normal(size=(2, 8, 8, 24)).astype(np.float32)
    w32 = rng.normal(size=(3, 3, 24, 8)).astype(np.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
      x, w = jnp.asarray(x32, dtype), jnp.asarray(w32, dtype)
      y, vjp = jax.vjp(lambda x, w: self.conv(x, w), x, w)
      # The offset -sum|w| is far larger than the signal: never half precision by default.
      assert y.dtype == jnp.float32
      dx, dw = vjp(jnp.ones_like(y))
      assert dx.dtype == dtype and dw.dtype == dtype
      # The exact sums of the rounded inputs, in float32 (a half-precision
      # accumulator or output over 216 terms would be off by far more).
      exact, _, exact_dw = adder_conv_and_grads(
          np.asarray(x, np.float64), np.asarray(w, np.float64), np.ones(y.shape),
          strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1,
          grad_mode="full_precision")
      np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=1e-5, atol=0)
      ulp = float(jnp.finfo(dtype).eps)
      np.testing.assert_allclose(np.asarray(dw, np.float64), exact_dw, rtol=ulp,
                                 atol=ulp * np.abs(exact_dw).max())

  def test_preferred_element_type(self):
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    w = jnp.full((3, 3, 2, 3), 3.0, jnp.bfloat16)
    y = self.conv(x, w, preferred_element_type=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32)[0, 1, 1], -36.0)
    dx = jax.grad(lambda x: self.conv(x, w, preferred_element_type=jnp.float32).sum())(x)
    assert dx.dtype == jnp.bfloat16
    for bad in (jnp.int32, "not a dtype"):
      with pytest.raises(TypeError, match="preferred_element_type"):
        self.conv(x, w, preferred_element_type=bad)

  def test_mixed_dtypes_promote(self):
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    w = jnp.zeros((3, 3, 2, 3), jnp.float32)
    assert self.conv(x, w).dtype == jnp.float32

  def test_vmap_matches_a_loop(self):
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(self.conv(x, w, strides=2)))
    # Jitted, not op by op: each eager primitive would compile on its own.
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1))))(xs, ws)
    single_step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    for k in range(3):
      chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], batched),
                                  single_step(xs[k], ws[k]), rtol=1e-5, atol=1e-4)
    # Only the input batched, a shared kernel: the usual per-example case.
    y, y1 = jax.jit(lambda xs: (jax.vmap(lambda x: self.conv(x, ws[0]))(xs),
                                self.conv(xs[1], ws[0])))(xs)
    np.testing.assert_allclose(y[1], y1, rtol=1e-6)

  def test_remat_and_jit_give_the_same_gradients(self):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    loss = lambda x, w: jnp.sum(self.conv(jax.nn.relu(x), w) ** 2) * 1e-3
    plain = jax.grad(loss, (0, 1))(x, w)
    # Eager remat is not a variant: it would add ~5 s per implementation.
    remat = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, w)
    chex.assert_trees_all_close(remat, plain, rtol=1e-5, atol=1e-5)

  def test_adder_dense_matches_loop_reference(self):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 37)).astype(np.float32)
    w = rng.normal(size=(37, 6)).astype(np.float32)
    for grad_mode in GRAD_MODES:
      y, vjp = jax.vjp(lambda x, w, grad_mode=grad_mode: adder_dense(
          x, w, grad_mode=grad_mode, implementation=self.implementation), x, w)
      g = rng.normal(size=y.shape).astype(np.float32)
      dx, dw = vjp(g)
      x4 = x.reshape(6, 1, 1, 37)
      ref_y, ref_dx, ref_dw = adder_conv_and_grads(
          x4, w[None, None], g.reshape(6, 1, 1, 6), strides=(1, 1), padding=((0, 0), (0, 0)),
          dilation=(1, 1), groups=1, grad_mode=grad_mode)
      np.testing.assert_allclose(y, ref_y.reshape(2, 3, 6), rtol=1e-5)
      np.testing.assert_allclose(dx, ref_dx.reshape(x.shape), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(dw, ref_dw[0, 0], rtol=1e-5, atol=1e-5)
    # -sum_k |x_k - w_kn| by hand.
    np.testing.assert_allclose(
        adder_dense(jnp.array([1.0, -2.0]), jnp.array([[0.5, 0.0], [1.0, -2.0]]),
                    implementation=self.implementation), [-3.5, -1.0])


class TestXla(AdderConvTestBase):
  implementation = "xla"

  def test_temp_memory_is_of_the_order_of_input_plus_output(self):
    # The official formulation's broadcast would be B*Ho*Wo * 3*3*C * O * 4 bytes
    # = 302 MB here; the loops need a padded input and a few windows.
    x = jax.ShapeDtypeStruct((16, 32, 32, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 64), jnp.float32)
    loss = lambda x, w: jnp.sum(self.conv(x, w) ** 2)
    io_bytes = (math.prod(x.shape) + 2 * math.prod((16, 32, 32, 64))) * 4
    for fn in (self.conv, jax.grad(loss, (0, 1))):
      temp = jax.jit(fn).lower(x, w).compile().memory_analysis().temp_size_in_bytes
      assert temp < 4 * io_bytes, (fn, temp, io_bytes)


class TestReference(AdderConvTestBase):
  implementation = "reference"


class TestBadInput:
  x = jnp.zeros((2, 8, 8, 4))
  w = jnp.zeros((3, 3, 4, 6))

  @pytest.mark.parametrize("kwargs, error, match", [
      (dict(x=jnp.zeros((8, 8, 4))), ValueError, "x must be a 4-D"),
      (dict(w=jnp.zeros((3, 4, 6))), ValueError, "w must be a 4-D"),
      (dict(x=[[1.0]]), TypeError, "x must be an array"),
      (dict(x=jnp.zeros((2, 8, 8, 4), jnp.int32)), TypeError, "x must have a floating-point"),
      (dict(w=jnp.zeros((3, 3, 4, 6), jnp.int8)), TypeError, "w must have a floating-point"),
      (dict(w=jnp.zeros((3, 3, 5, 6))), ValueError, "Channel mismatch"),
      (dict(x=jnp.zeros((2, 8, 8, 0)), w=jnp.zeros((3, 3, 0, 6))), ValueError,
       "x must have at least one input channel"),
      (dict(w=jnp.zeros((3, 3, 4, 0))), ValueError, "w must have at least one output channel"),
      (dict(feature_group_count=3), ValueError, "feature_group_count=3 does not divide"),
      (dict(feature_group_count=2, w=jnp.zeros((3, 3, 2, 5))), ValueError,
       "feature_group_count=2 does not divide the output"),
      (dict(feature_group_count=0), ValueError, "feature_group_count must be a positive"),
      (dict(strides=0), ValueError, "strides must be positive"),
      (dict(strides=(1, -1)), ValueError, "strides must be positive"),
      (dict(strides=(1, 1, 1)), ValueError, "strides must be an int or a pair"),
      (dict(rhs_dilation=0), ValueError, "rhs_dilation must be positive"),
      (dict(padding="FULL"), ValueError, "padding must be one of"),
      (dict(padding=((1, 1),)), ValueError, "padding must be one of"),
      (dict(padding=((-1, 0), (0, 0))), ValueError, "padding must be non-negative"),
      (dict(w=jnp.zeros((0, 3, 4, 6))), ValueError, r"w must have a kernel of at least 1x1 .*"
       r"shape \(0, 3, 4, 6\)"),
      (dict(w=jnp.zeros((3, 0, 4, 6)), padding="VALID"), ValueError, "w must have a kernel"),
      (dict(w=jnp.zeros((9, 3, 4, 6)), padding="VALID"), ValueError, "spans 9 positions"),
      (dict(w=jnp.zeros((3, 3, 4, 6)), rhs_dilation=5, padding=((1, 1), (1, 1))), ValueError,
       "more than the padded input"),
      (dict(grad_mode="exact"), ValueError, "grad_mode must be one of"),
      (dict(implementation="cuda"), ValueError, "implementation must be None or one of"),
  ])
  def test_adder_conv_rejects(self, kwargs, error, match):
    args = dict(x=self.x, w=self.w)
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("w")
    with pytest.raises(error, match=match):
      adder_conv(x, w, **args)

  @pytest.mark.parametrize("x, w, error, match", [
      (jnp.zeros((2, 5)), jnp.zeros((4, 3)), ValueError, "Feature mismatch"),
      (jnp.zeros((2, 5)), jnp.zeros((5,)), ValueError, "w must be a 2-D"),
      (jnp.zeros(()), jnp.zeros((1, 3)), ValueError, "x must have at least one dimension"),
      (jnp.zeros((2, 5), jnp.int32), jnp.zeros((5, 3)), TypeError, "x must have a floating"),
      (np.zeros((2, 5)), "w", TypeError, "w must be an array"),
  ])
  def test_adder_dense_rejects(self, x, w, error, match):
    with pytest.raises(error, match=match):
      adder_dense(x, w)


def test_reference_forward_matches_official_formulation():
  # The official code: unfold, broadcast against every filter, sum |.|.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  patches = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # conv_general_dilated_patches orders features as (C, kh, kw).
  flat_w = w.transpose(2, 0, 1, 3).reshape(27, 4)
  official = -jnp.abs(patches[..., :, None] - flat_w).sum(-2)
  np.testing.assert_allclose(adder_conv(x, w, implementation="reference"), official, rtol=1e-6)
