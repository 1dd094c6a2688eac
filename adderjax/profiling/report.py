"""Plain-text tables of operation counts, energy and latency."""

from collections.abc import Mapping, Sequence

from adderjax.profiling.costs import Cost
from adderjax.profiling.counting import OpCounts

__all__ = ["format_comparison", "format_cost", "format_layers", "format_totals", "human"]

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
_ENERGY_UNITS = ((1e12, "J"), (1e9, "mJ"), (1e6, "uJ"), (1e3, "nJ"))
_NO_XNOR = "* XNOR not included: the table has no figure for it."


def human(n: float) -> str:
  """Formats a count with two decimals and a K, M, G or T suffix.

  Example:
    >>> from adderjax.profiling import human
    >>> human(40_813_184), human(416_520), human(640)
    ('40.81M', '416.52K', '640')

  Args:
    n: a non-negative count.

  Returns:
    The count as the paper writes it, such as ``"41.17M"``.
  """
  for scale, prefix in _PREFIXES:
    if abs(n) >= scale:
      return f"{n / scale:.2f}{prefix}"
  return f"{n:.0f}" if n == int(n) else f"{n:.2f}"


def format_cost(cost: Cost) -> str:
  """Formats a :class:`Cost` total (``"1.92 uJ"``, ``"2.50M cycles"``), starred if incomplete.

  Example:
    >>> from adderjax.profiling import OpCounts, estimate_energy, format_cost
    >>> bnn = OpCounts(multiplications=0, additions=10**6, xnor=10**6, macs=10**6, params=0,
    ...                layers=())
    >>> format_cost(estimate_energy(bnn))  # 10**6 * 0.9 pJ, XNORs left out
    '900 nJ*'

  Args:
    cost: from :func:`estimate_energy` or :func:`estimate_latency`.

  Returns:
    The total with its unit, and a ``*`` where XNORs are left out.
  """
  star = "" if cost.complete else "*"
  if cost.unit == "pJ":
    for scale, unit in _ENERGY_UNITS:
      if cost.total >= scale:
        return f"{cost.total / scale:.3g} {unit}{star}"
    return f"{cost.total:.3g} pJ{star}"
  return f"{human(cost.total)} {cost.unit}{star}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
  """Aligns columns: the first ``left`` to the left, the rest to the right."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = []
  for r in [header, *rows]:
    cells = [c.ljust(w) if i < left else c.rjust(w)
             for i, (c, w) in enumerate(zip(r, widths, strict=True))]
    lines.append("  ".join(cells).rstrip())
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def format_layers(counts: OpCounts) -> str:
  """Formats the per-layer rows of :func:`count_ops` as a table, one line per layer call.

  The output column drops the leading (batch) dim of the traced shape.

  Args:
    counts: from :func:`count_ops`.

  Returns:
    The table, without a trailing newline.
  """
  rows = []
  for r in counts.layers:
    name = (r.path or "(model)") + (f" #{r.call + 1}" if r.call else "")
    rows.append([name, r.layer_type, r.op, "x".join(map(str, r.output_shape[1:])),
                 human(r.macs), human(r.multiplications), human(r.additions), human(r.xnor),
                 human(r.params)])
  header = ["layer", "type", "op", "output", "MACs", "muls", "adds", "xnor", "params"]
  return _table(header, rows, left=4)


def format_totals(counts: OpCounts, *, energy: Cost, latency: Cost) -> str:
  """Formats a model's per-example totals, energy and latency.

  Args:
    counts: from :func:`count_ops`.
    energy: from :func:`estimate_energy` on ``counts``.
    latency: from :func:`estimate_latency` on ``counts``.

  Returns:
    One line per total, without a trailing newline.
  """
  return format_comparison({"total": (counts, energy, latency)})


def format_comparison(columns: Mapping[str, tuple[OpCounts, Cost, Cost]]) -> str:
  """Formats the totals of several models side by side, one column each.

  Example:
    >>> from adderjax.profiling import (OpCounts, estimate_energy, estimate_latency,
    ...                                 format_comparison)
    >>> cnn = OpCounts(multiplications=1000, additions=1000, xnor=0, macs=1000, params=10,
    ...                layers=())
    >>> print(format_comparison({"CNN": (cnn, estimate_energy(cnn), estimate_latency(cnn))}))
    per example                       CNN
    -----------------------  ------------
    multiplications                 1.00K
    additions                       1.00K
    xnor                                0
    MACs                            1.00K
    params                             10
    energy (fp32_45nm)             4.6 nJ
    latency (via_nano_2000)  6.00K cycles

  Args:
    columns: a column title (such as ``"CNN"``) mapped to the model's counts,
      energy and latency.

  Returns:
    The table, with a footnote where XNORs are left out of a cost.
  """
  values = list(columns.values())
  energy_table = values[0][1].table
  latency_table = values[0][2].table
  rows = [
      ["multiplications"] + [human(c.multiplications) for c, _, _ in values],
      ["additions"] + [human(c.additions) for c, _, _ in values],
      ["xnor"] + [human(c.xnor) for c, _, _ in values],
      ["MACs"] + [human(c.macs) for c, _, _ in values],
      ["params"] + [human(c.params) for c, _, _ in values],
      [f"energy ({energy_table})"] + [format_cost(e) for _, e, _ in values],
      [f"latency ({latency_table})"] + [format_cost(t) for _, _, t in values],
  ]
  text = _table(["per example", *columns], rows)
  if not all(e.complete and t.complete for _, e, t in values):
    text += "\n" + _NO_XNOR
  return text
