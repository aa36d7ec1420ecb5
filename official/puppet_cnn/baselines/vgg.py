"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman, 2015) baseline.

The variant used by the common CIFAR training code (kuangliu/pytorch-cifar):
each 3x3 conv (stride 1, "same", with bias) is followed by BN and ReLU, "M"
is a 2x2/2 max-pool, and after the fifth pool (1x1 spatial for 32x32 inputs)
a global average pool and one Dense layer produce the logits. There are no
4096-wide fully connected layers.

Optional `classifier_units` inserts hidden Dense+ReLU layers (with dropout)
before the logits, as in e.g. chengyangfu/pytorch-vgg-cifar10's
512-512 classifier. For reference: VGG-11 with `conv_bias=False` and
`classifier_units=(512, 512)` has 9,753,674 parameters = 39.01 MB, the size
the Puppet-CNN paper lists for VGG; the default (one Dense layer, conv bias)
has 9,231,114 = 36.92 MB.

Configurations (Table 1 of the VGG paper): 'A' = VGG-11 (default),
'B' = VGG-13, 'D' = VGG-16, 'E' = VGG-19; 11/13/16/19 are accepted too.
VGG-11 has 9,231,114 trainable parameters for 10 classes.
BatchNorm uses momentum 0.9 and epsilon 1e-5 (PyTorch's defaults).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import keras

from official.puppet_cnn.baselines import pixel_normalization
from official.puppet_cnn.baselines import validation

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

VGG_CONFIGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M",
          512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
_DEPTH_TO_CONFIG = {11: "A", 13: "B", 16: "D", 19: "E"}


def _resolve_config(config, cfg):
  if cfg is not None:
    cfg = tuple(cfg)
    if not cfg or not all(
        c == "M" or (isinstance(c, numbers.Integral) and not isinstance(c, bool)
                     and c > 0)
        for c in cfg):
      raise ValueError(
          "`cfg` must be a non-empty sequence of positive ints (conv filters) "
          f"and 'M' (max-pool), got {cfg!r}.")
    if all(c == "M" for c in cfg):
      raise ValueError(f"`cfg` must contain at least one conv, got {cfg!r}.")
    return tuple(c if c == "M" else int(c) for c in cfg)
  key = _DEPTH_TO_CONFIG.get(config, config)
  if isinstance(key, str):
    key = key.upper()
  if key not in VGG_CONFIGS:
    raise ValueError(
        f"Unknown VGG config {config!r}; use one of 'A', 'B', 'D', 'E' "
        "(or 11, 13, 16, 19).")
  return VGG_CONFIGS[key]


def build_vgg(num_classes: int,
              input_shape=(32, 32, 3),
              config: Union[str, int] = "A",
              cfg: Optional[Sequence[Union[int, str]]] = None,
              classifier_units: Sequence[int] = (),
              classifier_dropout: float = 0.5,
              conv_bias: bool = True,
              mean=pixel_normalization.CIFAR10_MEAN,
              std=pixel_normalization.CIFAR10_STD,
              name: Optional[str] = None) -> keras.Model:
  """Builds a CIFAR-style VGG-BN returning logits of shape (num_classes,).

  Args:
    num_classes: number of output logits (>= 2).
    input_shape: (H, W, C) of the raw [0, 255] images; H and W must be at
      least 2**(number of pools).
    config: 'A'/'B'/'D'/'E' or 11/13/16/19.
    cfg: explicit layer list (ints = conv filters, 'M' = max-pool) that
      overrides `config`, e.g. for tiny test models.
    classifier_units: widths of hidden Dense+ReLU layers between global
      pooling and the logits (default none: pooling -> logits).
    classifier_dropout: dropout rate before each hidden Dense layer.
    conv_bias: whether the convs (each followed by BN) have a bias.
    mean, std: per-channel statistics for `PixelNormalization`.
    name: model name; defaults to "vgg{depth}_bn_cifar", where depth counts
      the convs plus the 3 FC layers of the original VGG (so 'A' -> vgg11).
  """
  num_classes = validation.check_num_classes(num_classes)
  layers_cfg = _resolve_config(config, cfg)
  num_pools = sum(1 for c in layers_cfg if c == "M")
  input_shape = validation.check_input_shape(input_shape, 2**num_pools, "VGG")
  num_convs = sum(1 for c in layers_cfg if c != "M")
  classifier_units = tuple(int(u) for u in classifier_units)
  if any(u < 1 for u in classifier_units):
    raise ValueError(
        f"`classifier_units` entries must be >= 1, got {classifier_units}.")
  if not 0.0 <= float(classifier_dropout) < 1.0:
    raise ValueError(
        f"`classifier_dropout` must be in [0, 1), got {classifier_dropout}.")
  if name is None:
    name = f"vgg{num_convs + 3}_bn_cifar"

  inputs = keras.Input(shape=input_shape, name="images")
  x = pixel_normalization.normalize_pixels(inputs, mean, std)
  conv_idx, pool_idx = 0, 0
  for c in layers_cfg:
    if c == "M":
      pool_idx += 1
      x = keras.layers.MaxPooling2D(2, strides=2, name=f"pool{pool_idx}")(x)
    else:
      conv_idx += 1
      x = keras.layers.Conv2D(
          c, 3, padding="same", use_bias=conv_bias, kernel_initializer="he_normal",
          name=f"conv{conv_idx}")(x)
      x = keras.layers.BatchNormalization(
          momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn{conv_idx}")(x)
      x = keras.layers.ReLU(name=f"relu{conv_idx}")(x)
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  for j, units in enumerate(classifier_units, start=1):
    x = keras.layers.Dropout(classifier_dropout, name=f"fc{j}_dropout")(x)
    x = keras.layers.Dense(units, activation="relu", name=f"fc{j}")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name=name)
