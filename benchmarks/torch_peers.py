"""PyTorch peers for benchmarks/peers.py: ResNet-20 as a CNN, and as an AdderNet the official way;
LeNet-5-BN as a CNN; the CNNs quantized to int8 by PyTorch's own post-training quantization.

Benchmark-only: PyTorch is never a dependency of adderjax (``pip install
torch==2.13.0`` for these). The network mirrors ``adderjax.models.resnet20``
(the official AdderNet ``resnet20.py``): a 3x3 stem convolution to 16
channels, three stages of three basic blocks at 16/32/64 channels with 1x1
projection shortcuts, global average pooling, a bias-free classifier and a
BatchNorm on the logits.

The AdderNet's layers follow the official code's formulation: the input
unfolded into patches, the distance to every filter by broadcasting
(``B x K x L`` patches against ``O x K`` filters, materialised), summed; its
backward pass is the paper's: ``dF = sum g (X - F)`` and
``dX = sum g HardTanh(F - X)``, with the official per-layer adaptive scale
``eta sqrt(numel) / ||dF||`` applied to ``dF``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class _AdderFunction(torch.autograd.Function):
  """``-sum_k |patches[b, k, l] - filters[o, k]|`` with the paper's gradients."""

  @staticmethod
  def forward(ctx, patches, filters, eta):
    ctx.save_for_backward(patches, filters)
    ctx.eta = eta
    # (B, 1, K, L) - (1, O, K, 1): the broadcast the official code materialises.
    return -(patches.unsqueeze(1) - filters[None, :, :, None]).abs().sum(2)

  @staticmethod
  def backward(ctx, grad):
    patches, filters = ctx.saved_tensors
    diff = patches.unsqueeze(1) - filters[None, :, :, None]          # X - F: (B, O, K, L)
    grad_filters = (diff * grad.unsqueeze(2)).sum((0, 3))             # sum g (X - F)
    scale = ctx.eta * math.sqrt(grad_filters.numel()) / grad_filters.norm().clamp(min=1e-12)
    grad_patches = ((-diff).clamp(-1, 1) * grad.unsqueeze(2)).sum(1)  # sum g HardTanh(F - X)
    return grad_patches, grad_filters * scale, None


class Adder2d(nn.Module):
  """An adder convolution in the official code's formulation (unfold, broadcast, sum)."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
               eta: float = 0.2):
    super().__init__()
    self.stride, self.padding, self.kernel, self.eta = stride, padding, kernel, eta
    self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))

  def forward(self, x):
    b, _, h, w = x.shape
    ho = (h + 2 * self.padding - self.kernel) // self.stride + 1
    wo = (w + 2 * self.padding - self.kernel) // self.stride + 1
    patches = F.unfold(x, self.kernel, padding=self.padding, stride=self.stride)
    y = _AdderFunction.apply(patches, self.weight.flatten(1), self.eta)
    return y.view(b, -1, ho, wo)


def _conv(kind: str, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
  padding = kernel // 2
  if kind == "adder":
    return Adder2d(cin, cout, kernel, stride, padding)
  return nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)


class BasicBlock(nn.Module):
  def __init__(self, kind: str, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(kind, cin, cout, 3, stride), nn.BatchNorm2d(cout, momentum=0.1)
    self.conv2, self.bn2 = _conv(kind, cout, cout, 3), nn.BatchNorm2d(cout, momentum=0.1)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(_conv(kind, cin, cout, 1, stride), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
  """ResNet-20 for CIFAR as in adderjax.models.resnet20; ``kind`` is "conv" or "adder"."""

  def __init__(self, kind: str, num_classes: int = 10):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
    blocks, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for b in range(3):
        blocks.append(BasicBlock(kind, cin, cout, stride if b == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes, bias=False)
    self.bn2 = nn.BatchNorm1d(num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.blocks(x).mean((2, 3))
    return self.bn2(self.fc(x))


class LeNet5BN(nn.Module):
  """LeNet-5-BN as in adderjax.models.lenet5_bn, the CNN (28x28x1 inputs)."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
    self.classifier = nn.Sequential(
        nn.Linear(16 * 5 * 5, 120, bias=False), nn.BatchNorm1d(120), nn.ReLU(),
        nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84), nn.ReLU(),
        nn.Linear(84, num_classes, bias=False), nn.BatchNorm1d(num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


def quantize_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
  """``model`` (eval mode) as PyTorch's int8 CNN: FX graph mode static post-training
  quantization with the x86 backend's default settings (per-channel int8 weights, uint8
  activations, BatchNorm folded into the convolutions), calibrated on ``calibration``."""
  from torch.ao.quantization import get_default_qconfig_mapping
  from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

  torch.backends.quantized.engine = "x86"
  model.eval()
  prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(calibration,))
  with torch.inference_mode():
    prepared(calibration)
  return convert_fx(prepared)
