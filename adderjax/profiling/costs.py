"""Energy and latency of counted operations, from published per-operation costs.

Energy: M. Horowitz, "Computing's energy problem (and what we can do about
it)", ISSCC 2014, 45 nm process, energy per operation in picojoules:

==========  ========  ==============
table       addition  multiplication
==========  ========  ==============
fp32_45nm   0.9       3.7
fp16_45nm   0.4       1.1
int32_45nm  0.1       3.1
int8_45nm   0.03      0.2
==========  ========  ==============

(The same table gives 0.05 pJ for a 16-bit integer addition but no 16-bit
integer multiplication, so there is no ``int16`` table.) It has no figure
for an XNOR, so :class:`EnergyTable` leaves ``xnor_pj`` as None: the energy
of XNORs is then reported as not included (``Cost.xnor is None``) rather
than guessed, and a caller who has a figure passes it, e.g.
``dataclasses.replace(ENERGY_TABLES["int8_45nm"], xnor_pj=0.01)``.

Latency: Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
Learning?", CVPR 2020, Section 4.1: "the latency of multiplication and
addition in VIA Nano 2000 CPU are 4 and 2 cycles", which puts LeNet-5-BN at
about 2.6M cycles as a CNN (435K multiplications and 435K additions) and
1.7M as an AdderNet (870K additions). The paper gives no XNOR latency, so
``"via_nano_2000"`` has none, with the same reporting as for energy. Cycles
are summed as if the operations ran one after another, as in the paper.
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

__all__ = ["CYCLE_TABLES", "Cost", "ENERGY_TABLES", "EnergyTable", "estimate_energy",
           "estimate_latency"]

_HOROWITZ = ('M. Horowitz, "Computing\'s energy problem (and what we can do about it)", '
             "ISSCC 2014, 45 nm")
_CYCLE_KEYS = ("multiplication", "addition", "xnor")


def _check_cost(value: Any, name: str, *, optional: bool = False) -> None:
  if value is None and optional:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value < 0):
    raise ValueError(f"{name} must be a non-negative finite number"
                     f"{' or None' if optional else ''}, got {name}={value!r}.")


@dataclasses.dataclass(frozen=True)
class EnergyTable:
  """Energy per operation, in picojoules.

  Example:
    >>> import dataclasses
    >>> from adderjax.profiling import ENERGY_TABLES
    >>> ENERGY_TABLES["fp32_45nm"].multiplication_pj
    3.7
    >>> dataclasses.replace(ENERGY_TABLES["int8_45nm"], xnor_pj=0.01).xnor_pj
    0.01

  Attributes:
    name: the table's name, reported in :class:`Cost`.
    addition_pj: energy of one addition.
    multiplication_pj: energy of one multiplication.
    xnor_pj: energy of one XNOR, or None where there is no figure (XNORs are
      then left out of the total and reported as such).
    source: where the figures come from.
  """

  name: str
  addition_pj: float
  multiplication_pj: float
  xnor_pj: float | None = None
  source: str = ""

  def __post_init__(self):
    _check_cost(self.addition_pj, "addition_pj")
    _check_cost(self.multiplication_pj, "multiplication_pj")
    _check_cost(self.xnor_pj, "xnor_pj", optional=True)


ENERGY_TABLES: Mapping[str, EnergyTable] = {
    t.name: t for t in (
        EnergyTable("fp32_45nm", addition_pj=0.9, multiplication_pj=3.7, source=_HOROWITZ),
        EnergyTable("fp16_45nm", addition_pj=0.4, multiplication_pj=1.1, source=_HOROWITZ),
        EnergyTable("int32_45nm", addition_pj=0.1, multiplication_pj=3.1, source=_HOROWITZ),
        EnergyTable("int8_45nm", addition_pj=0.03, multiplication_pj=0.2, source=_HOROWITZ),
    )
}

CYCLE_TABLES: Mapping[str, Mapping[str, float]] = {
    "via_nano_2000": {"multiplication": 4, "addition": 2},
}


@dataclasses.dataclass(frozen=True)
class Cost:
  """The energy or latency of a model's operations, per example.

  Attributes:
    table: the name of the table of per-operation costs (``"custom"`` for a
      mapping of cycles).
    unit: ``"pJ"`` or ``"cycles"``.
    multiplications: the cost of the multiplications.
    additions: the cost of the additions.
    xnor: the cost of the XNORs, or None where the table has no figure for
      them and there are some: they are then not in ``total``.
    total: the sum of the costs that are known.
  """

  table: str
  unit: str
  multiplications: float
  additions: float
  xnor: float | None
  total: float

  @property
  def complete(self) -> bool:
    """Whether every counted operation is in :attr:`total`."""
    return self.xnor is not None


def _counts(counts: Any) -> tuple[int, int, int]:
  try:
    return counts.multiplications, counts.additions, counts.xnor
  except AttributeError:
    raise ValueError(f"counts must be an OpCounts from count_ops (with multiplications, "
                     f"additions and xnor), got counts={counts!r}.") from None


def _cost(counts: Any, *, table: str, unit: str, mul: float, add: float,
          xnor: float | None) -> Cost:
  n_mul, n_add, n_xnor = _counts(counts)
  if xnor is None:
    xnor_cost = 0 if n_xnor == 0 else None
  else:
    xnor_cost = n_xnor * xnor
  muls, adds = n_mul * mul, n_add * add
  return Cost(table=table, unit=unit, multiplications=muls, additions=adds, xnor=xnor_cost,
              total=muls + adds + (xnor_cost or 0))


def estimate_energy(counts: Any, *, table: str | EnergyTable = "fp32_45nm") -> Cost:
  """Estimates the energy of a model's operations per example, in picojoules.

  Each operation costs its figure in the table: by default the 45 nm 32-bit
  float figures of M. Horowitz, "Computing's energy problem (and what we can
  do about it)", ISSCC 2014 (addition 0.9 pJ, multiplication 3.7 pJ). Only
  arithmetic is counted, not memory access. XNORs have no figure there; they
  are left out and reported as such (``Cost.xnor is None``) unless the table
  has an ``xnor_pj``.

  Example:
    >>> from adderjax.profiling import OpCounts, estimate_energy
    >>> cnn = OpCounts(multiplications=1000, additions=1000, xnor=0, macs=1000, params=0,
    ...                layers=())
    >>> estimate_energy(cnn).total  # 1000 * (3.7 + 0.9) pJ
    4600.0
    >>> estimate_energy(cnn, table="int8_45nm").total
    230.0

  Args:
    counts: an :class:`OpCounts` from :func:`count_ops`.
    table: the name of one of :data:`ENERGY_TABLES` (``"fp32_45nm"``,
      ``"fp16_45nm"``, ``"int32_45nm"``, ``"int8_45nm"``) or an
      :class:`EnergyTable`.

  Returns:
    A :class:`Cost` in ``"pJ"``, with a figure per operation and the total.

  Raises:
    ValueError: if ``table`` is not a known name or an :class:`EnergyTable`.
  """
  if isinstance(table, str):
    if table not in ENERGY_TABLES:
      raise ValueError(f"table must be one of {tuple(ENERGY_TABLES)} or an EnergyTable, "
                       f"got table={table!r}.")
    table = ENERGY_TABLES[table]
  if not isinstance(table, EnergyTable):
    raise ValueError(f"table must be one of {tuple(ENERGY_TABLES)} or an EnergyTable, "
                     f"got table={table!r}.")
  return _cost(counts, table=table.name, unit="pJ", mul=table.multiplication_pj,
               add=table.addition_pj, xnor=table.xnor_pj)


def estimate_latency(counts: Any, *,
                     cycles: str | Mapping[str, float] = "via_nano_2000") -> Cost:
  """Estimates the latency of a model's operations per example, in CPU cycles.

  The paper's model (Chen et al., CVPR 2020, Section 4.1): every operation
  takes its latency in cycles, one after another; on a VIA Nano 2000 a
  multiplication takes 4 cycles and an addition 2. XNORs have no figure
  there; they are left out and reported as such (``Cost.xnor is None``)
  unless ``cycles`` has an ``"xnor"`` entry.

  Example:
    >>> from adderjax.profiling import OpCounts, estimate_latency
    >>> cnn = OpCounts(multiplications=435_000, additions=435_000, xnor=0, macs=435_000,
    ...                params=0, layers=())
    >>> adder = OpCounts(multiplications=0, additions=870_000, xnor=0, macs=435_000,
    ...                  params=0, layers=())
    >>> estimate_latency(cnn).total, estimate_latency(adder).total  # the paper's 2.6M, 1.7M
    (2610000, 1740000)
    >>> estimate_latency(cnn, cycles={"multiplication": 3, "addition": 1}).total
    1740000

  Args:
    counts: an :class:`OpCounts` from :func:`count_ops`.
    cycles: the name of one of :data:`CYCLE_TABLES` (``"via_nano_2000"``) or
      a mapping with the cycles of a ``"multiplication"`` and an
      ``"addition"``, and optionally of an ``"xnor"``.

  Returns:
    A :class:`Cost` in ``"cycles"``, with a figure per operation and the total.

  Raises:
    ValueError: if ``cycles`` is not a known name or a valid mapping.
  """
  name = "custom"
  if isinstance(cycles, str):
    if cycles not in CYCLE_TABLES:
      raise ValueError(f"cycles must be one of {tuple(CYCLE_TABLES)} or a mapping with keys "
                       f"{_CYCLE_KEYS}, got cycles={cycles!r}.")
    name, cycles = cycles, CYCLE_TABLES[cycles]
  if not isinstance(cycles, Mapping):
    raise ValueError(f"cycles must be one of {tuple(CYCLE_TABLES)} or a mapping with keys "
                     f"{_CYCLE_KEYS}, got cycles={cycles!r}.")
  unknown = set(cycles) - set(_CYCLE_KEYS)
  missing = {"multiplication", "addition"} - set(cycles)
  if unknown or missing:
    raise ValueError(f"cycles must have the keys 'multiplication' and 'addition', and may have "
                     f"'xnor'; got cycles={dict(cycles)!r}.")
  for key, value in cycles.items():
    _check_cost(value, f"cycles[{key!r}]")
  return _cost(counts, table=name, unit="cycles", mul=cycles["multiplication"],
               add=cycles["addition"], xnor=cycles.get("xnor"))
