"""Downloads against a local HTTP server: checksums, atomic writes, retries, mirrors, the cache."""

import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from adderjax import data
from adderjax.data import remote
from tests.data.file_server import closed_port_url, serving
from tests.data.test_local_files import idx_bytes


def md5(content: bytes) -> str:
  return hashlib.md5(content).hexdigest()


def mnist_files(num_train=24, num_test=12) -> dict[str, bytes]:
  """Small, valid MNIST IDX files under the real names, gzipped as published."""
  rng = np.random.default_rng(0)
  files = {}
  for prefix, n in (("train", num_train), ("t10k", num_test)):
    files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
        idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), mtime=0)
    files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
        idx_bytes((np.arange(n) % 10).astype(np.uint8)), mtime=0)
  return files


def cifar10_archive(num_per_batch=4) -> bytes:
  """A cifar-10-python.tar.gz of the real layout with a few images per batch."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
      batch = pickle.dumps({b"data": np.full((num_per_batch, 3072), i, np.uint8),
                            b"labels": [i % 10] * num_per_batch}, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(batch)
      tar.addfile(info, io.BytesIO(batch))
  return buffer.getvalue()


def patch_remote(monkeypatch, dataset: str, files: dict[str, bytes]) -> None:
  """Points ``REMOTES[dataset]`` at a refused port, with the checksums of ``files``."""
  old = remote.REMOTES[dataset]
  patched = {split: tuple(remote.RemoteFile(f.name, md5(files[f.name]), len(files[f.name]))
                          for f in split_files) for split, split_files in old.files.items()}
  monkeypatch.setitem(remote.REMOTES, dataset, remote.Remote(
      dataset=dataset, homepage=old.homepage, base_urls=(closed_port_url(),), files=patched,
      unpacks_to=old.unpacks_to))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv(remote.ENV_DATA_DIR, str(tmp_path / "cache"))
  monkeypatch.delenv(remote.ENV_MIRROR, raising=False)
  return tmp_path / "cache"


@pytest.fixture
def mnist_server(cache, monkeypatch):
  files = mnist_files()
  patch_remote(monkeypatch, "mnist", files)
  with serving(files) as server:
    monkeypatch.setenv(remote.ENV_MIRROR, server.url)
    yield server


def listing(directory):
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_data_home_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(remote.ENV_DATA_DIR, str(tmp_path / "d"))
  assert data.data_home() == tmp_path / "d"
  assert remote.dataset_dir("cifar10") == tmp_path / "d" / "cifar10"
  monkeypatch.delenv(remote.ENV_DATA_DIR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data.data_home() == tmp_path / "xdg" / "adderjax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert data.data_home() == tmp_path / "home" / ".cache" / "adderjax"


def test_downloads_verifies_and_caches(mnist_server, cache):
  directory = data.download("mnist", progress=False)
  assert directory == cache / "mnist"
  names = [n for n in listing(directory) if not n.startswith(".")]
  assert names == sorted(mnist_server.files)
  for name, content in mnist_server.files.items():
    assert (directory / name).read_bytes() == content
  assert all(count == 1 for count in mnist_server.requests.values())
  assert data.is_downloaded("mnist")
  assert data.download("mnist", progress=False) == directory  # The cache: no second request.
  assert all(count == 1 for count in mnist_server.requests.values())


def test_only_the_needed_split_is_fetched(mnist_server, cache):
  data.download("mnist", splits=("test",), progress=False)
  assert set(mnist_server.requests) == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
  assert data.is_downloaded("mnist", splits=("test",)) and not data.is_downloaded("mnist")


def test_load_source_downloads_into_the_cache(mnist_server, cache):
  source = data.load_source("mnist", "train[:10]", source="idx", download=True)
  assert len(source) == 10 and source.images.shape == (10, 28, 28, 1)
  expected = np.frombuffer(gzip.decompress(mnist_server.files["train-labels-idx1-ubyte.gz"]),
                           np.uint8, offset=8)[:10]
  np.testing.assert_array_equal(source.labels, expected)
  # Afterwards the cache is read without download=True and without the server.
  assert len(data.load_source("mnist", "train", source="idx")) == 24


def test_without_download_a_missing_cache_says_what_to_do(cache):
  with pytest.raises(data.DataError, match="download=True"):
    data.load_source("mnist", "train", source="idx")


def test_wrong_checksum_is_an_error_and_leaves_nothing(mnist_server, cache):
  name = "t10k-labels-idx1-ubyte.gz"
  bad = b"x" * len(mnist_server.files[name])
  mnist_server.failures[name].append(bad)
  with pytest.raises(data.DownloadError) as info:
    data.download("mnist", splits=("test",), progress=False, retries=2, backoff=0)
  message = str(info.value)
  assert f"MD5 {md5(bad)}, expected {md5(mnist_server.files[name])}" in message
  assert name in message and mnist_server.url in message and str(cache / "mnist") in message
  assert mnist_server.requests[name] == 1  # A wrong file is not fetched again from the same URL.
  assert not (cache / "mnist" / name).exists() and not (cache / "mnist" / f"{name}.part").exists()


def test_404_moves_on_at_once_and_500_is_retried(mnist_server, cache):
  name = "t10k-images-idx3-ubyte.gz"
  mnist_server.failures[name] = [404]
  with pytest.raises(data.DownloadError, match=r"HTTP 404") as info:
    data.download("mnist", splits=("test",), progress=False, retries=3, backoff=0)
  assert mnist_server.requests[name] == 1
  assert "unreachable" in str(info.value)  # The next URL (a refused port) was tried too.
  mnist_server.failures[name] = [500] * 3
  with pytest.raises(data.DownloadError, match=r"HTTP 500 .*attempt 3 of 3"):
    data.download("mnist", splits=("test",), progress=False, retries=3, backoff=0)
  assert mnist_server.requests[name] == 4
  assert not (cache / "mnist" / name).exists()
  mnist_server.failures[name] = [500, 500]  # Two failures, then the file: retries get it.
  data.download("mnist", splits=("test",), progress=False, retries=3, backoff=0)
  assert (cache / "mnist" / name).read_bytes() == mnist_server.files[name]


def test_a_cut_connection_leaves_no_partial_file_and_a_rerun_completes(mnist_server, cache):
  name = "t10k-images-idx3-ubyte.gz"
  mnist_server.failures[name] = ["cut"]
  with pytest.raises(data.DownloadError, match="stopped at|mid-file"):
    data.download("mnist", splits=("test",), progress=False, retries=1)
  assert [n for n in listing(cache / "mnist") if not n.startswith(".")] == []
  data.download("mnist", splits=("test",), progress=False, retries=1)
  assert (cache / "mnist" / name).read_bytes() == mnist_server.files[name]


def test_an_interrupted_download_leaves_no_partial_file(mnist_server, cache, monkeypatch):
  def interrupt(self, received):
    raise KeyboardInterrupt
  monkeypatch.setattr(remote._ProgressBar, "update", interrupt)
  with pytest.raises(KeyboardInterrupt):
    data.download("mnist", splits=("test",), progress=False)
  assert [n for n in listing(cache / "mnist") if not n.startswith(".")] == []


def test_an_unreachable_mirror_is_followed_by_the_next(cache, monkeypatch):
  files = mnist_files()
  patch_remote(monkeypatch, "mnist", files)
  with serving(files) as server:
    directory = data.download("mnist", base_urls=[closed_port_url(), server.url],
                              progress=False)
  assert (directory / "train-images-idx3-ubyte.gz").read_bytes() == files[
      "train-images-idx3-ubyte.gz"]


def test_offline_fails_fast_with_every_url_and_what_to_do(cache, monkeypatch):
  patch_remote(monkeypatch, "mnist", mnist_files())
  urls = [closed_port_url(), closed_port_url()]
  with pytest.raises(data.DownloadError) as info:
    data.download("mnist", splits=("test",), base_urls=urls, progress=False)
  message = str(info.value)
  assert all(f"{u}t10k-images-idx3-ubyte.gz: unreachable" in message for u in urls)
  assert remote.ENV_MIRROR in message and "by hand" in message and "yann.lecun.com" in message


def test_a_bad_file_already_there_is_reported_not_replaced(mnist_server, cache):
  directory = cache / "mnist"
  directory.mkdir(parents=True)
  (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not it")
  with pytest.raises(data.DownloadError, match="Delete it to download it again"):
    data.download("mnist", splits=("test",), progress=False)
  assert (directory / "t10k-labels-idx1-ubyte.gz").read_bytes() == b"not it"


def test_progress_bar_shows_size_and_rate(mnist_server, cache, capsys):
  data.download("mnist", splits=("test",), progress=True)
  err = capsys.readouterr().err
  assert "t10k-images-idx3-ubyte.gz" in err and "MB/s" in err and "100%" in err
  data.download("mnist", progress=False)
  assert capsys.readouterr().err == ""


def test_cifar_archive_is_verified_unpacked_and_read(cache, monkeypatch):
  archive = cifar10_archive()
  patch_remote(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
  with serving({"cifar-10-python.tar.gz": archive}) as server:
    monkeypatch.setenv(remote.ENV_MIRROR, server.url)
    train = data.load_source("cifar10", "train", source="cifar_python", download=True)
    test = data.load_source("cifar10", "test", source="cifar_python", download=True)
    assert server.requests["cifar-10-python.tar.gz"] == 1
  assert len(train) == 20 and len(test) == 4
  assert train.images[:4].max() == 0 and test.images.min() == 5 and test.labels.tolist() == [5] * 4
  assert [n for n in listing(cache / "cifar10") if not n.startswith(".")] == [
      "cifar-10-batches-py"]  # Unpacked; the archive is gone.


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="imagenet2012"), "dataset must be one of"),
    (dict(dataset="mnist", splits="train"), "splits must be a sequence"),
    (dict(dataset="mnist", splits=("validation",)), "splits must be a sequence"),
    (dict(dataset="mnist", retries=0), "retries must be a positive int"),
    (dict(dataset="mnist", timeout=0), "timeout must be a positive"),
    (dict(dataset="mnist", backoff=-1), "backoff must be a non-negative"),
    (dict(dataset="mnist", base_urls="http://x/"), "base_urls must be"),
    (dict(dataset="mnist", base_urls=[]), "base_urls must be"),
])
def test_bad_arguments_are_named(cache, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.download(**kwargs)


def test_published_checksums_match_the_bundled_files():
  import importlib.resources
  folder = importlib.resources.files("adderjax.data") / "bundled"
  for file in remote.REMOTES["mnist"].files["test"]:
    content = (folder / file.name).read_bytes()
    assert md5(content) == file.md5 and len(content) == file.size


def test_files_in_a_read_only_directory_are_used_as_they_are(mnist_server, tmp_path):
  directory = tmp_path / "readonly"
  directory.mkdir()
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    (directory / name).write_bytes(mnist_server.files[name])
  directory.chmod(0o555)
  try:
    assert data.download("mnist", splits=("test",), data_dir=directory) == directory
    assert len(data.load_source("mnist", "test", source="idx", data_dir=directory,
                                download=True)) == 12
  finally:
    directory.chmod(0o755)
  assert sum(mnist_server.requests.values()) == 0
  assert listing(directory) == ["t10k-images-idx3-ubyte.gz",
                                "t10k-labels-idx1-ubyte.gz"]  # No lock.
