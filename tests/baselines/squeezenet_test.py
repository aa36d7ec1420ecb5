"""Tests for official.puppet_cnn.baselines.squeezenet."""

import keras
import numpy as np

from official.puppet_cnn.baselines import squeezenet


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_fire_module_parameter_count_by_hand():
  inputs = keras.Input(shape=(6, 6, 8))
  outputs = squeezenet.fire_module(inputs, 2, 3, 5, name="fire")
  model = keras.Model(inputs, outputs)
  squeeze = 1 * 1 * 8 * 2 + 2       # 1x1 conv 8->2 with bias
  expand1 = 1 * 1 * 2 * 3 + 3       # 1x1 conv 2->3 with bias
  expand3 = 3 * 3 * 2 * 5 + 5       # 3x3 conv 2->5 with bias
  assert model.count_params() == squeeze + expand1 + expand3 == 122
  assert model.output.shape == (None, 6, 6, 3 + 5)


def test_full_parameter_count_by_hand():
  model = squeezenet.build_squeezenet(10)
  assert model.name == "squeezenet1_1_cifar"

  def fire(c_in, s, e1, e3):
    return (c_in * s + s) + (s * e1 + e1) + (9 * s * e3 + e3)

  by_hand = (3 * 3 * 3 * 64 + 64            # conv1
             + fire(64, 16, 64, 64)         # fire2
             + fire(128, 16, 64, 64)        # fire3
             + fire(128, 32, 128, 128)      # fire4
             + fire(256, 32, 128, 128)      # fire5
             + fire(256, 48, 192, 192)      # fire6
             + fire(384, 48, 192, 192)      # fire7
             + fire(384, 64, 256, 256)      # fire8
             + fire(512, 64, 256, 256)      # fire9
             + 512 * 10 + 10)               # conv10 1x1
  assert model.count_params() == by_hand == 727_626
  # 32x32 adaptation: stride-1 stem, three 3x3/2 pools -> 4x4 at fire9.
  assert model.get_layer("fire2_concat").output.shape[1:] == (16, 16, 128)
  assert model.get_layer("fire9_concat").output.shape[1:] == (4, 4, 512)


def test_forward_logits():
  model = squeezenet.build_squeezenet(10)
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                        dtype=np.uint8)
  out = np.asarray(model(x, training=False))
  assert out.shape == (2, 10) and np.all(np.isfinite(out))
  assert np.all(out >= 0.0)   # reference ReLU after conv10
  no_relu = squeezenet.build_squeezenet(10, final_relu=False)
  assert "conv10_relu" not in [l.name for l in no_relu.layers]


def test_keras_save_reload_identical(tmp_path):
  model = squeezenet.build_squeezenet(10, final_relu=False)
  x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3),
                                        dtype=np.uint8)
  path = str(tmp_path / "squeezenet.keras")
  model.save(path)
  restored = keras.saving.load_model(path)
  assert restored.name == model.name
  np.testing.assert_array_equal(
      keras.ops.convert_to_numpy(restored(x, training=False)),
      keras.ops.convert_to_numpy(model(x, training=False)))
