"""Tests for official.puppet_cnn.data.protocols."""

import pytest

from official.puppet_cnn.data import protocols


def test_paper_cifar10_protocol():
  config = protocols.paper_data_config("cifar10", data_dir="/d", seed=5)
  assert config.dataset == "cifar10"
  assert config.train_subset == 10000 and config.val_fraction == 0.2
  assert config.data_dir == "/d" and config.seed == 5
  assert config.augment is False  # Augmentation stays opt-in.


def test_paper_cifar100_and_image_folder_protocols():
  c100 = protocols.paper_data_config("cifar100")
  assert c100.train_subset is None and c100.val_fraction == 0.2
  folder = protocols.paper_data_config("image_folder", data_dir="/mini")
  assert (folder.val_fraction, folder.test_fraction) == (0.1, 0.1)
  assert folder.resolved_image_size == 64


def test_unknown_protocol_or_field():
  with pytest.raises(ValueError, match="no paper protocol"):
    protocols.paper_data_config("mnist")
  with pytest.raises(ValueError, match="unknown DataConfig fields"):
    protocols.paper_data_config("cifar10", batchsize=3)
  with pytest.raises(ValueError):  # Validation still runs on overrides.
    protocols.paper_data_config("cifar10", image_size=64)
