"""The main job: its choice of data (network, cache, offline), its table and its plot."""

import re
import sys

import pytest

import adderjax
from adderjax import analysis, data
from adderjax.data import remote
from experiments import compare_mnist
from tests.data.file_server import serving
from tests.data.test_remote import mnist_files, patch_remote

FULL_MNIST_FIELDS = {"data_source": "idx", "download": False}
BUNDLED_FIELDS = {"data_source": "bundled", "train_split": "test[:8000]",
                  "eval_split": "test[8000:]"}


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
  """Small MNIST files with their checksums patched in; the real URLs refuse connections."""
  files = mnist_files()
  patch_remote(monkeypatch, "mnist", files)
  monkeypatch.setenv(remote.ENV_DATA_DIR, str(tmp_path / "cache"))
  monkeypatch.delenv(remote.ENV_MIRROR, raising=False)
  return files


def test_with_a_network_it_downloads_full_mnist(fake_mnist, tmp_path, monkeypatch):
  with serving(fake_mnist) as server:
    monkeypatch.setenv(remote.ENV_MIRROR, server.url)
    choice = compare_mnist.choose_data()
    assert sum(server.requests.values()) == 4
  assert choice.fields == {**FULL_MNIST_FIELDS, "data_dir": str(tmp_path / "cache" / "mnist")}
  assert choice.note == "" and choice.description.startswith("full MNIST")
  assert choice.default_epochs == 2


def test_with_the_files_cached_it_needs_no_network(fake_mnist, tmp_path, monkeypatch):
  with serving(fake_mnist) as server:
    data.download("mnist", base_urls=[server.url], progress=False)
  # The server is gone and the official URLs refuse: the cache is enough.
  choice = compare_mnist.choose_data("auto")
  assert choice.fields["data_dir"] == str(tmp_path / "cache" / "mnist") and not choice.note
  assert compare_mnist.choose_data("full").fields == choice.fields


def test_offline_it_says_so_in_one_line_and_uses_the_bundled_set(fake_mnist):
  choice = compare_mnist.choose_data()
  assert choice.fields == BUNDLED_FIELDS and choice.default_epochs == 10
  assert "\n" not in choice.note and "could not be downloaded" in choice.note
  assert "unreachable" in choice.note and "bundled" in choice.note
  with pytest.raises(data.DownloadError):
    compare_mnist.choose_data("full")


def test_asked_for_choices_and_data_dir(fake_mnist, tmp_path):
  assert compare_mnist.choose_data("bundled").fields == BUNDLED_FIELDS
  assert compare_mnist.choose_data("bundled").note == ""
  digits = compare_mnist.choose_data("digits")
  assert digits.fields == {"data_source": "digits"} and "not MNIST" in digits.description
  (tmp_path / "t10k-images-idx3-ubyte.gz").touch()
  choice = compare_mnist.choose_data("auto", str(tmp_path))
  assert choice.fields == {"data_source": "idx", "data_dir": str(tmp_path), "download": False,
                           "train_split": "test[:8000]", "eval_split": "test[8000:]"}
  (tmp_path / "train-images-idx3-ubyte").touch()
  assert compare_mnist.choose_data("auto", str(tmp_path)).fields == {
      "data_source": "idx", "data_dir": str(tmp_path), "download": False}


def test_full_without_network_fails_with_a_clear_error(fake_mnist, capsys):
  assert compare_mnist.main(["--data", "full"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: --data=full: Could not download") and "by hand" in err


@pytest.mark.parametrize("adder, cnn, n, expected", [
    (0.9875, 0.9875, 2000, "matches the CNN"),
    (0.9900, 0.9600, 2000, "beats the CNN"),
    (0.9500, 0.9900, 2000, "trails the CNN"),
    (0.9930, 0.9940, 10000, "matches the CNN"),
])
def test_verdict_weighs_the_difference_against_the_test_set_noise(adder, cnn, n, expected):
  line = compare_mnist.verdict(adder, cnn, n)
  assert expected in line and f"{100 * (adder - cnn):+.2f} points" in line


def test_main_job_on_the_bundled_data(fake_mnist, tmp_path, capsys):
  """One epoch on the 8,000 bundled images: the offline default, shortened."""
  assert compare_mnist.main(["--epochs", "1", "--num_devices", "1",
                             "--workdir", str(tmp_path / "run")]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0].startswith("Full MNIST could not be downloaded")
  assert "scikit-learn" not in out
  rows = {m.group(1): m.groups()[1:] for m in re.finditer(
      r"^(AdderNet|CNN)\s+([\d.]+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d,]+)\s+([\d,]+)", out, re.M)}
  assert set(rows) == {"AdderNet", "CNN"}
  assert rows["AdderNet"][1] == rows["CNN"][1] == "2000"
  # One epoch of 62 steps (seed 0): measured 95.20% and 96.55%.
  assert float(rows["AdderNet"][0]) >= 0.93 and float(rows["CNN"][0]) >= 0.95
  assert rows["AdderNet"][2:] == ("0", "833,040") and rows["CNN"][2:] == ("416,520", "416,520")
  assert re.search(r"^AdderNet - CNN: [+-]\d+\.\d\d points", out, re.M)
  plot = tmp_path / "run" / "learning_curves.png"
  assert f"Learning curves: {plot}" in out
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  steps, accuracy = analysis.metric_history(tmp_path / "run" / "conv", "eval_accuracy")
  assert steps.tolist() == [62] and accuracy[0] == pytest.approx(float(rows["CNN"][0]), abs=1e-4)


def test_without_matplotlib_the_plot_is_skipped_with_a_reason(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name == "matplotlib" or name.startswith("matplotlib."):
      raise ImportError("No module named 'matplotlib'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  monkeypatch.delitem(sys.modules, "adderjax.plotting", raising=False)  # Imported afresh.
  monkeypatch.delattr(adderjax, "plotting", raising=False)
  assert compare_mnist.plot_line(tmp_path, "title") == (
      "Learning curves: not plotted, matplotlib is not installed (pip install 'adderjax[plot]').")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--data_dir", "/nowhere/at/all"], "/nowhere/at/all is not a directory"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--data", "tfds"], "invalid choice: 'tfds'"),
])
def test_bad_arguments_are_named(argv, message, capsys):
  with pytest.raises(SystemExit):
    compare_mnist.main(argv)
  assert message in capsys.readouterr().err
