"""train_batches / eval_batches: order, resumption, sharding, augmentation, TFDS sources."""

import itertools

import numpy as np
import pytest

from adderjax import data
from adderjax.data import augment as aug
from adderjax.data import pipeline

ONE = dict(process_index=0, process_count=1)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def indexed(n: int, shape=(32, 32, 3), seed: int = 0) -> data.ArraySource:
  """Random images whose label is their index, to see which examples a batch holds."""
  images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
  return data.ArraySource(images, np.arange(n))


class ItemsOnly:
  """A source without ``.images``: the per-example path, as TFDS sources take."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    example = self._source[index]
    return {"image": example["image"].copy(), "label": np.int64(example["label"])}


def denormalize(images: np.ndarray, dataset: str) -> np.ndarray:
  spec = data.DATASETS[dataset]
  return np.rint((images * np.array(spec.std) + np.array(spec.mean)) * 255).astype(np.uint8)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_steps_and_eval_batches():
  assert data.steps_per_epoch(50_000, 256) == 195
  assert data.steps_per_epoch(256, 256) == 1
  assert data.num_eval_batches(10_000, 256) == 40 and data.num_eval_batches(256, 256) == 1
  assert data.num_eval_batches(1, 256) == 1
  with pytest.raises(ValueError, match="global_batch_size=512"):
    data.steps_per_epoch(100, 512)
  with pytest.raises(ValueError, match="global_batch_size="):
    data.num_eval_batches(100, 0)
  with pytest.raises(ValueError, match="num_examples="):
    data.steps_per_epoch(0, 8)


def test_train_batches_format_and_normalisation():
  source = data.load_source("cifar10", "train", source="synthetic", num_examples=64)
  batch = next(data.train_batches("cifar10", source, global_batch_size=16, seed=0,
                                  augment=False, **ONE))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  indices = data.epoch_permutation(64, seed=0, epoch=0)[:16]
  spec = data.DATASETS["cifar10"]
  expected = (source.images[indices] / 255 - np.array(spec.mean)) / np.array(spec.std)
  np.testing.assert_allclose(batch["image"], expected, atol=1e-5)
  np.testing.assert_array_equal(batch["label"], source.labels[indices])


def test_each_epoch_is_a_permutation_and_remainder_dropped():
  source = indexed(20)
  batches = take(data.train_batches("cifar10", source, global_batch_size=8, seed=5, **ONE), 6)
  for epoch in range(3):
    seen = np.concatenate([b["label"] for b in batches[2 * epoch:2 * epoch + 2]])
    assert len(set(seen.tolist())) == 16
    np.testing.assert_array_equal(seen, data.epoch_permutation(20, seed=5, epoch=epoch)[:16])
  orders = [np.concatenate([b["label"] for b in batches[i:i + 2]]) for i in (0, 2)]
  assert not np.array_equal(orders[0], orders[1])  # A new order each epoch.


def test_same_seed_same_batches_other_seed_other_batches():
  source = indexed(40)
  runs = [take(data.train_batches("cifar10", source, global_batch_size=8, seed=seed, **ONE), 3)
          for seed in (1, 1, 2)]
  assert_batches_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0][0]["label"], runs[2][0]["label"])
  # Same examples, other augmentation: the images differ too.
  sorted_labels = [np.sort(np.concatenate([b["label"] for b in run[:5]])) for run in runs]
  assert not np.array_equal(runs[0][0]["image"], runs[2][0]["image"])
  assert sorted_labels[0].shape == sorted_labels[2].shape


@pytest.mark.parametrize("dataset, shape",
                         [("cifar10", (32, 32, 3)), ("imagenet2012", (20, 24, 3))])
def test_resume_equals_the_run_from_zero(dataset, shape):
  source = indexed(20, shape)
  kwargs = dict(global_batch_size=8, seed=3, image_size=16 if dataset == "imagenet2012" else None)
  run = take(data.train_batches(dataset, source, **kwargs, **ONE), 7)  # Epochs of 2 steps.
  for start in (1, 2, 3, 6):
    resumed = take(data.train_batches(dataset, source, start_step=start, **kwargs, **ONE),
                   7 - start)
    assert_batches_equal(resumed, run[start:])


@pytest.mark.parametrize("dataset, shape, augment", [
    ("cifar10", (32, 32, 3), True), ("mnist", (28, 28, 1), True),
    ("imagenet2012", (30, 40, 3), True), ("imagenet2012", (30, 40, 3), False),
])
def test_process_slices_make_the_global_batch(dataset, shape, augment):
  source = indexed(48, shape)
  kwargs = dict(global_batch_size=16, seed=7, augment=augment,
                image_size=24 if dataset == "imagenet2012" else None)
  whole = take(data.train_batches(dataset, source, **kwargs, **ONE), 4)
  for count in (2, 4):
    parts = [take(data.train_batches(dataset, source, process_index=p, process_count=count,
                                     **kwargs), 4) for p in range(count)]
    for step in range(4):
      assert parts[0][step]["image"].shape[0] == 16 // count
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts]), whole[step][key])


def test_cifar_augmentation_is_a_crop_and_flip_of_the_example():
  source = indexed(32)
  batch = next(data.train_batches("cifar10", source, global_batch_size=32, seed=0, **ONE))
  pixels = denormalize(batch["image"], "cifar10")
  flips = 0
  for image, label in zip(pixels, batch["label"]):
    candidates = [(flip, (dy, dx)) for flip in (False, True) for dy in range(9) for dx in range(9)
                  if np.array_equal(image, _crop(source.images[label], (dy, dx), flip))]
    assert candidates, f"example {label} is no crop of its image"
    flips += candidates[0][0]
  assert 0 < flips < 32


def _crop(image, offset, flip):
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crop = padded[offset[0]:offset[0] + 32, offset[1]:offset[1] + 32]
  return crop[:, ::-1] if flip else crop


def test_mnist_is_not_augmented():
  source = indexed(16, (28, 28, 1))
  batch = next(data.train_batches("mnist", source, global_batch_size=16, seed=0, **ONE))
  np.testing.assert_array_equal(denormalize(batch["image"], "mnist"),
                                source.images[batch["label"]])
  assert np.mean(batch["image"]) == pytest.approx(
      (source.images.mean() / 255 - 0.1307) / 0.3081, abs=1e-4)


def test_imagenet_train_batches_shapes_and_range():
  source = data.load_source("imagenet2012", "train", source="synthetic", num_examples=16)
  batches = data.train_batches("imagenet2012", source, global_batch_size=8, seed=0, **ONE)
  batch = next(batches)
  assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.float32
  pixels = batch["image"] * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  small = next(data.train_batches("imagenet2012", source, global_batch_size=8, seed=0,
                                  image_size=96, **ONE))
  assert small["image"].shape == (8, 96, 96, 3)


def test_threads_give_the_same_batches():
  cases = [("imagenet2012", ItemsOnly(indexed(24, (30, 40, 3))), 20),
           ("imagenet2012", indexed(24, (30, 40, 3)), 20),
           ("cifar10", ItemsOnly(indexed(24)), None), ("cifar10", indexed(24), None)]
  for dataset, source, size in cases:
    runs = [take(data.train_batches(dataset, source, global_batch_size=8, seed=1, image_size=size,
                                    num_threads=threads, **ONE), 5) for threads in (0, 2)]
    assert_batches_equal(*runs)
    evals = [list(data.eval_batches(dataset, source, global_batch_size=10, image_size=size,
                                    num_threads=threads, **ONE)) for threads in (0, 3)]
    assert_batches_equal(*evals)


def test_items_only_source_equals_array_source():
  source = indexed(24)
  run = lambda s: take(data.train_batches("cifar10", s, global_batch_size=8, seed=1, **ONE), 4)
  assert_batches_equal(run(source), run(ItemsOnly(source)))


@pytest.mark.parametrize("count", [1, 2, 4])
def test_eval_covers_every_example_once(count):
  source = indexed(21)
  parts = [list(data.eval_batches("cifar10", source, global_batch_size=8, process_index=p,
                                  process_count=count)) for p in range(count)]
  assert all(len(part) == 3 for part in parts)  # ceil(21 / 8)
  batches = [{key: np.concatenate([part[b][key] for part in parts]) for key in parts[0][b]}
             for b in range(3)]
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.dtype == bool and masks.tolist() == [True] * 21 + [False] * 3
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:21], np.arange(21))
  assert np.all(labels[21:] == 0)
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(denormalize(images[:21], "cifar10"), source.images)
  assert np.all(images[21:] == 0)


def test_eval_imagenet_is_resize_and_centre_crop():
  source = indexed(5, (40, 60, 3))
  batches = list(data.eval_batches("imagenet2012", source, global_batch_size=4, image_size=16,
                                   **ONE))
  assert len(batches) == 2 and batches[1]["mask"].tolist() == [True, False, False, False]
  spec = data.DATASETS["imagenet2012"]
  expected = aug.normalize(aug.imagenet_eval_transform(source.images[4], 16), spec.mean, spec.std)
  np.testing.assert_allclose(batches[1]["image"][0], expected, atol=1e-6)
  # Without augmentation, training uses the evaluation transform too.
  train = next(data.train_batches("imagenet2012", source, global_batch_size=4, seed=0,
                                  image_size=16, augment=False, **ONE))
  order = data.epoch_permutation(5, seed=0, epoch=0)[:4]
  np.testing.assert_allclose(train["image"], np.stack([b for b in np.concatenate(
      [batches[0]["image"], batches[1]["image"]])[order]]), atol=1e-6)


_COMMON_ERRORS = [
    (dict(global_batch_size=6, process_count=4, process_index=0), "global_batch_size="),
    (dict(global_batch_size=8, process_count=2, process_index=2), "process_index="),
    (dict(global_batch_size=8, process_count=0, process_index=0), "process_count="),
    (dict(global_batch_size=0), "global_batch_size="),
    (dict(global_batch_size=8, num_threads=-1), "num_threads="),
    (dict(global_batch_size=8, image_size=64), "image_size="),
    (dict(global_batch_size=8, dataset="svhn"), "dataset="),
    (dict(global_batch_size=8, source=object()), "source="),
]


@pytest.mark.parametrize("kwargs, name", _COMMON_ERRORS + [
    (dict(global_batch_size=64), "global_batch_size=64"),
    (dict(global_batch_size=8, seed=-1), "seed="),
    (dict(global_batch_size=8, seed=None), "seed="),
    (dict(global_batch_size=8, start_step=-1), "start_step="),
    (dict(global_batch_size=8, augment="yes"), "augment="),
])
def test_bad_train_arguments_name_the_argument(kwargs, name):
  kwargs = {"dataset": "cifar10", "source": indexed(32), "seed": 0, **ONE, **kwargs}
  with pytest.raises(ValueError, match=name):  # Before iterating.
    data.train_batches(kwargs.pop("dataset"), kwargs.pop("source"), **kwargs)


@pytest.mark.parametrize("kwargs, name", _COMMON_ERRORS)
def test_bad_eval_arguments_name_the_argument(kwargs, name):
  kwargs = {"dataset": "cifar10", "source": indexed(32), **ONE, **kwargs}
  with pytest.raises(ValueError, match=name):
    data.eval_batches(kwargs.pop("dataset"), kwargs.pop("source"), **kwargs)


def test_default_process_is_jax_s():
  batch = next(data.train_batches("cifar10", indexed(16), global_batch_size=8, seed=0))
  assert batch["image"].shape[0] == 8  # One process in tests.


def test_wrong_image_shape_is_a_data_error():
  with pytest.raises(data.DataError, match=r"\(28, 28, 1\)"):
    next(data.train_batches("cifar10", indexed(16, (28, 28, 1)), global_batch_size=8, seed=0,
                            **ONE))


def test_imagenet_without_pillow_uses_numpy(monkeypatch):
  from adderjax.data import resize
  monkeypatch.setattr(resize, "_pil_image", lambda: None)
  assert resize.default_backend() == "numpy"
  source = indexed(8, (30, 40, 3))
  kwargs = dict(global_batch_size=4, seed=2, image_size=16)
  runs = [take(data.train_batches("imagenet2012", source, num_threads=threads, **kwargs, **ONE), 2)
          for threads in (0, 2)]
  assert_batches_equal(*runs)
  parts = [next(data.train_batches("imagenet2012", source, process_index=p, process_count=2,
                                   **kwargs)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), runs[0][0]["image"])
  # Step 0's augmentation, drawn as the pipeline documents: from (seed, step).
  rng = np.random.default_rng([2, pipeline._AUGMENT_STREAM, 0])
  uniforms, flips = aug.draw_imagenet_params(rng, 4)
  index = runs[0][0]["label"][1]
  spec = data.DATASETS["imagenet2012"]
  expected = aug.imagenet_train_transform(source.images[index], uniforms[1], flips[1], 16,
                                          backend="numpy")
  np.testing.assert_allclose(runs[0][0]["image"][1],
                             aug.normalize(expected, spec.mean, spec.std), atol=1e-6)
