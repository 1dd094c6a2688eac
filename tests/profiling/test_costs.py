"""estimate_energy and estimate_latency: the published figures and the argument checks."""

import dataclasses

import pytest

from adderjax.profiling import (
  CYCLE_TABLES,
  ENERGY_TABLES,
  EnergyTable,
  OpCounts,
  estimate_energy,
  estimate_latency,
)


def _counts(multiplications=0, additions=0, xnor=0):
  return OpCounts(multiplications=multiplications, additions=additions, xnor=xnor,
                  macs=0, params=0, layers=())


@pytest.mark.parametrize("name, add, mul", [
    # Horowitz, ISSCC 2014, 45 nm.
    ("fp32_45nm", 0.9, 3.7), ("fp16_45nm", 0.4, 1.1), ("int32_45nm", 0.1, 3.1),
    ("int8_45nm", 0.03, 0.2),
])
def test_energy_tables(name, add, mul):
  energy = estimate_energy(_counts(10, 100), table=name)
  assert (energy.table, energy.unit) == (name, "pJ")
  assert energy.multiplications == pytest.approx(10 * mul)
  assert energy.additions == pytest.approx(100 * add)
  assert energy.total == pytest.approx(10 * mul + 100 * add)
  assert energy.xnor == 0 and energy.complete
  assert ENERGY_TABLES[name].xnor_pj is None and "Horowitz" in ENERGY_TABLES[name].source


def test_lenet5_energy_cnn_against_adder():
  # The paper's LeNet-5-BN counts: 435K MACs.
  cnn = estimate_energy(_counts(435_000, 435_000))
  adder = estimate_energy(_counts(0, 870_000))
  assert cnn.total == pytest.approx(435_000 * 4.6)
  assert adder.total == pytest.approx(870_000 * 0.9)
  assert cnn.total / adder.total == pytest.approx(4.6 / 1.8)


def test_xnor_is_left_out_unless_the_table_has_a_figure():
  bnn = _counts(0, 100, 100)
  energy = estimate_energy(bnn)
  assert energy.xnor is None and not energy.complete
  assert energy.total == pytest.approx(90.0)
  table = dataclasses.replace(ENERGY_TABLES["int8_45nm"], name="int8_xnor", xnor_pj=0.01)
  energy = estimate_energy(bnn, table=table)
  assert energy.complete and energy.table == "int8_xnor"
  assert energy.xnor == pytest.approx(1.0) and energy.total == pytest.approx(4.0)


def test_latency_via_nano_2000_reproduces_the_paper():
  # Section 4.1: "the latency of multiplication and addition in VIA Nano 2000 CPU are 4 and 2
  # cycles": LeNet-5-BN CNN 2.6M cycles, AdderNet 1.7M.
  assert dict(CYCLE_TABLES["via_nano_2000"]) == {"multiplication": 4, "addition": 2}
  cnn = estimate_latency(_counts(435_000, 435_000))
  adder = estimate_latency(_counts(0, 870_000))
  assert (cnn.total, adder.total) == (2_610_000, 1_740_000)
  assert (cnn.unit, cnn.table) == ("cycles", "via_nano_2000")


def test_latency_custom_cycles_and_xnor():
  bnn = _counts(1, 10, 10)
  assert estimate_latency(bnn).xnor is None
  assert estimate_latency(bnn).total == 24
  latency = estimate_latency(bnn, cycles={"multiplication": 3, "addition": 1, "xnor": 1})
  assert (latency.table, latency.xnor, latency.total) == ("custom", 10, 23)


@pytest.mark.parametrize("kwargs, match", [
    (dict(table="fp64_45nm"), r"table must be one of \('fp32_45nm'.*got table='fp64_45nm'"),
    (dict(table={"addition": 1}), "table must be one of"),
])
def test_bad_energy_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    estimate_energy(_counts(1, 1), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cycles="pentium"), r"cycles must be one of \('via_nano_2000',\).*got cycles='pentium'"),
    (dict(cycles=4), "cycles=4"),
    (dict(cycles={"multiplication": 4}), "'addition'"),
    (dict(cycles={"multiplication": 4, "addition": 2, "divide": 9}), "'divide'"),
    (dict(cycles={"multiplication": -1, "addition": 2}), r"cycles\['multiplication'\]=-1"),
    (dict(cycles={"multiplication": 4, "addition": "2"}), r"cycles\['addition'\]='2'"),
])
def test_bad_latency_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    estimate_latency(_counts(1, 1), **kwargs)


@pytest.mark.parametrize("field, value", [("addition_pj", -0.1), ("multiplication_pj", None),
                                          ("xnor_pj", float("nan"))])
def test_bad_energy_table(field, value):
  with pytest.raises(ValueError, match=field):
    EnergyTable(**{"name": "t", "addition_pj": 1.0, "multiplication_pj": 1.0, field: value})


def test_bad_counts():
  with pytest.raises(ValueError, match="counts must be an OpCounts"):
    estimate_energy({"multiplications": 1})
