"""Optimizers for AdderNets: the adaptive learning rate of adder layers.

AdderNet (Chen et al., CVPR 2020) trains the kernel of each adder layer with
a layer-wise adaptive learning rate: the kernel gradient ``g`` of a layer with
``k`` kernel elements is replaced by ``eta * sqrt(k) * g / ||g||_2`` before the
ordinary SGD step. This module provides that rescaling as Optax gradient
transformations, a way to apply a transformation to the adder kernels alone,
and the full recipe of the official code as :func:`addernet_sgd`.
"""

from collections.abc import Callable
import math
import numbers
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from adderjax.nn import AdderKernel

__all__ = [
    "OnlyAdderKernelsState",
    "ScaleByAdaptiveLrState",
    "adder_kernel_mask",
    "addernet_sgd",
    "only_adder_kernels",
    "scale_by_adaptive_lr",
]

_ADDER_KERNEL_NAME = "adder_kernel"

MaskOrFn = Any | Callable[[optax.Params], Any]


class ScaleByAdaptiveLrState(NamedTuple):
  """State of :func:`scale_by_adaptive_lr`.

  Attributes:
    scale: A pytree like the params holding, per leaf, the scalar factor
      applied at the last update (zeros after ``init``), in float32 or the
      leaf's dtype where that is wider (float64).
  """

  scale: optax.Updates


def _concrete_number(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy real number, whose range can be checked now."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(value: ArrayLike, name: str) -> None:
  if _concrete_number(value) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {name}={value!r}.")


def _scalar_like(value: Any) -> bool:
  """A real number or a 0-d array (a traced one included), as optax hyperparameters are."""
  if isinstance(value, bool):
    return False
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.ndim(value) == 0
  return isinstance(value, numbers.Real)


def _compute_dtype(leaf: Any) -> jnp.dtype:
  """float32, or the leaf's floating dtype where it is wider (float64)."""
  dtype = getattr(leaf, "dtype", jnp.float32)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


def scale_by_adaptive_lr(
    eta: ArrayLike = 0.2, eps: ArrayLike = 1e-12
) -> optax.GradientTransformation:
  r"""Rescales each leaf by the AdderNet adaptive learning rate.

  Every leaf ``g`` with ``k`` elements becomes

  .. math::
    \eta \sqrt{k} \, \frac{g}{\max(\|g\|_2, \epsilon)},

  so each leaf is updated with the same norm ``eta * sqrt(k)`` whatever the
  magnitude of its gradient. The norm and the factor are computed in float32,
  or in the leaf's dtype where that is wider (float64), and the result is cast
  back to the leaf's dtype.

  The hyperparameters may be arrays, so that :func:`optax.inject_hyperparams`
  can wrap the transformation and ``jit`` or ``vmap`` can trace them.

  The transformation rescales every leaf it gets: to restrict it to the adder
  kernels, wrap it in :func:`only_adder_kernels` (or :func:`optax.masked`).

  Args:
    eta: The hyper-parameter ``eta`` of the paper (0.2 in the official code),
      a scalar > 0.
    eps: Floor on the gradient norm that avoids dividing by zero, a scalar
      > 0.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Raises:
    ValueError: If ``eta`` or ``eps`` is a number that is not > 0 (arrays are
      not checked: they may be traced).

  Example:
    >>> import jax.numpy as jnp
    >>> from adderjax.optim import scale_by_adaptive_lr
    >>> tx = scale_by_adaptive_lr(eta=0.2)
    >>> grads = {'w': jnp.array([3.0, 4.0, 0.0, 0.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> print(updates['w'])  # 0.2 * sqrt(4) * g / 5.
    [0.24 0.32 0.   0.  ]

  References:
    Chen et al., `AdderNet: Do We Really Need Multiplications in Deep
    Learning? <https://arxiv.org/abs/1912.13200>`_, CVPR 2020.
  """
  _check_positive(eta, "eta")
  _check_positive(eps, "eps")

  def leaf_scale(g: jax.Array) -> jax.Array:
    dtype = _compute_dtype(g)
    norm = jnp.linalg.norm(jnp.ravel(g).astype(dtype))
    return (eta * math.sqrt(g.size) / jnp.maximum(norm, eps)).astype(dtype)

  def init_fn(params):
    return ScaleByAdaptiveLrState(
        scale=jax.tree.map(lambda p: jnp.zeros([], _compute_dtype(p)), params)
    )

  def update_fn(updates, state, params=None):
    del state, params
    scale = jax.tree.map(leaf_scale, updates)
    updates = jax.tree.map(
        lambda g, s: (g.astype(s.dtype) * s).astype(g.dtype), updates, scale
    )
    return updates, ScaleByAdaptiveLrState(scale=scale)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _key_name(key: Any) -> Any:
  if isinstance(key, jax.tree_util.DictKey):
    return key.key
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  return None


def adder_kernel_mask(params: optax.Params) -> Any:
  """Marks the adder-layer kernels of a parameter tree.

  A leaf is an adder kernel if it is an :class:`adderjax.nn.AdderKernel`
  (Flax NNX) or, for Linen or plain-dict parameters, if the last key of its
  path is ``"adder_kernel"``. ``nnx.Variable`` objects count as leaves.

  Args:
    params: A pytree of parameters, e.g. ``nnx.state(model, nnx.Param)`` or
      the ``"params"`` collection of a Linen model.

  Returns:
    A pytree of Python bools with the structure of ``params`` (with Variables
    as leaves): True at the adder kernels.

  Example:
    >>> import jax.numpy as jnp
    >>> from adderjax.optim import adder_kernel_mask
    >>> params = {'conv': {'adder_kernel': jnp.ones(3), 'bias': jnp.ones(1)}}
    >>> adder_kernel_mask(params)
    {'conv': {'adder_kernel': True, 'bias': False}}
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_variable
  )
  mask = [
      isinstance(leaf, AdderKernel)
      or (bool(path) and _key_name(path[-1]) == _ADDER_KERNEL_NAME)
      for path, leaf in leaves_with_path
  ]
  return jax.tree_util.tree_unflatten(treedef, mask)


class _Selected(NamedTuple):
  """Marks, in :class:`OnlyAdderKernelsState`, a leaf the inner tx updates."""


def _is_marker(x: Any) -> bool:
  return isinstance(x, (_Selected, optax.MaskedNode))


class OnlyAdderKernelsState(NamedTuple):
  """State of :func:`only_adder_kernels`.

  Attributes:
    inner_state: The state of the inner transformation, initialized on the
      params with the non-selected leaves replaced by ``optax.MaskedNode()``.
    selected: A tree with the structure of the params holding an empty marker
      at the selected leaves and ``optax.MaskedNode()`` elsewhere. Both are
      empty pytrees: the selection lives in the tree structure and adds no
      array to the state.
  """

  inner_state: optax.OptState
  selected: Any


def only_adder_kernels(
    inner: optax.GradientTransformation, mask: MaskOrFn | None = None
) -> optax.GradientTransformation:
  """Applies a transformation to the adder kernels only.

  Like :func:`optax.masked`, but the selection is computed once, in ``init``,
  and stored in the structure of the state. This matters with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``: ``init`` receives an
  ``nnx.State`` of Variables, where an :class:`adderjax.nn.AdderKernel` can be
  recognized, while ``update`` receives the same tree with plain arrays.

  Args:
    inner: The transformation to apply to the selected leaves. Other leaves
      pass through unchanged.
    mask: Which leaves to select: a pytree of bools with the structure of the
      params (Variables as leaves), or a callable returning one from the
      params given to ``init``. Defaults to :func:`adder_kernel_mask`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from adderjax.optim import only_adder_kernels
    >>> tx = only_adder_kernels(optax.scale(-1.0))
    >>> params = {'adder_kernel': jnp.ones(2), 'bias': jnp.ones(2)}
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> print(updates['adder_kernel'], updates['bias'])
    [-1. -1.] [1. 1.]
  """

  def init_fn(params):
    if mask is None:
      leaf_mask = adder_kernel_mask(params)
    elif callable(mask):
      leaf_mask = mask(params)
    else:
      leaf_mask = mask
    selected = jax.tree.map(
        lambda _, m: _Selected() if m else optax.MaskedNode(),
        params,
        leaf_mask,
        is_leaf=_is_variable,
    )
    masked_params = jax.tree.map(
        lambda s, p: (p.get_value() if _is_variable(p) else p)
        if isinstance(s, _Selected)
        else optax.MaskedNode(),
        selected,
        params,
        is_leaf=_is_marker,
    )
    return OnlyAdderKernelsState(inner.init(masked_params), selected)

  def update_fn(updates, state, params=None):
    def select(tree):
      return jax.tree.map(
          lambda s, x: x if isinstance(s, _Selected) else optax.MaskedNode(),
          state.selected,
          tree,
          is_leaf=_is_marker,
      )

    masked_params = None if params is None else select(params)
    new_masked, inner_state = inner.update(
        select(updates), state.inner_state, masked_params
    )
    updates = jax.tree.map(
        lambda s, new, old: new if isinstance(s, _Selected) else old,
        state.selected,
        new_masked,
        updates,
        is_leaf=_is_marker,
    )
    return updates, OnlyAdderKernelsState(inner_state, state.selected)

  return optax.GradientTransformation(init_fn, update_fn)


def addernet_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: ArrayLike = 0.9,
    weight_decay: ArrayLike = 5e-4,
    eta: ArrayLike = 0.2,
    nesterov: bool = False,
    eps: ArrayLike = 1e-12,
    mask: MaskOrFn | None = None,
    adder_transform: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """SGD with momentum and the AdderNet adaptive rate on the adder kernels.

  The recipe of the official code, in its order:

  1. the gradient ``g`` of each adder kernel with ``k`` elements becomes
     ``eta * sqrt(k) * g / ||g||_2`` (:func:`scale_by_adaptive_lr`), other
     gradients are left as they are;
  2. weight decay on all parameters: ``d = g + weight_decay * p``;
  3. momentum: ``buf = momentum * buf + d`` (``buf`` starts at 0, so it equals
     ``d`` after the first step), and with ``nesterov=True`` the update is
     ``d + momentum * buf``;
  4. ``p -= learning_rate * buf``.

  The official PyTorch code rescales the adder gradient inside the backward
  pass of the layer, then ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)``
  adds weight decay and momentum to every parameter: the adaptive rate thus
  comes first and the weight decay is not rescaled by it.

  Every numeric hyperparameter may be an array (the learning rate also a
  schedule), so that :func:`optax.inject_hyperparams` can wrap this function
  and ``jit`` or ``vmap`` can trace them; :func:`optax.MultiSteps` can
  accumulate its gradients.

  Args:
    learning_rate: A fixed learning rate (a scalar) or a schedule of the step
      count.
    momentum: Momentum (decay of the trace), in [0, 1).
    weight_decay: Coefficient of the L2 weight decay, >= 0.
    eta: The ``eta`` of the adaptive learning rate, > 0.
    nesterov: Whether to use Nesterov momentum.
    eps: Floor on the adder gradient norm, > 0.
    mask: Which leaves get the adaptive rate, as in
      :func:`only_adder_kernels`; defaults to :func:`adder_kernel_mask`.
    adder_transform: What step 1 applies to the adder kernels' gradients
      instead of ``scale_by_adaptive_lr(eta, eps)`` (``eta`` and ``eps`` are
      then unused), for ablations: e.g. ``optax.scale(10.0)`` for a fixed
      factor, or ``optax.identity()`` for plain SGD.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Raises:
    ValueError: If ``learning_rate`` is neither a scalar nor a callable, or
      a hyperparameter given as a number is out of its range (arrays are not
      checked: they may be traced).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax.optim import addernet_sgd
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, addernet_sgd(0.1), wrt=nnx.Param)
    >>> loss_fn = lambda model, x: (model(x) ** 2).mean()
    >>> grads = nnx.grad(loss_fn)(model, jnp.ones((1, 2)))
    >>> _ = optimizer.update(model, grads)

  References:
    Chen et al., `AdderNet: Do We Really Need Multiplications in Deep
    Learning? <https://arxiv.org/abs/1912.13200>`_, CVPR 2020.

    Official code: https://github.com/huawei-noah/AdderNet
  """
  if not (callable(learning_rate) or _scalar_like(learning_rate)):
    raise ValueError(
        "learning_rate must be a scalar (a number or a 0-d array) or a schedule, "
        f"got learning_rate={learning_rate!r}."
    )
  if _concrete_number(momentum) and not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}.")
  if _concrete_number(weight_decay) and not weight_decay >= 0:
    raise ValueError(
        f"weight_decay must be >= 0, got weight_decay={weight_decay!r}."
    )
  if adder_transform is None:
    adder_transform = scale_by_adaptive_lr(eta, eps)
  return optax.chain(
      only_adder_kernels(adder_transform, mask),
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )
