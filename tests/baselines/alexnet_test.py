"""Tests for official.puppet_cnn.baselines.alexnet."""

import keras
import numpy as np
import pytest

from official.puppet_cnn.baselines import alexnet


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_parameter_count_by_hand():
  model = alexnet.build_alexnet(10)
  assert model.name == "alexnet_cifar"
  convs = (3 * 3 * 3 * 64 + 64          # conv1
           + 3 * 3 * 64 * 192 + 192     # conv2
           + 3 * 3 * 192 * 384 + 384    # conv3
           + 3 * 3 * 384 * 256 + 256    # conv4
           + 3 * 3 * 256 * 256 + 256)   # conv5
  # 32 -> pool 15 -> pool 7 -> pool 3: flatten 3*3*256 = 2304.
  fcs = (2304 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
  assert _count(model.weights) == convs + fcs == 2_910_026
  assert model.get_layer("flatten").output.shape == (None, 2304)


def test_forward_and_train_step():
  keras.utils.set_random_seed(0)
  model = alexnet.build_alexnet(3, (15, 15, 3), hidden_units=8, dropout=0.0)
  x = np.random.default_rng(0).integers(0, 256, (6, 15, 15, 3),
                                        dtype=np.uint8)
  y = np.array([0, 1, 2, 0, 1, 2])
  assert np.asarray(model(x)).shape == (6, 3)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  losses = [float(model.train_on_batch(x, y)) for _ in range(15)]
  assert losses[-1] < losses[0]


def test_too_small_input_raises():
  with pytest.raises(ValueError, match="at least 15x15"):
    alexnet.build_alexnet(10, (14, 14, 3))
