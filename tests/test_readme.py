"""The README's Python examples run: the usage example trains, the loader reads an export."""

import pathlib
import re

from flax import nnx
import jax.numpy as jnp
import numpy as np

from adderjax import export, models

README = pathlib.Path(__file__).parents[1] / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_usage_example_takes_training_steps():
  namespace = {}
  exec(compile(_blocks()[0], "README.md", "exec"), namespace)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=8))
  before = np.asarray(namespace["model"].adder.kernel[...])
  losses = [float(namespace["train_step"](namespace["model"], namespace["optimizer"], images,
                                          labels)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not np.allclose(np.asarray(namespace["model"].adder.kernel[...]), before)


def test_loading_an_export_without_adderjax(tmp_path, monkeypatch):
  block, = [b for b in _blocks() if "jax.export.deserialize" in b]
  assert "adderjax" not in block
  model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  monkeypatch.chdir(tmp_path)
  export.save(model, "model.jaxexport", input_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,),
              platforms=("cpu",))
  pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 1)).astype(np.uint8)
  namespace = {"pixels": pixels}
  exec(compile(block, "README.md", "exec"), namespace)
  x = (pixels / 255.0 - 0.1307) / 0.3081
  function, _ = export.load("model.jaxexport")
  np.testing.assert_allclose(np.asarray(namespace["logits"]),
                             np.asarray(function(jnp.asarray(x, jnp.float32))), rtol=1e-5,
                             atol=1e-4)
  assert namespace["logits"].shape == (3, 10)


def test_lp_example_sets_the_exponent_in_a_jitted_step():
  block, = [b for b in _blocks() if "set_exponent" in b]
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  assert float(namespace["exponents"]["p"][...]) == 1.0
  # |1 - 0|^1.5 over the 3x3x3 taps of an inner patch (the zero padding adds 0).
  np.testing.assert_allclose(namespace["y"][:, 1:-1, 1:-1], -27.0, rtol=1e-6)
