"""ExperimentConfig round trip and the identity used to refuse mixing runs."""
import json

import pytest

from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import TrainConfig
from official.puppet_cnn.experiment_config import identity


def test_json_round_trip():
  c = ExperimentConfig(train=TrainConfig(model="resnet", epochs=3),
                       data=DataConfig(train_subset=1000),
                       model=PuppetCNNConfig(stage_channels=(4, 8)))
  again = ExperimentConfig.from_dict(json.loads(c.to_json()))
  assert again == c


def test_identity_ignores_epochs_verbosity_and_data_location():
  a = ExperimentConfig(train=TrainConfig(epochs=3), data=DataConfig(data_dir="/a"))
  b = ExperimentConfig(train=TrainConfig(epochs=30, verbose=0), data=DataConfig(data_dir="/b"))
  assert identity(a) == identity(b)
  c = ExperimentConfig(train=TrainConfig(learning_rate=0.1))
  assert identity(a) != identity(c)


def test_train_config_validation():
  with pytest.raises(ValueError, match="distribution_strategy"):
    TrainConfig(distribution_strategy="tpu")
  with pytest.raises(ValueError, match="learning_rate"):
    TrainConfig(learning_rate=0)
  with pytest.raises(ValueError, match="entropy_bucket_edges"):
    TrainConfig(entropy_bucket_edges=(3.0, 1.0))
