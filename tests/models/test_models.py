"""Tests for adderjax.models: structure, parameter counts, training steps in every kind.

Cost decides the shape of these tests on a 2-core CPU, where tracing and
compiling a training step dominate (half a minute for a ResNet-50 CNN step,
longer for the AdderNet):

- Structure (parameter counts, which layers are adder, binary or
  multiplicative, the BatchNorms) is checked on abstract models
  (`nnx.eval_shape`) for every model and kind, and so are the output shapes
  of the deep ResNets (`jax.eval_shape`).
- A compiled training step with `addernet_sgd` runs for every architecture and
  kind: LeNet-5-BN, LeNet++, VGG-small and ResNet-20 as they are, and the
  ImageNet ResNet with one bottleneck per stage. ResNet-32 and 56 differ from
  ResNet-20 only in their ``blocks_per_stage``, ResNet-50 from the latter
  too, and ResNet-18 and 34 put ResNet-20's ``BasicBlock`` into ResNet-50's
  ``ResNet``.
- Models are filled with NumPy values (JAX's RNG compiles anew, slowly, for
  each shape); steps are compiled with XLA's cheapest settings, on batches of
  2 small images; ResNet-20's adder layers, on 8x8 maps, use the broadcasting
  reference implementation, which traces and compiles twice as fast as the
  XLA loops there.
"""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax import models
from adderjax.nn import AdderConv, AdderDense, AdderKernel, BinaryConv, BinaryDense
from adderjax.optim import addernet_sgd

# Compile time, not run time, is what these tiny steps spend (on CPU these options compile a
# ResNet-20 step 4x faster). VGG-small's adder layers, whose XLA loops run 4x slower
# unoptimized, keep the optimizations.
_CPU = jax.default_backend() == "cpu"
FAST_COMPILE = ({"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
                if _CPU else None)
FAST_COMPILE_OPTIMIZED = {"xla_cpu_use_fusion_emitters": False} if _CPU else None


def _is_variable(x):
  return isinstance(x, nnx.Variable)


@functools.cache
def _cached_abstract(name, kind, options):
  return nnx.eval_shape(lambda: models.get(name, kind=kind, rngs=nnx.Rngs(0), **dict(options)))


def _abstract(name, kind, **options):
  """The model with `jax.ShapeDtypeStruct` values, shared between tests: do not modify it."""
  return _cached_abstract(name, kind, tuple(sorted(options.items())))


def _output_shape(model, x):
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def _numpy_state(abstract, seed=0):
  """The model's state with NumPy values drawn about as the initializers would."""
  rng = np.random.default_rng(seed)

  def fill(path, variable):
    name = path[-1].key
    if name in ("scale", "var"):
      value = np.ones(variable.shape)
    elif name in ("bias", "mean"):
      value = np.zeros(variable.shape)
    elif name == "negative_slope":
      value = np.full(variable.shape, 0.25)
    elif isinstance(variable, AdderKernel):
      value = rng.normal(size=variable.shape)
    else:  # a multiplicative or binary kernel: LeCun normal
      value = rng.normal(size=variable.shape) / math.sqrt(math.prod(variable.shape[:-1]))
    return variable.replace(np.asarray(value, variable.dtype))

  graphdef, state = nnx.split(abstract)
  return graphdef, jax.tree_util.tree_map_with_path(fill, state, is_leaf=_is_variable)


def _num_classes(name):
  return 1000 if models.input_shape(name)[0] == 224 else 10


def _logits(outputs):
  return outputs[1] if isinstance(outputs, tuple) else outputs


def _count(state):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def _layers(model):
  return [m for _, m in nnx.iter_graph(model)
          if isinstance(m, (AdderConv, AdderDense, BinaryConv, BinaryDense, nnx.Conv, nnx.Linear))]


# Registry and arguments


def test_names_and_get():
  assert models.names() == ("lenet5_bn", "lenet_pp", "vgg_small", "resnet20", "resnet32",
                            "resnet56", "resnet18", "resnet34", "resnet50", "vit_tiny")
  assert tuple(models.MODELS) == models.names()
  assert models.KINDS == ("adder", "conv", "binary")
  classes = {"lenet5_bn": models.LeNet5BN, "lenet_pp": models.LeNetPP,
             "vgg_small": models.VGGSmall, "resnet20": models.CifarResNet,
             "resnet50": models.ResNet, "vit_tiny": models.ViTTiny}
  for name, cls in classes.items():
    assert type(_abstract(name, "conv")) is cls
    assert models.input_shape(name) in ((28, 28, 1), (32, 32, 3), (224, 224, 3))


def test_unknown_name():
  with pytest.raises(ValueError, match=r"name must be one of \('lenet5_bn', .*'vit_tiny'\), "
                                       r"got name='resnet19'"):
    models.get("resnet19", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="name="):
    models.input_shape("vgg16")


@pytest.mark.parametrize("name", ["lenet5_bn", "lenet_pp", "vgg_small", "resnet20", "resnet50"])
@pytest.mark.parametrize("kind", ["Adder", "cnn", None, 1])
def test_unknown_kind(name, kind):
  with pytest.raises(ValueError, match=r"kind must be one of \('adder', 'conv', 'binary'\), "
                                       rf"got kind={kind!r}"):
    models.get(name, kind=kind, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("embed_dim", [1, 4, True, 2.0, "2"])
def test_lenet_pp_bad_embed_dim(embed_dim):
  with pytest.raises(ValueError, match=rf"embed_dim must be one of \(2, 3\), "
                                       rf"got embed_dim={embed_dim!r}"):
    models.lenet_pp(embed_dim=embed_dim, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("options, match", [
    (dict(num_classes=0), "num_classes must be a positive int, got num_classes=0"),
    (dict(num_classes=10.0), "num_classes must be a positive int"),
    (dict(grad_mode="exact"), "grad_mode must be one of"),
    (dict(implementation="cuda"), "implementation must be None or one of"),
])
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    models.resnet20(rngs=nnx.Rngs(0), **options)


def test_bad_blocks_per_stage():
  with pytest.raises(ValueError, match=r"blocks_per_stage must be a sequence of 3 positive ints, "
                                       r"got blocks_per_stage=\(3, 0, 3\)"):
    models.CifarResNet(blocks_per_stage=(3, 0, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="block must be one of"):
    models.ResNet(block="wide", blocks_per_stage=(2, 2, 2, 2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, shape", [
    ("lenet5_bn", (2, 32, 32, 1)),
    ("vgg_small", (2, 28, 28, 3)),
    ("resnet20", (2, 32, 32, 1)),
    ("resnet18", (32, 32, 3)),
])
def test_bad_input_shape(name, shape):
  model = _abstract(name, "conv")
  with pytest.raises(ValueError, match=r"inputs must be an NHWC batch of shape .*got shape"):
    model(jnp.zeros(shape))


# Structure: parameter counts and which layers are adder, binary or multiplicative


def _cifar_resnet_params(n):
  """Parameters of the official CIFAR ResNet with n blocks per stage, counted by hand."""
  stem = 3 * 3 * 3 * 16 + 2 * 16
  params = stem + 64 * 10 + 2 * 10
  for stage, (c_in, c) in enumerate([(16, 16), (16, 32), (32, 64)]):
    convs = 9 * c_in * c + (2 * n - 1) * 9 * c * c
    params += convs + 2 * n * 2 * c
    if stage:  # 1x1 projection shortcut and its BatchNorm
      params += c_in * c + 2 * c
  return params


EXPECTED_PARAMS = {
    # conv 150 + 2400, fc 48000 + 10080 + 840, BatchNorm 2 * (6 + 16 + 120 + 84 + 10)
    "lenet5_bn": 61_942,
    # convs 794400, embedding 2304, classifier 20, BatchNorm 2 * 458, 7 PReLU slopes
    "lenet_pp": 797_651,
    # convs 4574592, classifier 81930, BatchNorm 2 * 1792
    "vgg_small": 4_660_106,
    "resnet20": _cifar_resnet_params(3),
    "resnet32": _cifar_resnet_params(5),
    "resnet56": _cifar_resnet_params(9),
    # torchvision's counts, plus the official BatchNorm on the 1000 logits
    "resnet18": 11_689_512 + 2000,
    "resnet34": 21_797_672 + 2000,
    "resnet50": 25_557_032 + 2000,
}

# The number of adder layers (kind "adder") and of binary layers (kind "binary").
EXPECTED_LAYERS = {
    "lenet5_bn": (5, 3),
    "lenet_pp": (8, 6),
    "vgg_small": (5, 5),
    "resnet20": (20, 20),
    "resnet32": (32, 32),
    "resnet56": (56, 56),
    "resnet18": (19, 19),
    "resnet34": (35, 35),
    "resnet50": (52, 52),
}


@pytest.mark.parametrize("kind", models.KINDS)
@pytest.mark.parametrize("name", EXPECTED_PARAMS)  # vit_tiny's: tests/models/test_vit.py
def test_structure(name, kind):
  model = _abstract(name, kind)
  params = _count(nnx.state(model, nnx.Param))
  expected = EXPECTED_PARAMS[name] - (7 if (name, kind) == ("lenet_pp", "binary") else 0)
  assert params == expected

  layers = _layers(model)
  adder = [m for m in layers if isinstance(m, (AdderConv, AdderDense))]
  binary = [m for m in layers if isinstance(m, (BinaryConv, BinaryDense))]
  n_adder, n_binary = EXPECTED_LAYERS[name]
  assert len(adder) == (n_adder if kind == "adder" else 0)
  assert len(binary) == (n_binary if kind == "binary" else 0)
  assert len(jax.tree.leaves(nnx.state(model, AdderKernel))) == len(adder)
  # Every layer has a kernel named `kernel`, whose shape gives its multiply-accumulates.
  assert all(m.kernel.ndim in (2, 4) for m in layers)
  # A BatchNorm with momentum 0.9 after every layer, but VGG-small's classifier.
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert len(norms) == len(layers) - (name == "vgg_small")
  assert {m.momentum for m in norms} == {0.9}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_params_match_torchvision(name):
  torchvision = {"resnet18": 11.69e6, "resnet50": 25.56e6}[name]
  params = _count(nnx.state(_abstract(name, "conv"), nnx.Param))
  assert params == pytest.approx(torchvision, rel=0.01)


def test_resnet20_params():
  params = _count(nnx.state(_abstract("resnet20", "adder"), nnx.Param))
  assert params == pytest.approx(0.27e6, rel=0.02)


@pytest.mark.parametrize("kind", models.KINDS)
def test_first_and_last_layers(kind):
  """The adder LeNet-5 is adder throughout; elsewhere stem and classifier are multiplicative."""
  inner_conv = {"adder": AdderConv, "conv": nnx.Conv, "binary": BinaryConv}[kind]
  inner_dense = {"adder": AdderDense, "conv": nnx.Linear, "binary": BinaryDense}[kind]
  lenet = _abstract("lenet5_bn", kind)
  assert type(lenet.conv1) is (AdderConv if kind == "adder" else nnx.Conv)
  assert type(lenet.fc3) is (AdderDense if kind == "adder" else nnx.Linear)
  assert type(lenet.conv2) is inner_conv and type(lenet.fc1) is inner_dense
  lenet_pp = _abstract("lenet_pp", kind)
  assert type(lenet_pp.convs[0]) is (AdderConv if kind == "adder" else nnx.Conv)
  assert type(lenet_pp.classifier) is (AdderDense if kind == "adder" else nnx.Linear)
  assert type(lenet_pp.embed) is inner_dense
  vgg = _abstract("vgg_small", kind)
  assert type(vgg.convs[0]) is nnx.Conv and type(vgg.classifier) is nnx.Linear
  assert all(type(m) is inner_conv for m in vgg.convs[1:])
  resnet = _abstract("resnet20", kind)
  assert type(resnet.conv1) is nnx.Conv and type(resnet.fc) is nnx.Linear
  assert resnet.fc.bias is None  # the official 1x1 classifier has no bias
  block = resnet.layer2[0]
  assert {type(block.conv1), type(block.conv2), type(block.downsample.conv)} == {inner_conv}
  imagenet = _abstract("resnet18", kind)
  assert type(imagenet.conv1) is nnx.Conv and type(imagenet.fc) is nnx.Linear
  assert imagenet.fc.bias is not None


def test_bottleneck_stride_on_3x3():
  """As the official resnet50.py: the 3x3 convolution and the shortcut carry the stride."""
  block = _abstract("resnet50", "adder").layer2[0]
  assert (block.conv1.strides, block.conv2.strides, block.conv3.strides) == ((1, 1), (2, 2),
                                                                               (1, 1))
  assert block.downsample.conv.strides == (2, 2)
  assert block.downsample.conv.kernel.shape == (1, 1, 256, 512)


def test_options_reach_the_adder_layers():
  model = _abstract("resnet20", "adder", grad_mode="sign", implementation="reference",
                    dtype=jnp.bfloat16)
  adder = [m for _, m in nnx.iter_graph(model) if isinstance(m, AdderConv)]
  assert {(m.grad_mode, m.implementation, m.dtype) for m in adder} == {
      ("sign", "reference", jnp.bfloat16)}
  assert model.bn2.dtype == jnp.bfloat16


def test_lenet_pp_embedding():
  model = _abstract("lenet_pp", "adder", embed_dim=3)
  embedding, logits = _output_shape(model, jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32))
  assert embedding.shape == (2, 3) and logits.shape == (2, 10)
  assert isinstance(model.classifier, AdderDense) and model.classifier.kernel.shape == (3, 10)


# Output shapes of the deep ResNets, by abstract evaluation in eval mode.


@pytest.mark.parametrize("kind", models.KINDS)
@pytest.mark.parametrize("name", ["resnet56", "resnet18", "resnet50"])
def test_output_shape(name, kind):
  """The deep models the training steps below leave out: ResNet-32 and 34 lie in between."""
  graphdef, state = nnx.split(_abstract(name, kind))

  def forward(state, x):
    model = nnx.merge(graphdef, state)
    model.eval()
    model.set_attributes(implementation="reference", raise_if_not_found=False)  # faster tracing
    return model(x)

  size = 32 if _num_classes(name) == 1000 else 8  # any size the pooling allows
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  assert jax.eval_shape(forward, state, x).shape == (2, _num_classes(name))


@pytest.mark.parametrize("name", models.names())
def test_train_and_eval_switch_every_batch_norm(name):
  model = nnx.merge(*nnx.split(_abstract(name, "adder")))  # a copy of the shared model
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert norms and not any(m.use_running_average for m in norms)
  model.eval()
  assert all(m.use_running_average for m in norms)
  model.train()
  assert not any(m.use_running_average for m in norms)


# A training step with addernet_sgd


STEP_MODELS = {
    "lenet5_bn": models.lenet5_bn,
    "lenet_pp": models.lenet_pp,
    "vgg_small": models.vgg_small,
    "resnet20": models.resnet20,
    "resnet_bottleneck_1111": lambda **kw: models.ResNet(block="bottleneck",
                                                         blocks_per_stage=(1,) * 4, **kw),
}
# The ImageNet ResNet at 40x40 has 2x2 maps in its last stage: at 32x32 they are 1x1, where a
# BatchNorm over a batch of 2 leaves (almost) no gradient to the layers before it.
STEP_IMAGES = {"lenet5_bn": (28, 28, 1), "lenet_pp": (28, 28, 1), "vgg_small": (32, 32, 3),
               "resnet20": (8, 8, 3), "resnet_bottleneck_1111": (40, 40, 3)}
# LeNet++ normalises its 2-wide embedding with BatchNorm: over a batch of 2 that maps each
# feature to exactly +-1 whatever the input, so the layers before it get a zero gradient up to
# rounding (nonzero on some CPUs, exactly zero on others). A batch of 4 leaves them a real one.
STEP_BATCH = {"lenet_pp": 4}
# Where the eval-mode forward is checked too (it doubles the cost of tracing). BatchNorm and
# its switch are the same in every model (test_train_and_eval_switch_every_batch_norm).
EVAL_MODELS = ("lenet5_bn",)


def _train_step(graphdef, state, images, labels, *, check_eval, compiler_options):
  """One compiled program: an addernet_sgd step in train mode, and with `check_eval` a
  train-mode forward that records its batch statistics as the running ones (momentum 0)
  and the eval-mode forward."""

  def run(state, images, labels):
    model = nnx.merge(graphdef, state)
    model.train()
    optimizer = nnx.Optimizer(model, addernet_sgd(0.05), wrt=nnx.Param)

    def loss_fn(model):
      logits = _logits(model(images))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    trained = nnx.state(model)
    if not check_eval:
      return loss, grads, trained, None, None
    model.set_attributes(momentum=0.0)
    train_outputs = model(images)
    model.eval()
    # A batch of 3, whose batch statistics differ from those of `images`.
    eval_images = jnp.concatenate([images, images[:1]])
    return loss, grads, trained, train_outputs, model(eval_images)

  return jax.jit(run, compiler_options=compiler_options)(state, images, labels)


@pytest.mark.parametrize("kind", models.KINDS)
@pytest.mark.parametrize("name", STEP_MODELS)
def test_train_step(name, kind):
  options = {}
  if kind == "adder" and name == "resnet20":  # 8x8 maps: the broadcast is small
    options["implementation"] = "reference"
  compiler_options = FAST_COMPILE
  if kind == "adder" and name == "vgg_small":
    compiler_options = FAST_COMPILE_OPTIMIZED
  abstract = nnx.eval_shape(lambda: STEP_MODELS[name](kind=kind, rngs=nnx.Rngs(0), **options))
  graphdef, state = _numpy_state(abstract)
  batch = STEP_BATCH.get(name, 2)
  images = np.random.default_rng(1).normal(size=(batch, *STEP_IMAGES[name])).astype(np.float32)
  labels = np.arange(batch) % 2

  check_eval = name in EVAL_MODELS
  loss, grads, trained, train_outputs, eval_outputs = _train_step(
      graphdef, state, images, labels, check_eval=check_eval, compiler_options=compiler_options)

  assert np.isfinite(loss) and loss > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The gradient reaches every layer's kernel, through adder and binary layers alike.
  kernels = [g[...] for path, g in
             jax.tree_util.tree_leaves_with_path(grads, is_leaf=_is_variable)
             if path[-1].key == "kernel"]
  assert len(kernels) == len(_layers(abstract))
  assert all(np.any(g != 0) for g in kernels)
  # SGD with weight decay moves every parameter with a gradient or a value; in a batch of 2,
  # the gradient of some BatchNorm biases (initialized to 0) is exactly 0.
  params = lambda state: nnx.state(nnx.merge(graphdef, state), nnx.Param)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params(state), params(trained))
  moving = jax.tree.map(lambda p, g: bool(np.any(p != 0) or np.any(g != 0)), params(state),
                        grads)
  assert jax.tree.leaves(changed) == jax.tree.leaves(moving)
  # Train mode updated the running statistics of every BatchNorm.
  norms = lambda state: [m for _, m in nnx.iter_graph(nnx.merge(graphdef, state))
                         if isinstance(m, nnx.BatchNorm)]
  for old, new in zip(norms(state), norms(trained), strict=True):
    assert np.any(old.mean[...] != new.mean[...]) or np.any(old.var[...] != new.var[...])

  if check_eval:
    assert train_outputs.shape == (2, 10) and eval_outputs.shape == (3, 10)
    assert not np.allclose(train_outputs[0], train_outputs[1])
    # Eval mode normalises with the running statistics, here those of the batch `images`,
    # not with those of its own batch: the same outputs as in train mode (up to rounding,
    # which normalising channels of tiny variance in a batch of 2 amplifies).
    np.testing.assert_allclose(eval_outputs[:2], train_outputs, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(eval_outputs[2], eval_outputs[0], rtol=1e-5, atol=1e-5)
