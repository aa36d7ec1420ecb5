"""SqueezeNet v1.1 (Iandola et al., 2016) baseline, adapted to 32x32 inputs.

Written here because `keras.applications` has no SqueezeNet. Layout follows
the reference v1.1 (torchvision `squeezenet1_1`):

  conv1 64 -> ReLU -> max-pool 3x3/2
  fire2(16, 64, 64), fire3(16, 64, 64)            -> max-pool 3x3/2
  fire4(32, 128, 128), fire5(32, 128, 128)        -> max-pool 3x3/2
  fire6(48, 192, 192), fire7(48, 192, 192),
  fire8(64, 256, 256), fire9(64, 256, 256)
  dropout 0.5 -> conv10 1x1 num_classes -> ReLU -> global average pool

where fire(s, e1, e3) = squeeze 1x1 conv (s, ReLU) feeding two parallel
expand convs, 1x1 (e1, ReLU) and 3x3 "same" (e3, ReLU), concatenated on the
channel axis. All convs have biases; there is no BatchNorm.

Adaptation to 32x32 (CIFAR): conv1 is 3x3 with stride 1 and "same" padding
(the reference uses 3x3 stride 2 "valid" for 224x224 inputs). The max-pools
use "same" padding, which for even sizes reproduces PyTorch's
`ceil_mode=True` pools: 32 -> 16 -> 8 -> 4. Initialization follows
torchvision: He-uniform for all convs except conv10 ~ N(0, 0.01).

As in the reference, the logits come out of a ReLU (so they are >= 0);
pass `final_relu=False` to drop it. For 10 classes the model has 727,626
parameters.
"""

from __future__ import annotations

from typing import Optional

import keras

from official.puppet_cnn.baselines import pixel_normalization
from official.puppet_cnn.baselines import validation

# (squeeze, expand1x1, expand3x3) for fire2..fire9; "M" = max-pool.
SQUEEZENET_1_1 = (
    "M", (16, 64, 64), (16, 64, 64),
    "M", (32, 128, 128), (32, 128, 128),
    "M", (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256),
)


def fire_module(x, squeeze: int, expand1x1: int, expand3x3: int, name: str):
  """Fire module: 1x1 squeeze -> [1x1 expand, 3x3 expand] -> concatenate.

  Parameters for `c_in` input channels:
    c_in*s + s  +  s*e1 + e1  +  9*s*e3 + e3.
  """
  s = keras.layers.Conv2D(squeeze, 1, activation="relu",
                          kernel_initializer="he_uniform",
                          name=f"{name}_squeeze1x1")(x)
  e1 = keras.layers.Conv2D(expand1x1, 1, activation="relu",
                           kernel_initializer="he_uniform",
                           name=f"{name}_expand1x1")(s)
  e3 = keras.layers.Conv2D(expand3x3, 3, padding="same", activation="relu",
                           kernel_initializer="he_uniform",
                           name=f"{name}_expand3x3")(s)
  return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([e1, e3])


def build_squeezenet(num_classes: int,
                     input_shape=(32, 32, 3),
                     dropout: float = 0.5,
                     final_relu: bool = True,
                     mean=pixel_normalization.CIFAR10_MEAN,
                     std=pixel_normalization.CIFAR10_STD,
                     name: Optional[str] = "squeezenet1_1_cifar"
                     ) -> keras.Model:
  """Builds SqueezeNet v1.1 (32x32 stem) returning (num_classes,) logits.

  Args:
    num_classes: number of output logits (>= 2).
    input_shape: (H, W, C) of the raw [0, 255] images.
    dropout: dropout rate before conv10.
    final_relu: apply the reference ReLU after conv10 (logits >= 0).
    mean, std: per-channel statistics for `PixelNormalization`.
    name: model name.
  """
  num_classes = validation.check_num_classes(num_classes)
  input_shape = validation.check_input_shape(input_shape, 1, "SqueezeNet")
  if not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")

  inputs = keras.Input(shape=input_shape, name="images")
  x = pixel_normalization.normalize_pixels(inputs, mean, std)
  x = keras.layers.Conv2D(64, 3, strides=1, padding="same", activation="relu",
                          kernel_initializer="he_uniform", name="conv1")(x)
  fire_idx, pool_idx = 2, 0
  for spec in SQUEEZENET_1_1:
    if spec == "M":
      pool_idx += 1
      x = keras.layers.MaxPooling2D(3, strides=2, padding="same",
                                    name=f"pool{pool_idx}")(x)
    else:
      x = fire_module(x, *spec, name=f"fire{fire_idx}")
      fire_idx += 1
  x = keras.layers.Dropout(dropout, name="dropout")(x)
  x = keras.layers.Conv2D(
      num_classes, 1,
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
      name="conv10")(x)
  if final_relu:
    x = keras.layers.ReLU(name="conv10_relu")(x)
  outputs = keras.layers.GlobalAveragePooling2D(name="logits")(x)
  return keras.Model(inputs, outputs, name=name)
