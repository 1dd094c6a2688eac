"""Downloads of MNIST and CIFAR in their authors' files: checksummed, atomic, cached.

:func:`download` puts the original files of a dataset in a directory (by
default a per-user cache) and returns it, ready for the ``"idx"`` and
``"cifar_python"`` sources. No TensorFlow is involved:

- every file is checked against its published MD5 before it is used;
- a file is written as ``NAME.part``, verified, then renamed, so an
  interrupted or failed download never leaves a file a later run could take
  for data, and the next run starts it again;
- a file already in the directory is verified and not downloaded again;
- each file is tried at its original location and at well-known mirrors, after
  ``$ADDERJAX_DATA_MIRROR`` (a base URL holding the files under their original
  names) when that is set; transient failures (timeouts, 5xx answers, cut
  connections) are retried with exponential backoff, and an unreachable host
  is left at once, so an offline machine fails in well under a second;
- a progress bar with size and rate is drawn when standard error is a
  terminal; nothing is printed otherwise.

The cache is ``$ADDERJAX_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/adderjax``,
else ``~/.cache/adderjax``; each dataset has a folder there.

Example:
  >>> import tempfile
  >>> from adderjax import data
  >>> data.is_downloaded("mnist", splits=("test",), data_dir=tempfile.mkdtemp())
  False
  >>> directory = data.download("mnist")  # doctest: +SKIP
  >>> source = data.load_source("mnist", "train", source="idx",
  ...                           data_dir=directory)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import hashlib
import http.client
import os
import pathlib
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from typing import IO
import urllib.error
import urllib.request

from adderjax._paths import user_cache_dir
from adderjax.data.local_files import DataError

try:
  import fcntl
except ImportError:  # Not on Windows: downloads there are not locked against each other.
  fcntl = None

__all__ = [
    "ENV_DATA_DIR",
    "ENV_MIRROR",
    "REMOTES",
    "DownloadError",
    "Remote",
    "RemoteFile",
    "data_home",
    "dataset_dir",
    "download",
    "is_downloaded",
]

ENV_DATA_DIR = "ADDERJAX_DATA_DIR"
"""Environment variable: the directory that holds downloaded datasets."""

ENV_MIRROR = "ADDERJAX_DATA_MIRROR"
"""Environment variable: a base URL, tried first, holding the files under their original names."""

_CHUNK_BYTES = 1 << 16
_USER_AGENT = "adderjax-data/1 (+python urllib)"


class DownloadError(DataError):
  """A dataset file could not be downloaded, or did not match its checksum."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """A file as its authors publish it.

  Attributes:
    name: Its name at every location.
    md5: Its published MD5, lowercase hex.
    size: Its size in bytes.
  """

  name: str
  md5: str
  size: int


@dataclasses.dataclass(frozen=True)
class Remote:
  """Where a dataset's files are published and how they unpack.

  Attributes:
    dataset: The dataset's name in :data:`adderjax.data.DATASETS`.
    homepage: The authors' page, which lists the files and their checksums.
    base_urls: Base URLs holding the files, the original location first.
    files: The files each split needs.
    unpacks_to: For an archive, the folder it unpacks to (then the archive is
      removed once unpacked); ``""`` for files used as they are.
  """

  dataset: str
  homepage: str
  base_urls: tuple[str, ...]
  files: dict[str, tuple[RemoteFile, ...]]
  unpacks_to: str = ""


_MNIST_TRAIN = (RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                           9912422),
                RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881))
_MNIST_TEST = (RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
               RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542))
_CIFAR10 = (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),)
_CIFAR100 = (RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169001437),)

REMOTES: dict[str, Remote] = {
    # The MD5s are those the mirrors' maintainers (torchvision, TensorFlow) publish.
    "mnist": Remote(
        dataset="mnist", homepage="http://yann.lecun.com/exdb/mnist/",
        base_urls=("http://yann.lecun.com/exdb/mnist/",
                   "https://ossci-datasets.s3.amazonaws.com/mnist/",
                   "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files={"train": _MNIST_TRAIN, "test": _MNIST_TEST}),
    # The MD5s are on the authors' page; PaddlePaddle's dataset mirror holds the same archives.
    "cifar10": Remote(
        dataset="cifar10", homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        base_urls=("https://www.cs.toronto.edu/~kriz/", "https://dataset.bj.bcebos.com/cifar/"),
        files={"train": _CIFAR10, "test": _CIFAR10}, unpacks_to="cifar-10-batches-py"),
    "cifar100": Remote(
        dataset="cifar100", homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        base_urls=("https://www.cs.toronto.edu/~kriz/", "https://dataset.bj.bcebos.com/cifar/"),
        files={"train": _CIFAR100, "test": _CIFAR100}, unpacks_to="cifar-100-python"),
}
"""The datasets :func:`download` can fetch, by name."""


def data_home() -> pathlib.Path:
  """The directory downloads go to: ``$ADDERJAX_DATA_DIR``, else the user's cache (XDG)."""
  return user_cache_dir(ENV_DATA_DIR)


def dataset_dir(dataset: str) -> pathlib.Path:
  """Where :func:`download` puts ``dataset`` by default: ``data_home() / dataset``."""
  return data_home() / _remote(dataset).dataset


def _remote(dataset: str) -> Remote:
  if not isinstance(dataset, str) or dataset not in REMOTES:
    raise ValueError(f"dataset must be one of {tuple(REMOTES)} to download, got "
                     f"dataset={dataset!r} (ImageNet cannot be downloaded: see adderjax.data).")
  return REMOTES[dataset]


def _needed_files(remote: Remote, splits: Sequence[str] | None) -> list[RemoteFile]:
  splits = tuple(remote.files) if splits is None else splits
  if isinstance(splits, str) or not all(s in remote.files for s in splits):
    raise ValueError(f"splits must be a sequence of {tuple(remote.files)} for "
                     f"{remote.dataset}, got splits={splits!r}.")
  files = []
  for split in splits:
    files.extend(f for f in remote.files[split] if f not in files)
  return files


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _is_present(remote: Remote, file: RemoteFile, directory: pathlib.Path) -> bool:
  """Whether ``file`` is usable in ``directory``: unpacked, verified, or unzipped by hand."""
  if remote.unpacks_to:
    return (directory / remote.unpacks_to).is_dir()
  path = directory / file.name
  if path.is_file():
    actual = _md5(path)
    if actual != file.md5:
      raise DownloadError(
          f"{path} is already there but is not the published file: its MD5 is {actual}, "
          f"expected {file.md5}. Delete it to download it again.")
    return True
  return (directory / file.name.removesuffix(".gz")).is_file()  # Unzipped: read as is.


def is_downloaded(dataset: str, *, splits: Sequence[str] | None = None,
                  data_dir: str | os.PathLike | None = None) -> bool:
  """Whether :func:`download` would find every file it needs without the network.

  Args:
    dataset: A name in :data:`REMOTES`.
    splits: The splits needed (default all).
    data_dir: The directory (default :func:`dataset_dir`).

  Returns:
    True if every file is there (and verified) or unpacked.

  Raises:
    DownloadError: If a file is there but does not match its checksum.
  """
  remote = _remote(dataset)
  directory = pathlib.Path(data_dir).expanduser() if data_dir else dataset_dir(dataset)
  return all(_is_present(remote, f, directory) for f in _needed_files(remote, splits))


def download(dataset: str, *, splits: Sequence[str] | None = None,
             data_dir: str | os.PathLike | None = None, base_urls: Sequence[str] | None = None,
             timeout: float = 10.0, retries: int = 3, backoff: float = 1.0,
             progress: bool | None = None) -> pathlib.Path:
  """Makes sure a dataset's original files are in a directory, downloading what is missing.

  Args:
    dataset: ``"mnist"`` (the four IDX files, kept gzipped), ``"cifar10"`` or
      ``"cifar100"`` (the "python version" archive, unpacked).
    splits: The splits needed, a sequence of ``"train"`` and ``"test"``
      (default both). MNIST's test split alone is two small files.
    data_dir: The directory (default ``data_home() / dataset``); created if
      needed.
    base_urls: Where to look for the files, in order (default
      ``$ADDERJAX_DATA_MIRROR`` if set, then the original location, then the
      mirrors in :data:`REMOTES`).
    timeout: Seconds to wait for a connection and for each read.
    retries: Attempts per URL for transient failures (timeouts, HTTP 5xx,
      cut connections).
    backoff: Seconds before the first retry, doubling after each.
    progress: Draw a progress bar on standard error (default: when it is a
      terminal).

  Returns:
    The directory, ready for ``load_source(dataset, split, source="idx" or
    "cifar_python", data_dir=...)``.

  Raises:
    DownloadError: If a file could not be had from any URL (the message lists
      each URL and why, and where to put the file by hand), or a file already
      there does not match its checksum.
    ValueError: If an argument is invalid; the message names it.
  """
  remote = _remote(dataset)
  files = _needed_files(remote, splits)
  if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
    raise ValueError(f"retries must be a positive int, got retries={retries!r}.")
  for name, value in (("timeout", timeout), ("backoff", backoff)):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
        or (name == "timeout" and value == 0):
      raise ValueError(f"{name} must be a {'positive' if name == 'timeout' else 'non-negative'} "
                       f"number of seconds, got {name}={value!r}.")
  if base_urls is None:
    mirror = os.environ.get(ENV_MIRROR, "")
    base_urls = ((mirror,) if mirror else ()) + remote.base_urls
  elif isinstance(base_urls, str) or not base_urls or not all(
      isinstance(u, str) and u for u in base_urls):
    raise ValueError("base_urls must be a non-empty sequence of URLs, "
                     f"got base_urls={base_urls!r}.")
  directory = pathlib.Path(data_dir).expanduser() if data_dir else dataset_dir(dataset)
  directory.mkdir(parents=True, exist_ok=True)
  show = sys.stderr.isatty() if progress is None else progress
  for file in files:
    if _is_present(remote, file, directory):  # Without a lock: the directory may be read-only.
      continue
    with _locked(directory / f".{file.name}.lock"):  # Other processes wait, then find the file.
      if _is_present(remote, file, directory):
        continue
      path = directory / file.name
      if not path.is_file():
        _fetch(file, base_urls, path, timeout=timeout, retries=retries, backoff=backoff,
               show=show, homepage=remote.homepage)
      if remote.unpacks_to:
        _unpack(path, directory, remote.unpacks_to)
  return directory


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  if fcntl is None:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _Transient(Exception):
  """A failure worth retrying at the same URL."""


class _Fatal(Exception):
  """A failure that no retry at the same URL would mend."""


def _fetch(file: RemoteFile, base_urls: Sequence[str], path: pathlib.Path, *, timeout: float,
           retries: int, backoff: float, show: bool, homepage: str) -> None:
  """Downloads ``file`` to ``path`` from the first URL that gives the published file."""
  part = path.with_name(path.name + ".part")
  failures = []
  for base in base_urls:
    url = base.rstrip("/") + "/" + file.name
    for attempt in range(1, retries + 1):
      try:
        _fetch_once(url, file, part, timeout=timeout, show=show)
      except _Transient as e:
        part.unlink(missing_ok=True)
        failure = f"{e} (attempt {attempt} of {retries})"
        if attempt < retries:
          time.sleep(backoff * 2**(attempt - 1))
          continue
      except _Fatal as e:
        part.unlink(missing_ok=True)
        failure = str(e)
      except BaseException:  # Interrupted, or the disk is full: leave no debris behind.
        part.unlink(missing_ok=True)
        raise
      else:
        os.replace(part, path)
        return
      failures.append(f"  {url}: {failure}")
      break
  raise DownloadError(
      f"Could not download {file.name} ({file.size:,} bytes, MD5 {file.md5}):\n"
      + "\n".join(failures)
      + f"\nCheck the network, or set ${ENV_MIRROR} to a base URL that holds the file, or "
      f"download it by hand (see {homepage}) and put it in {path.parent}.")


def _fetch_once(url: str, file: RemoteFile, part: pathlib.Path, *, timeout: float,
                show: bool) -> None:
  request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      expected = response.headers.get("Content-Length")
      expected = int(expected) if expected and expected.isdigit() else file.size
      digest = hashlib.md5(usedforsecurity=False)
      received = 0
      with open(part, "wb") as out, _ProgressBar(file.name, expected, show) as bar:
        while chunk := response.read(_CHUNK_BYTES):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(received)
  except urllib.error.HTTPError as e:
    kind = _Transient if e.code >= 500 or e.code in (408, 429) else _Fatal
    raise kind(f"HTTP {e.code} {e.reason}") from e
  except urllib.error.URLError as e:
    if isinstance(e.reason, (socket.gaierror, ConnectionRefusedError)):
      raise _Fatal(f"unreachable ({e.reason})") from e
    raise _Transient(f"{e.reason}") from e
  except TimeoutError as e:
    raise _Transient(f"timed out after {timeout:g} s") from e
  except (http.client.HTTPException, ConnectionError) as e:
    raise _Transient(f"connection failed mid-file: {type(e).__name__}: {e}") from e
  if received != file.size:
    raise _Transient(f"the transfer stopped at {received:,} of {file.size:,} bytes")
  if digest.hexdigest() != file.md5:
    raise _Fatal(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {file.md5}")


class _ProgressBar:
  """``name  12.3/170.5 MB  7%  4.1 MB/s`` redrawn in place on standard error."""

  def __init__(self, name: str, total: int, enabled: bool, stream: IO[str] | None = None):
    self.name, self.total, self.enabled = name, total, enabled
    self.stream = stream or sys.stderr
    self.start = self.last = time.monotonic()
    self.received = 0

  def __enter__(self) -> _ProgressBar:
    return self

  def update(self, received: int) -> None:
    self.received = received
    now = time.monotonic()
    if self.enabled and (now - self.last >= 0.2 or received >= self.total):
      self.last = now
      rate = received / max(now - self.start, 1e-9)
      self.stream.write(f"\r{self.name}  {received / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                        f"{100 * received / max(self.total, 1):3.0f}%  {rate / 1e6:.1f} MB/s")
      self.stream.flush()

  def __exit__(self, *exc) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()


def _unpack(archive: pathlib.Path, directory: pathlib.Path, folder: str) -> None:
  """Unpacks ``archive`` into ``directory / folder`` atomically, then removes the archive."""
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=".unpack-", dir=directory))
  try:
    try:
      with tarfile.open(archive, "r:*") as tar:
        tar.extractall(scratch, filter="data")  # Refuses absolute paths, links out, devices.
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DownloadError(f"{archive} could not be unpacked: {e}. Delete it to download it "
                          "again.") from e
    if not (scratch / folder).is_dir():
      raise DownloadError(f"{archive} does not hold the folder {folder}/. Delete it to download "
                          "it again.")
    os.replace(scratch / folder, directory / folder)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  archive.unlink()
