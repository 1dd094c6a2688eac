"""Tests for adderjax.models.from_torch, against the official AdderNet code's own outputs.

``official/record_official_logits.py`` ran the official PyTorch code once
(PyTorch is not a test dependency) and kept its logits:

- ResNet-20 with the official CIFAR-10 checkpoint on 32 seeded CIFAR-like
  images. In float64 the converted model matches to ~1e-12 (the mapping is
  exact); in float32 both sides round differently (the official code sums
  with ``torch.cdist``, adderjax in its own order), by a few 1e-4 of the
  largest logit, which is also how far the official float32 logits are from
  its float64 ones.
- ResNet-50 (the official ``resnet50.py``) with weights drawn by
  `generators.resnet50_state_dict` and recorded BatchNorm statistics, on two
  64x64 images.

The other ResNets (32, 56, 18, 34) have no official logits: their names and
layouts are checked by a round trip through a state dict written here.
"""

import functools
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import models
from adderjax.models import from_torch
from adderjax.models.pretrained_models import PRETRAINED
from adderjax.models.torch_checkpoint import load_torch_state_dict
from tests.models.official import generators

OFFICIAL = pathlib.Path(__file__).resolve().parent / "official"
CHECKPOINT = PRETRAINED["resnet20_cifar10"].path()


@functools.cache
def _resnet20_official():
  recorded = np.load(OFFICIAL / "resnet20_official.npz")
  images = generators.cifar_normalize(generators.cifar_images(generators.RESNET20_SEED, 32))
  assert generators.digest(images) == str(recorded["inputs_sha256"]), "NumPy drew other images"
  return images, recorded["logits_float32"], recorded["logits_float64"]


@functools.cache
def _resnet20_state():
  return load_torch_state_dict(CHECKPOINT)


def _state():
  """The official ResNet-20's state dict, a fresh dict (of shared, unmodified arrays)."""
  return dict(_resnet20_state())


def _logits(model, x):
  # Float32 as the official code runs it: on a GPU, JAX's default precision would run the
  # stem and classifier in TF32 (ResNet-20's logits 3.0e-4 from float64 on an H200, not 4e-5).
  with jax.default_matmul_precision("highest"):
    return np.asarray(nnx.jit(lambda model, x: model(x))(model, x))


def _differences(logits, official):
  """Max absolute difference, and the same relative to the largest official logit."""
  difference = np.abs(np.asarray(logits, np.float64) - official).max()
  return difference, difference / np.abs(official).max()


def test_resnet20_matches_the_official_code_in_float32_xla():
  # The default (native) implementation is compared through adderjax.models.pretrained,
  # in test_pretrained.py.
  images, official32, official64 = _resnet20_official()
  model = from_torch("resnet20", CHECKPOINT, implementation="xla")
  logits = _logits(model, images)
  assert logits.dtype == np.float32
  _, relative64 = _differences(logits, official64)
  _, relative32 = _differences(logits, official32)
  assert relative64 < 2e-4, relative64  # measured 4e-5
  assert relative32 < 2e-3, relative32  # measured 6e-4: the official float32 error
  np.testing.assert_array_equal(logits.argmax(1), official64.argmax(1))


def test_resnet20_matches_the_official_code_in_float64():
  images, _, official64 = _resnet20_official()
  with jax.enable_x64(True):
    # Broadcasting implementation: it compiles fastest for these small maps.
    model = from_torch("resnet20", CHECKPOINT, param_dtype=jnp.float64,
                       implementation="reference")
    assert model.layer1[0].conv1.kernel.get_value().dtype == jnp.float64
    logits = _logits(model, images[:8].astype(np.float64))
  assert logits.dtype == np.float64
  np.testing.assert_allclose(logits, official64[:8], rtol=0, atol=1e-9)


def test_resnet50_round_trip_matches_the_official_code():
  recorded = np.load(OFFICIAL / "resnet50_official.npz")
  weights = generators.resnet50_state_dict()
  assert generators.digest(*weights.values()) == str(recorded["weights_sha256"])
  state = generators.resnet50_with_statistics(weights, recorded["running_mean"],
                                              recorded["running_std"])
  images = generators.resnet50_test_images()
  assert generators.digest(images) == str(recorded["inputs_sha256"])
  model = from_torch("resnet50", state)  # num_classes from fc.weight: 10
  assert model.num_classes == 10 and model.fc.kernel.shape == (2048, 10)
  logits = _logits(model, images)
  _, relative64 = _differences(logits, recorded["logits_float64"])
  _, relative32 = _differences(logits, recorded["logits_float32"])
  # This random-weight ResNet-50 is ill-conditioned: the official float32 logits are 1.1e-3
  # from float64, and scaling the images by 1 + 1e-7 moved the XLA loops' logits by up to
  # 1.9e-3. Float32 rounding alone, in another order, gave 6e-4 to 6.2e-3 with the native
  # kernels (AVX2 and AVX-512 builds, jit or not); a conversion error would be of order 1.
  assert relative64 < 2e-2, relative64
  assert relative32 < 2e-2, relative32
  np.testing.assert_array_equal(logits.argmax(1), recorded["logits_float64"].argmax(1))


def _torch_name(path, kernel_name):
  """PyTorch's name of the adderjax variable at ``path`` (written out, not from convert.py)."""
  *module, leaf = (str(part) for part in path)
  if module[-2:] == ["downsample", "conv"]:
    module[-1] = "0"
  elif module[-2:] == ["downsample", "bn"]:
    module[-1] = "1"
  if leaf == "kernel":
    adder = module[0].startswith("layer")
    leaf = kernel_name if adder else "weight"
  else:
    leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
  return ".".join([*module, leaf])


def _torch_state(model, kernel_name, fc_as_conv, seed=0):
  """A PyTorch-layout state dict of random values for ``model``, and the values adderjax holds."""
  rng = np.random.default_rng(seed)
  state, expected = {}, {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    shape = tuple(variable.get_value().shape)
    value = rng.standard_normal(shape).astype(np.float32)
    if path[-1] == "var":
      value = np.abs(value) + 0.5
    name = _torch_name(path, kernel_name)
    if len(shape) == 4:
      state[name] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif len(shape) == 2:
      state[name] = value.T[..., None, None] if fc_as_conv else value.T
    else:
      state[name] = value
      if path[-1] == "var":
        state[name.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    expected[path] = value
  return state, expected


@pytest.mark.parametrize("name, kernel_name, fc_as_conv", [
    ("resnet20", "adder", True),
    ("resnet32", "weight", True),  # torchshiftadd's name for adder kernels
    ("resnet56", "adder", True),
    ("resnet18", "weight", False),  # fc as nn.Linear
    ("resnet34", "adder", True),  # fc as the official 1x1 nn.Conv2d
    ("resnet50", "adder", False),
])
def test_round_trip_of_every_layout(name, kernel_name, fc_as_conv):
  abstract = nnx.eval_shape(lambda: models.get(name, num_classes=7, rngs=nnx.Rngs(0)))
  state, expected = _torch_state(abstract, kernel_name, fc_as_conv)
  if name in ("resnet18", "resnet34"):  # torchvision-style basic blocks
    assert {"layer2.0.downsample.0." + kernel_name, "layer4.1.conv2." + kernel_name,
            "layer4.1.bn2.running_var", "fc.bias"} <= set(state)
    assert "layer1.0.downsample.0." + kernel_name not in state
  model = from_torch(name, {"state_dict": {f"module.{k}": v for k, v in state.items()}})
  assert model.bn1.use_running_average  # eval mode
  flat = nnx.to_flat_state(nnx.state(model))
  assert len(flat) == len(expected)
  for path, variable in flat:
    value = variable.get_value()
    assert value.dtype == jnp.float32, path
    np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=str(path))


def test_param_dtype_and_rngs_are_passed_on():
  model = from_torch("resnet20", _state(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  assert model.layer1[0].conv1.kernel.get_value().dtype == jnp.bfloat16
  assert model.bn1.scale.get_value().dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(model.fc.kernel.get_value(), np.float32),
      _state()["fc.weight"][:, :, 0, 0].T, rtol=1e-2)


def test_unknown_keys():
  state = _state()
  state["layer1.0.conv3.adder"] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"key 'layer1.0.conv3.adder' has no place in resnet20"):
    from_torch("resnet20", state)


@pytest.mark.parametrize("key", ["layer2.0.bn1.running_var", "layer1.0.conv1.adder",
                                 "layer3.0.downsample.0.adder", "fc.weight", "conv1.weight"])
def test_missing_keys(key):
  state = _state()
  del state[key]
  with pytest.raises(ValueError, match=f"key '{key}'.* is missing"):
    from_torch("resnet20", state, num_classes=10)


def test_num_batches_tracked_is_optional():
  state = {k: v for k, v in _state().items() if not k.endswith("num_batches_tracked")}
  assert from_torch("resnet20", state).num_classes == 10


@pytest.mark.parametrize("key, shape, expected", [
    ("layer3.0.conv1.adder", (64, 32, 1, 1), r"\(64, 32, 3, 3\)"),
    ("bn2.running_mean", (11,), r"\(10,\)"),
    ("fc.weight", (10, 32, 1, 1), r"\(10, 64\) or \(10, 64, 1, 1\)"),
])
def test_wrong_shapes(key, shape, expected):
  state = _state()
  state[key] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=rf"key '{key}' has shape \({shape[0]}.*expected {expected}"):
    from_torch("resnet20", state)


def test_num_classes_that_does_not_fit():
  # The first key checked is fc.weight or bn2's: either names the 10 classes it holds.
  with pytest.raises(ValueError, match=r"has shape \(10,.*\), expected \(100,"):
    from_torch("resnet20", _state(), num_classes=100)


def test_two_names_for_one_kernel():
  state = _state()
  state["layer1.0.conv1.weight"] = state["layer1.0.conv1.adder"]
  with pytest.raises(ValueError, match="'layer1.0.conv1.adder', 'layer1.0.conv1.weight'"):
    from_torch("resnet20", state)


@pytest.mark.parametrize("name", ["lenet5_bn", "lenet_pp", "vgg_small", "resnet101", None])
def test_names_without_an_official_counterpart(name):
  with pytest.raises(ValueError, match=f"name=.*{name}"):
    from_torch(name, _state())


def test_only_adder_models():
  with pytest.raises(ValueError, match="kind='conv'"):
    from_torch("resnet20", _state(), kind="conv")


def test_unreadable_checkpoint(tmp_path):
  path = tmp_path / "broken.pth"
  path.write_bytes(CHECKPOINT.read_bytes()[:5000])
  with pytest.raises(ValueError, match="broken.pth: not a readable PyTorch checkpoint"):
    from_torch("resnet20", path)
