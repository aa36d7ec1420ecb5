"""Tests for official/puppet_cnn/serving/depth_sample.py."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import depth_sample
from tests.serving import tiny_models


def _fake_test_batch():
  """3 images in CIFAR's row layout: 1024 red, then 1024 green, then 1024 blue values."""
  data = np.zeros((3, 3072), np.uint8)
  data[0] = 128                                                   # constant
  data[1] = np.random.default_rng(0).integers(0, 256, 3072)      # noise
  data[2, 0 * 1024 + 1 * 32 + 2] = 10                             # red at (y=1, x=2)
  data[2, 2 * 1024 + 31 * 32 + 0] = 20                            # blue at (y=31, x=0)
  return data, pickle.dumps({b"data": data, b"labels": [0, 1, 2]}, protocol=2)


def _write_archive(folder, raw):
  with tarfile.open(folder / depth_sample.CIFAR10_ARCHIVE, "w:gz") as tar:
    info = tarfile.TarInfo(depth_sample.CIFAR10_TEST_MEMBER)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def test_loads_the_archive_or_the_extracted_batch(tmp_path):
  data, raw = _fake_test_batch()
  _write_archive(tmp_path, raw)
  images = depth_sample.load_cifar10_test_images(str(tmp_path))
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  assert images[2, 1, 2, 0] == 10 and images[2, 31, 0, 2] == 20
  assert images[2].sum() == 30
  np.testing.assert_array_equal(images[1, :, :, 1].ravel(), data[1, 1024:2048])
  assert len(depth_sample.load_cifar10_test_images(str(tmp_path), count=2)) == 2
  (tmp_path / "x" / "cifar-10-batches-py").mkdir(parents=True)
  (tmp_path / "x" / depth_sample.CIFAR10_TEST_MEMBER).write_bytes(raw)
  np.testing.assert_array_equal(depth_sample.load_cifar10_test_images(str(tmp_path / "x")),
                                images)
  with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
    depth_sample.load_cifar10_test_images(str(tmp_path / "x" / "cifar-10-batches-py" / "y"))


def test_depth_statistics_by_the_paper_formula():
  model = PuppetClassifier(**tiny_models.TINY_PUPPET)
  images = tiny_models.images()[[0, 1, 3]]  # constant: H = 0 -> D = 1; noise -> D = 3
  stats = depth_sample.depth_statistics(model, images, batch_size=2)
  assert stats["count"] == 3 and stats["depth_histogram"] == {1: 1, 3: 2}
  assert stats["mean_depth"] == pytest.approx(7 / 3)
  fixed = PuppetClassifier(depth_adaptation=False, fixed_depth=2, **tiny_models.TINY_PUPPET)
  assert depth_sample.depth_statistics(fixed, images)["depth_histogram"] == {2: 3}
  with pytest.raises(ValueError, match="non-empty batch"):
    depth_sample.depth_statistics(model, images[:0])
