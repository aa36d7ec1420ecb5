"""A tiny real training run (64 real CIFAR-10 images, 1 epoch) for tests of run readers."""
import os

from official.puppet_cnn import train_lib
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import TrainConfig
from tests.data import fake_data

DATA_DIR = fake_data.real_cifar10_folder()
# (4, 8) stages, max_depth 3: the model the hand counts in the tests refer to.
MODEL = dict(stage_channels=(4, 8), max_depth=3)


def train_tiny_run(model_dir: str, **model_overrides) -> str:
  config = ExperimentConfig(
      train=TrainConfig(model="puppet_cnn", epochs=1, learning_rate=3e-3, jit_compile=False,
                        verbose=0),
      data=DataConfig(dataset="cifar10", data_dir=DATA_DIR, train_subset=1000, limit=64,
                      batch_size=32, seed=0),
      model=PuppetCNNConfig(**dict(MODEL, **model_overrides)))
  train_lib.run(config, "train_and_eval", model_dir)
  assert os.path.isfile(os.path.join(model_dir, "checkpoints", "best.keras"))
  return model_dir
