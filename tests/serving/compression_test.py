"""Tests for official/puppet_cnn/serving/compression.py."""

import keras
import numpy as np
import pytest

from official.puppet_cnn.serving import compression
from official.puppet_cnn.serving import model_size


def test_prune_array_zeroes_exactly_the_smallest():
  values = np.array([[-1.0, 9.0, -3.0], [4.0, -0.5, 6.0], [2.0, -8.0, 7.0], [5.0, 10.0, 0.1]])
  pruned = compression.prune_array(values, 0.5)
  # 12 values: the 6 smallest magnitudes are 0.1, 0.5, 1, 2, 3, 4.
  want = np.array([[0, 9, 0], [0, 0, 6], [0, -8, 7], [5, 10, 0]], dtype=float)
  np.testing.assert_array_equal(pruned, want)
  assert values[0, 0] == -1.0  # the input is not modified
  assert np.count_nonzero(compression.prune_array(values, 0.9)) == 2  # floor(10.8) zeroed
  with pytest.raises(ValueError, match="sparsity"):
    compression.prune_array(values, 1.0)


def _conv_dense():
  inputs = keras.Input((6, 6, 2))
  x = keras.layers.Conv2D(4, 3, name="conv")(inputs)         # kernel 72, bias 4
  x = keras.layers.BatchNormalization(name="bn")(x)          # 16
  x = keras.layers.Flatten()(x)                              # 64
  return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))  # kernel 192, bias 3


def test_magnitude_prune_only_kernels_per_layer():
  keras.utils.set_random_seed(0)
  model = _conv_dense()
  for w in model.weights:  # non-zero biases and BN values, to see that they are kept
    w.assign(np.random.default_rng(1).uniform(0.5, 1.0, w.shape).astype(w.dtype))
  before = {w.path: w.numpy().copy() for w in model.weights}
  stats = compression.magnitude_prune(model, 0.9)
  assert stats == {"kernels": 2, "kernel_params": 72 + 192, "zeroed": 64 + 172}
  after = {w.path: w.numpy() for w in model.weights}
  assert np.count_nonzero(after["conv/kernel"]) == 72 - 64
  assert np.count_nonzero(after["fc/kernel"]) == 192 - 172
  for path in before:
    if not path.endswith("kernel"):
      np.testing.assert_array_equal(after[path], before[path])


def test_quantize_int8_dense_by_hand():
  inputs = keras.Input((4,))
  model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(inputs))
  x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
  want = model(x).numpy()
  paths = compression.quantize_int8(model)
  assert paths == ["fc/kernel"]
  # int8 kernel 12 bytes + float32 per-output-channel scale 3 x 4 + float32 bias 3 x 4.
  assert model_size.stored_weight_bytes(model) == 12 + 12 + 12
  np.testing.assert_allclose(model(x).numpy(), want, atol=0.05)


def test_quantize_int8_conv_only_model_is_refused():
  inputs = keras.Input((6, 6, 2))
  model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
  with pytest.raises(ValueError, match="no layer Keras can quantize"):
    compression.quantize_int8(model)


def test_ideal_int8_bytes_by_hand():
  model = _conv_dense()
  # Kernels: 72 + 4 scales*4 and 192 + 3 scales*4; the rest float32: (4 + 16 + 3) * 4.
  assert compression.ideal_int8_bytes(model) == (72 + 16) + (192 + 12) + 23 * 4
