"""Every config loads, passes the trainer's checks and builds its model."""

import importlib
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from adderjax import data, models
from experiments import train
from experiments.configs import ablation_lenet5_bn, common

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "experiments" / "configs"
PAPER_ROWS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                    if p.stem not in ("__init__", "common", "ablation_lenet5_bn", "smoke",
                                      "mnist_vit_tiny"))
ABLATIONS = [f"{g},{lr}" for g in ablation_lenet5_bn.GRAD_MODES
             for lr in ablation_lenet5_bn.ADDER_LRS]


def load(name, arg):
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


def test_every_paper_row_has_a_config():
  assert PAPER_ROWS == sorted(
      ["mnist_lenet5_bn", "imagenet_resnet18", "imagenet_resnet50"]
      + [f"{d}_{m}" for d in ("cifar10", "cifar100")
         for m in ("resnet20", "resnet32", "vgg_small")])


def test_the_configs_kinds_are_the_models_kinds():
  # common.py writes them out so that loading a config does not import JAX.
  assert common.KINDS == models.KINDS
  with pytest.raises(ValueError, match=r"must be one of \('adder', 'conv', 'binary'\), got 'cnn'"):
    common.check_kind("cnn")


CASES = ([(row, kind) for row in PAPER_ROWS for kind in models.KINDS]
         + [("ablation_lenet5_bn", arg) for arg in ABLATIONS] + [("smoke", "adder")]
         + [("mnist_vit_tiny", kind) for kind in models.KINDS])


@pytest.mark.parametrize("name, arg", CASES)
def test_config_loads_and_builds_its_model(name, arg):
  config = load(name, arg)
  train.check_config(config)
  assert config.reference
  spec = data.DATASETS[config.dataset]
  model = nnx.eval_shape(lambda: train.make_model(config, rngs=nnx.Rngs(0)))
  height, _, channels = spec.image_shape
  size = config.image_size or height
  model.eval()
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state,
                       jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32))
  assert out.shape == (2, spec.num_classes)


def test_paper_recipes():
  cifar = load("cifar100_vgg_small", "conv")
  assert (cifar.kind, cifar.dataset, cifar.batch_size, cifar.learning_rate, cifar.num_epochs,
          cifar.momentum, cifar.weight_decay, cifar.eta, cifar.schedule) == (
              "conv", "cifar100", 256, 0.05, 400, 0.9, 5e-4, 0.2, "cosine")
  mnist = load("mnist_lenet5_bn", "")
  assert (mnist.kind, mnist.learning_rate, mnist.num_epochs) == ("adder", 0.1, 50)
  imagenet = load("imagenet_resnet50", "binary")
  assert (imagenet.kind, imagenet.num_epochs, imagenet.schedule) == ("binary", 150, "cosine")
  sign_fixed = load("ablation_lenet5_bn", "sign,fixed")
  assert (sign_fixed.grad_mode, sign_fixed.adder_lr) == ("sign", "fixed")


@pytest.mark.parametrize("name, arg", [("cifar10_resnet20", "cnn"),
                                       ("ablation_lenet5_bn", "sign"),
                                       ("ablation_lenet5_bn", "sign,ilr")])
def test_bad_config_argument_is_named(name, arg):
  with pytest.raises(ValueError, match="config argument"):
    load(name, arg)


def test_fixed_and_no_adder_rate_optimizers():
  """"fixed" multiplies only the adder kernels' gradients; "none" is plain SGD."""
  config = load("ablation_lenet5_bn", "full_precision,fixed")
  config.adder_lr_multiplier = 10.0
  config.weight_decay, config.momentum = 0.0, 0.0
  model = train.make_model(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, params)
  for adder_lr, factor in (("fixed", 10.0), ("none", 1.0)):
    config.adder_lr = adder_lr
    tx = train.make_optimizer(config, lambda step: 1.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat = nnx.to_flat_state(updates)
    kinds = {path: type(v).__name__ for path, v in nnx.to_flat_state(params)}
    for path, value in flat:
      expected = -factor if kinds[path] == "AdderKernel" else -1.0
      assert float(jnp.max(jnp.abs(value[...] - expected))) == 0.0, (adder_lr, path)


def test_model_kwargs_reach_the_model():
  config = load("mnist_lenet5_bn", "adder")
  assert not config.model_kwargs.keys()  # empty by default
  config.model = "lenet_pp"
  config.model_kwargs.embed_dim = 3
  train.check_config(config)
  model = nnx.eval_shape(lambda: train.make_model(config, rngs=nnx.Rngs(0)))
  assert model.embed_dim == 3 and model.classifier.kernel.shape == (3, 10)
  config.model_kwargs.kind = "conv"  # the trainer's own argument, from config.kind
  with pytest.raises(ValueError, match=r"config.model_kwargs sets \['kind'\]"):
    train.check_config(config)


def test_cifar_and_mnist_configs_download_their_data(tmp_path, monkeypatch):
  """A paper row's config fetches its dataset (here from a local mirror) with nothing else set."""
  from adderjax.data import remote
  from tests.data.file_server import serving
  from tests.data.test_remote import cifar10_archive, mnist_files, patch_remote
  files = {"cifar-10-python.tar.gz": cifar10_archive(), **mnist_files()}
  patch_remote(monkeypatch, "cifar10", files)
  patch_remote(monkeypatch, "mnist", files)
  monkeypatch.setenv(remote.ENV_DATA_DIR, str(tmp_path))
  with serving(files) as server:
    monkeypatch.setenv(remote.ENV_MIRROR, server.url)
    cifar = load("cifar10_resnet20", "adder")
    assert (cifar.data_source, cifar.download, cifar.data_dir) == ("cifar_python", True, "")
    train_source, eval_source = train.load_sources(cifar)
    assert (len(train_source), len(eval_source)) == (20, 4)
    mnist = load("mnist_lenet5_bn", "conv")
    assert (mnist.data_source, mnist.download) == ("idx", True)
    assert [len(s) for s in train.load_sources(mnist)] == [24, 12]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10", "mnist"]
