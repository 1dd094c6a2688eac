"""adderjax: AdderNet (Chen et al., CVPR 2020) for JAX and Flax.

The subpackages, each imported on first use so that ``import adderjax`` stays
cheap:

- `adderjax.ops`: ``adder_conv`` and ``adder_dense`` with the paper's
  gradients, ``sign_ste``. By default (``implementation=None``) they run
  native C++ kernels on CPUs (XLA FFI handlers, compiled on first use) and
  Pallas kernels on GPUs, with XLA loops wherever those cannot run.
- `adderjax.nn`: Flax NNX layers, ``AdderConv``, ``AdderDense``,
  ``BinaryConv``, ``BinaryDense``; `adderjax.linen`: the Linen adder layers.
- `adderjax.optim`: the adaptive learning rate as optax transforms,
  ``addernet_sgd``.
- `adderjax.models`: LeNet-5-BN, LeNet++, VGG-small and the ResNets as
  AdderNets, CNNs or BNNs.
- `adderjax.profiling`: operation counts, energy and latency;
  `adderjax.data`: input pipelines (downloads, the bundled MNIST).
- `adderjax.analysis`: features, kernels, gradient norms and weight
  statistics of a model; `adderjax.plotting`: their figures (matplotlib,
  the ``plot`` extra).
- `adderjax.allocator`: a process started again with glibc's allocator set
  up for XLA's per-step buffers on Linux CPUs (the trainer does it).
- `adderjax.quant`: post-training quantization of the adder layers to integers;
  `adderjax.export`: a trained model's inference function as a `jax.export` file.

Example:
  >>> import adderjax
  >>> adderjax.__version__
  '0.1.0'
  >>> adderjax.optim.addernet_sgd.__name__
  'addernet_sgd'
"""

import importlib
from typing import TYPE_CHECKING, Any

from adderjax._version import __version__

if TYPE_CHECKING:
  from adderjax import (
    allocator,
    analysis,
    data,
    export,
    linen,
    models,
    nn,
    ops,
    optim,
    plotting,
    profiling,
    quant,
  )

__all__ = ["__version__", "allocator", "analysis", "data", "export", "linen", "models", "nn",
           "ops", "optim", "plotting", "profiling", "quant"]

_SUBPACKAGES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
  # PEP 562: a subpackage is imported on first access (JAX and Flax take seconds).
  if name in _SUBPACKAGES:
    return importlib.import_module(f"adderjax.{name}")
  raise AttributeError(f"module 'adderjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | _SUBPACKAGES)
