"""adderjax.attention (exported by adderjax.nn) against a direct NumPy computation."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.nn import adder_attention, adder_attention_weights


def _numpy_weights(q, k, *, scale, mask=None, bias=None, identity=True):
  """softmax(-scale * sum |q - k| + bias) over the keys, masked, plus the masked identity."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  out = np.zeros((batch, heads, q_len, kv_len))
  for b in range(batch):
    for h in range(heads):
      for i in range(q_len):
        logits = np.array([-scale * np.abs(q[b, i, h] - k[b, j, h]).sum() for j in range(kv_len)])
        if bias is not None:
          logits = logits + np.broadcast_to(bias, out.shape)[b, h, i]
        keep = np.ones(kv_len, bool) if mask is None else np.broadcast_to(mask, out.shape)[b, h, i]
        e = np.where(keep, np.exp(logits - logits[keep].max()), 0)
        out[b, h, i] = e / e.sum()
        if identity and keep[i]:
          out[b, h, i, i] += 1
  return out


def _qkv(batch=2, length=5, heads=3, depth=4, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=(batch, length, heads, depth)).astype(np.float32)
               for _ in range(3))


def test_weights_and_output_match_numpy():
  q, k, v = _qkv()
  expected = _numpy_weights(q, k, scale=0.5)  # 1 / sqrt(depth 4)
  np.testing.assert_allclose(adder_attention_weights(q, k), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adder_attention(q, k, v),
                             np.einsum("bhqk,bkhd->bqhd", expected, v), rtol=1e-5, atol=1e-5)
  # The identity term is each query's own value added to softmax attention.
  plain = _numpy_weights(q, k, scale=0.5, identity=False)
  np.testing.assert_allclose(adder_attention(q, k, v, identity=False),
                             np.einsum("bhqk,bkhd->bqhd", plain, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adder_attention(q, k, v) - adder_attention(q, k, v, identity=False),
                             v, rtol=1e-5, atol=1e-5)


def test_mask_bias_causal_and_scale():
  q, k, v = _qkv(seed=1)
  rng = np.random.default_rng(2)
  mask = rng.uniform(size=(2, 1, 5, 5)) > 0.3
  mask[..., 0] = True  # every query keeps a key
  bias = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
  expected = _numpy_weights(q, k, scale=0.2, mask=mask, bias=bias)
  got = adder_attention_weights(q, k, bias, mask, scale=0.2)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adder_attention(q, k, v, bias, mask, scale=0.2),
                             np.einsum("bhqk,bkhd->bqhd", expected, v), rtol=1e-5, atol=1e-5)
  causal = np.tril(np.ones((5, 5), bool))
  np.testing.assert_allclose(adder_attention_weights(q, k, is_causal=True),
                             _numpy_weights(q, k, scale=0.5, mask=causal), rtol=1e-5, atol=1e-6)


def test_gradient_is_the_exact_one():
  q, k, _ = _qkv(batch=1, length=3, heads=1, depth=2, seed=3)
  loss = jax.jit(lambda q, k: jnp.sum(adder_attention_weights(q, k, identity=False)[..., 0, 1]))
  gq, gk = jax.grad(loss, argnums=(0, 1))(q, k)
  eps = 1e-3
  numeric = np.zeros_like(q)
  for index in np.ndindex(q.shape):
    step = np.zeros_like(q)
    step[index] = eps
    numeric[index] = (loss(q + step, k) - loss(q - step, k)) / (2 * eps)
  np.testing.assert_allclose(gq, numeric, rtol=1e-2, atol=1e-3)
  assert np.all(np.isfinite(gk)) and np.any(gk != 0)


def test_dropout_follows_flax():
  q, k, v = _qkv(seed=4)
  rng = jax.random.key(0)
  plain = adder_attention_weights(q, k, identity=False)
  dropped = adder_attention_weights(q, k, dropout_rng=rng, dropout_rate=0.5, identity=False)
  kept = np.asarray(dropped) != 0
  assert 0.2 < kept.mean() < 0.8
  np.testing.assert_allclose(np.asarray(dropped)[kept], 2 * np.asarray(plain)[kept], rtol=1e-5)
  # Broadcast dropout drops the same pairs in every batch entry and head.
  assert np.all(kept == kept[:1, :1])
  np.testing.assert_array_equal(
      adder_attention_weights(q, k, dropout_rng=rng, dropout_rate=0.5, deterministic=True),
      adder_attention_weights(q, k))


def _numpy_init(key, shape, dtype):  # no random initialiser to compile
  seed = int(np.sum(jax.random.key_data(key)))
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 0.3, dtype)


def test_as_the_attention_fn_of_multi_head_attention():
  layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                 attention_fn=functools.partial(adder_attention, scale=0.3),
                                 kernel_init=_numpy_init, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 8)), jnp.float32)
  mask = np.asarray(np.tril(np.ones((2, 1, 4, 4))), bool)
  run = nnx.jit(lambda layer, x: nnx.capture(layer, nnx.Intermediate)(x, mask=mask,
                                                                      sow_weights=True))
  y, captured = run(layer, x)
  q, k, v = layer.query(x), layer.key(x), layer.value(x)
  expected = _numpy_weights(q, k, scale=0.3, mask=mask)
  np.testing.assert_allclose(y, layer.out(jnp.einsum("bhqk,bkhd->bqhd", expected, v)),
                             rtol=1e-4, atol=1e-4)
  sown = dict(nnx.to_flat_state(captured))[("attention_weights",)].get_value()[0]
  np.testing.assert_allclose(sown, expected, rtol=1e-5, atol=1e-6)


def test_grouped_query_heads():
  q, _, _ = _qkv(heads=4, seed=6)
  _, k, v = _qkv(heads=2, seed=7)
  repeat = lambda x: np.repeat(x, 2, axis=2)
  np.testing.assert_allclose(adder_attention(q, k, v), adder_attention(q, repeat(k), repeat(v)),
                             rtol=1e-6)


@pytest.mark.parametrize("options, match", [
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale="1"), "scale="),
    (dict(identity=1), "identity must be a bool"),
    (dict(dropout_rate=1.0), "dropout_rate must be in"),
    (dict(dropout_rate=0.1), "dropout_rng must be given"),
])
def test_bad_options_are_named(options, match):
  q, k, v = _qkv(batch=1, length=2, heads=1, depth=2)
  with pytest.raises(ValueError, match=match):
    adder_attention(q, k, v, **options)


def test_bad_shapes_are_named():
  q, k, v = _qkv(batch=1, length=3, heads=2, depth=2)
  with pytest.raises(ValueError, match="identity=True .* q_length=3 and kv_length=2"):
    adder_attention(q, k[:, :2], v[:, :2])
  assert adder_attention(q, k[:, :2], v[:, :2], identity=False).shape == (1, 3, 2, 2)
  with pytest.raises(ValueError, match="same batch dims and depth"):
    adder_attention(q, k[..., :1], v)
  with pytest.raises(ValueError, match="value must have key's"):
    adder_attention(q, k, v[:, :2])
  with pytest.raises(ValueError, match="multiple of key's heads"):
    adder_attention(np.concatenate([q, q[:, :, :1]], 2), k, v)


def test_half_precision_inputs_sum_in_float32():
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(depth=64, seed=8))
  out = adder_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  expected = _numpy_weights(np.asarray(q, np.float32), np.asarray(k, np.float32), scale=1 / 8)
  np.testing.assert_allclose(np.asarray(adder_attention_weights(q, k), np.float32), expected,
                             atol=2e-2)
