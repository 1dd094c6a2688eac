"""The machine a benchmark ran on, and where its results go: shared by the CPU benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax


def cpu_model() -> str:
  """The CPU's model name and family/model numbers (machines differ between sessions)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or platform.machine()
  flags = fields.get("flags", "").split()
  vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
  return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
          f"model {fields.get('model', '?')}, {vector})")


def machine_meta() -> dict:
  """The device, CPU, core count, JAX version and date of this run."""
  return {"device": jax.devices()[0].device_kind, "cpu": cpu_model(),
          "platform": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str | None, meta: dict, rows: list[dict]) -> None:
  """Writes ``{"meta": meta, "rows": rows}`` to ``path``, if one is given."""
  if path:
    with open(path, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
