"""The package's public surface: version, lazy subpackages, __all__, no shadowed module."""

import importlib
import pathlib
import pkgutil
import subprocess
import sys
import tomllib
import types

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
