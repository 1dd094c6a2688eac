"""AdderNet, CNN and BNN versions of the paper's networks (Flax NNX), and a small ViT.

``vit_tiny`` is a vision transformer with the adder attention of Shu et al.
(NeurIPS 2021) in its ``"adder"`` kind (:mod:`adderjax.models.vit`).

Every model is built as ``name(*, kind="adder", num_classes=..., rngs, dtype=None,
param_dtype=jnp.float32, grad_mode="full_precision", implementation=None)``
(or ``get(name, ...)``), called on NHWC batches, and switched between batch
and running BatchNorm statistics by ``model.train()`` and ``model.eval()``.
``kind`` is one of :data:`KINDS`: ``"adder"`` (AdderNet), ``"conv"`` (CNN) or
``"binary"`` (BNN).

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> from adderjax import models
  >>> model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
  >>> model.eval()  # BatchNorm with the running statistics
  >>> forward = nnx.jit(lambda model, x: model(x))
  >>> forward(model, jnp.zeros((1, 28, 28, 1))).shape
  (1, 10)

:func:`from_torch` converts a PyTorch checkpoint of the official AdderNet
code (read without PyTorch by :mod:`adderjax.models.torch_checkpoint`), and
:func:`pretrained` returns the official ResNet-20 for CIFAR-10 shipped in the
package, whose input normalisation :data:`PRETRAINED` records.

For deployment, :func:`inference_function` turns a trained model into a
compiled function of the input alone, without ``nnx.jit``'s per-call graph
traversal (what dominates at batch 1).

``nnx.eval_shape(lambda: models.get("resnet50", rngs=nnx.Rngs(0)))`` builds a
model abstractly, with shapes and no values: enough to count parameters or
operations.
"""

from adderjax.models.convert import TORCH_MODELS, from_torch
from adderjax.models.inference import inference_function
from adderjax.models.layers import KINDS
from adderjax.models.lenet import LeNet5BN, LeNetPP, lenet5_bn, lenet_pp
from adderjax.models.pretrained_models import (
    PRETRAINED,
    PretrainedModel,
    pretrained,
    pretrained_names,
)
from adderjax.models.registry import INPUT_SHAPES, MODELS, get, input_shape, names
from adderjax.models.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet50,
    resnet56,
)
from adderjax.models.vgg import VGGSmall, vgg_small
from adderjax.models.vit import EncoderBlock, ViTTiny, vit_tiny

__all__ = [
    "INPUT_SHAPES",
    "KINDS",
    "MODELS",
    "PRETRAINED",
    "TORCH_MODELS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "EncoderBlock",
    "LeNet5BN",
    "LeNetPP",
    "PretrainedModel",
    "ResNet",
    "VGGSmall",
    "ViTTiny",
    "from_torch",
    "get",
    "inference_function",
    "input_shape",
    "lenet5_bn",
    "lenet_pp",
    "names",
    "pretrained",
    "pretrained_names",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "vgg_small",
    "vit_tiny",
]
