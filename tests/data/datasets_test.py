"""Tests for official.puppet_cnn.data.datasets."""

import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from official.puppet_cnn.data import cifar
from official.puppet_cnn.data import datasets
from official.puppet_cnn.data import splits as splits_lib
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.data.errors import DataError
from tests.data import fake_data


def _batches(ds):
  return [(x.numpy(), y.numpy()) for x, y in ds]


def _concat(ds):
  xs, ys = zip(*_batches(ds))
  return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def real_dir():
  data_dir = fake_data.real_cifar10_dir()
  if data_dir is None:
    pytest.skip("real CIFAR-10 not found: set PUPPET_CNN_DATA_DIR or put "
                "cifar-10-python.tar.gz in <repo>/../shared/data")
  return data_dir


@pytest.fixture(scope="module")
def real_arrays(real_dir):
  return cifar.load_cifar("cifar10", real_dir)


@pytest.fixture(scope="module")
def paper10(real_dir):
  """The paper's CIFAR-10 protocol on the real archive, no limit."""
  return datasets.build_datasets(DataConfig(
      dataset="cifar10", data_dir=real_dir, train_subset=10000,
      val_fraction=0.2, seed=0, batch_size=128, eval_batch_size=1000))


def test_paper_cifar10_protocol_counts(paper10, real_arrays):
  s = paper10
  assert (s.num_train, s.num_val, s.num_test) == (8000, 2000, 10000)
  assert s.num_classes == 10 and s.class_names[0] == "airplane"
  assert s.image_shape == (32, 32, 3)
  assert s.steps_per_epoch == 8000 // 128
  x_test, y_test = _concat(s.test)
  # Every test image is counted, in the original order.
  np.testing.assert_array_equal(x_test, real_arrays[2])
  np.testing.assert_array_equal(y_test, real_arrays[3])
  _, y_val = _concat(s.val)
  np.testing.assert_array_equal(np.bincount(y_val), [200] * 10)
  train_batches = _batches(s.train)
  assert len(train_batches) == 62
  assert all(x.shape == (128, 32, 32, 3) for x, _ in train_batches)
  y_train = np.concatenate([y for _, y in train_batches])
  # 8000 = 62 * 128 + 64: the 64 dropped ones leave at most 64 missing.
  counts = np.bincount(y_train, minlength=10)
  assert counts.sum() == 7936 and counts.min() >= 800 - 64
  assert counts.max() <= 800


def test_validation_images_come_from_the_seeded_subset(paper10, real_arrays):
  x_train_all, y_train_all = real_arrays[:2]
  pool = splits_lib.class_balanced_subset(y_train_all, 10000, seed=0)
  _, val_idx = splits_lib.train_val_split(y_train_all, 0.2, seed=0,
                                          indices=pool)
  x_val, y_val = _concat(paper10.val)
  np.testing.assert_array_equal(x_val, x_train_all[val_idx])
  np.testing.assert_array_equal(y_val, y_train_all[val_idx])


def test_limited_real_build_static_shapes(real_dir):
  s = datasets.build_datasets(DataConfig(
      dataset="cifar10", data_dir=real_dir, train_subset=10000, limit=300,
      batch_size=64))
  assert (s.num_train, s.num_val, s.num_test) == (300, 300, 300)
  x_spec, y_spec = s.train.element_spec
  assert x_spec.shape.as_list() == [64, 32, 32, 3]
  assert x_spec.dtype == tf.uint8 and y_spec.dtype == tf.int32
  assert s.test.element_spec[0].shape.as_list() == [None, 32, 32, 3]
  assert len(_batches(s.train)) == 4  # 300 // 64, remainder dropped.
  sizes = [x.shape[0] for x, _ in _batches(s.test)]
  assert sizes == [64, 64, 64, 64, 44]  # Remainder kept.
  x, _ = _batches(s.train)[0]
  # Not normalized: raw pixels in [0, 255].
  assert x.dtype == np.uint8 and x.max() > 200


def test_same_seed_same_batches_and_reshuffle_per_epoch(real_dir):
  config = DataConfig(dataset="cifar10", data_dir=real_dir, limit=256,
                      batch_size=32, seed=3)
  a = datasets.build_datasets(config)
  b = datasets.build_datasets(config)
  epoch_a1, epoch_a2 = _concat(a.train), _concat(a.train)
  epoch_b1 = _concat(b.train)
  np.testing.assert_array_equal(epoch_a1[0], epoch_b1[0])
  np.testing.assert_array_equal(epoch_a1[1], epoch_b1[1])
  # The next epoch is reshuffled, over the same examples.
  assert not np.array_equal(epoch_a1[1], epoch_a2[1]) or not np.array_equal(
      epoch_a1[0], epoch_a2[0])
  np.testing.assert_array_equal(np.sort(epoch_a1[1]), np.sort(epoch_a2[1]))
  # Evaluation order never changes.
  np.testing.assert_array_equal(_concat(a.test)[0], _concat(a.test)[0])
  other = datasets.build_datasets(
      DataConfig(dataset="cifar10", data_dir=real_dir, limit=256,
                 batch_size=32, seed=4))
  assert not np.array_equal(_concat(other.train)[1], epoch_a1[1])


# ---------------------------------------------------------------------------
# Fake CIFAR: augmentation and plumbing, no real data needed.


@pytest.fixture
def fake_dir(tmp_path):
  payloads = fake_data.make_cifar10_batches(num_per_batch=40)[0]
  fake_data.write_folder(str(tmp_path / "cifar-10-batches-py"), payloads)
  return str(tmp_path)


def _is_crop_of_padded(augmented, original, pad=4):
  padded = np.pad(original, [(pad, pad), (pad, pad), (0, 0)])
  for flipped in (padded, padded[:, ::-1]):
    for top in range(2 * pad + 1):
      for left in range(2 * pad + 1):
        if np.array_equal(flipped[top:top + 32, left:left + 32], augmented):
          return True
  return False


def test_augmentation_is_padded_crop_plus_flip_and_reproducible(fake_dir):
  config = DataConfig(data_dir=fake_dir, augment=True, batch_size=16,
                      val_fraction=0.2, seed=1)
  a = datasets.build_datasets(config)
  b = datasets.build_datasets(config)
  plain = datasets.build_datasets(DataConfig(
      data_dir=fake_dir, augment=False, batch_size=16, val_fraction=0.2,
      seed=1))
  xa, ya = _concat(a.train)
  xb, _ = _concat(b.train)
  xp, yp = _concat(plain.train)
  assert a.train.element_spec[0].shape.as_list() == [16, 32, 32, 3]
  assert xa.dtype == np.uint8
  np.testing.assert_array_equal(xa, xb)  # Same seed, same augmentation.
  np.testing.assert_array_equal(ya, yp)  # Same shuffle as without augment.
  assert not np.array_equal(xa, xp)
  for aug, orig in zip(xa[:24], xp[:24]):
    assert _is_crop_of_padded(aug, orig)
  # A later epoch draws new crops.
  assert not np.array_equal(_concat(a.train)[0], xa)
  # Evaluation data is not augmented.
  np.testing.assert_array_equal(_concat(a.test)[0], _concat(plain.test)[0])


def test_env_var_used_when_data_dir_is_none(fake_dir, monkeypatch):
  monkeypatch.setenv(cifar.DATA_DIR_ENV_VAR, fake_dir)
  s = datasets.build_datasets(DataConfig(batch_size=8))
  assert (s.num_train, s.num_val, s.num_test) == (160, 40, 40)


def test_val_fraction_zero_and_too_small_train(fake_dir):
  s = datasets.build_datasets(DataConfig(data_dir=fake_dir, val_fraction=0.0,
                                         batch_size=8))
  assert s.val is None and s.num_val == 0 and s.num_train == 200
  with pytest.raises(DataError, match="batch_size=512"):
    datasets.build_datasets(DataConfig(data_dir=fake_dir, batch_size=512))
  with pytest.raises(DataError, match="train_subset=1000 exceeds"):
    datasets.build_datasets(DataConfig(data_dir=fake_dir, train_subset=1000))


def test_missing_data_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path)):
    datasets.build_datasets(DataConfig(data_dir=str(tmp_path)))
  with pytest.raises(DataError, match="needs data_dir"):
    datasets.build_datasets(DataConfig(dataset="image_folder"))


@pytest.mark.parametrize("kwargs", [
    dict(dataset="imagenet"),
    dict(dataset="cifar10", image_size=64),
    dict(dataset="cifar10", label_mode="coarse"),
    dict(val_fraction=1.0),
    dict(batch_size=0),
    dict(limit=0),
    dict(dataset="image_folder", val_fraction=0.5, test_fraction=0.5),
])
def test_config_validation(kwargs):
  with pytest.raises(ValueError):
    DataConfig(**kwargs)


# ---------------------------------------------------------------------------
# Image folder.


@pytest.fixture
def color_tree(tmp_path):
  """3 classes x 10 images; class c is a constant color, image i shifts it."""
  root = tmp_path / "tree"
  colors = {"cat": (200, 0, 0), "dog": (0, 200, 0), "eel": (0, 0, 200)}
  for name, color in colors.items():
    os.makedirs(root / name)
    for i in range(10):
      value = tuple(c + i for c in color)
      Image.new("RGB", (20 + i, 16), value).save(root / name / f"{i}.png")
  return str(root)


def test_image_folder_8_1_1_split(color_tree):
  s = datasets.build_datasets(DataConfig(
      dataset="image_folder", data_dir=color_tree, image_size=8,
      val_fraction=0.1, test_fraction=0.1, batch_size=4))
  assert (s.num_train, s.num_val, s.num_test) == (24, 3, 3)
  assert s.class_names == ("cat", "dog", "eel")
  assert s.image_shape == (8, 8, 3)
  seen = []
  for split in (s.train, s.val, s.test):
    x, y = _concat(split)
    for image, label in zip(x, y):
      channel = int(label)
      # Each image is constant and its dominant channel matches its label.
      assert (image == image[0, 0]).all()
      assert image[0, 0].argmax() == channel
      seen.append((channel, int(image[0, 0, channel])))
  assert len(set(seen)) == 24 + 3 + 3 - 24 % 4  # Train remainder dropped.
  _, y_test = _concat(s.test)
  np.testing.assert_array_equal(np.bincount(y_test), [1, 1, 1])


def test_image_folder_augment_crops_from_larger_images(tmp_path):
  root = tmp_path / "tree"
  os.makedirs(root / "only")
  # 16x16 images: a 1-pixel red frame around a green 14x14 square. With
  # image_size=14 and augment, images are stored at round(14 * 8 / 7) = 16
  # (no resize here); training takes random 14x14 crops (offsets 0..2, maybe
  # flipped), evaluation the central one (offset 1): pure green.
  source = np.zeros((16, 16, 3), np.uint8)
  source[:, :, 0] = 255
  source[1:15, 1:15] = (0, 255, 0)
  for i in range(4):
    Image.fromarray(source).save(root / "only" / f"{i}.png")
  s = datasets.build_datasets(DataConfig(
      dataset="image_folder", data_dir=str(root), image_size=14,
      augment=True, val_fraction=0.25, test_fraction=0.25, batch_size=1))
  assert (s.num_train, s.num_val, s.num_test) == (2, 1, 1)
  assert s.train.element_spec[0].shape.as_list() == [1, 14, 14, 3]
  assert s.test.element_spec[0].shape.as_list() == [None, 14, 14, 3]
  for split in (s.val, s.test):
    x, _ = _concat(split)
    np.testing.assert_array_equal(x, np.broadcast_to((0, 255, 0), x.shape))
  crops = {(top, left, flip): (source[:, ::-1] if flip else source)[
      top:top + 14, left:left + 14] for top in range(3) for left in range(3)
           for flip in (0, 1)}
  seen = set()
  for _ in range(10):
    x, _ = _concat(s.train)
    for image in x:
      matches = [k for k, crop in crops.items() if np.array_equal(crop, image)]
      assert matches, "a training image is not a 14x14 crop of the source"
      seen.add(tuple(image[:, :, 0].sum(1)) + tuple(image[:, :, 0].sum(0)))
  assert len(seen) > 1  # Crops vary between epochs.


def test_large_arrays_use_a_generator_with_the_same_result(fake_dir,
                                                           monkeypatch):
  config = DataConfig(data_dir=fake_dir, batch_size=16, augment=True, seed=2)
  expected = datasets.build_datasets(config)
  monkeypatch.setattr(datasets, "_MAX_CONSTANT_BYTES", 0)
  got = datasets.build_datasets(config)
  assert got.train.element_spec == expected.train.element_spec
  assert got.test.element_spec == expected.test.element_spec
  for name in ("train", "val", "test"):
    batches_a = _batches(getattr(expected, name))
    batches_b = _batches(getattr(got, name))
    assert len(batches_a) == len(batches_b) > 0
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)
