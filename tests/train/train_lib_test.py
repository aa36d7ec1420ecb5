"""train_lib end to end on a few hundred real CIFAR-10 images: train, evaluate, resume."""
import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest

from official.puppet_cnn import train_lib
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import TrainConfig
from tests.data import fake_data

DATA_DIR = fake_data.real_cifar10_folder()
pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="real CIFAR-10 not found: set "
                                "PUPPET_CNN_DATA_DIR or put it in <repo>/../shared/data")


def _config(epochs=2, model="puppet_cnn", **train):
  return ExperimentConfig(
      train=TrainConfig(model=model, epochs=epochs, learning_rate=3e-3, jit_compile=False,
                        verbose=0, **train),
      data=DataConfig(dataset="cifar10", data_dir=DATA_DIR, train_subset=1000, limit=96,
                      batch_size=32, seed=0),
      model=PuppetCNNConfig(stage_channels=(4, 8), max_depth=3))


def _csv_epochs(model_dir):
  with open(os.path.join(model_dir, "training_log.csv")) as f:
    return [int(row["epoch"]) for row in csv.DictReader(f)]


class _Interrupt(keras.callbacks.Callback):
  """Simulates Ctrl-C right after epoch `after` finished (and was backed up)."""

  def __init__(self, after):
    super().__init__()
    self.after = after

  def on_epoch_end(self, epoch, logs=None):
    if epoch + 1 == self.after:
      raise KeyboardInterrupt


class _Epochs(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.seen = []

  def on_epoch_begin(self, epoch, logs=None):
    self.seen.append(epoch)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 2-epoch train_and_eval run: read by one test, copied by another."""
  model_dir = str(tmp_path_factory.mktemp("finished") / "run")
  return model_dir, train_lib.run(_config(), "train_and_eval", model_dir)


def test_train_and_eval_writes_results(finished_run):
  model_dir, results = finished_run
  on_disk = json.load(open(os.path.join(model_dir, "results.json")))
  assert on_disk["num_test_images"] == 96 == results["num_test_images"]
  assert 0.0 <= on_disk["top1"] <= on_disk["top5"] <= 1.0
  assert sum(on_disk["depth_histogram"].values()) == 96
  assert set(on_disk["depth_histogram"]) <= {"1", "2", "3"}
  assert sum(b["count"] for b in on_disk["accuracy_by_entropy_bucket"]) == 96
  assert on_disk["epochs_trained"] == 2 and on_disk["model"] == "puppet_cnn"
  assert on_disk["parameter_breakdown"]["total_stored"] == on_disk["stored_params"]
  # The loss in results.json is the mean cross-entropy: check it against a fresh evaluation
  # of the best checkpoint with Keras's own loss.
  model = keras.models.load_model(os.path.join(model_dir, "checkpoints", "best.keras"))
  images, labels = [], []
  from official.puppet_cnn.data.datasets import build_datasets
  for x, y in build_datasets(_config().data).test:
    images.append(x.numpy())
    labels.append(y.numpy())
  logits = model.predict(np.concatenate(images), verbose=0)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      np.concatenate(labels), logits)
  assert abs(float(loss) - on_disk["loss"]) < 1e-4
  saved = json.load(open(os.path.join(model_dir, "config.json")))
  assert saved["data"]["train_subset"] == 1000 and saved["model"]["stage_channels"] == [4, 8]
  assert _csv_epochs(model_dir) == [0, 1]


def test_interrupted_run_resumes_from_last_finished_epoch(tmp_path):
  model_dir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    train_lib.run(_config(epochs=2), "train", model_dir, callbacks=[_Interrupt(after=1)])
  state = json.load(open(os.path.join(model_dir, "training_state.json")))
  assert state["epochs_done"] == 1 and not state["finished"]
  seen = _Epochs()
  train_lib.run(_config(epochs=2), "train", model_dir, callbacks=[seen])
  assert seen.seen == [1]  # only the missing epoch ran
  assert _csv_epochs(model_dir) == [0, 1]
  state = json.load(open(os.path.join(model_dir, "training_state.json")))
  assert state["epochs_done"] == 2 and state["finished"]


def test_finished_run_is_not_retrained_or_overwritten(tmp_path, finished_run):
  model_dir = str(tmp_path / "run")
  shutil.copytree(finished_run[0], model_dir)  # a copy: the fixture's run stays as it was
  weights = os.path.join(model_dir, "checkpoints", "latest.weights.h5")
  stamp = os.path.getmtime(weights)
  seen = _Epochs()
  results = train_lib.run(_config(), "train_and_eval", model_dir, callbacks=[seen])
  assert seen.seen == [] and os.path.getmtime(weights) == stamp
  assert results["num_test_images"] == 96
  # More epochs continue the same run.
  train_lib.run(_config(epochs=3), "train", model_dir, callbacks=[seen])
  assert seen.seen == [2]
  # A different config in the same model_dir is refused, naming the difference.
  other = _config(epochs=3)
  other.train.learning_rate = 0.5
  with pytest.raises(ValueError, match="learning_rate"):
    train_lib.run(other, "train", model_dir)
  # --overwrite starts over (with 1 epoch: the 3 epochs on disk, if kept, would run none).
  other = _config(epochs=1)
  other.train.learning_rate = 0.5
  train_lib.run(other, "train", model_dir, overwrite=True, callbacks=[seen])
  assert seen.seen == [2, 0]
  assert _csv_epochs(model_dir) == [0]


def test_baseline_trains_through_the_same_pipeline(tmp_path):
  results = train_lib.run(_config(epochs=1, model="squeezenet"), "train_and_eval",
                          str(tmp_path / "run"))
  assert results["num_test_images"] == 96 and "depth_histogram" not in results
  assert results["model"] == "squeezenet"


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(train_lib.RunError, match="no checkpoint"):
    train_lib.run(_config(), "eval", str(tmp_path / "empty"))


def test_bad_mode_and_config():
  with pytest.raises(ValueError, match="--mode"):
    train_lib.run(_config(), "fit", "/tmp/unused")
  with pytest.raises(ValueError, match="--model must be one of"):
    TrainConfig(model="lenet")
  with pytest.raises(ValueError, match="--epochs"):
    TrainConfig(epochs=0)


class _Scales(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.seen = []

  def on_epoch_begin(self, epoch, logs=None):
    self.seen.append((epoch, self.model.depth_scale))


def test_incremental_depth_refines_on_schedule_and_resumes(tmp_path):
  model_dir = str(tmp_path / "run")
  assert [_config(epochs=3, depth_refinements=1, refine_every_epochs=2).train.depth_scale_at(e)
          for e in range(3)] == [0.5, 0.5, 1.0]
  # Trained on the shortest such schedule: one epoch at 0.5 (kept, not refined, at its
  # start), then one at full depth.
  config = _config(epochs=2, depth_refinements=1, refine_every_epochs=1)
  assert [config.train.depth_scale_at(e) for e in range(2)] == [0.5, 1.0]
  seen = _Scales()
  with pytest.raises(KeyboardInterrupt):
    train_lib.run(config, "train", model_dir, callbacks=[seen, _Interrupt(after=1)])
  assert seen.seen == [(0, 0.5)]
  # Resumed after epoch 1: the model restarts at 0.5 and is refined to full depth.
  seen = _Scales()
  results = train_lib.run(config, "train_and_eval", model_dir, callbacks=[seen])
  assert seen.seen == [(1, 1.0)]
  state = json.load(open(os.path.join(model_dir, "training_state.json")))
  assert state["best_epoch"] == 2  # the best checkpoint is chosen among full-depth epochs
  assert results["depth_scale"] == 1.0
  best = keras.models.load_model(os.path.join(model_dir, "checkpoints", "best.keras"))
  assert best.depth_scale == 1.0
  # Row 0 is used only at full depth: it was copied from row 1 and then trained on its own.
  gamma = best.puppet.bn_weights[0]["repeated"][0].numpy()
  assert np.abs(gamma[0] - 1.0).max() > 1e-4 and np.abs(gamma[0] - gamma[1]).max() > 1e-6


def test_incremental_depth_needs_enough_epochs():
  with pytest.raises(ValueError, match="needs more than 4 epochs"):
    TrainConfig(epochs=4, depth_refinements=2, refine_every_epochs=2)
  with pytest.raises(ValueError, match="Puppet-CNN"):
    TrainConfig(model="resnet", epochs=4, depth_refinements=1)
  assert TrainConfig(epochs=9, depth_refinements=2).refinement_interval == 3


def test_training_bins_are_the_bins_of_one_epoch_of_training_images():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn import PuppetClassifier  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.data.datasets import Splits  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = np.zeros((10, 16, 16, 3), np.uint8)
  for i in range(10):  # i + 1 grey levels: H = log2(i + 1) bits (equal counts per level)
    images[i] = (np.arange(256).reshape(16, 16) % (i + 1) * 20)[..., None]
  images[9] = rng.integers(0, 256, (16, 16, 3))  # near 8 bits
  labels = np.zeros((10,), np.int32)
  train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4, drop_remainder=True)
  splits = Splits(train=train.repeat(), val=None, test=train, num_classes=5,
                  class_names=tuple("abcde"), image_shape=(16, 16, 3), num_train=10,
                  num_val=0, num_test=10, batch_size=4)
  model = PuppetClassifier(stage_channels=(4, 8), max_depth=3, num_classes=5,
                           input_shape=(16, 16, 3), complexity_bins=16, execution="bucketed")
  # One epoch is 2 batches of 4 (the remainder dropped): images 0..7. Their bins from H
  # (eq. 8, tested on its own in complexity_test.py) and the bin formula floor(H * 16 / 8).
  from official.puppet_cnn.modeling import complexity as cx  # pylint: disable=import-outside-toplevel
  h = np.asarray(cx.image_complexity(images), np.float64)
  bins = np.minimum(np.floor(h * 16 / 8), 15).astype(int)
  want = sorted(set(bins[:8].tolist()))
  assert bins[9] not in want and len(want) >= 3  # image 9 (noise) is not in the epoch
  assert train_lib.training_bins(model, splits) == tuple(want)
  with pytest.raises(ValueError, match="--export_kernel_cache_bins must be one of"):
    train_lib.check_export_kernel_cache(_config(), "int8", "test")
  with pytest.raises(ValueError, match="needs --export_kernel_cache"):
    train_lib.check_export_kernel_cache(_config(), None, "train")


def test_grouped_batches_train_with_the_models_bins(tmp_path, caplog):
  """--batch_grouping=complexity_bin: the run's training batches hold one of the model's
  bins each (all but the merged leftovers), and the run trains and evaluates. With a batch
  norm in G (the default) the run is warned that one-bin batches normalize G differently in
  training and inference; with generator_norm='state' it is not."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  base = _config(epochs=1)
  config = dataclasses.replace(
      base, data=dataclasses.replace(base.data, batch_grouping="complexity_bin"),
      model=dataclasses.replace(base.model, complexity_bins=16, execution="bucketed"))
  config = type(config).from_dict(config.to_dict())  # validated like a loaded config.json
  bins_seen = []
  with caplog.at_level("WARNING"):
    state = dataclasses.replace(config, model=config.model.replace(generator_norm="state"))
    train_lib.batch_grouping_args(state)
    assert "--generator_norm=state normalizes" not in caplog.text
    splits = train_lib.build_datasets(config.data, **train_lib.batch_grouping_args(config))
  assert ("--generator_norm=batch_per_step: each one-bin batch normalizes G by its bin's "
          "state alone") in caplog.text
  from official.puppet_cnn import PuppetClassifier  # pylint: disable=import-outside-toplevel
  model = PuppetClassifier(config.model)
  for x, _ in splits.train:
    bins_seen.append(len(set(model.image_bins(x.numpy()).tolist())))
  assert len(bins_seen) == 96 // 32 and bins_seen[0] == 1
  results = train_lib.run(config, "train_and_eval", str(tmp_path / "run"), splits=splits)
  assert results["num_test_images"] == 96 and 0.0 <= results["top1"] <= 1.0
  assert train_lib.batch_grouping_args(base) == {}


def test_precise_batch_norm_reestimates_the_statistics_before_each_validation(tmp_path):
  """--precise_bn_images: the last validation ran on statistics re-estimated from the run's
  first N training images (shuffled), so re-estimating them again from the saved last-epoch
  weights changes nothing; a run without it saves different (moving-average) statistics."""
  from official.puppet_cnn import PuppetClassifier  # pylint: disable=import-outside-toplevel
  runs = {}
  for n in (0, 64):
    config = _config(epochs=1, precise_bn_images=n)
    model_dir = str(tmp_path / f"run{n}")
    train_lib.run(config, "train", model_dir)
    model = PuppetClassifier(config.model)
    model.build((None, 32, 32, 3))
    model.load_weights(os.path.join(model_dir, "checkpoints", "latest.weights.h5"))
    runs[n] = (config, model)
  config, model = runs[64]
  splits = train_lib.build_datasets(config.data)
  images = train_lib.precise_bn_images(splits, 64, config.train.seed)
  assert images.shape == (64, 32, 32, 3)
  for n, (_, m) in runs.items():
    saved = [w.numpy().copy() for w in m.non_trainable_weights]
    m.recalibrate_batch_norm(images, batch_size=32, generator=True)
    diff = max(float(np.abs(w.numpy() - s).max()) for w, s in zip(m.non_trainable_weights,
                                                                   saved))
    if n:
      assert diff < 1e-5, diff
    else:
      assert diff > 1e-3, diff
  with pytest.raises(ValueError, match="precise_bn_images must be >= 0"):
    _config(precise_bn_images=-1)
  with pytest.raises(ValueError, match="is not one"):
    _config(model="resnet", precise_bn_images=8)
  with pytest.raises(ValueError, match="one device"):
    _config(precise_bn_images=8, distribution_strategy="mirrored")


def test_mixed_bfloat16_run_trains_saves_and_exports_under_its_policy(tmp_path):
  """--dtype_policy=mixed_bfloat16 end to end: the checkpoint and the SavedModel keep the
  policy (bfloat16 convolutions), the results say so, and the caller's global policy is
  restored afterwards."""
  results = train_lib.run(_config(epochs=1, dtype_policy="mixed_bfloat16"), "train_and_eval",
                          str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
  assert keras.config.dtype_policy().name == "float32"
  assert results["dtype_policy"] == "mixed_bfloat16" and 0 <= results["top1"] <= 1
  loaded = keras.models.load_model(str(tmp_path / "run" / "checkpoints" / "best.keras"))
  assert loaded.precision_policy == "mixed_bfloat16" and loaded.puppet.conv_dtype == "bfloat16"
  with open(os.path.join(results["export_path"], "assets.extra", "model_info.json")) as f:
    assert json.load(f)["dtype_policy"] == "mixed_bfloat16"


def test_out_of_memory_in_training_says_what_to_change(tmp_path, monkeypatch):
  """An out-of-memory error of model.fit (a real TensorFlow ResourceExhaustedError, raised in
  place of a step too large for this machine) comes out as TrainingOutOfMemoryError naming
  the run's settings and the flags that need less; any other error passes unchanged."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.training_memory import TrainingOutOfMemoryError  # pylint: disable=import-outside-toplevel
  raised = []

  def fit(self, *args, **kwargs):
    del self, args, kwargs
    raised.append(raised[0] if raised else tf.errors.ResourceExhaustedError(
        None, None, "Out of memory while trying to allocate 93.03GiB. [Op:one_step_on_data]"))
    raise raised[-1]

  monkeypatch.setattr(PuppetClassifier, "fit", fit)
  with pytest.raises(TrainingOutOfMemoryError) as info:
    train_lib.run(_config(epochs=1), "train", str(tmp_path / "oom"))
  text = str(info.value)
  assert info.value.__cause__ is raised[0]
  assert "allocate 93.03GiB" in text and "--execution=per_sample" in text
  assert "--batch_size=32" in text and "--complexity_bins=16 --execution=bucketed" in text
  raised[:] = [ValueError("not a memory problem")]
  with pytest.raises(ValueError, match="not a memory problem"):
    train_lib.run(_config(epochs=1), "train", str(tmp_path / "other"), overwrite=True)
