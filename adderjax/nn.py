"""Flax NNX adder layers."""

from flax import nnx


class AdderKernel(nnx.Param):
  """The kernel of an adder layer.

  A subclass of :class:`flax.nnx.Param`, so ``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` trains it like any parameter, while filters such as
  ``nnx.state(model, AdderKernel)`` and :func:`adderjax.optim.addernet_sgd`
  find the adder kernels alone.
  """
