"""The README's usage example runs and trains."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_usage_example_takes_training_steps():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=8))
  before = np.asarray(namespace["model"].adder.kernel[...])
  losses = [float(namespace["train_step"](namespace["model"], namespace["optimizer"], images,
                                          labels)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not np.allclose(np.asarray(namespace["model"].adder.kernel[...]), before)
