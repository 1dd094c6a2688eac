"""TFDS sources, under tfds.testing.mock_data, through the whole pipeline."""

import itertools

import numpy as np
import pytest

from adderjax import data
from adderjax.data import augment as aug

tfds = pytest.importorskip("tensorflow_datasets")

ONE = dict(process_index=0, process_count=1)


def mock(num_examples: int):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("dataset, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                            ("cifar100", (32, 32, 3))])
def test_tfds_mock_sources(dataset, shape):
  spec = data.DATASETS[dataset]
  with mock(20):
    train = data.load_source(dataset, "train")
    test = data.load_source(dataset, spec.eval_split)
  assert len(train) == 20 and not hasattr(train, "images")
  batches = list(itertools.islice(
      data.train_batches(dataset, train, global_batch_size=8, seed=0, **ONE), 3))
  for batch in batches:
    assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert np.all((0 <= batch["label"]) & (batch["label"] < spec.num_classes))
  evals = list(data.eval_batches(dataset, test, global_batch_size=8, **ONE))
  assert len(evals) == 3 and int(sum(b["mask"].sum() for b in evals)) == 20
  images = np.stack([np.asarray(test[i]["image"]) for i in range(20)])
  labels = np.array([int(test[i]["label"]) for i in range(20)])
  expected = (images / 255 - np.array(spec.mean)) / np.array(spec.std)
  got = np.concatenate([b["image"] for b in evals])
  np.testing.assert_allclose(got[:20], expected, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in evals])[:20], labels)
  # The per-channel means of the split, back in [0, 1] units.
  np.testing.assert_allclose((got[:20] * np.array(spec.std) + np.array(spec.mean)).mean((0, 1, 2)),
                             images.mean((0, 1, 2)) / 255, atol=1e-5)


def test_tfds_mock_imagenet():
  with mock(12):
    train = data.load_source("imagenet2012", "train")
    val = data.load_source("imagenet2012", "validation")
  sizes = {np.asarray(train[i]["image"]).shape for i in range(12)}
  assert len(sizes) > 1  # Variable-size images.
  batch = next(data.train_batches("imagenet2012", train, global_batch_size=4, seed=0,
                                  image_size=32, num_threads=2, **ONE))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.int32
  evals = list(data.eval_batches("imagenet2012", val, global_batch_size=8, image_size=32, **ONE))
  assert [b["mask"].sum() for b in evals] == [8, 4]
  spec = data.DATASETS["imagenet2012"]
  image = np.asarray(val[9]["image"])
  expected = aug.normalize(aug.imagenet_eval_transform(image, 32), spec.mean, spec.std)
  np.testing.assert_allclose(evals[1]["image"][1], expected, atol=1e-6)
  assert evals[1]["label"][1] == int(val[9]["label"])
