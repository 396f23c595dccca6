"""Input pipeline: TFDS random-access data sources and a NumPy batch iterator.

Data is read with ``tfds.data_source`` (ArrayRecord files, no TensorFlow
needed) and batched on the host as NumPy arrays, images on the [0, 1] pixel
scale. ``digits`` (`Digits`) and ``fashion_mnist`` (`FashionMnistFromFiles`)
are prepared offline on first use; the other `DATASETS` must be prepared in the
``array_record`` format, or downloaded with ``download=True``.

Example::

  train, test, meta = input_pipeline.get_datasets("digits")
  train = input_pipeline.load_split(train)  # Small: decode once, keep in memory.
  for batch in input_pipeline.iterate(train, 64, seed=0, epoch=0):
    ...
"""

import dataclasses
import functools
import gzip
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from sklearn import datasets as sklearn_datasets
from tensorflow_datasets.image_classification import mnist as tfds_mnist

Batch = dict[str, np.ndarray]
"""``{'image': float32 [B, H, W, C] on [0, 1], 'label': int32 [B]}``."""

Examples = Sequence[Mapping[str, Any]]
"""A random-access data source of examples (``tfds.data_source``)."""

Source = Examples | Batch
"""A data source, or a whole split in memory."""

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """What a model needs to know about a dataset (pixel statistics on [0, 1])."""

  name: str
  num_classes: int
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Statistics of the training splits, pixels scaled to [0, 1]. The digits values
# come from the split defined by `Digits` (tests check them against the data).
_CIFAR = (32, 32, 3)
_METADATA = {
  m.name: m
  for m in (
    DatasetMetadata("digits", 10, (8, 8, 1), (0.3059,), (0.3762,)),
    DatasetMetadata("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,)),
    DatasetMetadata("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,)),
    DatasetMetadata(
      "cifar10", 10, _CIFAR, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    DatasetMetadata(
      "cifar100", 100, _CIFAR, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
  )
}

DATASETS = tuple(_METADATA)
"""Names accepted by `get_datasets` and `get_metadata`."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's package ``dataset-fashion-mnist`` installs the idx files."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared (in the ``array_record`` format) under data_dir."""


class Digits(tfds.core.GeneratorBasedBuilder):
  """The UCI 8x8 handwritten digits of ``sklearn.datasets.load_digits``.

  Pixel counts 0..16 stored as ``uint8`` ``round(x * 255 / 16)``; in the order
  of ``np.random.RandomState(0).permutation(1797)``, the first 36 images of each
  class form ``test``, the other 1,437 ``train``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # What TFDS would find itself, were it not for a lookup that needs the
  # `importlib_resources` backport for builders defined inside a package.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Optical recognition of handwritten digits, 8x8 images, as bundled "
        "with scikit-learn (sklearn.datasets.load_digits)."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
      homepage=(
        "https://archive.ics.uci.edu/dataset/80/"
        "optical+recognition+of+handwritten+digits"
      ),
      citation=(
        "@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, "
        "title={Optical Recognition of Handwritten Digits}, year={1998}, "
        "howpublished={UCI Machine Learning Repository}, "
        "doi={10.24432/C50P49}}"
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    digits = sklearn_datasets.load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    test = np.concatenate([order[labels[order] == c][:36] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {
      "train": self._generate_examples(images, labels, train),
      "test": self._generate_examples(images, labels, np.sort(test)),
    }

  def _generate_examples(self, images, labels, indices):
    # PIL images: TFDS would encode NumPy ones with TensorFlow, not installed.
    for i in indices:
      yield int(i), {"image": PIL.Image.fromarray(images[i]), "label": int(labels[i])}


class FashionMnistFromFiles(tfds_mnist.FashionMNIST, skip_registration=True):
  """TFDS's ``fashion_mnist`` (version 3.0.1), prepared from local idx files.

  The dataset of TFDS's own builder, read from the `FILES` (gzipped or not) in
  the ``manual_dir`` of the ``download_config`` of ``download_and_prepare``.
  """

  name = "fashion_mnist"
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Install Debian's package with `apt-get install dataset-fashion-mnist` "
    f"(files in {FASHION_MNIST_DIR}), or put the four original idx files of "
    "https://github.com/zalandoresearch/fashion-mnist in manual_dir."
  )
  FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
  }
  """The idx files of each split: ``(images, labels)``, without ``.gz``."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = epath.Path(dl_manager.manual_dir)
    return {
      split: self._generate_examples(*(_find_idx_file(directory, f) for f in files))
      for split, files in self.FILES.items()
    }

  def _generate_examples(self, images_path: epath.Path, labels_path: epath.Path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(
        f"{os.fspath(images_path)!r} holds images of shape {images.shape} and "
        f"{os.fspath(labels_path)!r} labels of shape {labels.shape}; expected "
        "[N, 28, 28] and [N]."
      )
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": PIL.Image.fromarray(image), "label": int(label)}


def _find_idx_file(directory: epath.Path, name: str) -> epath.Path:
  """``name.gz`` or ``name`` in ``directory``; a one-line error says how to get it."""
  for path in (directory / f"{name}.gz", directory / name):
    if path.exists():
      return path
  raise FileNotFoundError(
    f"Fashion-MNIST is not in {os.fspath(directory)!r} (no {name}): install it "
    "with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or, "
    "where there is internet, call get_datasets('fashion_mnist', download=True)."
  )


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an unsigned-byte idx file (the MNIST format, ``.gz`` or not)."""
  path = epath.Path(path)
  raw = path.read_bytes()
  if path.name.endswith(".gz"):
    raw = gzip.decompress(raw)
  # Two zero bytes, type 0x08 (unsigned byte), the number of dimensions d, d
  # big-endian int32 sizes, then the data in C order.
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
    raise ValueError(
      f"{os.fspath(path)!r} is not an unsigned-byte idx file (header {raw[:4]!r})."
    )
  ndim = raw[3]
  shape = tuple(int(n) for n in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != np.prod(shape):
    raise ValueError(
      f"{os.fspath(path)!r} announces shape {shape} but holds {data.size} values."
    )
  return data.reshape(shape)


def get_metadata(name: str) -> DatasetMetadata:
  """Returns the `DatasetMetadata` of one of `DATASETS`, else a ValueError."""
  if name not in _METADATA:
    raise ValueError(f"Unknown dataset name={name!r}; expected one of {DATASETS}.")
  return _METADATA[name]


def get_datasets(
  name: str, data_dir: PathLike | None = None, *, download: bool = False,
  manual_dir: PathLike = FASHION_MNIST_DIR,
) -> tuple[Examples, Examples, DatasetMetadata]:  # fmt: skip
  """``(train_source, test_source, metadata)`` of one of `DATASETS`.

  The sources (``tfds.data_source``) hold a ``uint8`` ``'image'`` ``[H, W, C]``
  and an integer ``'label'``. ``download`` lets TFDS download and prepare a
  missing dataset (with TensorFlow); ``manual_dir`` holds the Fashion-MNIST idx
  files. Raises `DatasetNotFoundError` (or, for ``fashion_mnist``,
  FileNotFoundError) where the data is neither prepared nor downloaded.
  """
  metadata = get_metadata(name)
  if name == "fashion_mnist":
    _prepare_fashion_mnist(data_dir, manual_dir, download=download)
  prepare = download or name == "digits"
  try:
    train, test = tfds.data_source(
      name, split=["train", "test"], data_dir=data_dir, download=prepare,
      builder_kwargs={"file_format": "array_record"} if prepare else None,
    )  # fmt: skip
  except (KeyError, NotImplementedError):
    # TFDS's ways of saying "no splits prepared here" and "prepared, but in a
    # format without random access".
    raise DatasetNotFoundError(_not_prepared_message(name, data_dir)) from None
  return train, test, metadata


def _prepare_fashion_mnist(data_dir, manual_dir, *, download: bool) -> None:
  """Prepares ``fashion_mnist`` from ``manual_dir``, unless TFDS may download it."""
  builder = FashionMnistFromFiles(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return
  try:
    for files in FashionMnistFromFiles.FILES.values():
      for file in files:
        _find_idx_file(epath.Path(manual_dir), file)
  except FileNotFoundError:
    if download:
      return
    raise
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  builder.download_and_prepare(download_config=config)


def _not_prepared_message(name: str, data_dir: PathLike | None) -> str:
  builder = tfds.builder(name, data_dir=data_dir)
  version_dir = os.fspath(builder.data_path)
  root = builder.data_path.parent.parent
  if builder.is_prepared():
    return (
      f"Dataset {name!r} is prepared in {version_dir!r}, but in the "
      f"{builder.info.file_format.value} format, which has no random access. "
      "Convert it (this needs TensorFlow) with\n"
      f"    tfds convert_format --dataset_version_dir={version_dir} "
      "--out_file_format=array_record"
    )
  return (
    f"Dataset {name!r} is not prepared under data_dir={os.fspath(root)!r} "
    f"(looked in {version_dir!r}) and download=False. To get it, "
    "on a machine with internet access and TensorFlow installed run\n"
    f"    tfds build {name} --data_dir=DIR --file_format=array_record\n"
    f"and copy DIR/{name} to {os.fspath(root / name)!r}; or call "
    f"get_datasets({name!r}, data_dir=..., download=True) where downloads work."
  )


def iterate(
  source: Source, batch_size: int, *, seed: int = 0, epoch: int = 0,
  shuffle: bool = True, drop_remainder: bool = True,
) -> Iterator[Batch]:  # fmt: skip
  """Yields the batches of one epoch of a data source or a `load_split` split.

  The order is ``np.random.default_rng((seed, epoch)).permutation``, or that of
  ``source`` where ``shuffle=False``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got batch_size={batch_size}.")
  num_examples = len(source["label"]) if isinstance(source, Mapping) else len(source)
  order = _order(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
  stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
  for start in range(0, stop, batch_size):
    yield _read(source, order[start : start + batch_size])


def batch_at(split: Batch, batch_size: int, seed: int, step: int) -> Batch:
  """The batch of step ``step`` of `iterate`'s epochs, one after the other."""
  epoch, i = divmod(step, len(split["label"]) // batch_size)
  order = _order(len(split["label"]), seed, epoch)
  return _read(split, order[i * batch_size : (i + 1) * batch_size])


def hold_out(split: Batch, num_examples: int) -> tuple[Batch, Batch]:
  """``(rest, held_out)``: ``num_examples`` set aside, the same draw in every run.

  Both parts keep ``split``'s order.
  """
  n = len(split["label"])
  if not 0 < num_examples < n:
    raise ValueError(
      f"num_examples={num_examples} must lie between 1 and {n - 1} (the split has "
      f"{n} examples)"
    )
  held = np.zeros(n, bool)
  held[np.random.default_rng(0).permutation(n)[:num_examples]] = True
  return _read(split, np.flatnonzero(~held)), _read(split, np.flatnonzero(held))


@functools.lru_cache(maxsize=1)
def load(name: str, data_dir: PathLike | None = None) -> tuple[Batch, Batch, Any]:
  """`get_datasets`, decoded; the last dataset read stays in memory."""
  train, test, meta = get_datasets(name, data_dir)
  return load_split(train), load_split(test), meta


def splits(
  name: str, data_dir: PathLike | None = None, validation: int = 0,
  evaluate_on: str = "test",
) -> tuple[Batch, Batch, Any]:  # fmt: skip
  """The training split, the evaluation split and the metadata of ``name``.

  ``validation`` training examples are held out (`hold_out`): the evaluation
  split where ``evaluate_on="validation"``.
  """
  train, test, meta = load(name, data_dir)
  if validation:
    try:
      train, held = hold_out(train, validation)
    except ValueError as error:
      raise ValueError(f"validation={validation}: {error}") from error
    test = held if evaluate_on == "validation" else test
  return train, test, meta


@functools.lru_cache(maxsize=4)
def _order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


def load_split(source: Examples, *, batch_size: int = 1024) -> Batch:
  """Reads and decodes a whole (small) data source, ``batch_size`` at a time."""
  batches = list(iterate(source, batch_size, shuffle=False, drop_remainder=False))
  return {key: np.concatenate([b[key] for b in batches]) for key in ("image", "label")}


def _read(source: Source, indices: np.ndarray) -> Batch:
  if isinstance(source, Mapping):
    return {key: source[key][indices] for key in ("image", "label")}
  keys = indices.tolist()
  getitems = getattr(source, "__getitems__", None)
  records = getitems(keys) if getitems is not None else [source[k] for k in keys]
  images = np.stack([np.asarray(r["image"]) for r in records])
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  return {"image": images.astype(np.float32) / np.float32(255), "label": labels}
