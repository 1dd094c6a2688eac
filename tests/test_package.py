"""The package's public surface: version, lazy subpackages, __all__, no shadowed module; the
wheel it builds holds its code and data."""

import fnmatch
import importlib
import pathlib
import pkgutil
import shutil
import subprocess
import sys
import tomllib
import types
import zipfile

import pytest

import adderjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _public_modules():
  names = ["adderjax"]
  for info in pkgutil.walk_packages(adderjax.__path__, "adderjax."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return names


def test_version_is_single_sourced_with_pyproject():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  module, name = attr.rsplit(".", 1)
  assert getattr(importlib.import_module(module), name) == adderjax.__version__
  assert adderjax.__version__.count(".") == 2


def test_import_is_lazy_and_reaches_the_subpackages():
  code = ("import sys, adderjax; assert 'jax' not in sys.modules, 'import adderjax imported jax'; "
          "print(adderjax.__version__, adderjax.nn.AdderConv.__name__, "
          "adderjax.optim.addernet_sgd.__name__, adderjax.ops.adder_conv.__name__, "
          "adderjax.models.get.__name__)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [adderjax.__version__, "AdderConv", "addernet_sgd",
                                   "adder_conv", "get"]
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    adderjax.nope  # noqa: B018


@pytest.mark.parametrize("name", _public_modules())
def test_every_public_module_declares_all_and_defines_it(name):
  module = importlib.import_module(name)
  assert hasattr(module, "__all__"), f"{name} has no __all__"
  for public in module.__all__:
    assert hasattr(module, public), f"{name}.__all__ names {public!r}, which it lacks"


@pytest.mark.parametrize("name", [n for n in _public_modules()
                                  if hasattr(importlib.import_module(n), "__path__")])
def test_no_submodule_is_shadowed_by_an_attribute_of_its_package(name):
  package = importlib.import_module(name)
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith("_"):  # private, or __main__ (which would run)
      continue
    importlib.import_module(f"{name}.{info.name}")
    value = getattr(package, info.name)
    assert isinstance(value, types.ModuleType), (
        f"{name}.{info.name} is a {type(value).__name__}, which hides the module of that name")


def test_wheel_holds_the_code_and_the_package_data(tmp_path):
  """What a user installs from a wheel (the notebooks' first cell): every module, the bundled
  MNIST, the pretrained weights with their licence, the native kernels' C++ source."""
  source = tmp_path / "source"  # A copy, so that the build writes nothing into the checkout.
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  shutil.copytree(ROOT / "adderjax", source / "adderjax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
  result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  wheel, = (tmp_path / "dist").glob(f"adderjax-{adderjax.__version__}-py3-none-any.whl")
  with zipfile.ZipFile(wheel) as f:
    names = set(f.namelist())
  package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
      "package-data"]
  for package, patterns in package_data.items():
    folder = ROOT / package.replace(".", "/")
    for pattern in patterns:
      files = [p.relative_to(ROOT).as_posix() for p in folder.rglob("*") if p.is_file()
               and fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern)]
      assert files, f"{package}: {pattern} matches no file in the checkout"
      assert set(files) <= names, f"the wheel lacks {sorted(set(files) - names)}"
  modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "adderjax").rglob("*.py")}
  assert modules <= names, f"the wheel lacks {sorted(modules - names)}"
  assert {"adderjax/data/bundled/t10k-images-idx3-ubyte.gz",
          "adderjax/ops/csrc/adder_forward_cpu.cc", "adderjax/ops/csrc/vec.h",
          "adderjax/models/weights/resnet20_cifar10.pth", "adderjax/models/weights/NOTICE"} <= names
  assert not any(n.startswith(("tests/", "experiments/")) for n in names)
