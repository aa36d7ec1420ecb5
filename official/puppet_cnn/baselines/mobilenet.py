"""MobileNet v1 / v2 / v3-small baselines built on `keras.applications`.

Each model is

  images [0, 255] -> Rescaling(1/255) -> PixelNormalization(mean, std)
  -> keras.applications backbone (weights=None, include_top=False)
  -> GlobalAveragePooling2D -> [Dropout] -> Dense(num_classes) logits

The backbone is nested as a sub-model named e.g. "mobilenet_v2_backbone".
Normalization happens exactly once: `MobileNet` and `MobileNetV2` contain no
preprocessing layers (keras expects `preprocess_input` outside the model),
and `MobileNetV3Small` is built with `include_preprocessing=False` (its
default would add a Rescaling(1/127.5, offset=-1) layer).

`keras.applications` rejects inputs smaller than 32x32; at 32x32 every
backbone downsamples by 32 to a 1x1 feature map. For v3-small the head is
GAP + Dense on the 576-channel last stage, i.e. without keras's own
1024-wide "top" 1x1 conv, which only exists with `include_top=True`.
"""

from __future__ import annotations

from typing import Optional

import keras

from official.puppet_cnn.baselines import pixel_normalization
from official.puppet_cnn.baselines import validation

MIN_SPATIAL = 32

_BACKBONES = {
    "v1": (keras.applications.MobileNet, {}),
    "v2": (keras.applications.MobileNetV2, {}),
    "v3_small": (keras.applications.MobileNetV3Small,
                 {"include_preprocessing": False}),
}


def build_mobilenet(num_classes: int,
                    input_shape=(32, 32, 3),
                    version: str = "v2",
                    alpha: float = 1.0,
                    dropout: float = 0.0,
                    bn_momentum: Optional[float] = 0.9,
                    mean=pixel_normalization.CIFAR10_MEAN,
                    std=pixel_normalization.CIFAR10_STD,
                    name: Optional[str] = None) -> keras.Model:
  """Builds a MobileNet classifier returning logits of shape (num_classes,).

  Args:
    num_classes: number of output logits (>= 2).
    input_shape: (H, W, C) of the raw [0, 255] images, H, W >= 32.
    version: "v1", "v2" or "v3_small".
    alpha: width multiplier passed to keras.applications.
    dropout: dropout rate between global pooling and the logits layer.
    bn_momentum: momentum of every batch norm in the backbone. keras.applications uses
      0.999, which leaves the moving statistics near their initial values after a few
      hundred steps (a MobileNet v2 trained 500 steps on CIFAR-10 then evaluated at exactly
      chance, 10.00%); 0.9 matches the other baselines and Puppet-CNN. None keeps 0.999.
    mean, std: per-channel statistics for `PixelNormalization`.
    name: model name; defaults to "mobilenet_{version}".
  """
  if version not in _BACKBONES:
    raise ValueError(
        f"Unknown MobileNet version {version!r}; use one of "
        f"{sorted(_BACKBONES)}.")
  num_classes = validation.check_num_classes(num_classes)
  input_shape = validation.check_input_shape(
      input_shape, MIN_SPATIAL, f"MobileNet {version}")
  if not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
  if name is None:
    name = f"mobilenet_{version}"

  app_fn, extra_kwargs = _BACKBONES[version]
  backbone = app_fn(
      input_shape=input_shape, alpha=alpha, include_top=False, weights=None,
      pooling=None, name=f"mobilenet_{version}_backbone", **extra_kwargs)
  if bn_momentum is not None:
    for layer in backbone.layers:
      if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = float(bn_momentum)

  inputs = keras.Input(shape=input_shape, name="images")
  x = pixel_normalization.normalize_pixels(inputs, mean, std)
  x = backbone(x)
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  if dropout > 0.0:
    x = keras.layers.Dropout(dropout, name="dropout")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name=name)


def build_mobilenet_v1(num_classes: int,
                       input_shape=(32, 32, 3),
                       alpha: float = 1.0,
                       dropout: float = 0.0,
                       mean=pixel_normalization.CIFAR10_MEAN,
                       std=pixel_normalization.CIFAR10_STD,
                       name: Optional[str] = None) -> keras.Model:
  """MobileNet v1 (Howard et al., 2017); see `build_mobilenet`."""
  return build_mobilenet(num_classes, input_shape, version="v1", alpha=alpha,
                         dropout=dropout, mean=mean, std=std, name=name)


def build_mobilenet_v2(num_classes: int,
                       input_shape=(32, 32, 3),
                       alpha: float = 1.0,
                       dropout: float = 0.0,
                       mean=pixel_normalization.CIFAR10_MEAN,
                       std=pixel_normalization.CIFAR10_STD,
                       name: Optional[str] = None) -> keras.Model:
  """MobileNet v2 (Sandler et al., 2018); see `build_mobilenet`."""
  return build_mobilenet(num_classes, input_shape, version="v2", alpha=alpha,
                         dropout=dropout, mean=mean, std=std, name=name)


def build_mobilenet_v3_small(num_classes: int,
                             input_shape=(32, 32, 3),
                             alpha: float = 1.0,
                             dropout: float = 0.0,
                             mean=pixel_normalization.CIFAR10_MEAN,
                             std=pixel_normalization.CIFAR10_STD,
                             name: Optional[str] = None) -> keras.Model:
  """MobileNet v3-small (Howard et al., 2019); see `build_mobilenet`."""
  return build_mobilenet(num_classes, input_shape, version="v3_small",
                         alpha=alpha, dropout=dropout, mean=mean, std=std,
                         name=name)
