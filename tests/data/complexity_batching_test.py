"""Tests for official.puppet_cnn.data.complexity_batching (and its DataConfig plumbing)."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn.config_definitions import ComplexityConfig
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data import cifar
from official.puppet_cnn.data import complexity_batching
from official.puppet_cnn.data import datasets
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import TrainConfig
from tests.data import fake_data


def _tagged(keys):
  """Examples (image, label = its index) whose image's first pixel is its key."""
  keys = np.asarray(keys, np.uint8)
  images = np.zeros((len(keys), 2, 2, 3), np.uint8)
  images[:, 0, 0, 0] = keys
  return tf.data.Dataset.from_tensor_slices((images, np.arange(len(keys), dtype=np.int32)))


def _key_of(images):
  return tf.cast(images[:, 0, 0, 0], tf.int32)


@pytest.mark.parametrize("batch_size", [4, 7])
def test_group_by_key_against_a_count_of_each_key(batch_size):
  rng = np.random.default_rng(0)
  keys = rng.choice(5, size=103, p=[0.5, 0.2, 0.15, 0.1, 0.05])
  examples = _tagged(keys).shuffle(103, seed=1)
  ds = complexity_batching.group_by_key(examples, _key_of, 5, batch_size, 103)
  assert ds.cardinality().numpy() == 103 // batch_size
  assert ds.element_spec[0].shape.as_list() == [batch_size, 2, 2, 3]
  batches = [(x.numpy()[:, 0, 0, 0], y.numpy()) for x, y in ds]
  assert len(batches) == 103 // batch_size
  # Each key fills floor(n_k / B) whole batches: counted from the keys, not from the code.
  full = sum(n // batch_size for n in collections.Counter(keys.tolist()).values())
  single = [len(set(k.tolist())) == 1 for k, _ in batches]
  assert sum(single) >= full
  # The one-key batches come first; the leftovers are merged at the end of the epoch.
  assert all(single[:full])
  # No example twice, every label with its own key, nothing but the remainder dropped.
  labels = np.concatenate([y for _, y in batches])
  assert len(set(labels.tolist())) == labels.size == (103 // batch_size) * batch_size
  np.testing.assert_array_equal(np.concatenate([k for k, _ in batches]), keys[labels])
  # The same batches through tf.distribute, as `model.fit` feeds them (it rewrites the
  # batching of a distributed dataset).
  dist = tf.distribute.OneDeviceStrategy("/cpu:0").experimental_distribute_dataset(ds)
  assert [int(x.shape[0]) for x, _ in dist] == [batch_size] * (103 // batch_size)


def test_group_by_key_rejects_keys_out_of_range():
  ds = complexity_batching.group_by_key(_tagged([0, 1, 9, 1]), _key_of, 3, 2, 4)
  with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
    list(ds)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=5), dict(num_keys=0)])
def test_group_by_key_argument_checks(kwargs):
  args = dict(num_keys=2, batch_size=2, num_examples=4)
  args.update(kwargs)
  with pytest.raises(ValueError):
    complexity_batching.group_by_key(_tagged([0, 1, 0, 1]), _key_of, **args)


@pytest.fixture(scope="module")
def real_dir():
  data_dir = fake_data.real_cifar10_dir()
  if data_dir is None:
    pytest.skip("real CIFAR-10 not found")
  return data_dir


@pytest.mark.parametrize("config", [
    PuppetCNNConfig(stage_channels=(4, 8), complexity_bins=16),
    PuppetCNNConfig(stage_channels=(4, 8), complexity_bins=6, complexity_bin_floor=5.0,
                    complexity=ComplexityConfig(color_mode="channel_mean", bins=64)),
], ids=["default", "floor_channel_mean"])
def test_bins_are_the_models(real_dir, config):
  """The pipeline's bin of each real image is the bin the model computes for it."""
  _, _, x_test, _ = cifar.load_cifar("cifar10", real_dir)
  images = np.asarray(x_test[:300])
  want = PuppetClassifier(config).image_bins(images)
  got = complexity_batching.complexity_bin_fn(config)(tf.constant(images)).numpy()
  np.testing.assert_array_equal(got, want)
  assert len(set(want.tolist())) >= 3  # real images spread over several bins


@pytest.mark.parametrize("augment", [False, True])
def test_real_training_batches_hold_one_model_bin(real_dir, augment):
  model_config = PuppetCNNConfig(stage_channels=(4, 8), complexity_bins=16)
  config = DataConfig(dataset="cifar10", data_dir=real_dir, limit=640, batch_size=32,
                      batch_grouping="complexity_bin", augment=augment)
  splits = datasets.build_datasets(
      config, batch_key_fn=complexity_batching.complexity_bin_fn(model_config), num_keys=16)
  model = PuppetClassifier(model_config)
  batches = list(splits.train)
  assert len(batches) == splits.steps_per_epoch == 640 // 32
  occupied = [len(set(model.image_bins(x.numpy()).tolist())) for x, _ in batches]
  # Ungrouped, a batch of 32 real images spans several bins; grouped, all but the merged
  # leftovers at the end of the epoch hold one.
  assert sum(n == 1 for n in occupied) >= len(batches) - 16
  assert occupied[0] == 1
  labels = np.concatenate([y.numpy() for _, y in batches])
  assert labels.size == 640 and labels.dtype == np.int32


def test_configuration_errors():
  with pytest.raises(ValueError, match="batch_grouping must be one of"):
    DataConfig(batch_grouping="depth")
  with pytest.raises(ValueError, match="complexity_bins > 0"):
    complexity_batching.complexity_bin_fn(PuppetCNNConfig(complexity_bins=0))
  with pytest.raises(ValueError, match="needs the model's bins"):
    datasets.build_datasets(DataConfig(batch_grouping="complexity_bin"))
  grouped = DataConfig(batch_grouping="complexity_bin")
  with pytest.raises(ValueError, match="has none"):
    ExperimentConfig(train=TrainConfig(model="resnet"), data=grouped,
                     model=PuppetCNNConfig(complexity_bins=16))
  with pytest.raises(ValueError, match="complexity_bins > 0"):
    ExperimentConfig(data=grouped, model=PuppetCNNConfig(complexity_bins=0))
  ExperimentConfig(data=grouped, model=PuppetCNNConfig(complexity_bins=16))  # valid
