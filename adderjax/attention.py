"""Adder attention: self-attention whose query-key similarity is a negative L1 distance.

Shu et al., "Adder Attention for Vision Transformer", NeurIPS 2021, replace
the query-key products of self-attention by the adder similarity
``-sum_d |q_d - k_d|`` and observe that an attention map made of additions
alone loses rank (feature diversity); they add an identity mapping to keep
it. :func:`adder_attention` is that attention as a drop-in ``attention_fn``
of :class:`flax.nnx.MultiHeadAttention` (the same signature as
:func:`flax.nnx.dot_product_attention`), and :func:`adder_attention_weights`
its weights.
"""

from __future__ import annotations

import math

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, PrecisionLike, PromoteDtypeFn
import jax
import jax.numpy as jnp

__all__ = ["adder_attention", "adder_attention_weights"]


def _check_shapes(query: jax.Array, key: jax.Array) -> None:
  if query.ndim < 3 or key.ndim != query.ndim:
    raise ValueError(f"query and key must be [batch..., length, num_heads, depth] of the same "
                     f"rank, got shapes {query.shape} and {key.shape}.")
  if query.shape[:-3] != key.shape[:-3] or query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key must have the same batch dims and depth, got shapes "
                     f"{query.shape} and {key.shape}.")
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(f"query's heads ({query.shape[-2]}) must be a multiple of key's heads "
                     f"({key.shape[-2]}).")


def _repeat_heads(x: jax.Array, heads: int) -> jax.Array:
  """Repeats each of x's heads for grouped-query attention (no copy for equal heads)."""
  return x if x.shape[-2] == heads else jnp.repeat(x, heads // x.shape[-2], axis=-2)


def adder_attention_weights(
    query: jax.Array,
    key: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    module: nnx.Module | None = None,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    identity: bool = True,
) -> jax.Array:
  """The adder attention weights ``softmax(-scale * sum_d |q_d - k_d| + bias) + I``.

  For each batch entry and head, the logit of query ``i`` and key ``j`` is
  ``-scale * sum_d |query[i, d] - key[j, d]|`` plus ``bias``; pairs whose
  ``mask`` is False (or above the diagonal with ``is_causal``) get the
  lowest float, as in :func:`flax.nnx.dot_product_attention_weights`; a
  softmax over the keys, then dropout, as there. With ``identity`` the
  identity matrix is added after the softmax and the dropout, on the pairs
  the mask keeps: query ``i`` also takes key ``i``'s value in full, Shu et
  al.'s identity mapping, which keeps the attention map from losing rank.
  The rows then sum to 2 (1 for a query whose own key is masked out); they
  are not renormalised (an output projection after the attention absorbs
  the factor).

  The default ``scale`` is ``1 / sqrt(depth)``, as for dot products: for
  independent standard normal ``q`` and ``k`` the L1 distance has a standard
  deviation of about ``0.85 * sqrt(depth)`` (``sqrt(2 - 4 / pi)`` per
  dimension), so the logits spread over about one unit, as scaled dot
  products do (the softmax ignores the common offset). The distances are
  summed in float32 (or wider) whatever the inputs' dtype. The gradient is
  the exact one, ``sign(q - k)`` away from ties (where JAX's ``abs`` takes
  +1), for queries and keys alike: both are activations, and AdderNet's
  asymmetric weight and input rules have no counterpart here.

  Example:
    >>> import numpy as np
    >>> from adderjax.nn import adder_attention_weights
    >>> q = k = np.array([[[0.0]], [[3.0]]])  # 2 tokens, 1 head, depth 1
    >>> np.asarray(adder_attention_weights(q, k, identity=False), float).round(3).tolist()
    [[[0.953, 0.047], [0.047, 0.953]]]
    >>> adder_attention_weights(q, k)[0].sum(-1).tolist()
    [2.0, 2.0]

  Args:
    query: ``[batch..., q_length, num_heads, depth]``.
    key: ``[batch..., kv_length, num_kv_heads, depth]``; ``num_heads`` a
      multiple of ``num_kv_heads`` (grouped-query attention).
    bias: added to the logits, broadcastable to ``[batch..., num_heads,
      q_length, kv_length]``.
    mask: False where a query may not attend to a key, broadcastable to the
      same shape.
    broadcast_dropout: drop the same pairs in every batch entry and head.
    dropout_rng: the dropout key.
    dropout_rate: the dropout rate of the softmax weights.
    deterministic: no dropout.
    dtype: the dtype of the computation (default: infer from the inputs).
    precision: accepted for the hook's signature (no product to take it).
    module: where to sow the weights (``nnx.Intermediate``,
      ``"attention_weights"``), as Flax's attention does; None for nowhere.
    promote_dtype: promotes ``(query, key, None)`` to ``dtype``.
    is_causal: mask the pairs above the diagonal.
    scale: the factor of the L1 distances (default ``1 / sqrt(depth)``).
    identity: add the identity matrix (needs ``q_length == kv_length``).

  Returns:
    ``[batch..., num_heads, q_length, kv_length]`` weights.

  Raises:
    ValueError: for shapes that do not fit, a bad ``scale``, ``identity``
      with ``q_length != kv_length``, or ``dropout_rate`` out of [0, 1).
  """
  del precision
  query, key, _ = promote_dtype((query, key, None), dtype=dtype)
  dtype = query.dtype
  _check_shapes(query, key)
  if scale is None:
    scale = 1 / math.sqrt(query.shape[-1])
  elif (isinstance(scale, bool) or not isinstance(scale, (int, float))
        or not math.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale must be a finite number > 0 or None, got scale={scale!r}.")
  if not isinstance(identity, bool):
    raise ValueError(f"identity must be a bool, got identity={identity!r}.")
  if not 0 <= dropout_rate < 1:
    raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={dropout_rate!r}.")
  q_length, kv_length = query.shape[-3], key.shape[-3]
  if identity and q_length != kv_length:
    raise ValueError(f"identity=True adds the identity matrix, which needs as many queries as "
                     f"keys, got q_length={q_length} and kv_length={kv_length}; pass "
                     f"identity=False for cross-attention.")
  key = _repeat_heads(key, query.shape[-2])

  # [batch..., q, 1, h, d] - [batch..., 1, k, h, d] summed over d: [batch..., q, k, h].
  distance = jnp.sum(jnp.abs(query[..., :, None, :, :] - key[..., None, :, :, :]), axis=-1,
                     dtype=jnp.promote_types(dtype, jnp.float32))
  logits = jnp.moveaxis(-scale * distance, -1, -3).astype(dtype)
  if bias is not None:
    logits = logits + bias
  keep = None
  if mask is not None:
    keep = jnp.asarray(mask, bool)
  if is_causal:
    causal = jnp.tril(jnp.ones((q_length, kv_length), bool))
    keep = causal if keep is None else jnp.logical_and(keep, causal)
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.finfo(dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)

  if not deterministic and dropout_rate > 0:
    if dropout_rng is None:
      raise ValueError("dropout_rng must be given for dropout (dropout_rate > 0 and not "
                       "deterministic), got dropout_rng=None.")
    keep_prob = 1 - dropout_rate
    shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast_dropout
             else weights.shape)
    kept = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (kept.astype(dtype) / jnp.asarray(keep_prob, dtype))

  if identity:
    eye = jnp.eye(q_length, dtype=dtype)
    weights = weights + (eye if keep is None else jnp.where(keep, eye, 0).astype(dtype))
  if module is not None:
    module.sow(nnx.Intermediate, "attention_weights", weights)
  return weights


def adder_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    module: nnx.Module | None = None,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    identity: bool = True,
) -> jax.Array:
  """Adder attention (Shu et al., NeurIPS 2021): an ``attention_fn`` for ``nnx.MultiHeadAttention``.

  The output is ``W @ value`` per batch entry and head, with the weights
  ``W = softmax(-scale * sum_d |q_d - k_d| + bias) + I`` of
  :func:`adder_attention_weights` (masked, with dropout on the softmax
  part). With the identity term (``identity=True``, the default) that is
  the softmax attention plus each query's own value, ``softmax(A) V + V``:
  our reading of the paper's "additional identity mapping", which keeps the
  map ``W`` full-rank where the additions' softmax alone loses rank.

  The arguments are those of :func:`flax.nnx.dot_product_attention`, in the
  same order, so :class:`flax.nnx.MultiHeadAttention` calls it as its
  ``attention_fn``; ``scale`` and ``identity`` are set with
  :func:`functools.partial`. The distances are computed by broadcasting, in
  ``batch * heads * q_length * kv_length * depth`` memory: meant for the
  short sequences of small vision transformers. The query and key projections
  of ``MultiHeadAttention`` stay multiplicative.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import adder_attention
    >>> attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
    ...                                    attention_fn=adder_attention, rngs=nnx.Rngs(0))
    >>> attention(jnp.ones((3, 5, 8))).shape
    (3, 5, 8)

  Args:
    query: ``[batch..., q_length, num_heads, depth]``.
    key: ``[batch..., kv_length, num_kv_heads, depth]``.
    value: ``[batch..., kv_length, num_kv_heads, v_depth]``.
    bias: as in :func:`adder_attention_weights`.
    mask: as in :func:`adder_attention_weights`.
    broadcast_dropout: as in :func:`adder_attention_weights`.
    dropout_rng: as in :func:`adder_attention_weights`.
    dropout_rate: as in :func:`adder_attention_weights`.
    deterministic: as in :func:`adder_attention_weights`.
    dtype: as in :func:`adder_attention_weights`.
    precision: the precision of the weights-value product.
    module: as in :func:`adder_attention_weights`.
    promote_dtype: promotes ``(query, key, value)`` to ``dtype``.
    is_causal: as in :func:`adder_attention_weights`.
    scale: as in :func:`adder_attention_weights`.
    identity: as in :func:`adder_attention_weights`.

  Returns:
    ``[batch..., q_length, num_heads, v_depth]``.

  Raises:
    ValueError: as :func:`adder_attention_weights`, and for a ``value`` whose
      length or heads differ from ``key``'s.
  """
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  if value.shape[:-1] != key.shape[:-1]:
    raise ValueError(f"value must have key's batch dims, length and heads, got shapes "
                     f"{value.shape} and {key.shape}.")
  weights = adder_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      query.dtype, None, module, dtypes.promote_dtype, is_causal, scale=scale,
      identity=identity)
  value = _repeat_heads(value, query.shape[-2])
  return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
