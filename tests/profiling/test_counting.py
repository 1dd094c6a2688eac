"""count_ops on small hand-built models, against counts worked out by hand."""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import models
from adderjax.nn import AdderConv, AdderDense, BinaryConv, BinaryDense, adder_attention
from adderjax.profiling import OpCounts, count_ops


def _abstract(make):
  """The module ``make(rngs)`` builds, with ShapeDtypeStruct params (no RNG, no compile)."""
  return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def _x(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.mark.parametrize("options, out_hw, per_output", [
    # 3x3 kernel over 4 channels: 36 MACs per output element; SAME keeps 10x10.
    (dict(kernel_size=(3, 3)), (10, 10), 36),
    # Stride 2 with SAME: ceil(10 / 2) = 5.
    (dict(kernel_size=(3, 3), strides=2), (5, 5), 36),
    # VALID 5x3: (10 - 5 + 1, 10 - 3 + 1) = (6, 8); 5 * 3 * 4 = 60.
    (dict(kernel_size=(5, 3), padding="VALID"), (6, 8), 60),
    # Explicit padding 1 and stride 3 with a 3x3 kernel: floor((10 + 2 - 3) / 3) + 1 = 4.
    (dict(kernel_size=(3, 3), strides=3, padding=1), (4, 4), 36),
    # Two groups: each filter sees 4 / 2 = 2 channels, 3 * 3 * 2 = 18.
    (dict(kernel_size=(3, 3), feature_group_count=2), (10, 10), 18),
    # Dilation 2 grows the receptive field, not the MACs: VALID gives 10 - 5 + 1 = 6.
    (dict(kernel_size=(3, 3), kernel_dilation=2, padding="VALID"), (6, 6), 36),
])
@pytest.mark.parametrize("cls, op", [(nnx.Conv, "mac"), (AdderConv, "adder"),
                                     (BinaryConv, "binary")])
def test_conv_macs(cls, op, options, out_hw, per_output):
  layer = _abstract(lambda rngs: cls(4, 6, rngs=rngs, **options))
  counts = count_ops(layer, _x(3, 10, 10, 4))
  macs = out_hw[0] * out_hw[1] * 6 * per_output
  (row,) = counts.layers
  assert row.output_shape == (3, *out_hw, 6)
  assert (row.op, row.macs, counts.macs) == (op, macs, macs)
  expected = {"mac": (macs, macs, 0), "adder": (0, 2 * macs, 0), "binary": (0, macs, macs)}
  assert (counts.multiplications, counts.additions, counts.xnor) == expected[op]
  assert counts.params == row.params == layer.kernel.size + (6 if cls is nnx.Conv else 0)


@pytest.mark.parametrize("cls, op", [(nnx.Linear, "mac"), (AdderDense, "adder"),
                                     (BinaryDense, "binary")])
def test_dense_counts_every_leading_position(cls, op):
  layer = _abstract(lambda rngs: cls(12, 5, rngs=rngs))
  # Per example: 7 positions of 12 -> 5.
  counts = count_ops(layer, _x(2, 7, 12))
  assert counts.macs == 7 * 12 * 5
  assert counts.layers[0].op == op
  assert counts.layers[0].output_shape == (2, 7, 5)


class _TwoCallsTwoOutputs(nnx.Module):
  """A stem, an adder layer, a binary layer, and a head applied twice; returns a tuple."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.blocks = nnx.List([AdderConv(4, 8, 3, padding="VALID", rngs=rngs),
                            BinaryConv(8, 8, 1, rngs=rngs)])
    self.head = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    h = x.mean(axis=(1, 2))
    return h, self.head(self.head(h))


def test_paths_repeated_calls_tuple_output_and_params():
  model = _abstract(_TwoCallsTwoOutputs)
  counts = count_ops(model, _x(5, 16, 16, 1))
  rows = [(r.path, r.layer_type, r.op, r.call, r.output_shape[1:], r.macs, r.params)
          for r in counts.layers]
  assert rows == [
      ("stem", "Conv", "mac", 0, (8, 8, 4), 64 * 9 * 4, 36),
      ("blocks/0", "AdderConv", "adder", 0, (6, 6, 8), 36 * 9 * 4 * 8, 288),
      ("blocks/1", "BinaryConv", "binary", 0, (6, 6, 8), 36 * 64, 64),
      ("head", "Linear", "mac", 0, (8,), 64, 72),
      ("head", "Linear", "mac", 1, (8,), 64, 0),
  ]
  mac, adder, binary = 64 * 36 + 2 * 64, 36 * 288, 36 * 64
  assert counts.macs_by_op() == {"mac": mac, "adder": adder, "binary": binary}
  assert counts.multiplications == mac
  assert counts.additions == mac + 2 * adder + binary
  assert counts.xnor == binary
  # Every nnx.Param, BatchNorm's scale and bias included (its statistics are not Params).
  assert counts.params == 36 + 8 + 288 + 64 + 72


def test_concrete_model_is_left_unchanged():
  # Concrete NumPy parameters (a JAX initialisation would compile for every shape).
  graphdef, state = nnx.split(_abstract(_TwoCallsTwoOutputs))
  model = nnx.merge(graphdef, jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), state))
  x = jnp.ones((2, 16, 16, 1))
  before = jax.tree.map(np.asarray, nnx.state(model))
  abstract = count_ops(model, _x(2, 16, 16, 1))
  assert count_ops(model, x) == abstract
  chex.assert_trees_all_equal(nnx.state(model), before)
  # The layers' __call__ are restored after the trace.
  assert "__call__" not in vars(BinaryConv) or BinaryConv.__call__.__qualname__.startswith(
      "BinaryConv.")
  assert nnx.Conv.__call__.__qualname__ == "Conv.__call__"


def test_batch_size_and_apply():
  model = _abstract(_TwoCallsTwoOutputs)
  one = count_ops(model, _x(1, 16, 16, 1))
  assert count_ops(model, _x(4, 16, 16, 1)) .macs == one.macs
  # Four examples treated as one: four times the count.
  assert count_ops(model, _x(4, 16, 16, 1), batch_size=1).macs == 4 * one.macs
  # apply picks what runs: the stem alone.
  stem = count_ops(model, _x(1, 16, 16, 1), apply=lambda m, x: m.stem(x))
  assert [r.path for r in stem.layers] == ["stem"]
  assert stem.params == one.params


class _Scaled(nnx.Module):
  """A custom layer, counted only when passed as extra_layers."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((6, 3)))
    del rngs

  def __call__(self, x):
    return x @ self.kernel[...]


def test_extra_layers():
  layer = _abstract(_Scaled)
  assert count_ops(layer, _x(2, 6)).layers == ()
  counts = count_ops(layer, _x(2, 6), extra_layers={_Scaled: "adder"})
  assert (counts.macs, counts.additions) == (18, 36)


class _Pair(nnx.Module):
  """A custom layer that returns two arrays."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((6, 3)))
    del rngs

  def __call__(self, x):
    return x, x @ self.kernel[...]


def test_extra_layer_must_return_one_array():
  with pytest.raises(ValueError, match=r"layer '' \(_Pair\) returned"):
    count_ops(_abstract(_Pair), _x(2, 6), extra_layers={_Pair: "mac"})


def test_same_layer_config_on_other_shapes_is_traced_again():
  class Twice(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(4, 4, (3, 3), rngs=rngs)
      self.b = nnx.Conv(4, 4, (3, 3), rngs=rngs)
      self.c = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
      # b repeats a's configuration and input shape; c differs in stride, a's second call in
      # input shape.
      return self.a(self.c(self.b(self.a(x))))

  counts = count_ops(_abstract(Twice), _x(1, 8, 8, 4))
  assert [(r.path, r.call, r.output_shape[1:3]) for r in counts.layers] == [
      ("a", 0, (8, 8)), ("b", 0, (8, 8)), ("c", 0, (4, 4)), ("a", 1, (4, 4))]
  assert counts.macs == (2 * 64 + 2 * 16) * 144


def test_result_is_frozen():
  counts = count_ops(_abstract(lambda rngs: nnx.Linear(2, 3, rngs=rngs)), _x(1, 2))
  assert isinstance(counts, OpCounts)
  with pytest.raises(AttributeError):
    counts.macs = 0  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=[1, 2]), "x must be an array"),
    (dict(x=_x()), "leading batch dim"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=2.0), "batch_size=2.0"),
    (dict(batch_size=5), "batch_size=5 does not divide"),
    (dict(extra_layers={int: "mac"}), "extra_layers"),
    (dict(extra_layers={_Scaled: "matmul"}), "'matmul'"),
    (dict(extra_layers=[_Scaled]), "extra_layers="),
])
def test_bad_arguments(kwargs, match):
  layer = _abstract(lambda rngs: nnx.Linear(2, 3, rngs=rngs))
  kwargs = {"x": _x(2, 2), **kwargs}
  with pytest.raises(ValueError, match=match):
    count_ops(layer, **kwargs)


@pytest.mark.parametrize("attention_fn, scores_op", [
    (nnx.dot_product_attention, "mac"),
    (adder_attention, "adder"),
    (functools.partial(adder_attention, scale=0.1), "adder"),
])
def test_multi_head_attention(attention_fn, scores_op):
  """Projections (LinearGeneral), the query-key scores and the weighted values, by hand."""
  batch, length, features, heads, depth = 2, 5, 12, 3, 4
  layer = _abstract(lambda rngs: nnx.MultiHeadAttention(
      num_heads=heads, in_features=features, qkv_features=heads * depth, decode=False,
      attention_fn=attention_fn, rngs=rngs))
  counts = count_ops(layer, _x(batch, length, features))
  projection = length * features * heads * depth  # per example, each of q, k, v and out
  attention = heads * length * length * depth
  rows = {row.path: row for row in counts.layers}
  assert list(rows) == ["query", "key", "value", "scores", "values", "out"]
  assert {rows[p].macs for p in ("query", "key", "value", "out")} == {projection}
  assert {rows[p].layer_type for p in ("query", "key", "value", "out")} == {"LinearGeneral"}
  assert rows["query"].params == features * heads * depth + heads * depth
  assert (rows["scores"].macs, rows["scores"].op, rows["scores"].layer_type) == (
      attention, scores_op, "attention")
  assert (rows["values"].macs, rows["values"].op, rows["values"].params) == (attention, "mac", 0)
  assert rows["scores"].output_shape == (batch, heads, length, length)
  adder_macs = attention if scores_op == "adder" else 0
  assert counts.multiplications == 4 * projection + 2 * attention - adder_macs
  assert counts.additions == 4 * projection + 2 * attention + adder_macs
  assert counts.params == 4 * (features * heads * depth + heads * depth) - heads * depth + features


def test_vit_tiny_adder_against_conv():
  """vit_tiny's adder kind moves the MLPs and the attention scores from products to additions."""
  options = dict(embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
  x = _x(1, 28, 28, 1)
  adder, conv = (count_ops(_abstract(lambda rngs, kind=kind: models.get(
      "vit_tiny", kind=kind, rngs=rngs, **options)), x) for kind in ("adder", "conv"))
  assert adder.macs == conv.macs and adder.params == conv.params
  tokens, depth = 17, 2
  mlp = 2 * tokens * 32 * 64  # per block: fc1 and fc2
  scores = tokens * tokens * 32  # per block: heads * q * k * head depth = q * k * embed_dim
  assert conv.macs - conv.multiplications == 0
  assert conv.multiplications - adder.multiplications == depth * (mlp + scores)
  assert adder.additions - conv.additions == depth * (mlp + scores)
