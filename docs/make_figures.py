"""Runs the notebooks in colabs/ and writes their figures to docs/figures/ (the README's gallery).

The figures are the notebooks' own outputs: a code cell tagged
``figure:NAME`` yields ``NAME.png``, so the gallery and the notebooks come
from the same code and the same run. Each notebook runs top to bottom in a
fresh Jupyter kernel (``nbclient`` + ``ipykernel``, in the ``test`` extra).

    python -m docs.make_figures                 # full mode: the committed figures
    python -m docs.make_figures --write-notebooks  # ... and store the outputs in colabs/
    ADDERJAX_FAST=1 python -m docs.make_figures --out /tmp/figures  # a quick check

Full mode trains the paper's MNIST networks on CPU for tens of minutes.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Sequence
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
FIGURES = ROOT / "docs" / "figures"
TAG = "figure:"


def run_notebook(path: str | pathlib.Path, *, timeout: int = 3600, fast: bool | None = None,
                 env: dict[str, str] | None = None):
  """Executes the notebook at ``path`` in a fresh kernel, in the repository root.

  Args:
    path: the ``.ipynb`` file.
    timeout: seconds allowed per cell.
    fast: set ``ADDERJAX_FAST`` to ``"1"`` (True) or unset it (False) in the
      kernel; None keeps this process's setting.
    env: more environment variables for the kernel.

  Returns:
    The executed ``nbformat`` notebook (the file is not changed).

  Raises:
    nbclient.exceptions.CellExecutionError: naming the cell that failed.
  """
  import nbclient
  import nbformat

  notebook = nbformat.read(str(path), as_version=4)
  kernel_env = dict(os.environ)
  if fast is not None:
    kernel_env.pop("ADDERJAX_FAST", None)
    if fast:
      kernel_env["ADDERJAX_FAST"] = "1"
  kernel_env.update(env or {})
  # The kernel imports this checkout's adderjax (not an installed copy), as the tests do.
  kernel_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), kernel_env.get("PYTHONPATH", "")) if p)
  kernel_env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  with _environment(kernel_env):
    client.execute()
  return notebook


class _environment:
  """Sets ``os.environ`` to ``env`` for the kernel launch, then restores it."""

  def __init__(self, env: dict[str, str]):
    self.env = env

  def __enter__(self):
    self.saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(self.env)

  def __exit__(self, *exc):
    os.environ.clear()
    os.environ.update(self.saved)


def figures(notebook) -> dict[str, bytes]:
  """The PNG output of each code cell tagged ``figure:NAME``, by NAME.

  Raises:
    ValueError: if a tagged cell has no PNG output, or two cells share a name.
  """
  found: dict[str, bytes] = {}
  for cell in notebook.cells:
    for tag in cell.get("metadata", {}).get("tags", []):
      if not tag.startswith(TAG):
        continue
      name = tag[len(TAG):]
      pngs = [o["data"]["image/png"] for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
      if len(pngs) != 1:
        raise ValueError(f"The cell tagged {tag!r} has {len(pngs)} PNG outputs, not 1.")
      if name in found:
        raise ValueError(f"Two cells are tagged {tag!r}.")
      found[name] = base64.b64decode(pngs[0])
  return found


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                      help="notebooks to run (default: every colabs/*.ipynb)")
  parser.add_argument("--out", type=pathlib.Path, default=FIGURES,
                      help=f"where the PNG files go (default: {FIGURES.relative_to(ROOT)})")
  parser.add_argument("--write-notebooks", action="store_true",
                      help="store the executed notebooks, with their outputs, in place")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
  args = parser.parse_args(argv)
  import nbformat

  paths = args.notebooks or sorted(COLABS.glob("*.ipynb"))
  args.out.mkdir(parents=True, exist_ok=True)
  for path in paths:
    print(f"running {path} ...", file=sys.stderr, flush=True)
    notebook = run_notebook(path, timeout=args.timeout)
    for name, png in figures(notebook).items():
      (args.out / f"{name}.png").write_bytes(png)
      print(f"  wrote {args.out / name}.png", file=sys.stderr)
    if args.write_notebooks:
      nbformat.write(notebook, str(path))
      print(f"  stored the outputs in {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
