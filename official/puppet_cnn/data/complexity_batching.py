"""Training batches of one complexity bin each (`DataConfig.batch_grouping='complexity_bin'`).

Bucketed training (`execution='bucketed'`) runs the puppeteer once per complexity bin that
occurs in the batch, so a batch of 64 CIFAR-10 images, which falls into 4.74 of 16 bins on
average, pays for about 5 puppeteer trajectories. Grouping the training stream by bin, the way sequence
models bucket by length, makes almost every batch one bin, so every step runs the puppeteer
once. The images, the labels and the epoch's examples are the same; only which images share
a batch changes (docs/benchmarks_grouped.md measures the step and what it does to accuracy).

The pipeline (after shuffling and augmentation, so the bin is that of the image the model
sees):

  1. every image gets its bin, computed exactly as `PuppetClassifier` computes it
     (`complexity_bin_fn`), 256 images at a time;
  2. `group_by_window` fills one window of `batch_size` images per bin and emits it when
     full, so every batch emitted during the epoch holds one bin;
  3. at the end of the epoch each bin's partial window is flushed, and these leftovers are
     merged into full, mixed batches (at most about one per occupied bin) and the last
     `num_examples % batch_size` dropped, exactly as the ungrouped pipeline drops them;
  4. the epoch has `num_examples // batch_size` batches of a static shape (asserted).

The bin is computed in the input pipeline in float32 as the model computes it; an image whose
H lies within float round-off of a bin edge could land in the neighbouring bin in the model
(a batch then runs two trajectories: slower, never wrong).
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.modeling import complexity as complexity_lib

# `DataConfig.batch_grouping` values.
BATCH_GROUPINGS = ("none", "complexity_bin")

# Images whose bins are computed in one vectorized call.
KEY_BATCH = 256


def complexity_bin_fn(model_config: PuppetCNNConfig) -> Callable[[tf.Tensor], tf.Tensor]:
  """`images (B, H, W, C) in [0, pixel_max] -> int32 (B,)`: each image's complexity bin, as
  `PuppetClassifier` bins it in training (its `complexity` settings, `complexity_bins` and
  `complexity_bin_floor`).

  Raises:
    ValueError: the config has no complexity bins (`complexity_bins=0`: every image has its
      own H, so there is nothing to group by).
  """
  c = model_config
  if keras.backend.backend() != "tensorflow":
    raise ValueError(
        "batch_grouping='complexity_bin' computes the bins inside tf.data, which needs "
        f"KERAS_BACKEND=tensorflow (this process runs Keras with {keras.backend.backend()!r})")
  if not c.complexity_bins:
    raise ValueError(
        "batch_grouping='complexity_bin' needs a model with complexity bins "
        "(complexity_bins > 0; with 0 every image has its own H and its own puppeteer "
        "trajectory, so no grouping makes a batch share one)")

  def bins(images):
    h = complexity_lib.image_complexity(tf.cast(images, tf.float32), c.complexity)
    return complexity_lib.config_complexity_bin(h, c)
  return bins


def group_by_key(examples: tf.data.Dataset, key_fn: Callable[[tf.Tensor], tf.Tensor],
                 num_keys: int, batch_size: int, num_examples: int) -> tf.data.Dataset:
  """Batches an epoch of `(image, label)` examples so that each batch shares one key.

  Args:
    examples: one epoch of unbatched `(image, label)` examples, already shuffled.
    key_fn: `images (B, ...) -> int32 (B,)` keys in [0, num_keys), e.g.
      `complexity_bin_fn(config)`.
    num_keys: the number of keys (a key outside [0, num_keys) is an error).
    batch_size: examples per batch.
    num_examples: the examples in one epoch of `examples`; the result has
      `num_examples // batch_size` batches (asserted).

  Returns:
    A dataset of `(images (batch_size, ...), labels (batch_size,))` batches; every batch but
    the last few of the epoch (the merged leftovers of each key) holds a single key.
  """
  if batch_size <= 0 or num_examples < batch_size:
    raise ValueError(f"group_by_key needs 0 < batch_size <= num_examples, got batch_size="
                     f"{batch_size}, num_examples={num_examples}")
  if num_keys <= 0:
    raise ValueError(f"num_keys must be positive, got {num_keys}")

  def with_keys(images, labels):
    keys = tf.cast(key_fn(images), tf.int64)
    ok = tf.reduce_all((keys >= 0) & (keys < num_keys))
    check = tf.debugging.Assert(ok, [f"group_by_key: a key outside [0, {num_keys}):", keys])
    with tf.control_dependencies([check]):
      return images, labels, tf.identity(keys)

  keyed = (examples.batch(KEY_BATCH)
           .map(with_keys, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
           .unbatch())
  grouped = keyed.group_by_window(
      key_func=lambda image, label, key: key,
      reduce_func=lambda key, window: window.batch(batch_size),
      window_size=batch_size)
  # Full windows come out intact when the stream is cut into batch_size again (they are
  # aligned on it: a window is emitted only when full, the partial ones only at the end of
  # the epoch); the partial windows are merged into full batches and the remainder dropped.
  # (Not `Dataset.rebatch`: `tf.distribute` rewrites a distributed dataset's batches and
  # then emits rebatch's partial input batches as they are.)
  batches = (grouped.unbatch().map(lambda image, label, key: (image, label))
             .batch(batch_size, drop_remainder=True))
  return batches.apply(tf.data.experimental.assert_cardinality(num_examples // batch_size))
