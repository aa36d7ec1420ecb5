"""Tests for official.puppet_cnn.baselines.registry (build_baseline)."""

import keras
import numpy as np
import pytest

from official.puppet_cnn import baselines
from official.puppet_cnn.baselines import BASELINES
from official.puppet_cnn.baselines import build_baseline

NAMES = ("resnet", "vgg", "alexnet", "squeezenet", "mobilenet_v1",
         "mobilenet_v2", "mobilenet_v3_small")
MODEL_NAMES = {
    "resnet": "resnet18_cifar", "vgg": "vgg11_bn_cifar",
    "alexnet": "alexnet_cifar", "squeezenet": "squeezenet1_1_cifar",
    "mobilenet_v1": "mobilenet_v1", "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3_small"}


def test_registry_names_and_exports():
  assert set(BASELINES) == set(NAMES)
  assert set(baselines.__all__) >= {"build_baseline", "BASELINES",
                                    "PixelNormalization"}


@pytest.mark.parametrize("name", NAMES)
def test_build_and_forward_uint8(name):
  model = build_baseline(name, 10)
  assert isinstance(model, keras.Model)
  assert model.name == MODEL_NAMES[name]
  assert tuple(model.input.shape) == (None, 32, 32, 3)
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                        dtype=np.uint8)
  out = keras.ops.convert_to_numpy(model(x, training=False))
  assert out.shape == (2, 10)
  assert out.dtype == np.float32
  assert np.all(np.isfinite(out))
  # The last layer produces logits: no softmax anywhere in the graph.
  assert getattr(model.layers[-1], "activation", None) in (
      None, keras.activations.linear)


def test_overrides_are_forwarded():
  model = build_baseline("resnet", 5, (16, 16, 3), widths=(4, 8),
                         blocks_per_stage=(1, 1), model_name="tiny")
  assert model.name == "tiny"
  assert model.output.shape == (None, 5)
  assert tuple(model.input.shape) == (None, 16, 16, 3)
  grey = build_baseline("resnet", 3, (16, 16, 1), widths=(4,),
                        blocks_per_stage=(1,), mean=(0.5,), std=(0.25,))
  out = np.asarray(grey(np.full((1, 16, 16, 1), 255, np.uint8)))
  assert out.shape == (1, 3)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as e:
    build_baseline("resnet50", 10)
  for name in NAMES:
    assert name in str(e.value)
  with pytest.raises(ValueError, match="Unknown baseline"):
    build_baseline(None, 10)


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, "10", True, None])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    build_baseline("squeezenet", num_classes)


def test_numpy_int_num_classes_accepted():
  model = build_baseline("resnet", np.int64(2), (8, 8, 3), widths=(4,),
                         blocks_per_stage=(1,))
  assert model.output.shape == (None, 2)


@pytest.mark.parametrize("input_shape", [
    (32, 32), (32, 32, 3, 1), (0, 32, 3), (32, -1, 3), (32.0, 32, 3),
    "32x32x3", 32])
def test_bad_input_shape(input_shape):
  with pytest.raises(ValueError, match="input_shape"):
    build_baseline("resnet", 10, input_shape)


def test_too_small_input_for_model():
  with pytest.raises(ValueError, match="at least 32x32"):
    build_baseline("mobilenet_v2", 10, (16, 16, 3))


def test_unknown_override_raises():
  with pytest.raises(TypeError, match="widthz"):
    build_baseline("resnet", 10, widthz=(4,))
  with pytest.raises(TypeError, match="model_name"):
    build_baseline("alexnet", 10, widths=(4,))


def test_name_can_be_passed_by_keyword():
  model = build_baseline(name="alexnet", num_classes=4,
                         input_shape=(15, 15, 3))
  assert model.name == "alexnet_cifar"


def test_default_channels_need_matching_statistics():
  with pytest.raises(ValueError, match="channels"):
    build_baseline("squeezenet", 10, (32, 32, 1))
