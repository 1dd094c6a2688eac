"""The notebooks in colabs/: each runs top to bottom in a real Jupyter kernel (fast mode), and the
committed copies carry the outputs of a full run; docs/make_figures.py turns them into the README's
gallery."""

import base64
import copy
import importlib.util
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest

from docs import make_figures

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
# This one runs through the figure script's command line; the others through run_notebook.
SCRIPT_NOTEBOOK = "quickstart.ipynb"


def _read(path):
  return nbformat.read(str(path), as_version=4)


def _figure_tags(notebook):
  return {tag[len(make_figures.TAG):] for cell in notebook.cells
          for tag in cell.get("metadata", {}).get("tags", []) if tag.startswith(make_figures.TAG)}


def _errors(notebook):
  return [output for cell in notebook.cells for output in cell.get("outputs", [])
          if output.get("output_type") == "error"]


def test_the_readme_lists_every_notebook():
  readme = (ROOT / "README.md").read_text()
  listed = set(re.findall(r"\]\(colabs/([\w-]+\.ipynb)\)", readme))
  assert {p.name for p in NOTEBOOKS} == listed
  assert SCRIPT_NOTEBOOK in listed


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name != SCRIPT_NOTEBOOK],
                         ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path):
  notebook = make_figures.run_notebook(path, fast=True, timeout=600)
  assert not _errors(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code)
  # Every tagged cell drew exactly one figure (figures() raises otherwise).
  pngs = make_figures.figures(notebook)
  assert set(pngs) == _figure_tags(notebook) and pngs
  assert all(png.startswith(b"\x89PNG") for png in pngs.values())
  assert "fast mode" in "".join(o.get("text", "") for c in code for o in c.outputs)


def test_figure_script_in_fast_mode(tmp_path, monkeypatch):
  monkeypatch.setenv("ADDERJAX_FAST", "1")
  path = ROOT / "colabs" / SCRIPT_NOTEBOOK
  before = path.read_bytes()
  assert make_figures.main([str(path), "--out", str(tmp_path / "figures")]) == 0
  written = sorted(p.name for p in (tmp_path / "figures").iterdir())
  assert written == sorted(f"{name}.png" for name in _figure_tags(_read(path)))
  assert all((tmp_path / "figures" / name).read_bytes().startswith(b"\x89PNG") for name in written)
  assert path.read_bytes() == before  # only --write-notebooks stores outputs


def test_figures_needs_one_png_per_tagged_cell():
  notebook = nbformat.v4.new_notebook()
  cell = nbformat.v4.new_code_cell("1")
  cell.metadata["tags"] = ["figure:x"]
  notebook.cells = [cell]
  with pytest.raises(ValueError, match="'figure:x' has 0 PNG outputs, not 1"):
    make_figures.figures(notebook)
  png = base64.b64encode(b"\x89PNG-data").decode()
  cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
  assert make_figures.figures(notebook) == {"x": b"\x89PNG-data"}
  notebook.cells.append(copy.deepcopy(cell))
  with pytest.raises(ValueError, match="Two cells are tagged 'figure:x'"):
    make_figures.figures(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_carries_full_mode_outputs(path):
  notebook = _read(path)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code), "run it: python -m docs.make_figures"
  assert not _errors(notebook)
  text = "".join(o.get("text", "") for cell in code for o in cell.outputs)
  assert "full mode" in text and "fast mode" not in text
  assert set(make_figures.figures(notebook)) == _figure_tags(notebook)


def _install_cell(path):
  return next(cell for cell in _read(path).cells if cell.cell_type == "code").source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_installs_itself_and_links_to_colab(path):
  notebook = _read(path)
  # The same install cell in every notebook (tested once below), its address left for the user.
  assert _install_cell(path) == _install_cell(NOTEBOOKS[0])
  assert '\nADDERJAX_REPO = ""  # the git clone address' in _install_cell(path)
  assert "colab-badge.svg" in notebook.cells[0].source
  assert f"colabs/{path.name}" in notebook.cells[0].source


def _run_install_cell(source, cwd, monkeypatch):
  """Runs the install cell as on a fresh runtime (adderjax missing); returns pip's arguments."""
  calls = []
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
  monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args))
  exec(compile(source, "install cell", "exec"), {})
  return calls


def test_install_cell_takes_a_wheel_or_the_repository_or_says_what_to_do(tmp_path,
                                                                         monkeypatch):
  source = _install_cell(NOTEBOOKS[0])
  with pytest.raises(RuntimeError, match=r"set ADDERJAX_REPO .* upload the adderjax-\*\.whl"):
    _run_install_cell(source, tmp_path, monkeypatch)
  address = "https://example.invalid/someone/adderjax"
  with_repo = source.replace('ADDERJAX_REPO = ""', f'ADDERJAX_REPO = "{address}"', 1)
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  assert _run_install_cell(with_repo, tmp_path, monkeypatch) == [
      pip + [f"adderjax[plot] @ git+{address}"]]
  wheel = tmp_path / "adderjax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  assert _run_install_cell(with_repo, tmp_path, monkeypatch) == [
      pip + [f"adderjax[plot] @ {wheel.as_uri()}"]]  # An uploaded wheel comes first.


def test_readme_gallery_shows_every_figure():
  readme = (ROOT / "README.md").read_text()
  shown = set(re.findall(r"docs/figures/([\w-]+)\.png", readme))
  tags = set().union(*(_figure_tags(_read(p)) for p in NOTEBOOKS))
  assert shown == tags
  assert all((ROOT / "docs" / "figures" / f"{name}.png").is_file() for name in tags)
