"""Tests for examples/input_pipeline.py."""

import gzip
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sklearn_datasets

from examples import input_pipeline


@pytest.fixture(scope="module")
def sources(data_dir):
  """The digits data sources and metadata."""
  return input_pipeline.get_datasets("digits", data_dir=data_dir)


def _readable_mock(source):
  # TFDS 4.9.10's `mock_data` sets `__getitems__` on its mock array_record
  # reader as a plain attribute, so it is called without `self` and fails.
  # Read the mock item by item instead.
  reader = source.data_source
  reader.__getitems__ = lambda keys: [reader[k] for k in keys]
  return source


def test_digits_is_prepared_in_data_dir(sources, data_dir):
  train, test, metadata = sources
  assert (len(train), len(test)) == (1437, 360)
  version_dir = pathlib.Path(data_dir) / "digits" / "1.0.0"
  assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
    "digits-test.array_record-00000-of-00001",
    "digits-train.array_record-00000-of-00001",
  ]
  assert metadata == input_pipeline.get_metadata("digits")
  assert (metadata.num_classes, metadata.input_shape) == (10, (8, 8, 1))


def test_digits_second_call_reuses_files(sources, data_dir):
  files = sorted((pathlib.Path(data_dir) / "digits" / "1.0.0").iterdir())
  mtimes = [f.stat().st_mtime_ns for f in files]
  train, _, _ = input_pipeline.get_datasets("digits", data_dir=data_dir)
  assert len(train) == 1437
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_digits_records(sources):
  train, _, _ = sources
  example = train[0]
  assert example["image"].shape == (8, 8, 1)
  assert example["image"].dtype == np.uint8
  assert 0 <= example["label"] < 10


def test_digits_splits_hold_the_sklearn_images(digits):
  train, test, _ = digits
  np.testing.assert_array_equal(np.bincount(test["label"]), np.full(10, 36))
  digits = sklearn_datasets.load_digits()
  expected = np.round(digits.images * 255 / 16)[..., None] / 255

  def sorted_rows(images, labels):
    rows = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], 1)
    return rows[np.lexsort(rows.T[::-1])]

  stored = sorted_rows(
    np.concatenate([train["image"], test["image"]]),
    np.concatenate([train["label"], test["label"]]),
  )
  np.testing.assert_allclose(
    stored, sorted_rows(expected.astype(np.float32), digits.target), atol=1e-6
  )


def test_digits_metadata_matches_train_pixels(digits):
  train, _, _ = digits
  metadata = input_pipeline.get_metadata("digits")
  np.testing.assert_allclose(train["image"].mean(), metadata.mean[0], atol=1e-4)
  np.testing.assert_allclose(train["image"].std(), metadata.std[0], atol=1e-4)


def test_load_split_range_and_dtypes(digits):
  train, test, _ = digits
  assert train["image"].shape == (1437, 8, 8, 1)
  assert test["image"].shape == (360, 8, 8, 1)
  for split in (train, test):
    assert split["image"].dtype == np.float32
    assert split["label"].dtype == np.int32
    assert split["image"].min() == 0.0
    assert split["image"].max() == 1.0
    assert set(np.unique(split["label"])) == set(range(10))


def test_iterate_batches(sources):
  train, _, _ = sources
  batches = list(input_pipeline.iterate(train, 100, seed=0, epoch=0))
  assert len(batches) == 14  # 1,437 // 100, remainder dropped.
  for batch in batches:
    assert batch["image"].shape == (100, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (100,)
    assert batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  kept = input_pipeline.iterate(train, 100, seed=0, drop_remainder=False)
  assert [len(b["label"]) for b in kept] == [100] * 14 + [37]


def _labels(source, **kwargs):
  batches = input_pipeline.iterate(source, 64, **kwargs)
  return np.concatenate([b["label"] for b in batches])


def test_iterate_is_deterministic_given_seed_and_epoch(digits):
  train, _, _ = digits
  np.testing.assert_array_equal(
    _labels(train, seed=3, epoch=1), _labels(train, seed=3, epoch=1)
  )


def test_iterate_order_changes_with_epoch_and_seed(digits):
  train, _, _ = digits
  first = _labels(train, seed=0, epoch=0)
  assert not np.array_equal(first, _labels(train, seed=0, epoch=1))
  assert not np.array_equal(first, _labels(train, seed=1, epoch=0))


def test_iterate_epoch_is_a_permutation(digits):
  train, _, _ = digits
  labels = _labels(train, seed=0, epoch=2, drop_remainder=False)
  np.testing.assert_array_equal(np.sort(labels), np.sort(train["label"]))


def test_iterate_without_shuffle_keeps_order(digits):
  train, _, _ = digits
  batches = input_pipeline.iterate(train, 500, shuffle=False, drop_remainder=False)
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(images, train["image"])


def test_iterate_source_and_arrays_agree(sources, digits):
  train_source, _, _ = sources
  train_arrays, _, _ = digits
  from_source = input_pipeline.iterate(train_source, 256, seed=5, epoch=7)
  from_arrays = input_pipeline.iterate(train_arrays, 256, seed=5, epoch=7)
  for a, b in zip(from_source, from_arrays, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_batch_at_is_the_batch_of_each_step_of_the_epochs(digits):
  train, _, _ = digits
  epochs = [list(input_pipeline.iterate(train, 500, seed=3, epoch=e)) for e in (0, 1)]
  for step, expected in enumerate(epochs[0] + epochs[1]):
    batch = input_pipeline.batch_at(train, 500, 3, step)
    np.testing.assert_array_equal(batch["label"], expected["label"])
    np.testing.assert_array_equal(batch["image"], expected["image"])


def test_iterate_rejects_bad_batch_size(digits):
  train, _, _ = digits
  with pytest.raises(ValueError, match="batch_size"):
    next(input_pipeline.iterate(train, 0))


@pytest.mark.parametrize(
  ("name", "shape", "num_classes"),
  [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)],
)
def test_mocked_tfds_datasets(tmp_path, name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test, metadata = input_pipeline.get_datasets(name, data_dir=tmp_path)
    train, test = _readable_mock(train), _readable_mock(test)
    assert (len(train), len(test)) == (40, 40)
    assert metadata.input_shape == shape
    assert metadata.num_classes == num_classes
    assert len(metadata.mean) == len(metadata.std) == shape[-1]
    batches = list(input_pipeline.iterate(train, 16, seed=0, epoch=0))
    again = list(input_pipeline.iterate(train, 16, seed=0, epoch=0))
    arrays = input_pipeline.load_split(test)
  assert len(batches) == 2
  for batch, other in zip(batches, again, strict=True):
    assert batch["image"].shape == (16, *shape)
    assert batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()
    np.testing.assert_array_equal(batch["image"], other["image"])
  assert arrays["image"].shape == (40, *shape)


def test_missing_dataset_raises_one_clear_error(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFoundError) as info:
    input_pipeline.get_datasets("mnist", data_dir=tmp_path)
  assert isinstance(info.value, FileNotFoundError)  # What the CLIs catch.
  message = str(info.value)
  assert "'mnist'" in message
  assert str(tmp_path) in message
  assert "tfds build mnist" in message
  assert "--file_format=array_record" in message
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="svhn"):
    input_pipeline.get_datasets("svhn")
  with pytest.raises(ValueError, match="svhn"):
    input_pipeline.get_metadata("svhn")


def test_metadata_of_every_dataset():
  for name in input_pipeline.DATASETS:
    metadata = input_pipeline.get_metadata(name)
    assert metadata.name == name
    channels = metadata.input_shape[-1]
    assert len(metadata.mean) == len(metadata.std) == channels
    assert all(0 < m < 1 for m in metadata.mean)
    assert all(0 < s < 0.5 for s in metadata.std)


def _write_idx(path, array, *, compress=True):
  """Writes ``array`` (uint8) as an idx file: the format's reference writer."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    path = path.with_name(path.name + ".gz")
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


@pytest.fixture(scope="module")
def fashion_files(tmp_path_factory):
  """Small Fashion-MNIST idx files: 30 train and 20 test random images."""
  directory = tmp_path_factory.mktemp("fashion_files")
  rng = np.random.default_rng(0)
  splits = {}
  for split, prefix, n in (("train", "train", 30), ("test", "t10k", 20)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
    # Uncompressed labels: the builder takes either.
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=False)
    splits[split] = images, labels
  return directory, splits


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("fashion_tfds")


@pytest.fixture(scope="module")
def fashion(fashion_files, fashion_dir):
  files, _ = fashion_files
  return input_pipeline.get_datasets(
    "fashion_mnist", data_dir=fashion_dir, manual_dir=files
  )


def _sorted_examples(images, labels):
  rows = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], 1)
  return rows[np.lexsort(rows.T[::-1])]


def test_read_idx_matches_the_written_array(tmp_path):
  array = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
  for compress in (True, False):
    path = _write_idx(tmp_path / f"x{compress}", array, compress=compress)
    read = input_pipeline.read_idx(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_bad_files(tmp_path):
  path = tmp_path / "floats"
  path.write_bytes(bytes([0, 0, 0x0D, 1]) + np.asarray([2], ">i4").tobytes())
  with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
    input_pipeline.read_idx(path)
  short = tmp_path / "short"
  short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">i4").tobytes() + b"abc")
  with pytest.raises(ValueError, match=r"announces shape \(5,\) but holds 3"):
    input_pipeline.read_idx(short)


def test_fashion_mnist_is_prepared_from_the_idx_files(fashion, fashion_files):
  _, splits = fashion_files
  train, test, metadata = fashion
  assert (len(train), len(test)) == (30, 20)
  assert metadata == input_pipeline.get_metadata("fashion_mnist")
  for source, (images, labels) in zip((train, test), splits.values(), strict=True):
    arrays = input_pipeline.load_split(source)
    assert arrays["image"].shape == (len(labels), 28, 28, 1)
    np.testing.assert_array_equal(
      _sorted_examples(np.round(arrays["image"] * 255), arrays["label"]),
      _sorted_examples(images, labels),
    )


def test_fashion_mnist_is_tfds_own_dataset(fashion, fashion_dir):
  # What was prepared is where TFDS's own `fashion_mnist` looks, in its format.
  train = tfds.data_source("fashion_mnist", split="train", data_dir=fashion_dir)
  assert len(train) == 30
  builder = tfds.builder("fashion_mnist", data_dir=fashion_dir)
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  assert builder.info.version == "3.0.1"


def test_fashion_mnist_once_prepared_needs_no_files(fashion, fashion_dir, tmp_path):
  train, test, _ = input_pipeline.get_datasets(
    "fashion_mnist", data_dir=fashion_dir, manual_dir=tmp_path / "none"
  )
  assert (len(train), len(test)) == (30, 20)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
  files = tmp_path / "files"
  files.mkdir()
  _write_idx(files / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
  with pytest.raises(FileNotFoundError) as info:
    input_pipeline.get_datasets(
      "fashion_mnist", data_dir=tmp_path / "tfds", manual_dir=files
    )
  message = str(info.value)
  assert "\n" not in message
  assert str(files) in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert not (tmp_path / "tfds" / "fashion_mnist").exists()
