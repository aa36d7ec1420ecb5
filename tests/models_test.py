"""The model factory maps every --model name to a model that takes pixels and gives logits."""
import numpy as np
import pytest

from official.puppet_cnn import models
from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn.config_definitions import PuppetCNNConfig


@pytest.mark.parametrize("name, block", [("puppet_cnn", "plain"), ("puppet_vgg", "plain"),
                                         ("puppet_resnet", "residual")])
def test_puppet_models(name, block):
  model = models.build_model(name, 7, (16, 16, 3), PuppetCNNConfig(stage_channels=(4, 8),
                                                                   max_depth=2))
  assert isinstance(model, PuppetClassifier) and model.puppet.block_type == block
  assert model.config.num_classes == 7 and model.config.input_shape == (16, 16, 3)
  assert model(np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 7)


def test_baseline_and_unknown_names():
  model = models.build_model("squeezenet", 4, (32, 32, 3))
  assert model(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 4)
  assert not models.is_puppet("squeezenet") and models.is_puppet("puppet_alexnet")
  with pytest.raises(ValueError, match="unknown model"):
    models.build_model("lenet", 10, (32, 32, 3))
  assert set(models.MODEL_NAMES) >= {"puppet_cnn", "resnet", "mobilenet_v2"}
