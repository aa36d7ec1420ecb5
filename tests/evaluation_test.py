"""evaluate_model against numbers worked out by hand for a model with fixed logits."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn import evaluation


class FixedLogits(keras.Model):
  """Returns logits stored in the image's first pixel row (a test double)."""

  def call(self, images, training=None):
    return tf.cast(images[:, 0, 0:4, 0], tf.float32)


def _dataset(images, labels, batch):
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def test_metrics_by_hand():
  # Four images; logits over 4 classes are written into pixels [0, 0:4, 0].
  logits = np.array([[9, 1, 0, 0],    # label 0: top-1 right
                     [1, 9, 5, 0],    # label 2: rank 1 (in top-2, not top-1)
                     [0, 1, 2, 9],    # label 0: rank 3
                     [5, 5, 1, 0]],   # label 1: a tie with class 0 counts against: rank 1
                    np.float32)
  labels = np.array([0, 2, 0, 1])
  images = np.zeros((4, 8, 8, 1), np.float32)
  images[:, 0, 0:4, 0] = logits
  images[3, 4:, :, 0] = 200.0  # a two-level image: H = 0.5 * 1 bit + 0.5 * spectrum entropy
  results = evaluation.evaluate_model(FixedLogits(), _dataset(images, labels, 3), 4,
                                      bucket_edges=(0.0, 0.5, 8.0), top_k=2, verbose=0)
  assert results["num_test_images"] == 4
  assert results["top1"] == 0.25 and results["top2"] == 0.75
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  assert abs(results["loss"] - (-log_softmax[np.arange(4), labels].mean())) < 1e-6
  assert "depth_histogram" not in results  # a baseline has no per-sample depth
  counts = [b["count"] for b in results["accuracy_by_entropy_bucket"]]
  assert sum(counts) == 4


def test_all_equal_logits_are_never_correct():
  images = np.zeros((2, 8, 8, 1), np.float32)  # logits all 0
  results = evaluation.evaluate_model(FixedLogits(), _dataset(images, np.array([0, 3]), 2), 2,
                                      top_k=3, verbose=0)
  assert results["top1"] == 0.0 and results["top3"] == 0.0


class BrokenLogits(FixedLogits):
  """FixedLogits, with logit 0 made NaN where pixel [0, 4] is 1 and +inf where it is 2."""

  def call(self, images, training=None):
    logits = super().call(images)
    flag = tf.cast(images[:, 0, 4, 0], tf.float32)[:, None]
    bad = tf.where(flag == 1.0, np.nan, tf.where(flag == 2.0, np.inf, logits))
    return tf.concat([bad[:, :1], logits[:, 1:]], axis=1)


def test_nan_logits_are_wrong_and_counted():
  logits = np.array([[0, 1, 0, 0], [9, 1, 0, 0], [0, 1, 2, 3]], np.float32)
  images = np.zeros((3, 8, 8, 1), np.float32)
  images[:, 0, 0:4, 0] = logits
  images[0, 0, 4, 0], images[2, 0, 4, 0] = 1.0, 2.0  # image 0: NaN logit, image 2: +inf
  results = evaluation.evaluate_model(BrokenLogits(), _dataset(images, np.array([1, 0, 3]), 3),
                                      3, top_k=2, verbose=0)
  # Only image 1 counts: the NaN row would otherwise rank its label at -1, "inside" the top 2.
  assert results["top1"] == pytest.approx(1 / 3) and results["top2"] == pytest.approx(1 / 3)
  assert results["nonfinite_logits"] == 2


def test_puppet_depth_histogram_and_buckets():
  model = PuppetClassifier(stage_channels=(4,), max_depth=3, num_classes=3,
                           input_shape=(8, 8, 3))
  images = np.zeros((5, 8, 8, 3), np.uint8)           # 3 constant images: H = 0, depth 1
  images[3:] = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3))  # noisy: depth 3
  results = evaluation.evaluate_model(model, _dataset(images, np.zeros(5, np.int32), 2), 5,
                                      bucket_edges=(0.0, 1.0, 8.0), verbose=0)
  assert results["depth_histogram"] == {"1": 3, "3": 2}
  assert results["mean_depth"] == pytest.approx(9 / 5)
  low, high = results["accuracy_by_entropy_bucket"]
  assert (low["count"], low["mean_depth"]) == (3, 1.0)
  assert (high["count"], high["mean_depth"]) == (2, 3.0)


def test_empty_dataset_is_an_error():
  empty = _dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int32), 2)
  with pytest.raises(ValueError, match="empty"):
    evaluation.evaluate_model(FixedLogits(), empty, 0, verbose=0)
