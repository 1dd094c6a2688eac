"""Counting the arithmetic of a Flax NNX model, per example, by tracing it abstractly.

:func:`count_ops` runs the model under :func:`jax.eval_shape` (so nothing is
computed and no real array is made, whatever the input size), records the
output shape of every call of a convolution or dense layer, and turns each
into multiply-accumulates (MACs) and the operations they stand for, by the
convention of Chen et al., "AdderNet: Do We Really Need Multiplications in
Deep Learning?", CVPR 2020 (arXiv:1912.13200), Tables 1, 3 and 4:

- ``"mac"``: :class:`flax.nnx.Conv`, :class:`flax.nnx.Linear` and
  :class:`flax.nnx.LinearGeneral` (the projections of
  :class:`flax.nnx.MultiHeadAttention`), one multiplication and one addition
  per MAC;
- ``"adder"``: :class:`adderjax.nn.AdderConv` and
  :class:`adderjax.nn.AdderDense`, two additions per MAC (the subtraction
  ``x - f`` and the accumulation);
- ``"binary"``: :class:`adderjax.nn.BinaryConv` and
  :class:`adderjax.nn.BinaryDense`, one XNOR and one addition (the popcount)
  per MAC.

A layer's MACs per call are ``prod(output.shape[:-1]) * kernel.size``: for a
convolution with kernel ``(kh, kw, cin // groups, cout)`` that is every
output pixel times ``kh * kw * cin // groups`` for each of the ``cout``
filters; for a dense layer it is the leading (non-feature) output dims times
``din * dout`` (for a ``LinearGeneral``, the output dims before its
``out_features`` times ``kernel.size``).

The attention inside every :class:`flax.nnx.MultiHeadAttention` is counted
too, as two rows per call, paths ``"<attention>/scores"`` and
``"<attention>/values"`` (``layer_type`` ``"attention"``, no parameters):
the query-key similarity, ``batch * heads * q_length * kv_length * depth``
MACs, of op ``"adder"`` for :func:`adderjax.nn.adder_attention`
(subtraction and accumulation, as in an adder layer) and ``"mac"`` for any
other ``attention_fn`` (dot products); and the weighted sum of the values,
``batch * heads * q_length * kv_length * v_depth`` MACs of op ``"mac"``
(softmax weights times values, in adder attention too).

Only these are counted, as in the paper: bias adds, BatchNorm, LayerNorm,
softmax, pooling, activations, residual additions, adder attention's
identity term and the absolute value of an adder layer (a sign-bit
operation) are left out, as are layers of other classes
(``nnx.ConvTranspose``, ``nnx.Einsum``) unless they are passed as
``extra_layers``.

How our models' counts compare with the paper's, and why they differ, is
worked out in :mod:`adderjax.profiling`.
"""

from collections.abc import Callable, Hashable, Iterator, Mapping
import contextlib
import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from adderjax._checks import positive_int
from adderjax.nn import AdderConv, AdderDense, BinaryConv, BinaryDense, adder_attention

__all__ = ["COUNTED_LAYERS", "OPS", "LayerCount", "OpCounts", "count_ops"]

OPS = ("mac", "adder", "binary")
"""The operations a counted layer's MACs stand for: multiply-accumulate, adder, binary."""

COUNTED_LAYERS: Mapping[type, str] = MappingProxyType({
    nnx.Conv: "mac", nnx.Linear: "mac", nnx.LinearGeneral: "mac", AdderConv: "adder",
    AdderDense: "adder", BinaryConv: "binary", BinaryDense: "binary",
})
"""The layer classes :func:`count_ops` counts, mapped to their op (one of :data:`OPS`)."""


# (multiplications, additions, xnor) for one multiply-accumulate of each op.
_OPS_PER_MAC = {"mac": (1, 1, 0), "adder": (0, 2, 0), "binary": (0, 1, 1)}


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """The operations of one call of one layer, per example.

  Attributes:
    path: the layer's attribute path in the model, joined by ``"/"`` as in
      :class:`adderjax.quant.LayerReport`, such as ``"layer1/0/conv1"``
      (``""`` for the model itself).
    layer_type: the layer's class name, such as ``"AdderConv"``.
    op: the operation its MACs stand for: ``"mac"`` (multiply-accumulate),
      ``"adder"`` or ``"binary"``.
    call: 0 for the layer's first call in the traced forward pass, 1 for its
      second, and so on.
    output_shape: the shape of the layer's output in the trace, batch dims
      included.
    macs: multiply-accumulates (or their adder / binary counterparts).
    multiplications: multiplications.
    additions: additions.
    xnor: XNOR operations.
    params: the layer's parameter count on the row of its first call, 0 on
      later calls (so that the column sums to the layers' parameters).
  """

  path: str
  layer_type: str
  op: str
  call: int
  output_shape: tuple[int, ...]
  macs: int
  multiplications: int
  additions: int
  xnor: int
  params: int


@dataclasses.dataclass(frozen=True)
class OpCounts:
  """Per-example operation counts of a model, from :func:`count_ops`.

  Attributes:
    multiplications: multiplications per example.
    additions: additions per example.
    xnor: XNOR operations per example.
    macs: multiply-accumulates (of all ops) per example.
    params: the number of elements of all the model's :class:`flax.nnx.Param`
      variables (BatchNorm scales and biases included, batch statistics not).
    layers: one :class:`LayerCount` per call of a counted layer, in call
      order.
  """

  multiplications: int
  additions: int
  xnor: int
  macs: int
  params: int
  layers: tuple[LayerCount, ...]

  def macs_by_op(self) -> dict[str, int]:
    """Returns the MACs per example of each op, ``{"mac": .., "adder": .., "binary": ..}``."""
    totals = dict.fromkeys(OPS, 0)
    for row in self.layers:
      totals[row.op] += row.macs
    return totals


def _op_of(module: Any, layer_ops: Mapping[type, str]) -> str | None:
  """The op of the most derived registered class ``module`` is an instance of."""
  best = None
  for cls, op in layer_ops.items():
    if isinstance(module, cls) and (best is None or issubclass(cls, best[0])):
      best = (cls, op)
  return None if best is None else best[1]


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _param_count(node: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(node, nnx.Param)))


def _check_layer_ops(extra_layers: Any) -> dict[type, str]:
  if not isinstance(extra_layers, Mapping):
    raise ValueError(f"extra_layers must map layer classes to one of {OPS}, "
                     f"got extra_layers={extra_layers!r}.")
  for cls, op in extra_layers.items():
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)) or op not in OPS:
      raise ValueError(f"extra_layers must map nnx.Module subclasses to one of {OPS}, "
                       f"got {cls!r}: {op!r} in extra_layers.")
  return {**COUNTED_LAYERS, **extra_layers}


def _aval_key(leaf: Any) -> Hashable:
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return ("array", tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))
  return ("value", leaf)


def _call_key(layer: nnx.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
  """Returns what a layer call's output shape depends on, or None if that is not hashable.

  That is the layer's class, static attributes and variable shapes (its
  graphdef and state) and the shapes (or values) of the arguments.
  """
  graphdef, state = nnx.split(layer)
  leaves, treedef = jax.tree.flatten((args, kwargs))
  key = (type(layer), graphdef, jax.tree.structure(state),
         tuple(_aval_key(v) for v in jax.tree.leaves(state)), treedef,
         tuple(_aval_key(v) for v in leaves))
  try:
    hash(key)
  except TypeError:
    return None
  return key


@contextlib.contextmanager
def _recording(classes: set[type], paths: Mapping[int, str],
               calls: list[tuple[str, Any, tuple[int, ...]]]) -> Iterator[None]:
  """Wraps the ``__call__`` of ``classes`` to append (path, layer, output shape) to ``calls``.

  Only the instances in ``paths`` (keyed by ``id``) are recorded, each once
  per call even where a subclass's ``__call__`` calls its parent's. A call
  whose layer configuration and argument shapes were seen before is not
  traced again: it returns zeros of the output shape it had then, which is
  all the rest of an abstract trace needs (the 52 adder convolutions of a
  ResNet-50 come in 22 configurations).
  """
  originals = {cls: cls.__call__ for cls in classes}
  owned = {cls: "__call__" in vars(cls) for cls in classes}
  active: set[int] = set()
  seen: dict[Hashable, jax.ShapeDtypeStruct] = {}

  def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self, *args, **kwargs):
      if id(self) not in paths or id(self) in active:
        return original(self, *args, **kwargs)
      key = _call_key(self, args, kwargs)
      if key in seen:
        out = jnp.zeros(seen[key].shape, seen[key].dtype)
      else:
        active.add(id(self))
        try:
          out = original(self, *args, **kwargs)
        finally:
          active.discard(id(self))
        if not (hasattr(out, "shape") and hasattr(out, "dtype")):
          raise ValueError(f"count_ops counts layers that return one array; the layer "
                           f"{paths[id(self)]!r} ({type(self).__name__}) returned {out!r}.")
        if key is not None:
          seen[key] = jax.ShapeDtypeStruct(out.shape, out.dtype, weak_type=out.weak_type)
      calls.append((paths[id(self)], self, tuple(out.shape)))
      return out
    return call

  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    yield
  finally:
    for cls, original in originals.items():
      if owned[cls]:
        cls.__call__ = original
      else:
        delattr(cls, "__call__")


@dataclasses.dataclass(frozen=True)
class _AttentionPart:
  """A row of an attention call: its op and the MACs per element of its output shape."""

  op: str
  per_output: int


def _attention_op(attention_fn: Any) -> str:
  while isinstance(attention_fn, functools.partial):
    attention_fn = attention_fn.func
  return "adder" if attention_fn is adder_attention else "mac"


def _recording_attention(attention_fn: Callable[..., Any], path: str,
                         calls: list[tuple[str, Any, tuple[int, ...]]]) -> Callable[..., Any]:
  """``attention_fn``, appending its two rows (scores, weighted values) to ``calls``."""

  prefix = f"{path}/" if path else ""

  def attend(query, key, value, *args, **kwargs):
    *batch, q_length, heads, depth = query.shape
    kv_length = key.shape[-3]
    calls.append((f"{prefix}scores", _AttentionPart(_attention_op(attention_fn), depth),
                  (*batch, heads, q_length, kv_length)))
    calls.append((f"{prefix}values", _AttentionPart("mac", kv_length),
                  (*batch, q_length, heads, value.shape[-1])))
    return attention_fn(query, key, value, *args, **kwargs)

  return attend


def _row(path: str, layer: Any, op: str, call: int, shape: tuple[int, ...], batch_size: int,
         params: int) -> LayerCount:
  if isinstance(layer, _AttentionPart):
    per_output = layer.per_output
  elif isinstance(layer, nnx.LinearGeneral):
    per_output = math.prod(layer.kernel.shape) // math.prod(layer.out_features)
  else:
    kernel_shape = tuple(layer.kernel.shape)
    per_output = math.prod(kernel_shape) // kernel_shape[-1]
  total = math.prod(shape) * per_output
  if total % batch_size:
    raise ValueError(f"batch_size={batch_size} does not divide the {total} MACs of the layer "
                     f"{path!r} (output shape {shape}); pass the number of examples in x.")
  macs = total // batch_size
  muls, adds, xnor = (macs * n for n in _OPS_PER_MAC[op])
  layer_type = "attention" if isinstance(layer, _AttentionPart) else type(layer).__name__
  return LayerCount(path=path, layer_type=layer_type, op=op, call=call,
                    output_shape=shape, macs=macs, multiplications=muls, additions=adds,
                    xnor=xnor, params=params if call == 0 else 0)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise ValueError(f"x must be an array or a jax.ShapeDtypeStruct, got x={x!r}.")
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def count_ops(
    model: nnx.Module,
    x: Any,
    *,
    batch_size: int | None = None,
    apply: Callable[[nnx.Module, Any], Any] | None = None,
    extra_layers: Mapping[type, str] | None = None,
) -> OpCounts:
  """Counts a model's multiplications, additions and XNORs per example.

  The forward pass is traced with :func:`jax.eval_shape` on
  ``nnx.merge(*nnx.split(model))``: no arithmetic is done, ``x`` may be a
  :class:`jax.ShapeDtypeStruct`, and ``model`` may be abstract itself
  (``nnx.eval_shape(lambda: Model(...))``), so that counting a ResNet-50 at
  224x224 takes a second or two. The copy is put in evaluation mode
  (``.eval()``: running BatchNorm statistics, no Dropout), which leaves the
  counted layers and their calls as they are; ``model`` itself is not
  changed.

  Every call of an ``nnx.Conv``, ``nnx.Linear``, ``nnx.LinearGeneral``,
  ``AdderConv``, ``AdderDense``, ``BinaryConv`` or ``BinaryDense`` reachable
  from ``model`` as an attribute (see :func:`flax.nnx.iter_modules`) is
  counted, a layer called twice twice, and so is the attention of every
  ``nnx.MultiHeadAttention`` (two rows a call: the query-key scores, adder
  for :func:`adderjax.nn.adder_attention`, and the weighted sum of the
  values). A multiply-accumulate layer counts one multiplication
  and one addition per MAC, an adder layer two additions, a binary layer one
  XNOR and one addition (the paper's convention). Bias adds, BatchNorm,
  pooling, activations and residual additions are not counted, as in the
  paper, which counts only the convolution and fully connected layers. A
  call that repeats an earlier one's layer configuration and input shapes is
  counted but not traced again.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax.nn import AdderConv
    >>> from adderjax.profiling import count_ops
    >>> # Abstract: ShapeDtypeStruct parameters and input, nothing computed.
    >>> layer = nnx.eval_shape(lambda: AdderConv(3, 16, 3, strides=2, rngs=nnx.Rngs(0)))
    >>> counts = count_ops(layer, jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32))
    >>> counts.macs, counts.additions, counts.multiplications  # 16*16 pixels * 3*3*3*16
    (110592, 221184, 0)
    >>> counts.layers[0].output_shape
    (8, 16, 16, 16)

  Args:
    model: a Flax NNX module, concrete or abstract.
    x: the input batch, an array or a :class:`jax.ShapeDtypeStruct`.
    batch_size: the number of examples in ``x`` that the totals are divided by
      (default: ``x.shape[0]``).
    apply: how to run the model, ``apply(model, x)`` (default:
      ``model(x)``); its output may be any pytree of arrays.
    extra_layers: more layer classes to count, mapped to their op, ``"mac"``,
      ``"adder"`` or ``"binary"``. Their instances need a ``kernel``
      parameter whose last dim is the output features, must do
      ``kernel.size / kernel.shape[-1]`` MACs per output element, and must
      return one array.

  Returns:
    An :class:`OpCounts` with per-example totals and a row per layer call.

  Raises:
    ValueError: if ``x``, ``batch_size`` or ``extra_layers`` is not valid, or
      a counted layer returns something other than one array.
  """
  x = _abstract(x)
  if batch_size is None:
    if not x.shape:
      raise ValueError(f"x must have a leading batch dim, or pass batch_size; got x={x!r}.")
    batch_size = x.shape[0]
  batch_size = positive_int(batch_size, "batch_size")
  layer_ops = _check_layer_ops({} if extra_layers is None else extra_layers)
  run = apply if apply is not None else (lambda m, inputs: m(inputs))

  layer_params = {}
  for path, module in nnx.iter_modules(model):
    if _op_of(module, layer_ops) is not None:
      layer_params[_path_name(path)] = _param_count(module)

  graphdef, state = nnx.split(model)
  calls: list[tuple[str, Any, tuple[int, ...]]] = []
  rows: list[LayerCount] = []

  def forward(state, x):
    clone = nnx.merge(graphdef, state)
    clone.eval()  # Running BatchNorm statistics, no Dropout: the same layer calls, traced faster.
    paths, classes = {}, set()
    for path, module in nnx.iter_modules(clone):
      if _op_of(module, layer_ops) is not None:
        paths[id(module)] = _path_name(path)
        classes.add(type(module))
      if isinstance(module, nnx.MultiHeadAttention):
        module.attention_fn = _recording_attention(module.attention_fn, _path_name(path), calls)
    with _recording(classes, paths, calls):
      out = run(clone, x)
    seen: dict[str, int] = {}
    for path, layer, shape in calls:
      call = seen.get(path, 0)
      seen[path] = call + 1
      if isinstance(layer, _AttentionPart):
        rows.append(_row(path, layer, layer.op, call, shape, batch_size, 0))
      else:
        rows.append(_row(path, layer, _op_of(layer, layer_ops), call, shape, batch_size,
                         layer_params[path]))
    return out

  jax.eval_shape(forward, state, x)
  return OpCounts(
      multiplications=sum(r.multiplications for r in rows),
      additions=sum(r.additions for r in rows),
      xnor=sum(r.xnor for r in rows),
      macs=sum(r.macs for r in rows),
      params=_param_count(model),
      layers=tuple(rows),
  )
