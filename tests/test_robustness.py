"""FGSM and PGD (adderjax.robustness, exported by adderjax.analysis) on small trained models."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import analysis
from adderjax.data import bundled
from adderjax.nn import AdderDense

MEAN, STD = 0.1307, 0.3081  # MNIST's, as adderjax.data normalises it


class _Centroids(nnx.Module):
  """A nearest-centroid classifier on 14x14 images, "trained" by taking the class means.

  ``kind="adder"``: an :class:`AdderDense` whose kernel holds the class means,
  logits the negative L1 distances to them; ``"conv"``: an ``nnx.Linear``
  computing ``x . m - |m|^2 / 2``, the L2 nearest centroid. About 80%
  accurate on MNIST, with nothing to compile but the forward pass.
  """

  def __init__(self, kind, images, labels):
    zeros = nnx.initializers.zeros  # no random init to compile: the kernel is set below
    x = images.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(len(images), -1)  # as _features
    centres = np.stack([x[labels == c].mean(0) for c in range(10)], axis=1)  # (196, 10)
    if kind == "adder":
      self.layer = AdderDense(196, 10, kernel_init=zeros, rngs=nnx.Rngs(0))
      self.layer.kernel[...] = centres
      self.temperature = 0.1
    else:
      self.layer = nnx.Linear(196, 10, kernel_init=zeros, rngs=nnx.Rngs(0))
      self.layer.kernel[...] = centres
      self.layer.bias[...] = -0.5 * np.sum(centres ** 2, axis=0)
      self.temperature = 0.2

  def __call__(self, x):
    return self.temperature * self.layer(_features(x))


def _features(x):
  return nnx.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)


def _data():
  pixels, labels = bundled.load_bundled_mnist()
  return ((pixels[:1152].astype(np.float32) / 255 - MEAN) / STD), labels[:1152].astype(np.int32)


@pytest.fixture(scope="module")
def adder_net():
  images, labels = _data()
  return _Centroids("adder", images[:1024], labels[:1024])


@pytest.fixture(scope="module")
def cnn():
  images, labels = _data()
  return _Centroids("conv", images[:1024], labels[:1024])


def _test_batch(n=128):
  images, labels = _data()
  return images[1024:1024 + n], labels[1024:1024 + n]


def test_pgd_raises_the_loss_and_stays_in_the_ball_and_the_pixel_range(adder_net):
  images, labels = _test_batch()
  epsilon = 0.15
  result = analysis.pgd(adder_net, images, labels, epsilon=epsilon, steps=5, mean=MEAN, std=STD,
                        batch_size=48)  # 128 = 2 * 48 + 32: a padded last batch
  logits = np.asarray(adder_net(jnp.asarray(images)), np.float64)
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  clean_loss = float(-np.mean(log_softmax[np.arange(len(labels)), labels]))
  np.testing.assert_allclose(result.clean_loss, clean_loss, rtol=1e-4)
  assert result.clean_accuracy > 0.6
  assert result.loss > clean_loss + 0.5
  assert result.accuracy < result.clean_accuracy - 0.2
  clean_pixels, pixels = images * STD + MEAN, result.adversarial * STD + MEAN
  assert np.abs(pixels - clean_pixels).max() <= epsilon + 1e-5
  assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
  adversarial_logits = adder_net(jnp.asarray(result.adversarial))
  np.testing.assert_allclose(result.accuracy, float(np.mean(np.argmax(adversarial_logits, -1)
                                                            == labels)))
  untouched = analysis.pgd(adder_net, images, labels, epsilon=0.0, steps=5, mean=MEAN, std=STD,
                           batch_size=48)
  assert untouched.accuracy == untouched.clean_accuracy == result.clean_accuracy
  np.testing.assert_allclose(untouched.adversarial, images, atol=1e-5)


def test_fgsm_raises_the_loss_of_a_cnn_and_epsilon_zero_changes_nothing(cnn):
  images, labels = _test_batch()
  attacked = analysis.fgsm(cnn, images, labels, epsilon=0.1, mean=MEAN, std=STD)
  assert attacked.loss > attacked.clean_loss + 0.3
  untouched = analysis.fgsm(cnn, images, labels, epsilon=0.0, mean=MEAN, std=STD)
  assert untouched.accuracy == untouched.clean_accuracy == attacked.clean_accuracy
  np.testing.assert_allclose(untouched.adversarial, images, atol=1e-5)


def test_exact_and_surrogate_gradients_differ_for_an_adder_net_only(adder_net, cnn):
  images, labels = _test_batch()  # the CNN's attack as compiled for the test above
  options = dict(epsilon=0.1, mean=MEAN, std=STD)
  exact = analysis.fgsm(adder_net, images, labels, gradient="exact", **options)
  surrogate = analysis.fgsm(adder_net, images, labels, gradient="surrogate", **options)
  assert np.mean(exact.adversarial != surrogate.adversarial) > 0.01
  exact_cnn = analysis.fgsm(cnn, images, labels, **options)
  surrogate_cnn = analysis.fgsm(cnn, images, labels, gradient="surrogate", **options)
  np.testing.assert_array_equal(exact_cnn.adversarial, surrogate_cnn.adversarial)
  assert adder_net.layer.grad_mode == "full_precision"  # the model itself is left as it was


def test_with_grad_mode_replaces_it_in_a_copy(adder_net):
  copy = analysis.with_grad_mode(adder_net, "sign")
  assert copy.layer.grad_mode == "sign" and adder_net.layer.grad_mode == "full_precision"
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 196)), jnp.float32)
  x_grad = lambda model: jax.jit(jax.grad(lambda x: model.layer(x).sum()))(x)
  exact = np.sign(np.asarray(adder_net.layer.kernel[...]) - np.asarray(x)[:, :, None]).sum(-1)
  np.testing.assert_array_equal(x_grad(copy), exact)
  assert not np.allclose(x_grad(copy), x_grad(adder_net))
  with pytest.raises(ValueError, match="grad_mode"):
    analysis.with_grad_mode(adder_net, "exact")


def test_apply_and_a_tuple_output(cnn):
  images, labels = _test_batch(8)
  direct = analysis.fgsm(cnn, images, labels, epsilon=0.1, mean=MEAN, std=STD)
  via_apply = analysis.fgsm(cnn, images, labels, epsilon=0.1, mean=MEAN, std=STD,
                            apply=lambda model, x: (x, model(x)))  # logits last, as LeNet++
  np.testing.assert_array_equal(via_apply.adversarial, direct.adversarial)
  assert via_apply.accuracy == direct.accuracy


@pytest.mark.parametrize("options, name", [
    (dict(epsilon=-0.1), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(epsilon="8/255"), "epsilon"),
    (dict(epsilon=0.1, steps=0), "steps"),
    (dict(epsilon=0.1, step_size=0.0), "step_size"),
    (dict(epsilon=0.1, gradient="training"), "gradient"),
    (dict(epsilon=0.1, std=0.0), "std"),
    (dict(epsilon=0.1, mean=(0.1, 0.2)), "mean"),
    (dict(epsilon=0.1, pixel_range=(1.0, 0.0)), "pixel_range"),
    (dict(epsilon=0.1, batch_size=0), "batch_size"),
    (dict(epsilon=0.1, random_start=1), "random_start"),
    (dict(epsilon=0.1, seed=0.5), "seed"),
])
def test_bad_arguments_are_named(cnn, options, name):
  images, labels = _test_batch(4)
  with pytest.raises(ValueError, match=name):
    analysis.pgd(cnn, images, labels, **options)


def test_bad_inputs_are_named(cnn):
  images, labels = _test_batch(4)
  with pytest.raises(ValueError, match="labels"):
    analysis.fgsm(cnn, images, labels[:3], epsilon=0.1)
  with pytest.raises(ValueError, match="images"):
    analysis.fgsm(cnn, images[:0], labels[:0], epsilon=0.1)
