"""config.adder_p_schedule: parsing, the values per step, and the errors that name it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train
from experiments.adder_p import PSchedule, parse
from experiments.configs import smoke


def test_parse_the_forms():
  assert parse("") is None and parse("  ") is None
  assert parse("constant:1.5") == PSchedule("constant", 1.5, 1.5, 1.0)
  assert parse("cosine:2:1:0.5") == PSchedule("cosine", 2.0, 1.0, 0.5)
  assert parse(" linear : 1 : 2 : 1 ") == PSchedule("linear", 1.0, 2.0, 1.0)


def test_values_per_step():
  steps = np.arange(12)
  cosine = [float(parse("cosine:2:1:0.5").at(s, total_steps=10)) for s in steps]
  want = np.where(steps >= 5, 1.0, 1.5 + 0.5 * np.cos(np.pi * np.minimum(steps, 5) / 5))
  np.testing.assert_allclose(cosine, want, rtol=1e-6)
  assert cosine[5:] == [1.0] * 7  # Exactly 1 after the ramp: the paper's gradients and kernels.
  linear = [float(parse("linear:1:2:1").at(s, total_steps=4)) for s in range(6)]
  np.testing.assert_allclose(linear, [1.0, 1.25, 1.5, 1.75, 2.0, 2.0], rtol=1e-6)
  assert float(parse("constant:1.3").at(7, total_steps=10)) == np.float32(1.3)
  # Traceable, in float32, in [1, 2] throughout.
  traced = jax.jit(lambda s: parse("cosine:2:1:0.3").at(s, total_steps=7))(jnp.arange(9))
  assert traced.dtype == jnp.float32 and jnp.all((traced >= 1) & (traced <= 2))


@pytest.mark.parametrize("text, problem", [
    ("cos:2:1:0.5", "the kind 'cos' is not one of"),
    ("cosine:2:1", "'cosine' takes 3 numbers"),
    ("constant:1:2", "'constant' takes 1 numbers"),
    ("cosine:2:x:0.5", "P1 'x' is not a number"),
    ("constant:0.5", "P=0.5 is out of range"),
    ("linear:2:3:1", "P1=3 is out of range"),
    ("cosine:2:1:1.5", "F=1.5 is out of range"),
    ("constant:inf", "P is inf"),
    (2.0, "it is not a string"),
])
def test_bad_schedules_name_the_field(text, problem):
  with pytest.raises(ValueError, match="config.adder_p_schedule") as error:
    parse(text)
  assert problem in str(error.value)
  config = smoke.get_config()
  config.adder_p_schedule = str(text)
  with pytest.raises(ValueError, match="config.adder_p_schedule"):
    train.check_config(config)
