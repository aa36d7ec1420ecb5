"""Tests for official.puppet_cnn.baselines.pixel_normalization."""

import keras
import numpy as np
import pytest

from official.puppet_cnn.baselines import PixelNormalization
from official.puppet_cnn.baselines import pixel_normalization

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float64)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float64)


def _images(seed=0, shape=(2, 5, 4, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_defaults_are_cifar10_statistics():
  layer = PixelNormalization()
  np.testing.assert_allclose(layer.mean, CIFAR_MEAN)
  np.testing.assert_allclose(layer.std, CIFAR_STD)


def test_layer_matches_numpy_reference():
  x01 = _images().astype(np.float32) / 255.0
  got = keras.ops.convert_to_numpy(PixelNormalization()(x01))
  # Hand-written reference: channel c -> (x[..., c] - mean[c]) / std[c].
  want = np.empty_like(x01, dtype=np.float64)
  for c in range(3):
    want[..., c] = (x01[..., c] - CIFAR_MEAN[c]) / CIFAR_STD[c]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32


def test_normalize_pixels_from_uint8_matches_numpy_reference():
  x = _images(1)
  inputs = keras.Input(shape=x.shape[1:])
  model = keras.Model(inputs, pixel_normalization.normalize_pixels(inputs))
  got = keras.ops.convert_to_numpy(model(x))
  # Pixel 0 -> -mean/std, pixel 255 -> (1-mean)/std, in between linear.
  want = (x.astype(np.float64) / 255.0 - CIFAR_MEAN) / CIFAR_STD
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # float inputs with the same values give the same result.
  got_f = keras.ops.convert_to_numpy(model(x.astype(np.float32)))
  np.testing.assert_allclose(got_f, got, rtol=0, atol=1e-6)


def test_custom_and_scalar_statistics():
  x = np.array([[[[0.0, 0.5]]]], dtype=np.float32)  # (1, 1, 1, 2)
  got = keras.ops.convert_to_numpy(
      PixelNormalization(mean=(0.5, 0.25), std=(0.5, 0.25))(x))
  np.testing.assert_allclose(got, [[[[(0.0 - 0.5) / 0.5,
                                      (0.5 - 0.25) / 0.25]]]], atol=1e-6)
  got = keras.ops.convert_to_numpy(PixelNormalization(mean=0.5, std=2.0)(x))
  np.testing.assert_allclose(got, [[[[-0.25, 0.0]]]], atol=1e-6)


def test_config_round_trip():
  layer = PixelNormalization(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                             name="pn")
  config = layer.get_config()
  assert config["mean"] == pytest.approx([0.1, 0.2, 0.3])
  assert config["std"] == pytest.approx([0.4, 0.5, 0.6])
  clone = PixelNormalization.from_config(config)
  assert clone.name == "pn"
  assert clone.mean == layer.mean and clone.std == layer.std
  # Through the registered name as used by `.keras` files.
  serialized = keras.saving.serialize_keras_object(layer)
  assert keras.saving.get_registered_name(PixelNormalization) == (
      "puppet_cnn>PixelNormalization")
  restored = keras.saving.deserialize_keras_object(serialized)
  assert isinstance(restored, PixelNormalization)
  x = _images(2).astype(np.float32) / 255.0
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(x)),
                                keras.ops.convert_to_numpy(layer(x)))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="same length"):
    PixelNormalization(mean=(0.5, 0.5), std=(0.5,))
  with pytest.raises(ValueError, match="> 0"):
    PixelNormalization(mean=(0.5,), std=(0.0,))
  with pytest.raises(ValueError, match="channels"):
    PixelNormalization()(np.zeros((1, 2, 2, 1), np.float32))
