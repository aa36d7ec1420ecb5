"""CIFAR-scale AlexNet (Krizhevsky et al., 2012) baseline.

Exact variant (no BatchNorm, no LRN, no grouping), for an HxWxC input:

  conv1  3x3/1 "same", 64  + ReLU -> max-pool 3x3/2 ("valid", overlapping)
  conv2  3x3/1 "same", 192 + ReLU -> max-pool 3x3/2
  conv3  3x3/1 "same", 384 + ReLU
  conv4  3x3/1 "same", 256 + ReLU
  conv5  3x3/1 "same", 256 + ReLU -> max-pool 3x3/2
  flatten (32x32 input: 32 -> 15 -> 7 -> 3, i.e. 3*3*256 = 2304 features)
  dropout 0.5 -> Dense 256 + ReLU -> dropout 0.5 -> Dense 256 + ReLU
  -> Dense num_classes (logits)

i.e. torchvision's AlexNet layout (overlapping 3x3/2 pools, dropout before
each hidden FC layer) with every kernel shrunk to 3x3 at stride 1 and the
4096-wide classifier shrunk to 256. For 32x32x3 inputs and 10 classes this
has 2,910,026 parameters = 11.64 MB in float32, matching the 11.65 MB that
the Puppet-CNN paper reports for AlexNet. Inputs must be at least 15x15 so
that the three valid 3x3/2 pools leave >= 1 pixel.
"""

from __future__ import annotations

from typing import Optional

import keras

from official.puppet_cnn.baselines import pixel_normalization
from official.puppet_cnn.baselines import validation

CONV_FILTERS = (64, 192, 384, 256, 256)
POOL_AFTER = (1, 2, 5)  # 1-based conv indices followed by a max-pool.
MIN_SPATIAL = 15


def build_alexnet(num_classes: int,
                  input_shape=(32, 32, 3),
                  hidden_units: int = 256,
                  dropout: float = 0.5,
                  mean=pixel_normalization.CIFAR10_MEAN,
                  std=pixel_normalization.CIFAR10_STD,
                  name: Optional[str] = "alexnet_cifar") -> keras.Model:
  """Builds the CIFAR-scale AlexNet returning logits of shape (num_classes,).

  Args:
    num_classes: number of output logits (>= 2).
    input_shape: (H, W, C) of the raw [0, 255] images, H, W >= 15.
    hidden_units: width of the two hidden Dense layers.
    dropout: dropout rate before each hidden Dense layer.
    mean, std: per-channel statistics for `PixelNormalization`.
    name: model name.
  """
  num_classes = validation.check_num_classes(num_classes)
  input_shape = validation.check_input_shape(
      input_shape, MIN_SPATIAL, "AlexNet")
  if int(hidden_units) < 1:
    raise ValueError(f"`hidden_units` must be >= 1, got {hidden_units}.")
  if not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")

  inputs = keras.Input(shape=input_shape, name="images")
  x = pixel_normalization.normalize_pixels(inputs, mean, std)
  for i, filters in enumerate(CONV_FILTERS, start=1):
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                            name=f"conv{i}")(x)
    if i in POOL_AFTER:
      x = keras.layers.MaxPooling2D(3, strides=2, padding="valid",
                                    name=f"pool{i}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  for j in (1, 2):
    x = keras.layers.Dropout(dropout, name=f"dropout{j}")(x)
    x = keras.layers.Dense(int(hidden_units), activation="relu",
                           name=f"fc{j}")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name=name)
