"""Tests for adderjax.models.torch_checkpoint: PyTorch checkpoints read without PyTorch.

The expected values come from PyTorch itself, recorded once by
``official/record_official_logits.py``: ``varied.pth`` (zip format) and
``varied_legacy.pth`` (pre-1.6 format) with the values ``torch.load`` reads
back, and the keys and a digest of the official (legacy-format) ResNet-20
checkpoint. Pickles that ``torch.save`` does not write (untyped storages, a
big-endian archive, forbidden globals) are assembled here from pickle opcodes.
"""

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from adderjax.models.pretrained_models import PRETRAINED
from adderjax.models.torch_checkpoint import load_torch_state_dict, unwrap_state_dict
from tests.models.official import generators

OFFICIAL = pathlib.Path(__file__).resolve().parent / "official"
CHECKPOINT = PRETRAINED["resnet20_cifar10"].path()


# A few pickle opcodes (protocol 2), to write what torch.save would, or would not.
def _global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text):
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
  return b"J" + struct.pack("<i", value)


def _tuple(*items):
  return b"(" + b"".join(items) + b"t"


def _tensor(storage_class, key, numel, offset, size, stride, dtype=None):
  """``_rebuild_tensor_v2`` of a persistent storage, or ``_rebuild_tensor_v3`` given a dtype."""
  storage = _tuple(_str("storage"), _global(*storage_class), _str(key), _str("cpu"),
                   _int(numel)) + b"Q"
  hooks = _global("collections", "OrderedDict") + b")R"
  args = [storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89",
          hooks]
  if dtype is None:
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(*args) + b"R"
  return _global("torch._utils", "_rebuild_tensor_v3") + _tuple(*args, _global("torch", dtype)) \
      + b"R"


def _dict_pickle(items):
  return b"\x80\x02}" + b"".join(_str(key) + value + b"s" for key, value in items.items()) + b"."


def _zip(data_pkl, records, *, folder="archive", byteorder="little"):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr(f"{folder}/data.pkl", data_pkl)
    if byteorder is not None:
      archive.writestr(f"{folder}/byteorder", byteorder)
    for key, data in records.items():
      archive.writestr(f"{folder}/data/{key}", data)
  buffer.seek(0)
  return buffer


def _legacy(main_pickle):
  """A legacy stream whose object is ``main_pickle`` (with no storages)."""
  head = b"".join(pickle.dumps(value, protocol=2) for value in (
      0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
  return io.BytesIO(head + main_pickle + pickle.dumps([], protocol=2))


@pytest.mark.parametrize("name", ["varied.pth", "varied_legacy.pth"])
def test_reads_what_torch_load_reads(name):
  expected = np.load(OFFICIAL / "varied_expected.npz")
  keys = [key for key in expected.files if not key.endswith(":dtype")]
  state = load_torch_state_dict(OFFICIAL / name)
  # Unwrapped from {"epoch", "best_acc1", "state_dict"}, without the "module." prefix.
  assert list(state) == keys
  assert "float32_transposed" in keys and "bfloat16" in keys and "num_batches_tracked" in keys
  for key in keys:
    dtype = str(expected[f"{key}:dtype"])
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    assert state[key].dtype == want, key
    assert state[key].shape == expected[key].shape, key
    np.testing.assert_array_equal(state[key].astype(expected[key].dtype), expected[key],
                                  err_msg=key)
    assert state[key].flags.c_contiguous and state[key].flags.writeable, key
  # Views and shared storages become independent arrays.
  state["float32"][0, 0] = -1
  assert state["float32_transposed"][0, 0] == 0


def test_reads_the_official_legacy_checkpoint():
  recorded = np.load(OFFICIAL / "resnet20_official.npz")
  state = load_torch_state_dict(CHECKPOINT)
  assert [f"module.{key}" for key in state] == recorded["checkpoint_keys"].tolist()
  assert generators.digest(*state.values()) == str(recorded["checkpoint_sha256"])
  assert state["layer2.0.downsample.0.adder"].shape == (32, 16, 1, 1)
  assert state["bn2.num_batches_tracked"].dtype == np.int64


def test_reads_file_objects_and_streams():
  data = CHECKPOINT.read_bytes()
  expected = load_torch_state_dict(CHECKPOINT)

  class Stream(io.RawIOBase):  # readable, not seekable
    def __init__(self):
      self.buffer = io.BytesIO(data)

    def readable(self):
      return True

    def readinto(self, b):
      return self.buffer.readinto(b)

  for file in (io.BytesIO(data), io.BufferedReader(Stream())):
    state = load_torch_state_dict(file)
    assert state.keys() == expected.keys()
    assert all(np.array_equal(state[key], expected[key]) for key in state)


def test_untyped_storages_big_endian_archives_and_any_folder_name():
  values = np.array([1.5, -2.0, 0.25], "<f4")
  pickled = _dict_pickle({
      "typed": _tensor(("torch", "FloatStorage"), "0", 3, 1, (2,), (1,)),
      "untyped": _tensor(("torch", "UntypedStorage"), "1", 12, 0, (3,), (1,), dtype="float32"),
      "bytes": _tensor(("torch.storage", "UntypedStorage"), "1", 12, 4, (2,), (1,)),
  })
  records = {"0": values.tobytes(), "1": values.tobytes()}
  state = load_torch_state_dict(_zip(pickled, records, folder="my model"))
  np.testing.assert_array_equal(state["typed"], values[1:])
  np.testing.assert_array_equal(state["untyped"], values)
  np.testing.assert_array_equal(state["bytes"], values.view(np.uint8)[4:6])

  big = {"0": values.astype(">f4").tobytes(), "1": values.astype(">f4").tobytes()}
  state = load_torch_state_dict(_zip(pickled, big, byteorder="big", folder="x"))
  np.testing.assert_array_equal(state["typed"], values[1:])


def test_a_zip_archive_without_byteorder_is_little_endian():
  values = np.arange(4, dtype="<i8")
  pickled = _dict_pickle({"w": _tensor(("torch", "LongStorage"), "0", 4, 0, (2, 2), (1, 2))})
  state = load_torch_state_dict(_zip(pickled, {"0": values.tobytes()}, byteorder=None))
  np.testing.assert_array_equal(state["w"], [[0, 2], [1, 3]])


class _RunsCode:
  """Unpickled by plain pickle, this would run a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "collections.Counter"])
def test_refuses_any_other_global(tmp_path, container, payload):
  marker = tmp_path / "ran"
  if payload == "os.system":
    pickled = pickle.dumps({"w": _RunsCode(marker)}, protocol=2)
    name = f"{os.system.__module__}.system"
  elif payload == "builtins.eval":
    pickled = b"\x80\x02}" + _str("w") + _global("builtins", "eval") + _tuple(_str("1+1")) \
        + b"Rs."
    name = "builtins.eval"
  else:
    pickled = pickle.dumps({"w": collections.Counter("ab")}, protocol=2)
    name = "collections.Counter"
  file = _zip(pickled, {}) if container == "zip" else _legacy(pickled)
  path = tmp_path / "evil.pth"
  path.write_bytes(file.getvalue())
  with pytest.raises(ValueError, match=f"evil.pth.*global {name}.*not allowed"):
    load_torch_state_dict(path)
  assert not marker.exists()


def test_refuses_to_modify_its_stand_ins():
  # BUILD on a stand-in for torch._utils._rebuild_tensor_v2 would set its state.
  pickled = (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"}" + _str("name")
             + _str("eval") + b"sb.")
  with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
    load_torch_state_dict(_zip(pickled, {}))


@pytest.mark.parametrize("cut", [0, 1, 10, 200, 3000, 40_000, -8, -1])
def test_truncated_legacy_checkpoint(tmp_path, cut):
  data = CHECKPOINT.read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:cut])
  with pytest.raises(ValueError, match="cut.pth: not a readable PyTorch checkpoint"):
    load_torch_state_dict(path)


@pytest.mark.parametrize("cut", [10, 1000, -30])
def test_truncated_zip_checkpoint(tmp_path, cut):
  path = tmp_path / "cut.pth"
  path.write_bytes((OFFICIAL / "varied.pth").read_bytes()[:cut])
  with pytest.raises(ValueError, match="cut.pth: not a readable PyTorch checkpoint"):
    load_torch_state_dict(path)


@pytest.mark.parametrize("records, match", [
    ({"0": b"\0" * 8}, "storage '0' has 8 bytes, expected 12"),
    ({}, "no record 'archive/data/0'"),
])
def test_corrupted_zip_records(records, match):
  pickled = _dict_pickle({"w": _tensor(("torch", "FloatStorage"), "0", 3, 0, (3,), (1,))})
  with pytest.raises(ValueError, match=match):
    load_torch_state_dict(_zip(pickled, records))


def test_a_tensor_beyond_its_storage():
  pickled = _dict_pickle({"w": _tensor(("torch", "FloatStorage"), "0", 3, 1, (3,), (1,))})
  with pytest.raises(ValueError, match="needs 4 elements, but storage '0' has 3"):
    load_torch_state_dict(_zip(pickled, {"0": b"\0" * 12}))


def test_garbage_and_not_a_state_dict(tmp_path):
  path = tmp_path / "noise.pth"
  path.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ValueError, match="noise.pth: not a readable PyTorch checkpoint"):
    load_torch_state_dict(path)
  with pytest.raises(ValueError, match="no state dict found.*got list"):
    load_torch_state_dict(_zip(pickle.dumps([1, 2], protocol=2), {}))
  with pytest.raises(ValueError, match=r"no state dict found.*got keys \[\]"):
    load_torch_state_dict(_zip(pickle.dumps({"state_dict": {}}, protocol=2), {}))
  with pytest.raises(ValueError, match="path_or_file must be a path or a binary file"):
    load_torch_state_dict(42)


def test_unwrap_state_dict():
  w = np.ones((2, 3), np.float32)
  assert list(unwrap_state_dict({"model": {"state_dict": {"module.a": w}}})) == ["a"]
  assert list(unwrap_state_dict({"module.a": w, "b": w})) == ["module.a", "b"]  # not all
  with pytest.raises(ValueError, match="from-here: the value of key 'optimizer'"):
    unwrap_state_dict({"a": w, "optimizer": {"lr": 0.1}}, source="from-here")
