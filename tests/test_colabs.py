"""Every notebook in colabs/ runs from top to bottom (its code cells, in order)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  cells = json.loads(path.read_text())["cells"]
  source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  exec(compile(source, str(path), "exec"), {"__name__": "__notebook__"})


def test_there_is_a_notebook():
  assert NOTEBOOKS
