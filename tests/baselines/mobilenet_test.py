"""Tests for official.puppet_cnn.baselines.mobilenet."""

import keras
import numpy as np
import pytest

from official.puppet_cnn.baselines import PixelNormalization
from official.puppet_cnn.baselines import mobilenet


def _all_layers(model):
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from _all_layers(layer)


@pytest.mark.parametrize("version", ["v1", "v2", "v3_small"])
def test_normalization_applied_exactly_once(version):
  model = mobilenet.build_mobilenet(10, version=version)
  layers = list(_all_layers(model))
  rescaling = [l for l in layers if isinstance(l, keras.layers.Rescaling)]
  pixel_norm = [l for l in layers if isinstance(l, PixelNormalization)]
  assert len(rescaling) == 1 and len(pixel_norm) == 1
  assert rescaling[0].scale == pytest.approx(1 / 255)
  # No keras-side Normalization layer either.
  assert not any(isinstance(l, keras.layers.Normalization) for l in layers)
  backbone = model.get_layer(f"mobilenet_{version}_backbone")
  assert backbone.output.shape[1:3] == (1, 1)   # 32x32 / 32


def test_head_and_output():
  model = mobilenet.build_mobilenet_v2(7, dropout=0.2)
  assert model.name == "mobilenet_v2"
  assert model.get_layer("logits").kernel.shape == (1280, 7)
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                        dtype=np.uint8)
  out = np.asarray(model(x, training=False))
  assert out.shape == (2, 7) and np.all(np.isfinite(out))


def test_bad_version_and_small_input_raise():
  with pytest.raises(ValueError, match="version"):
    mobilenet.build_mobilenet(10, version="v3_large")
  with pytest.raises(ValueError, match="at least 32x32"):
    mobilenet.build_mobilenet_v1(10, (28, 28, 3))


def test_keras_save_reload_identical(tmp_path):
  model = mobilenet.build_mobilenet_v3_small(10)
  x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3),
                                        dtype=np.uint8)
  path = str(tmp_path / "mobilenet_v3_small.keras")
  model.save(path)
  restored = keras.saving.load_model(path)
  assert restored.name == model.name
  np.testing.assert_array_equal(
      keras.ops.convert_to_numpy(restored(x, training=True)),
      keras.ops.convert_to_numpy(model(x, training=True)))


def test_backbone_batch_norm_momentum_is_set_and_serialized(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.baselines import mobilenet  # pylint: disable=import-outside-toplevel
  model = mobilenet.build_mobilenet(4, version="v3_small")
  bns = [l for l in model.get_layer("mobilenet_v3_small_backbone").layers
         if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(l.momentum == 0.9 for l in bns)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  bns = [l for l in loaded.get_layer("mobilenet_v3_small_backbone").layers
         if isinstance(l, keras.layers.BatchNormalization)]
  assert all(l.momentum == 0.9 for l in bns)
  keras_default = mobilenet.build_mobilenet(4, version="v2", bn_momentum=None)
  assert any(isinstance(l, keras.layers.BatchNormalization) and l.momentum == 0.999
             for l in keras_default.get_layer("mobilenet_v2_backbone").layers)
