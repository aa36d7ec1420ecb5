"""CIFAR-style ResNet (He et al., 2016) baseline; ResNet-18 by default.

The variant used by the common CIFAR training code (e.g. kuangliu/pytorch-cifar)
and reported as "ResNet-18" in the Puppet-CNN tables:

* stem: 3x3 conv, stride 1, `widths[0]` filters, BN, ReLU -- no 7x7 conv and
  no initial max-pool, so 32x32 inputs keep full resolution in stage 1;
* `len(widths)` stages of BasicBlocks (two 3x3 conv + BN, identity shortcut,
  or 1x1 conv + BN projection when stride or width changes); the first stage
  has stride 1, every later one starts with stride 2;
* global average pooling and a Dense logits layer (no softmax).

Convolutions have no bias (BN follows). BatchNorm uses momentum 0.9 and
epsilon 1e-5 (PyTorch's defaults). With the default widths (64, 128, 256, 512)
and blocks (2, 2, 2, 2) the model has 11,173,962 trainable parameters for 10
classes (plus 9,600 non-trainable BN moving statistics).
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from official.puppet_cnn.baselines import pixel_normalization
from official.puppet_cnn.baselines import validation

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv_bn(x, filters, kernel_size, strides, name, relu):
  x = keras.layers.Conv2D(
      filters, kernel_size, strides=strides, padding="same", use_bias=False,
      kernel_initializer="he_normal", name=f"{name}_conv")(x)
  x = keras.layers.BatchNormalization(
      momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
  if relu:
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
  return x


def basic_block(x, filters: int, strides: int, name: str):
  """ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""
  in_channels = x.shape[-1]
  y = _conv_bn(x, filters, 3, strides, f"{name}_1", relu=True)
  y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
  if strides != 1 or in_channels != filters:
    shortcut = _conv_bn(x, filters, 1, strides, f"{name}_proj", relu=False)
  else:
    shortcut = x
  y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def build_resnet(num_classes: int,
                 input_shape=(32, 32, 3),
                 widths: Sequence[int] = (64, 128, 256, 512),
                 blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
                 mean=pixel_normalization.CIFAR10_MEAN,
                 std=pixel_normalization.CIFAR10_STD,
                 name: Optional[str] = None) -> keras.Model:
  """Builds a CIFAR-style ResNet returning logits of shape (num_classes,).

  Args:
    num_classes: number of output logits (>= 2).
    input_shape: (H, W, C) of the raw [0, 255] images.
    widths: filters per stage; the stem uses `widths[0]`.
    blocks_per_stage: BasicBlocks per stage, same length as `widths`.
    mean, std: per-channel statistics for `PixelNormalization`.
    name: model name; defaults to "resnet{depth}_cifar", depth = 2*blocks+2.
  """
  num_classes = validation.check_num_classes(num_classes)
  input_shape = validation.check_input_shape(input_shape, 1, "ResNet")
  widths = tuple(int(w) for w in widths)
  blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
  if not widths or len(widths) != len(blocks_per_stage):
    raise ValueError(
        "`widths` and `blocks_per_stage` must be non-empty and of equal "
        f"length, got {widths} and {blocks_per_stage}.")
  if min(widths) < 1 or min(blocks_per_stage) < 1:
    raise ValueError(
        "`widths` and `blocks_per_stage` entries must be >= 1, got "
        f"{widths} and {blocks_per_stage}.")
  if name is None:
    name = f"resnet{2 * sum(blocks_per_stage) + 2}_cifar"

  inputs = keras.Input(shape=input_shape, name="images")
  x = pixel_normalization.normalize_pixels(inputs, mean, std)
  x = _conv_bn(x, widths[0], 3, 1, "stem", relu=True)
  for stage, (filters, blocks) in enumerate(zip(widths, blocks_per_stage)):
    for block in range(blocks):
      strides = 2 if (stage > 0 and block == 0) else 1
      x = basic_block(x, filters, strides,
                      name=f"stage{stage + 1}_block{block + 1}")
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name=name)
