"""The main job: data fallback and the side-by-side table."""

import importlib.util
import re

import pytest

from experiments import compare_mnist


@pytest.fixture
def no_tensorflow(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))


def test_falls_back_to_the_idx_test_set_then_to_digits(no_tensorflow, tmp_path):
  (tmp_path / "t10k-images-idx3-ubyte.gz").touch()
  fields, description = compare_mnist.choose_data(str(tmp_path))
  assert fields == {"data_source": "idx", "data_dir": str(tmp_path),
                    "train_split": "test[:8000]", "eval_split": "test[8000:]"}
  assert description.startswith("TFDS needs TensorFlow") and "first 8,000" in description
  (tmp_path / "train-images-idx3-ubyte").touch()
  assert compare_mnist.choose_data(str(tmp_path))[0] == {"data_source": "idx",
                                                          "data_dir": str(tmp_path)}
  fields, description = compare_mnist.choose_data(None)
  assert fields == {"data_source": "digits"} and "scikit-learn" in description


def test_prints_both_networks_side_by_side(no_tensorflow, tmp_path, capsys):
  assert compare_mnist.main(["--epochs", "0.5", "--batch_size", "128",
                             "--bn_recompute_batches", "0", "--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "falling back" not in out and "scikit-learn's 8x8 digits" in out
  rows = {m.group(1): m.groups()[1:] for m in re.finditer(
      r"^(AdderNet|CNN)\s+([\d.]+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d,]+)\s+([\d,]+)", out, re.M)}
  assert set(rows) == {"AdderNet", "CNN"}
  # Test images: the 20% of the 1,797 digits held out; op counts from count_ops.
  assert rows["AdderNet"][1] == rows["CNN"][1] == "360"
  assert rows["AdderNet"][2:] == ("0", "833,040") and rows["CNN"][2:] == ("416,520", "416,520")
  assert (tmp_path / "adder" / "checkpoints").is_dir() and (tmp_path / "conv" / "metrics.jsonl").exists()


def test_bad_data_dir_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit):
    compare_mnist.main(["--data_dir", str(tmp_path / "nowhere")])
  assert "nowhere is not a directory" in capsys.readouterr().err
