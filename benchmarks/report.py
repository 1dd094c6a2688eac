"""The machine a benchmark ran on, and where its results go: shared by the CPU benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax


def machine_meta() -> dict:
  """The device, CPU, core count, JAX version and date of this run."""
  return {"device": jax.devices()[0].device_kind,
          "platform": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str | None, meta: dict, rows: list[dict]) -> None:
  """Writes ``{"meta": meta, "rows": rows}`` to ``path``, if one is given."""
  if path:
    with open(path, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
