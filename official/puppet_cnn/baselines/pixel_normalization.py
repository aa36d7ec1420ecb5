"""In-model pixel normalization shared by all baseline models.

Every baseline takes raw pixels in [0, 255] (uint8 or float) and normalizes
them inside the graph, so a saved `.keras` model is self-contained:

    x = cast(x, float32) / 255            # keras.layers.Rescaling(1 / 255)
    x = (x - mean) / std                  # PixelNormalization(mean, std)

`PixelNormalization` is a tiny, stateless, registered layer (no weights, no
`adapt()`), so it serializes through `get_config` and runs on any Keras 3
backend.
"""

from __future__ import annotations

import numbers
from typing import Sequence, Union

import keras
from keras import ops

# CIFAR-10 per-channel statistics of pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

FloatOrSeq = Union[float, Sequence[float]]


def _as_float_tuple(value: FloatOrSeq, what: str) -> tuple:
  if isinstance(value, numbers.Real):
    values = (float(value),)
  else:
    try:
      values = tuple(float(v) for v in value)
    except TypeError as e:
      raise ValueError(
          f"PixelNormalization `{what}` must be a float or a sequence of "
          f"floats, got {value!r}.") from e
  if not values:
    raise ValueError(f"PixelNormalization `{what}` must not be empty.")
  return values


@keras.saving.register_keras_serializable(package="puppet_cnn")
class PixelNormalization(keras.layers.Layer):
  """Per-channel `(x - mean) / std` over the last (channels) axis.

  Expects inputs already scaled to [0, 1] (see `normalize_pixels`). `mean` and
  `std` are either one value per channel or a single value broadcast to all
  channels. The layer has no weights.
  """

  def __init__(self,
               mean: FloatOrSeq = CIFAR10_MEAN,
               std: FloatOrSeq = CIFAR10_STD,
               **kwargs):
    super().__init__(**kwargs)
    self.mean = _as_float_tuple(mean, "mean")
    self.std = _as_float_tuple(std, "std")
    if len(self.mean) != len(self.std):
      raise ValueError(
          "PixelNormalization `mean` and `std` must have the same length, got "
          f"{len(self.mean)} and {len(self.std)}.")
    if any(s <= 0.0 for s in self.std):
      raise ValueError(
          f"PixelNormalization `std` values must be > 0, got {self.std}.")

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is not None and len(self.mean) not in (1, channels):
      raise ValueError(
          f"PixelNormalization has {len(self.mean)} mean/std values but the "
          f"input has {channels} channels; pass one value per channel (or a "
          "single value) via `mean=` / `std=`.")
    super().build(input_shape)

  def call(self, inputs):
    x = ops.cast(inputs, self.compute_dtype)
    mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
    std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
    return (x - mean) / std

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update({"mean": list(self.mean), "std": list(self.std)})
    return config


def normalize_pixels(inputs,
                     mean: FloatOrSeq = CIFAR10_MEAN,
                     std: FloatOrSeq = CIFAR10_STD):
  """Applies `Rescaling(1/255)` then `PixelNormalization(mean, std)`.

  `Rescaling` casts its input to float32 (its compute dtype) first, so uint8
  tensors are accepted.
  """
  x = keras.layers.Rescaling(1.0 / 255.0, name="rescale_0_1")(inputs)
  return PixelNormalization(mean=mean, std=std, name="pixel_normalization")(x)
