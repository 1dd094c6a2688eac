"""load_source: splits, synthetic and digits sources, TFDS errors, bad arguments."""

import numpy as np
import pytest

from adderjax import data


def test_dataset_specs():
  assert set(data.DATASETS) == {"mnist", "cifar10", "cifar100", "imagenet2012"}
  expected = {"mnist": (10, (28, 28, 1), "test", "none"),
              "cifar10": (10, (32, 32, 3), "test", "cifar"),
              "cifar100": (100, (32, 32, 3), "test", "cifar"),
              "imagenet2012": (1000, (224, 224, 3), "validation", "imagenet")}
  for name, (classes, shape, eval_split, augment) in expected.items():
    spec = data.DATASETS[name]
    assert (spec.name, spec.num_classes, spec.image_shape) == (name, classes, shape)
    assert (spec.train_split, spec.eval_split, spec.augment) == ("train", eval_split, augment)
    assert len(spec.mean) == len(spec.std) == shape[2]
    assert all(0 < m < 1 for m in spec.mean) and all(0 < s < 1 for s in spec.std)
  with pytest.raises(AttributeError):
    data.DATASETS["mnist"].num_classes = 3  # Frozen.


@pytest.mark.parametrize("split, expected", [
    ("train", ("train", None, None)), ("test[:8000]", ("test", None, "8000")),
    ("validation[-10:]", ("validation", "-10", None)), ("train[10%:20%]", ("train", "10%", "20%")),
])
def test_parse_split(split, expected):
  assert data.parse_split(split) == expected


@pytest.mark.parametrize("split",
                         ["dev", "train[1:2:3]", "train[a:]", "Train", "train[:5", 3, None])
def test_bad_split_names_split(split):
  with pytest.raises(ValueError, match="split="):
    data.parse_split(split)
  with pytest.raises(ValueError, match="split="):
    data.load_source("mnist", split, source="synthetic")


@pytest.mark.parametrize("split, rows", [
    ("test", slice(0, 200)), ("test[:50]", slice(0, 50)), ("test[50:]", slice(50, 200)),
    ("test[10:20]", slice(10, 20)), ("test[-30:-10]", slice(170, 190)),
    ("test[:25%]", slice(0, 50)),
    ("test[25%:30%]", slice(50, 60)), ("test[20:10]", slice(20, 20)),
])
def test_split_slices(split, rows):
  full = data.load_source("cifar10", "test", source="synthetic", num_examples=200, seed=3)
  part = data.load_source("cifar10", split, source="synthetic", num_examples=200, seed=3)
  np.testing.assert_array_equal(part.images, full.images[rows])
  np.testing.assert_array_equal(part.labels, full.labels[rows])


def test_split_slice_out_of_range():
  with pytest.raises(ValueError, match=r"split='test\[:300\]'"):
    data.load_source("cifar10", "test[:300]", source="synthetic", num_examples=200)


@pytest.mark.parametrize("dataset, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                            ("cifar100", (32, 32, 3)),
                                            ("imagenet2012", (64, 64, 3))])
def test_synthetic_source(dataset, shape):
  train = data.load_source(dataset, "train", source="synthetic")
  test = data.load_source(dataset, "test", source="synthetic")
  assert isinstance(train, data.ArraySource)
  assert train.images.shape == (1024, *shape) and train.images.dtype == np.uint8
  assert (len(test) == 256
          and len(data.load_source(dataset, "validation", source="synthetic")) == 256)
  num_classes = data.DATASETS[dataset].num_classes
  assert train.labels.min() >= 0 and train.labels.max() < num_classes
  # Balanced classes.
  counts = np.bincount(train.labels, minlength=num_classes)
  assert counts.max() - counts.min() <= 1
  again = data.load_source(dataset, "train", source="synthetic")
  np.testing.assert_array_equal(again.images, train.images)
  assert not np.array_equal(test.images[:10], train.images[:10])


def test_synthetic_depends_on_seed_and_is_learnable():
  train = data.load_source("cifar10", "train", source="synthetic", num_examples=500, seed=1)
  test = data.load_source("cifar10", "test", source="synthetic", num_examples=200, seed=1)
  other = data.load_source("cifar10", "train", source="synthetic", num_examples=500, seed=2)
  assert not np.array_equal(other.images, train.images)
  # Test images are nearest to their class's mean training image: the classes share
  # their prototypes across splits.
  means = np.stack([train.images[train.labels == c].mean(0) for c in range(10)])
  distances = ((test.images[:, None].astype(np.float32) - means[None]) ** 2).sum((2, 3, 4))
  assert (distances.argmin(1) == test.labels).mean() > 0.95
  # ... and not a trivial task: the images are noisy.
  assert train.images.std() > 50


def test_synthetic_large_has_no_repeated_noise():
  big = data.load_source("cifar10", "train", source="synthetic", num_examples=3000)
  assert big.images.shape == (3000, 32, 32, 3)
  assert len({image.tobytes() for image in big.images}) == 3000


def test_digits_source():
  pytest.importorskip("sklearn")
  train = data.load_source("mnist", "train", source="digits")
  test = data.load_source("mnist", "test", source="digits")
  assert (len(train), len(test)) == (1437, 360)
  assert train.images.shape == (1437, 28, 28, 1) and train.images.dtype == np.uint8
  assert train.images.max() == 255 and np.all(train.images[:, :2] == 0)
  assert np.all(train.images[:, 26:] == 0) and np.all(train.images[:, :, :2] == 0)
  # Each 8x8 pixel is a 3x3 block.
  core = train.images[:, 2:26, 2:26, 0].reshape(-1, 8, 3, 8, 3)
  assert np.all(core == core[:, :, :1, :, :1])
  from sklearn.datasets import load_digits
  digits = load_digits()
  everything = np.concatenate([train.images, test.images])[:, 2:26:3, 2:26:3, 0]
  expected = np.rint(digits.images * 255 / 16)
  order = np.lexsort(everything.reshape(len(everything), -1).T)
  reference = np.lexsort(expected.reshape(len(expected), -1).T)
  np.testing.assert_array_equal(everything[order], expected[reference])
  assert np.bincount(np.concatenate([train.labels, test.labels])).tolist() == \
      np.bincount(digits.target).tolist()
  part = data.load_source("mnist", "test[:100]", source="digits")
  np.testing.assert_array_equal(part.images, test.images[:100])


def test_array_source():
  images = np.zeros((3, 4, 5, 1), np.uint8)
  source = data.ArraySource(images, np.array([0, 1, 2]))
  assert len(source) == 3 and source[2]["label"] == 2 and source[1]["image"].shape == (4, 5, 1)
  with pytest.raises(ValueError, match="images="):
    data.ArraySource(images.astype(np.float32), np.arange(3))
  with pytest.raises(ValueError, match="labels="):
    data.ArraySource(images, np.arange(4))


def test_tfds_failure_is_a_data_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match="pip install tensorflow") as info:
    data.load_source("cifar10", "test", data_dir=tmp_path / "tfds")
  assert "array_record" in str(info.value) and str(tmp_path / "tfds") in str(info.value)


@pytest.mark.parametrize("kwargs, name", [
    (dict(dataset="svhn", split="train"), "dataset="),
    (dict(dataset="mnist", split="train", source="http"), "source="),
    (dict(dataset="cifar10", split="train", source="idx", data_dir="."), "dataset="),
    (dict(dataset="cifar10", split="train", source="digits"), "dataset="),
    (dict(dataset="mnist", split="train", source="cifar_python", data_dir="."), "dataset="),
    (dict(dataset="mnist", split="validation", source="digits"), "split="),
    (dict(dataset="mnist", split="train", num_examples=10), "num_examples="),
    (dict(dataset="mnist", split="train", source="synthetic", num_examples=0), "num_examples="),
    (dict(dataset="mnist", split="train", source="synthetic", seed=-1), "seed="),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    data.load_source(kwargs.pop("dataset"), kwargs.pop("split"), **kwargs)
