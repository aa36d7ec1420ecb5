"""Builds the train / validation / test `tf.data` pipelines.

`build_datasets(DataConfig(...))` loads CIFAR-10, CIFAR-100 or a class-per-
folder image tree, draws the (seeded, class-balanced, stratified) splits of
`splits.py`, and returns a `Splits` with three batched `tf.data.Dataset`s of
`(image, label)`:

  * images are **uint8 in [0, 255]**, NHWC, RGB. The pipeline does NOT
    normalize: every model in this project rescales and normalizes its input
    inside the graph, so a saved model takes raw pixels.
  * labels are int32 class indices (sparse, not one-hot).
  * `train` batches have a fully static shape (`drop_remainder=True`, as XLA
    needs static shapes); the last `num_train % batch_size` examples of each
    epoch are dropped (a different set every epoch, since the training split is
    reshuffled every epoch).
  * `val` and `test` keep the last, smaller batch (`drop_remainder=False`) so
    every validation/test image is counted; their batch dimension is None.
  * with `batch_grouping='complexity_bin'` each training batch holds the
    images of one complexity bin of the model (`complexity_batching.py`),
    except a few merged batches at the end of each epoch.
  * `train` is shuffled with `seed` (reshuffled every epoch, but the sequence
    of epochs is the same for the same seed); `val`/`test` are in a fixed
    order. All three are cached (`cache=True`) and prefetched (AUTOTUNE).

The paper's protocols (see `protocols.paper_data_config`):

  * CIFAR-10: `train_subset=10000` images drawn class-balanced with `seed`,
    `val_fraction=0.2` of them held out -> 8,000 train / 2,000 val; test on the
    full 10,000-image test set.
  * CIFAR-100: all 50,000 train images, `val_fraction=0.2` -> 40,000 / 10,000
    (stratified); test on the 10,000 test images.
  * mini-ImageNet as an image folder: 8:1:1 train/val/test (`val_fraction=0.1`,
    `test_fraction=0.1`, stratified).

Augmentation (`augment=True`, train split only; off by default):

  * CIFAR: zero-pad 4 pixels on each side, random 32x32 crop, random
    horizontal flip.
  * image folder: images are stored with the shorter side resized to
    `round(image_size * 8 / 7)` and center-cropped to that square; training
    takes a random `image_size` crop (plus a random horizontal flip), and
    val/test take the central `image_size` crop (the 256 -> 224 ImageNet
    recipe). With `augment=False` the shorter side is resized straight to
    `image_size` and center-cropped, for every split.

The random crop/flip use stateless ops seeded from
`tf.data.Dataset.random(seed)`, so augmented epochs are reproducible too.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from official.puppet_cnn.data import cifar
from official.puppet_cnn.data import complexity_batching
from official.puppet_cnn.data import image_folder
from official.puppet_cnn.data import splits as splits_lib
from official.puppet_cnn.data.errors import DataError

DATASETS = ("cifar10", "cifar100", "image_folder")

# Default image side when `DataConfig.image_size` is None.
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "image_folder": 64}

# CIFAR augmentation: zero padding on each side before the random crop.
CIFAR_CROP_PADDING = 4

# Image folders with augmentation are stored at image_size * 8 / 7.
RESIZE_RATIO = 8 / 7

# Arrays above this many bytes are fed through a generator instead of being
# embedded as a constant in the tf.data graph (which is limited to 2 GB).
_MAX_CONSTANT_BYTES = 1 << 30


@dataclasses.dataclass
class DataConfig:
  """What data to load and how to batch it.

  Attributes:
    dataset: 'cifar10' (default), 'cifar100' or 'image_folder'.
    data_dir: CIFAR: a directory holding `cifar-10-python.tar.gz` /
      `cifar-100-python.tar.gz` or the extracted folder, the archive itself, or
      the extracted folder itself; None (default): `$PUPPET_CNN_DATA_DIR`,
      else download with TFDS/Keras (see `cifar.load_cifar`). image_folder:
      the root holding one subfolder per class (required).
    image_size: side of the square images fed to the model. None (default):
      32 for CIFAR (the only size allowed for CIFAR), 64 for image_folder.
    label_mode: CIFAR-100 only: 'fine' (default, 100 classes) or 'coarse'.
    train_subset: if set, draw this many training images class-balanced with
      `seed` before the validation split (10000 in the paper's CIFAR-10
      protocol); None (default): use all.
    val_fraction: fraction of the (subset of the) training pool held out,
      stratified, for validation (default 0.2; 0 disables validation and
      `Splits.val` is None).
    test_fraction: image_folder only (CIFAR has its official test split): the
      fraction held out, stratified, for testing (default 0.1; with
      val_fraction=0.1 this is the paper's 8:1:1 split).
    seed: seed of the subset, the splits, the shuffling and the augmentation
      (default 0).
    batch_size: training batch size (default 128).
    eval_batch_size: val/test batch size; None (default): `batch_size`.
    augment: random crop + horizontal flip on the training split (default
      False; see the module docstring for the exact recipe per dataset).
    flip: with `augment`, also flip horizontally at random (default True).
    cache: cache the decoded examples in memory after the first pass
      (default True).
    shuffle_buffer: training shuffle buffer; None (default): the whole
      training split (a full uniform shuffle).
    limit: if set, keep only the first `limit` examples of each split (in
      index order, after subsetting and splitting), for tests and quick runs;
      None (default): everything.
    batch_grouping: 'none' (default; the paper): training batches are drawn
      uniformly from the shuffled split. 'complexity_bin': each training
      batch holds images of one complexity bin of the model (all but a few
      merged batches at the end of each epoch), so bucketed training runs the
      puppeteer once per step instead of once per bin in the batch
      (`complexity_batching.py`; needs `build_datasets(...,
      batch_key_fn=complexity_batching.complexity_bin_fn(model_config))`,
      which `train_lib.run` passes).
  """
  dataset: str = "cifar10"
  data_dir: Optional[str] = None
  image_size: Optional[int] = None
  label_mode: str = "fine"
  train_subset: Optional[int] = None
  val_fraction: float = 0.2
  test_fraction: float = 0.1
  seed: int = 0
  batch_size: int = 128
  eval_batch_size: Optional[int] = None
  augment: bool = False
  flip: bool = True
  cache: bool = True
  shuffle_buffer: Optional[int] = None
  limit: Optional[int] = None
  batch_grouping: str = "none"

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(
          f"dataset must be one of {DATASETS}, got {self.dataset!r}.")
    if self.image_size is not None and (
        int(self.image_size) != self.image_size or self.image_size <= 0):
      raise ValueError(
          f"image_size must be a positive int, got {self.image_size}.")
    if (self.dataset != "image_folder" and self.image_size is not None
        and self.image_size != 32):
      raise ValueError(
          f"{self.dataset} images are 32x32; image_size must be 32 or None, "
          f"got {self.image_size}.")
    if self.label_mode not in cifar.LABEL_MODES:
      raise ValueError(f"label_mode must be one of {cifar.LABEL_MODES}, got "
                       f"{self.label_mode!r}.")
    if self.dataset != "cifar100" and self.label_mode != "fine":
      raise ValueError("label_mode='coarse' only exists for cifar100.")
    if self.train_subset is not None and self.train_subset <= 0:
      raise ValueError(
          f"train_subset must be positive or None, got {self.train_subset}.")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(
          f"val_fraction must lie in [0, 1), got {self.val_fraction}.")
    if not 0.0 <= self.test_fraction < 1.0:
      raise ValueError(
          f"test_fraction must lie in [0, 1), got {self.test_fraction}.")
    if (self.dataset == "image_folder"
        and self.val_fraction + self.test_fraction >= 1.0):
      raise ValueError(
          f"val_fraction + test_fraction = "
          f"{self.val_fraction + self.test_fraction} leaves no training data.")
    if self.batch_grouping not in complexity_batching.BATCH_GROUPINGS:
      raise ValueError(
          f"batch_grouping must be one of {complexity_batching.BATCH_GROUPINGS}, "
          f"got {self.batch_grouping!r}.")
    for name in ("batch_size", "eval_batch_size", "shuffle_buffer", "limit"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")

  @property
  def resolved_image_size(self) -> int:
    return self.image_size or DEFAULT_IMAGE_SIZE[self.dataset]


@dataclasses.dataclass
class Splits:
  """The batched datasets of one `DataConfig`.

  Attributes:
    train: shuffled training batches `(uint8 (B, H, W, 3), int32 (B,))` with
      a static batch size (remainder dropped).
    val: validation batches (remainder kept), or None if `val_fraction` is 0.
    test: test batches (remainder kept).
    num_classes: number of classes.
    class_names: the class names; label i is class_names[i].
    image_shape: (H, W, 3) of the images fed to the model.
    num_train: training examples (the train split has
      `num_train // batch_size` batches per epoch).
    num_val: validation examples.
    num_test: test examples.
    batch_size: training batch size.
  """
  train: tf.data.Dataset
  val: Optional[tf.data.Dataset]
  test: tf.data.Dataset
  num_classes: int
  class_names: Tuple[str, ...]
  image_shape: Tuple[int, int, int]
  num_train: int
  num_val: int
  num_test: int
  batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    """Training batches per epoch (remainder dropped)."""
    return self.num_train // self.batch_size


# --------------------------------------------------------------------------
# tf.data helpers.


def _from_arrays(images: np.ndarray, labels: np.ndarray) -> tf.data.Dataset:
  labels = labels.astype(np.int32)
  if images.nbytes <= _MAX_CONSTANT_BYTES:
    return tf.data.Dataset.from_tensor_slices((images, labels))

  def generate():
    for i in range(images.shape[0]):
      yield images[i], labels[i]

  return tf.data.Dataset.from_generator(
      generate, output_signature=(
          tf.TensorSpec(images.shape[1:], tf.uint8),
          tf.TensorSpec((), tf.int32)))


def _augment_fn(config: DataConfig, stored_size: int, image_size: int):
  """Returns `((image, label), seed) -> (image, label)` for training."""
  pad = CIFAR_CROP_PADDING if config.dataset != "image_folder" else 0

  def augment(example, seed):
    image, label = example
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    if pad or stored_size != image_size:
      image = tf.image.stateless_random_crop(
          image, (image_size, image_size, 3), seed=crop_seed)
    if config.flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image, label

  return augment


def _center_crop_fn(stored_size: int, image_size: int):
  offset = (stored_size - image_size) // 2

  def crop(image, label):
    return image[offset:offset + image_size, offset:offset + image_size], label

  return crop


def _train_pipeline(config: DataConfig, images, labels, stored_size: int,
                    image_size: int, batch_key_fn=None,
                    num_keys: int = 0) -> tf.data.Dataset:
  ds = _from_arrays(images, labels)
  if config.cache:
    ds = ds.cache()
  buffer = config.shuffle_buffer or images.shape[0]
  ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
  if config.augment:
    seeds = tf.data.Dataset.random(
        seed=config.seed, rerandomize_each_iteration=True).batch(
            2, drop_remainder=True)
    ds = tf.data.Dataset.zip((ds, seeds)).map(
        _augment_fn(config, stored_size, image_size),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  elif stored_size != image_size:
    ds = ds.map(_center_crop_fn(stored_size, image_size))
  if config.batch_grouping == "complexity_bin":
    ds = complexity_batching.group_by_key(ds, batch_key_fn, num_keys, config.batch_size,
                                          images.shape[0])
  else:
    ds = ds.batch(config.batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _eval_pipeline(config: DataConfig, images, labels, stored_size: int,
                   image_size: int) -> tf.data.Dataset:
  ds = _from_arrays(images, labels)
  if stored_size != image_size:
    ds = ds.map(_center_crop_fn(stored_size, image_size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if config.cache:
    ds = ds.cache()
  ds = ds.batch(config.eval_batch_size or config.batch_size,
                drop_remainder=False)
  return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Loading and splitting.


def _limit(indices: np.ndarray, limit: Optional[int]) -> np.ndarray:
  return indices if limit is None else indices[:limit]


def _subset(config: DataConfig, labels: np.ndarray) -> Optional[np.ndarray]:
  if config.train_subset is None:
    return None
  if config.train_subset > labels.shape[0]:
    raise DataError(
        f"train_subset={config.train_subset} exceeds the "
        f"{labels.shape[0]} available training images of {config.dataset}.")
  return splits_lib.class_balanced_subset(
      labels, config.train_subset, config.seed)


def _load_cifar_splits(config: DataConfig):
  """Returns (arrays per split, class_names, stored_size)."""
  x_train, y_train, x_test, y_test = cifar.load_cifar(
      config.dataset, config.data_dir, config.label_mode)
  pool = _subset(config, y_train)
  train_idx, val_idx = splits_lib.train_val_split(
      y_train, config.val_fraction, config.seed, indices=pool)
  test_idx = np.arange(y_test.shape[0])
  train_idx, val_idx, test_idx = (
      _limit(i, config.limit) for i in (train_idx, val_idx, test_idx))
  arrays = {
      "train": (x_train[train_idx], y_train[train_idx]),
      "val": (x_train[val_idx], y_train[val_idx]),
      "test": (x_test[test_idx], y_test[test_idx]),
  }
  names = cifar.cifar_class_names(config.dataset, config.label_mode)
  return arrays, names, 32


def _load_image_folder_splits(config: DataConfig):
  """Lists the tree, splits it, then decodes only the selected files."""
  if config.data_dir is None:
    raise DataError(
        "dataset='image_folder' needs data_dir: the root folder holding "
        "<root>/<class_name>/<image>.{png,jpg,...}.")
  image_size = config.resolved_image_size
  stored = (int(round(image_size * RESIZE_RATIO)) if config.augment
            else image_size)
  class_names, files = image_folder.list_image_folder(config.data_dir)
  paths = np.array([p for p, _ in files], dtype=object)
  labels = np.array([label for _, label in files], np.int64)
  pool = _subset(config, labels)
  parts = splits_lib.train_val_test_split(
      labels, config.val_fraction, config.test_fraction, config.seed,
      indices=pool)
  arrays = {}
  for name, idx in zip(("train", "val", "test"), parts):
    idx = _limit(idx, config.limit)
    images = image_folder.load_images(list(paths[idx]), stored, stored)
    arrays[name] = (images, labels[idx])
  return arrays, class_names, stored


def build_datasets(config: DataConfig, batch_key_fn=None,
                   num_keys: int = 0) -> Splits:
  """Loads, splits and batches the data described by `config`.

  Args:
    config: the DataConfig.
    batch_key_fn: with `batch_grouping='complexity_bin'` (required then):
      `images (B, H, W, 3) uint8 -> int32 (B,)` keys in [0, num_keys), each
      training batch holding one key (`complexity_batching.complexity_bin_fn`).
    num_keys: the number of keys of `batch_key_fn` (the model's
      `complexity_bins`).

  Returns:
    A `Splits`.

  Raises:
    DataError: missing, empty or corrupt data, or a split too small for the
      training batch size.
    ValueError: `batch_grouping` set without a `batch_key_fn`.
  """
  if config.batch_grouping != "none" and (batch_key_fn is None or num_keys <= 0):
    raise ValueError(
        f"batch_grouping={config.batch_grouping!r} needs the model's bins: pass "
        "build_datasets(config, batch_key_fn=complexity_batching.complexity_bin_fn("
        "model_config), num_keys=model_config.complexity_bins)")
  if config.dataset == "image_folder":
    arrays, class_names, stored = _load_image_folder_splits(config)
  else:
    arrays, class_names, stored = _load_cifar_splits(config)
  image_size = config.resolved_image_size
  (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
      arrays["train"], arrays["val"], arrays["test"])
  if x_train.shape[0] < config.batch_size:
    raise DataError(
        f"only {x_train.shape[0]} training examples for batch_size="
        f"{config.batch_size} (training drops the remainder, so an epoch "
        "would be empty); lower batch_size or raise limit/train_subset.")
  if x_test.shape[0] == 0:
    raise DataError(f"the test split of {config.dataset} is empty; raise "
                    "test_fraction or limit.")
  if config.val_fraction > 0 and x_val.shape[0] == 0:
    raise DataError(f"the validation split of {config.dataset} is empty; "
                    "raise val_fraction or limit (or set val_fraction=0).")
  train = _train_pipeline(config, x_train, y_train, stored, image_size,
                          batch_key_fn, num_keys)
  val = (_eval_pipeline(config, x_val, y_val, stored, image_size)
         if config.val_fraction > 0 else None)
  test = _eval_pipeline(config, x_test, y_test, stored, image_size)
  result = Splits(
      train=train, val=val, test=test,
      num_classes=len(class_names), class_names=tuple(class_names),
      image_shape=(image_size, image_size, 3),
      num_train=int(x_train.shape[0]), num_val=int(x_val.shape[0]),
      num_test=int(x_test.shape[0]), batch_size=config.batch_size)
  logging.info(
      "%s: %d train (%d batches of %d), %d val, %d test, %d classes, "
      "images %s uint8, augment=%s, batch_grouping=%s, seed=%d.", config.dataset,
      result.num_train, result.steps_per_epoch, config.batch_size,
      result.num_val, result.num_test, result.num_classes, result.image_shape,
      config.augment, config.batch_grouping, config.seed)
  return result
