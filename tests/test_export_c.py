"""adderjax.export.save_c and adderjax.quant.lower: the integer program, its C build, its
accuracy."""

import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax import export, models, quant
from adderjax.data import DATASETS, bundled
from adderjax.nn import AdderConv
from adderjax.quant import QuantizedAdderConv, QuantizedAdderDense
from adderjax.quant.calibration import replace_module

MNIST = DATASETS["mnist"]
STEPS = 250
CC = shutil.which("cc")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
WARNINGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]

needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH")


def _is_gcc() -> bool:
  if CC is None:
    return False
  version = subprocess.run([CC, "--version"], capture_output=True, text=True).stdout
  return "gcc" in version.lower() or "free software foundation" in version.lower()


def _has_avx2() -> bool:
  try:
    return " avx2" in pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


def _normalise(pixels):
  return ((pixels / 255 - np.float32(MNIST.mean[0])) / np.float32(MNIST.std[0])).astype(np.float32)


def _build(directory, flags, compiler=None, output="a.out"):
  binary = directory / output
  subprocess.run([compiler or CC, *WARNINGS, *flags, "-o", str(binary), str(directory / "model.c"),
                  str(directory / "main.c")], check=True, capture_output=True, text=True)
  return binary


def _logits(command, pixels):
  out = subprocess.run([*command, "--logits"], input=np.ascontiguousarray(pixels).tobytes(),
                       capture_output=True, check=True).stdout.decode()
  return np.array([[int(v) for v in line.split()] for line in out.splitlines()], np.int64)


# ---------------------------------------------------------------------------------------------
# LeNet-5-BN, trained briefly on the bundled MNIST.


@pytest.fixture(scope="module")
def mnist():
  return bundled.load_bundled_mnist()


@pytest.fixture(scope="module")
def trained_lenet(mnist):
  """LeNet-5-BN after STEPS Adam steps of 64 on the first 4,000 bundled images."""
  images, labels = mnist
  x, y = _normalise(images[:4000]), labels[:4000]
  model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  for i in range(STEPS):
    j = (i * 64) % (len(x) - 64)
    step(model, optimizer, jnp.asarray(x[j:j + 64]), jnp.asarray(y[j:j + 64]))
  model.eval()
  return model


@pytest.fixture(scope="module")
def lenet_program(trained_lenet, mnist):
  images, _ = mnist
  qmodel, _ = quant.quantize(trained_lenet, [_normalise(images[4000:4256])], bits=8,
                             scale_groups=4)
  program = quant.lower(qmodel, input_shape=MNIST.image_shape, mean=MNIST.mean, std=MNIST.std)
  return qmodel, program


@pytest.fixture(scope="module")
def lenet_c(lenet_program, tmp_path_factory):
  directory = tmp_path_factory.mktemp("lenet_c")
  info = export.save_c(lenet_program[1], directory, input_shape=MNIST.image_shape)
  return directory, info


@pytest.fixture(scope="module")
def lenet_held_out(lenet_program, mnist):
  """The NumPy executor's logits of the 2,000 held-out images."""
  return lenet_program[1].run(mnist[0][8000:])


@pytest.fixture(scope="module")
def lenet_reference(lenet_held_out):
  """The NumPy executor's logits of the first 500 held-out images."""
  return lenet_held_out[:500]


def _flag_sets():
  sets = [pytest.param([], id="plain"), pytest.param(["-DADDERJAX_NO_SIMD"], id="no-simd")]
  sets.append(pytest.param(["-mavx2"], id="avx2", marks=pytest.mark.skipif(
      not (X86_64 and _has_avx2()), reason="needs an x86-64 CPU with AVX2")))
  sets.append(pytest.param(["-mgeneral-regs-only"], id="general-regs-only",
                           marks=pytest.mark.skipif(not (X86_64 and _is_gcc()),
                                                    reason="needs gcc on x86-64")))
  return sets


@needs_cc
@pytest.mark.parametrize("flags", _flag_sets())
def test_c_lenet_logits_equal_the_reference_on_mnist(lenet_c, lenet_reference, mnist, flags):
  directory, _ = lenet_c
  binary = _build(directory, flags, output="lenet_" + "_".join(f.strip("-") for f in flags))
  np.testing.assert_array_equal(_logits([str(binary)], mnist[0][8000:8500]), lenet_reference)
  classes = subprocess.run([str(binary)], input=mnist[0][8000:8010].tobytes(),
                           capture_output=True, check=True).stdout.decode().split()
  assert [int(c) for c in classes] == np.argmax(lenet_reference[:10], axis=-1).tolist()


def test_integer_program_agrees_with_the_float_model(trained_lenet, lenet_program, lenet_held_out,
                                                     mnist):
  images, labels = mnist[0][8000:], mnist[1][8000:]
  float_logits = np.asarray(jax.jit(lambda x: trained_lenet(x))(_normalise(images)))
  integer = np.argmax(lenet_held_out, axis=-1)
  float_accuracy = np.mean(np.argmax(float_logits, -1) == labels)
  integer_accuracy = np.mean(integer == labels)
  assert float_accuracy > 0.85
  print(f"held-out accuracy: float {float_accuracy:.2%}, integer program {integer_accuracy:.2%}")
  assert abs(integer_accuracy - float_accuracy) <= 0.01, (float_accuracy, integer_accuracy)
  assert np.mean(integer == np.argmax(float_logits, -1)) >= 0.97


def test_generated_sources_have_no_floating_point(lenet_c, resnet_c):
  for directory, _ in (lenet_c, resnet_c):
    for name in ("model.h", "model.c", "main.c"):
      text = (directory / name).read_text()
      assert not re.search(r"\b(float|double|long double)\b", text), name


def test_save_c_reports_memory(lenet_c, lenet_program):
  _, info = lenet_c
  memory = info["memory"]
  assert info["num_classes"] == 10 and info["input_shape"] == [28, 28, 1]
  assert info["output_fraction_bits"] == lenet_program[1].output_fraction_bits
  # LeNet-5-BN: ~61K weights in uint8 (padded to 32 per patch) plus the epilogue constants.
  assert 60_000 < memory["weights"] < 100_000
  assert memory["largest_activation"] == 28 * 28 * 6 * 4
  assert memory["static"] == sum(memory[k] for k in ("weights", "activations", "scratch",
                                                     "main_buffers"))


# ---------------------------------------------------------------------------------------------
# A small CIFAR ResNet with random quantized adder layers (no calibration: fast).


def _random_adder_layer(parent, name, bn, rng, *, bits, signed, scales, inputs=None):
  """Puts a random QuantizedAdderConv/Dense in place of ``parent.name``, and sets ``bn``.

  The BatchNorm statistics normalise the layer's output for inputs like
  ``inputs`` (samples; default: ``relu(N(0, 1))``, what the normalised layers
  before give), so that the activations neither vanish nor saturate.
  """
  layer = getattr(parent, name)
  shape = layer.kernel.shape
  cout = shape[-1]
  codes = rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), shape)
  group = rng.integers(0, len(scales), cout)
  group[:len(scales)] = np.arange(len(scales))
  correction = -rng.random(cout)
  kind = QuantizedAdderConv if isinstance(layer, AdderConv) else QuantizedAdderDense
  setattr(parent, name, kind(layer, codes, group, scales, correction, bits=bits,
                             signed_inputs=signed))
  if inputs is None:
    inputs = np.maximum(rng.standard_normal(128), 0)
  levels = 2 ** bits - 1
  lo, hi = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, levels)
  m = 1 if signed else 2
  mean, var = np.zeros(cout), np.zeros(cout)
  for g, scale in enumerate(scales):
    a = np.clip(np.round(inputs * levels / (scale * (2 if signed else 1))), lo, hi)
    cs = group == g
    d = np.abs(a[:, None, None] - m * codes.reshape(-1, cout)[None, :, cs])
    step = scale * 2 / (m * levels)
    mean[cs] = -step * d.mean(0).sum(0) + correction[cs]
    var[cs] = step ** 2 * d.var(0).sum(0)
  _set_batch_norm(bn, rng, mean, var)


def _set_batch_norm(bn, rng, mean, var):
  n = len(mean)
  # set_value: the variables may hold abstract arrays (a model built by nnx.eval_shape).
  bn.mean.set_value(jnp.asarray(mean, jnp.float32))
  bn.var.set_value(jnp.asarray(var, jnp.float32))
  bn.scale.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(n), jnp.float32))
  bn.bias.set_value(jnp.asarray(0.2 * rng.standard_normal(n), jnp.float32))


def _random_quantized_resnet(seed=0):
  """CifarResNet (1, 1, 1) whose adder layers are random 8-bit QuantizedAdderConvs, 2 groups.

  Built abstractly (`nnx.eval_shape`, no initializer to compile) and filled
  with NumPy values.
  """
  model = nnx.eval_shape(lambda: models.CifarResNet(blocks_per_stage=(1, 1, 1),
                                                    rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  for stage in (model.layer1, model.layer2, model.layer3):
    for block in stage:
      pairs = [(block, "conv1", block.bn1), (block, "conv2", block.bn2)]
      if block.downsample is not None:
        pairs.append((block.downsample, "conv", block.downsample.bn))
      for parent, name, bn in pairs:
        _random_adder_layer(parent, name, bn, rng, bits=8, signed=False,
                            scales=np.array([1.0, 2.5]))
  # The stem sees x = (p / 255 - 0.5) / 0.25 (variance 4/3), the classifier the pooled features.
  stem = rng.standard_normal(model.conv1.kernel.shape) * 0.3
  model.conv1.kernel.set_value(jnp.asarray(stem, jnp.float32))
  _set_batch_norm(model.bn1, rng, np.zeros(16), (stem.reshape(-1, 16) ** 2).sum(0) * 4 / 3)
  fc = rng.standard_normal(model.fc.kernel.shape) * 0.3
  model.fc.kernel.set_value(jnp.asarray(fc, jnp.float32))
  _set_batch_norm(model.bn2, rng, np.zeros(10), (fc ** 2).sum(0) * 0.2)
  model.eval()
  return model


RESNET_INPUT = (8, 8, 3)


def _resnet_images(n, seed=1):
  """Images of a random colour each, with noise: what differs between them survives pooling."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (n, 1, 1, 3))
  return np.clip(base + rng.integers(-40, 41, (n,) + RESNET_INPUT), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def resnet_program():
  model = _random_quantized_resnet()
  kwargs = dict(input_shape=RESNET_INPUT, mean=(0.5,) * 3, std=(0.25,) * 3)
  program = quant.lower(model, **kwargs)
  # The logits' BatchNorm from the classifier's outputs on 64 images, as training would set it.
  z = program.run(_resnet_images(64, seed=2)) * 2.0 ** -program.output_fraction_bits
  bn = model.bn2
  a = np.asarray(bn.scale[...]) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
  y = (z - np.asarray(bn.bias[...])) / a + np.asarray(bn.mean[...])
  bn.mean.set_value(jnp.asarray(y.mean(0)))
  bn.var.set_value(jnp.asarray(y.var(0)))
  return quant.lower(model, **kwargs)


@pytest.fixture(scope="module")
def resnet_images():
  return _resnet_images(24)


@pytest.fixture(scope="module")
def resnet_c(resnet_program, tmp_path_factory):
  directory = tmp_path_factory.mktemp("resnet_c")
  info = export.save_c(resnet_program, directory, input_shape=RESNET_INPUT)
  return directory, info


def test_resnet_program_has_every_operation(resnet_program, resnet_images):
  kinds = {type(op).__name__ for op in resnet_program.operations}
  assert kinds == {"InputTable", "MulSum", "Quantize", "AdderSum", "Add", "MeanPool"}
  logits = resnet_program.run(resnet_images)
  assert logits.shape == (24, 10)
  assert len(set(np.argmax(logits, -1).tolist())) >= 3  # not degenerate


@needs_cc
@pytest.mark.parametrize("flags", _flag_sets())
def test_c_resnet_logits_equal_the_reference(resnet_c, resnet_program, resnet_images, flags):
  directory, _ = resnet_c
  binary = _build(directory, flags, output="resnet_" + "_".join(f.strip("-") for f in flags))
  np.testing.assert_array_equal(_logits([str(binary)], resnet_images),
                                resnet_program.run(resnet_images))


def test_c_on_aarch64_with_neon_under_qemu(lenet_c, lenet_reference, resnet_c, resnet_program,
                                           resnet_images, mnist):
  if CROSS is None or QEMU is None:
    pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 on PATH (Debian: apt-get install "
                "gcc-aarch64-linux-gnu qemu-user)")
  for (directory, _), pixels, expected in (
      (lenet_c, mnist[0][8000:8100], lenet_reference[:100]),
      (resnet_c, resnet_images, resnet_program.run(resnet_images))):
    # NEON is on by default for AArch64 (__ARM_NEON): the vabdq_u8/vpadalq sums.
    binary = _build(directory, ["-static"], compiler=CROSS, output="arm.out")
    np.testing.assert_array_equal(_logits([QEMU, str(binary)], pixels), expected)


def test_c_is_bit_exact_with_12_bit_codes(tmp_path):
  """A random 12-bit LeNet-5-BN (int32 codes and sums in C, signed first layer); plain C."""
  if CC is None:
    pytest.skip("no C compiler (cc) on PATH")
  model = nnx.eval_shape(lambda: models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(3)
  for i, (name, bn) in enumerate([("conv1", "bn1"), ("conv2", "bn2"), ("fc1", "bn3"),
                                  ("fc2", "bn4"), ("fc3", "bn5")]):
    inputs = _normalise(bundled.load_bundled_mnist()[0][:4]).reshape(-1) if i == 0 else None
    _random_adder_layer(model, name, getattr(model, bn), rng, bits=12, signed=i == 0,
                        scales=np.array([1.5, 3.0]), inputs=inputs)
  model.eval()
  program = quant.lower(model, input_shape=(28, 28, 1), mean=MNIST.mean, std=MNIST.std)
  assert {program.tensors[op.output].bits for op in program.operations
          if type(op).__name__ in ("InputTable", "Quantize")} == {12}
  pixels = bundled.load_bundled_mnist()[0][:32]
  expected = program.run(pixels)
  assert len(set(np.argmax(expected, -1).tolist())) >= 3
  export.save_c(program, tmp_path, input_shape=(28, 28, 1), verbose=False)
  np.testing.assert_array_equal(_logits([str(_build(tmp_path, []))], pixels), expected)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_bad_arguments_name_the_argument(lenet_program, tmp_path):
  qmodel, program = lenet_program
  with pytest.raises(ValueError, match="input_shape"):
    export.save_c(qmodel, tmp_path, input_shape=(28, 28))
  with pytest.raises(ValueError, match="input_shape"):
    quant.lower(qmodel, input_shape=(32, 32, 1))
  with pytest.raises(ValueError, match="mean"):
    export.save_c(qmodel, tmp_path, input_shape=(28, 28, 1), mean=(0.1, 0.2))
  with pytest.raises(ValueError, match="std"):
    quant.lower(qmodel, input_shape=(28, 28, 1), std=(0.0,))
  with pytest.raises(ValueError, match="input_shape"):
    export.save_c(program, tmp_path, input_shape=(32, 32, 1))
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="directory"):
    export.save_c(program, tmp_path / "file", input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match="pixels"):
    program.run(np.zeros((2, 28, 28, 1), np.float32))


def test_unsupported_models_and_float_adder_layers_are_named(lenet_program):
  float_model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"layer conv1 is a float AdderConv"):
    quant.lower(float_model, input_shape=(28, 28, 1))
  qmodel, _ = lenet_program
  partly = nnx.clone(qmodel)
  replace_module(partly, ("fc2",), float_model.fc2)
  with pytest.raises(ValueError, match=r"layer fc2 is a float AdderDense"):
    quant.lower(partly, input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match=r"unsupported module <model> \(.*Sequential\)"):
    quant.lower(nnx.Sequential(float_model.fc3), input_shape=(1, 1, 84))
  binary = nnx.clone(qmodel)
  binary.activation = nnx.hard_tanh
  with pytest.raises(ValueError, match=r"unsupported module activation \(hard_tanh\)"):
    quant.lower(binary, input_shape=(28, 28, 1))


def test_export_imports_the_c_generator_only_when_used():
  code = "import sys, adderjax.export; assert 'adderjax.c_export' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_fixed_point_overflow_names_the_layer():
  from adderjax.quant import integer_program

  assert integer_program._fixed_point(0.75, 2 ** 20, "fc") == (3 * 2 ** 29, 31)
  with pytest.raises(ValueError, match="layer fc: inputs up to"):
    integer_program._fixed_point(0.75, 2 ** 50, "fc")
  with pytest.raises(ValueError, match="layer conv2: the multiplier"):
    integer_program._fixed_point(2.0 ** 40, 2 ** 20, "conv2")
