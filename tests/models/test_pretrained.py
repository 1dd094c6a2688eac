"""Tests for adderjax.models.pretrained: the official ResNet-20 shipped in the package.

Its logits are compared with the official code's (recorded by
``official/record_official_logits.py``) through the default (native)
implementation, on images normalised by the record's own ``normalize``.
"""

import dataclasses
import hashlib
import pathlib
import tomllib

from flax import nnx
import numpy as np
import pytest

from adderjax import models
from adderjax.models import PRETRAINED, from_torch, pretrained, pretrained_models, pretrained_names
from tests.models.official import generators

ROOT = pathlib.Path(__file__).resolve().parents[2]
OFFICIAL = pathlib.Path(__file__).resolve().parent / "official"
WEIGHTS = ROOT / "adderjax" / "models" / "weights"


def test_names_and_record():
  assert pretrained_names() == ("resnet20_cifar10",)
  record = PRETRAINED["resnet20_cifar10"]
  assert (record.model, record.dataset, record.num_classes, record.top1) == (
      "resnet20", "cifar10", 10, 91.82)
  assert record.input_shape == models.input_shape("resnet20")
  # The official test.py's transforms.Normalize, as the recording script used it.
  assert record.mean == generators.CIFAR_MEAN and record.std == generators.CIFAR_STD
  images = generators.cifar_images(0, 2)
  np.testing.assert_array_equal(record.normalize(images / np.float32(255)),
                                generators.cifar_normalize(images))


def test_matches_the_official_code():
  recorded = np.load(OFFICIAL / "resnet20_official.npz")
  record = PRETRAINED["resnet20_cifar10"]
  images = generators.cifar_images(generators.RESNET20_SEED, 32)
  x = record.normalize(images.astype(np.float32) / 255)
  assert generators.digest(x) == str(recorded["inputs_sha256"])
  model = pretrained("resnet20_cifar10")  # in eval mode
  logits = np.asarray(nnx.jit(lambda model, x: model(x))(model, x))
  official = recorded["logits_float64"]
  relative = np.abs(logits - official).max() / np.abs(official).max()
  assert relative < 1e-3, relative  # measured 3.6e-4 (float32, native kernels)
  np.testing.assert_array_equal(logits.argmax(1), official.argmax(1))


def test_same_weights_as_from_torch_and_options_passed_on():
  model = pretrained("resnet20_cifar10", implementation="xla", rngs=nnx.Rngs(1))
  assert model.bn2.use_running_average
  assert model.layer1[0].conv1.implementation == "xla"
  reference = from_torch("resnet20", WEIGHTS / "resnet20_cifar10.pth")
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                               nnx.to_flat_state(nnx.state(reference))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_unknown_name():
  with pytest.raises(ValueError, match="name=.*'resnet20'"):
    pretrained("resnet20")


def test_a_damaged_file_is_refused(monkeypatch):
  record = dataclasses.replace(PRETRAINED["resnet20_cifar10"], sha256="0" * 64)
  monkeypatch.setattr(pretrained_models, "PRETRAINED", {"resnet20_cifar10": record})
  with pytest.raises(ValueError, match="resnet20_cifar10.pth has sha256 fe3ad7c1"):
    pretrained("resnet20_cifar10")


def test_shipped_files_and_package_data():
  record = PRETRAINED["resnet20_cifar10"]
  assert hashlib.sha256(record.path().read_bytes()).hexdigest() == record.sha256
  licence = (WEIGHTS / "LICENSE-huawei-noah-AdderNet.txt").read_text()
  assert licence.startswith("BSD 3-Clause License") and "Huawei" in licence
  notice = (WEIGHTS / "NOTICE").read_text()
  for fact in ("d94dc43", "models/ResNet20-AdderNet.pth", "BSD 3-Clause", record.sha256):
    assert fact in notice, fact
  patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
      "package-data"]["adderjax.models"]
  for file in WEIGHTS.iterdir():
    assert any(file.match(f"weights/{p.split('/', 1)[1]}") for p in patterns), file.name
