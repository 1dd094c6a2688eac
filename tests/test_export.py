"""adderjax.export: files that load and run in a process without adderjax, with the same logits."""

import json
import pathlib
import subprocess
import sys
import textwrap
import zipfile

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import export, models, quant
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats

_LOADER = textwrap.dedent("""
    import json, sys, zipfile
    import jax, numpy as np
    x = np.load(sys.argv[1])
    for path in sys.argv[2:]:
      with zipfile.ZipFile(path) as f:
        spec = json.loads(f.read("spec.json"))
        exported = jax.export.deserialize(bytearray(f.read("function.bin")))
      assert list(x.shape[1:]) == spec["input_shape"][1:], spec
      np.save(path + ".logits.npy", np.asarray(exported.call(x)))
      np.save(path + ".logits_7.npy", np.asarray(exported.call(x[:7])))
    assert "adderjax" not in sys.modules and "flax" not in sys.modules, sorted(sys.modules)
    print("loaded", len(sys.argv) - 2)
""")


@pytest.fixture(scope="module")
def lenet_and_images():
  model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
  recompute_batch_norm_stats(model, [jnp.asarray(images)])
  model.eval()
  return model, images


def test_float_and_quantized_exports_run_without_adderjax(lenet_and_images, tmp_path):
  model, images = lenet_and_images
  qmodel, _ = quant.quantize(model, [jnp.asarray(images)], bits=8, scale_groups=1)
  paths = [tmp_path / "float.jaxexport", tmp_path / "int8.jaxexport"]
  spec = export.save(model, paths[0], input_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,),
                     metadata={"model": "lenet5_bn"})
  assert spec["platforms"] == ["cpu", "cuda"]
  assert spec["preprocessing"]["mean"] == [0.1307] and spec["metadata"] == {"model": "lenet5_bn"}
  export.save(qmodel, paths[1], input_shape=(28, 28, 1), platforms=("cpu",))
  assert model.conv1.implementation is None, "the model passed in is unchanged"
  np.save(tmp_path / "x.npy", images)
  result = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path / "x.npy"),
                           *map(str, paths)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded 2" in result.stdout
  want_float = np.asarray(model(jnp.asarray(images)))
  want_int = np.asarray(qmodel(jnp.asarray(images)))
  assert np.std(want_float) > 0.1, "the logits are not degenerate"
  # The float model may run the native CPU kernels, the export the XLA loops: sums
  # in another order.
  np.testing.assert_allclose(np.load(f"{paths[0]}.logits.npy"), want_float, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.load(f"{paths[1]}.logits.npy"), want_int, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.load(f"{paths[1]}.logits_7.npy"), want_int[:7], rtol=1e-5,
                             atol=1e-5)


def test_load_reads_the_spec_and_rejects_other_files(lenet_and_images, tmp_path):
  model, images = lenet_and_images
  path = tmp_path / "m.jaxexport"
  export.save(model, path, input_shape=(28, 28, 1), platforms=("cpu",))
  function, spec = export.load(path)
  assert spec["format"] == export.FORMAT and spec["input_shape"] == [None, 28, 28, 1]
  assert function(images[:2]).shape == (2, 10)
  with zipfile.ZipFile(path) as f:
    assert json.loads(f.read("spec.json")) == spec
  bad = tmp_path / "bad.zip"
  with zipfile.ZipFile(bad, "w") as f:
    f.writestr("other.txt", "x")
  with pytest.raises(ValueError, match="not an adderjax export"):
    export.load(bad)


def test_damaged_files_are_a_value_error_naming_the_path(lenet_and_images, tmp_path):
  """Not zipfile.BadZipFile or struct.error from deep inside: the docstring promises ValueError."""
  model, _ = lenet_and_images
  good = tmp_path / "m.jaxexport"
  export.save(model, good, input_shape=(28, 28, 1), platforms=("cpu",))
  data = good.read_bytes()
  cases = {"not-a-zip": (b"just some text\n" * 10, "does not read as a zip file"),
           "truncated": (data[:len(data) // 2], "does not read as a zip file"),
           "bit-flipped": (data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],
                           "does not read as a zip file")}
  for name, member in (("garbage-function", "function.bin"), ("garbage-spec", "spec.json")):
    path = tmp_path / f"{name}.src"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
      for info in src.infolist():
        dst.writestr(info.filename, b"unpack me" * 4 if info.filename == member
                     else src.read(info.filename))
    cases[name] = (path.read_bytes(), f"its {member} (does not deserialize|is not JSON)")
  for name, (content, reason) in cases.items():
    path = tmp_path / f"{name}.jaxexport"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{path} .*{reason}"):
      export.load(path)


def test_bad_arguments_are_named(lenet_and_images, tmp_path):
  model, _ = lenet_and_images
  with pytest.raises(ValueError, match="input_shape"):
    export.save(model, tmp_path / "m", input_shape=(28, 28))
  with pytest.raises(ValueError, match="mean"):
    export.save(model, tmp_path / "m", input_shape=(28, 28, 1), mean=(0.1, 0.2))
  with pytest.raises(ValueError, match="platforms"):
    export.save(model, tmp_path / "m", input_shape=(28, 28, 1), platforms=())
  assert not pathlib.Path(tmp_path / "m").exists()
