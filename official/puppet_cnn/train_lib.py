"""Training and evaluation library behind `python -m official.puppet_cnn.train`.

`run(config, mode, model_dir)` builds the data and the model, trains with `model.fit`
(checkpoints, resumption, logs), evaluates on the test split and writes `results.json`, and
optionally exports a SavedModel. Tests call it directly with tiny configs.

Files in `model_dir`:
  config.json               the resolved ExperimentConfig
  training_state.json       epochs done, best validation accuracy, whether training finished
  backup/                   Keras BackupAndRestore state (resumes an interrupted run at the
                            last finished epoch, optimizer state included)
  checkpoints/latest.keras  the model after the last finished epoch
  checkpoints/best.keras    the model with the best validation accuracy so far
  training_log.csv          per-epoch metrics (appended across resumptions)
  tensorboard/              TensorBoard logs
  results.json              test-set evaluation (see evaluation.evaluate_model)

Running the same command again never loses work: an interrupted run resumes, a finished run is
evaluated again without retraining, a run with more epochs continues, and a model_dir holding
a run with a different config is refused (pass overwrite=True to start over).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from official.puppet_cnn import distribute_utils
from official.puppet_cnn import evaluation
from official.puppet_cnn import models
from official.puppet_cnn import training_memory
from official.puppet_cnn.config_definitions import COMPUTE_DTYPES
from official.puppet_cnn.data import complexity_batching
from official.puppet_cnn.data.datasets import Splits
from official.puppet_cnn.data.datasets import build_datasets
from official.puppet_cnn.experiment_config import MODES
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import identity

CONFIG_FILE = "config.json"


class RunError(ValueError):
  """A model_dir that holds another run, or a checkpoint that is not there."""


STATE_FILE = "training_state.json"
RESULTS_FILE = "results.json"


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _write_json(path: str, values: Dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(values, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def prepare_model_dir(config: ExperimentConfig, model_dir: str, overwrite: bool) -> None:
  """Creates model_dir, or checks that it holds a run of the same config."""
  if overwrite and tf.io.gfile.exists(model_dir):
    logging.warning("--overwrite: deleting %s", model_dir)
    tf.io.gfile.rmtree(model_dir)
  tf.io.gfile.makedirs(model_dir)
  saved = _read_json(os.path.join(model_dir, CONFIG_FILE))
  if saved is not None:
    old = identity(ExperimentConfig.from_dict(saved))
    new = identity(config)
    if old != new:
      diffs = [f"{section}.{k}: {old[section].get(k)!r} -> {new[section].get(k)!r}"
               for section in new for k in new[section]
               if old[section].get(k) != new[section].get(k)]
      raise RunError(
          f"{model_dir} already holds a run with a different config ({'; '.join(diffs)}). "
          "Use a new --model_dir, or --overwrite to delete the old run.")
  _write_json(os.path.join(model_dir, CONFIG_FILE), config.to_dict())


class _RunState(keras.callbacks.Callback):
  """Records finished epochs and the best validation accuracy in training_state.json."""

  def __init__(self, path: str, monitor: str, state: Dict[str, Any]):
    super().__init__()
    self.path, self.monitor, self.state = path, monitor, state

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    self.state["epochs_done"] = epoch + 1
    value = logs.get(self.monitor)
    if value is not None and value > self.state.get("best", -1.0):
      self.state["best"] = float(value)
      self.state["best_epoch"] = epoch + 1
    _write_json(self.path, self.state)


class DepthSchedule(keras.callbacks.Callback):
  """Incremental-in-depth training: the model's depth_scale per epoch (TrainConfig).

  At the start (or on resumption) the model is put at the scale of the last finished epoch;
  at each epoch whose scale is finer, `PuppetClassifier.refine_depth` copies the trained
  batch-norm rows into the new ones and the train step is traced again. When the final scale
  is reached, the best-checkpoint tracking starts over, so that the best checkpoint is a
  full-depth model.
  """

  def __init__(self, train_config, best_checkpoint, run_state):
    super().__init__()
    self.train_config = train_config
    self.best_checkpoint = best_checkpoint
    self.run_state = run_state

  def on_train_begin(self, logs=None):
    start = getattr(self.model, "_initial_epoch", None) or 0
    self.model.depth_scale = self.train_config.depth_scale_at(start - 1 if start else 0)
    self.model.make_train_function(force=True)

  def on_epoch_begin(self, epoch, logs=None):
    scale = self.train_config.depth_scale_at(epoch)
    if scale == self.model.depth_scale:
      return
    sources = self.model.refine_depth(scale)
    logging.info("epoch %d: depth_scale %.4g (new batch-norm rows from %s)", epoch + 1, scale,
                 sources)
    self.model.make_train_function(force=True)
    if scale == 1.0:
      self.best_checkpoint.best = -float("inf")
      self.run_state.state.pop("best", None)


class PreciseBatchNorm(keras.callbacks.Callback):
  """Re-estimates a Puppet-CNN's batch-norm moving statistics (the puppet's and G's) on
  fixed training images before each validation (`TrainConfig.precise_bn_images`)."""

  def __init__(self, images: np.ndarray, batch_size: int):
    super().__init__()
    self.images, self.batch_size = images, int(batch_size)

  def on_test_begin(self, logs=None):
    self.model.recalibrate_batch_norm(self.images, batch_size=self.batch_size, generator=True)


def precise_bn_images(splits: Splits, count: int, seed: int) -> np.ndarray:
  """The first `count` training images (`sweeps.calibration_images`), shuffled with `seed`
  (grouped training batches hold one complexity bin each; G's batch statistics need mixed
  batches)."""
  from official.puppet_cnn import sweeps  # pylint: disable=import-outside-toplevel
  images = sweeps.calibration_images(splits, count)
  return images[np.random.default_rng(seed).permutation(len(images))]


def _compile(model: keras.Model, config: ExperimentConfig) -> None:
  t = config.train
  if t.weight_decay > 0:
    optimizer = keras.optimizers.AdamW(t.learning_rate, weight_decay=t.weight_decay)
  else:
    optimizer = keras.optimizers.Adam(t.learning_rate)
  model.compile(
      optimizer=optimizer,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
               keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")],
      jit_compile=t.jit_compile, steps_per_execution=t.steps_per_execution)


def train(config: ExperimentConfig, splits: Splits, model_dir: str,
          strategy: tf.distribute.Strategy,
          extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> keras.Model:
  """Trains (or resumes) and returns the model after the last epoch."""
  t = config.train
  chief = distribute_utils.is_chief()
  write_dir = model_dir if chief else os.path.join(
      model_dir, "worker_tmp", str(distribute_utils.task_info()[1]))
  state_path = os.path.join(write_dir, STATE_FILE)
  state = _read_json(state_path) or {"epochs_done": 0, "finished": False}
  with strategy.scope():
    model = models.build_model(t.model, splits.num_classes, splits.image_shape, config.model)
    _compile(model, config)
  if state.get("epochs_done", 0) >= t.epochs:
    logging.info("training already finished (%d epochs) in %s; loading it",
                 state["epochs_done"], model_dir)
    with strategy.scope():
      model.optimizer.build(model.trainable_variables)
      model.load_weights(os.path.join(write_dir, "checkpoints", "latest.weights.h5"))
    return model
  monitor = "val_accuracy" if splits.val is not None else "accuracy"
  ckpt_dir = os.path.join(write_dir, "checkpoints")
  tf.io.gfile.makedirs(ckpt_dir)
  best = keras.callbacks.ModelCheckpoint(os.path.join(ckpt_dir, "best.keras"), monitor=monitor,
                                         mode="max", save_best_only=True,
                                         initial_value_threshold=state.get("best"))
  run_state = _RunState(state_path, monitor, state)
  callbacks = [
      keras.callbacks.BackupAndRestore(os.path.join(write_dir, "backup"),
                                       delete_checkpoint=False),
  ]
  if t.depth_refinements:  # before the checkpoints: they must see the refined model
    callbacks.append(DepthSchedule(t, best, run_state))
  if t.precise_bn_images:  # validation and the checkpoints use the re-estimated statistics
    callbacks.append(PreciseBatchNorm(precise_bn_images(splits, t.precise_bn_images, t.seed),
                                      splits.batch_size))
  callbacks += [
      keras.callbacks.ModelCheckpoint(os.path.join(ckpt_dir, "latest.weights.h5"),
                                      save_weights_only=True),
      best,
      run_state,
      keras.callbacks.CSVLogger(os.path.join(write_dir, "training_log.csv"), append=True),
      keras.callbacks.TensorBoard(os.path.join(write_dir, "tensorboard")),
  ] + list(extra_callbacks)
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    _work_around_multi_worker_symbolic_build(model, strategy)
  if models.is_puppet(t.model):
    logging.info("execution=%s, complexity_bins=%d, batch %d: a training step %s",
                 config.model.execution, config.model.complexity_bins,
                 config.data.batch_size,
                 training_memory.describe(config.model, config.data.batch_size))
  start = time.time()
  try:
    model.fit(splits.train, validation_data=splits.val, epochs=t.epochs, callbacks=callbacks,
              verbose=t.verbose)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless out of memory)
    if not training_memory.is_out_of_memory(e):
      raise
    raise training_memory.TrainingOutOfMemoryError(training_memory.out_of_memory_message(
        t.model, config.model, config.data.batch_size, t.jit_compile, e)) from e
  state["finished"] = True
  state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - start
  _write_json(state_path, state)
  return model


def _work_around_multi_worker_symbolic_build(model: keras.Model,
                                              strategy: tf.distribute.Strategy) -> None:
  """Works around two Keras 3.15 bugs with MultiWorkerMirroredStrategy in `fit`.

  `fit` first builds the model symbolically from a batch that it reduces eagerly with
  `strategy.reduce("MEAN", batch)`; under MultiWorkerMirroredStrategy that eager collective
  reduce of a PerReplica batch fails ("Attempt to convert a value (PerReplica...)"). Only the
  batch's shapes and dtypes matter for the build, so use the first local replica's batch.
  """
  def build(iterator=None, data_batch=None):
    if iterator is not None:
      for _, _, it in iterator:
        data_batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], next(it))
        break
    with strategy.scope():
      model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

  model._maybe_symbolic_build = build  # pylint: disable=protected-access

  # Each step's logs are then reduced with strategy.reduce("MEAN", v, axis=0), which fails on
  # scalars ("Invalid reduction dimension 0"); give them shape (1,), whose mean over workers
  # is the same scalar (the metric values are already synchronized across workers).
  def rank1(step):
    return lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}

  model.train_step = rank1(model.train_step)
  model.test_step = rank1(model.test_step)


def _load_for_eval(config: ExperimentConfig, splits: Splits, model_dir: str,
                   strategy: tf.distribute.Strategy, model: Optional[keras.Model]):
  best = os.path.join(model_dir, "checkpoints", "best.keras")
  latest = os.path.join(model_dir, "checkpoints", "latest.weights.h5")
  if tf.io.gfile.exists(best):
    logging.info("evaluating the best checkpoint %s", best)
    return keras.models.load_model(best), "best"
  if model is not None:
    return model, "last"
  if tf.io.gfile.exists(latest):
    with strategy.scope():
      model = models.build_model(config.train.model, splits.num_classes, splits.image_shape,
                                 config.model)
      model.load_weights(latest)
    return model, "latest"
  raise RunError(f"--mode=eval found no checkpoint in {model_dir}/checkpoints "
                          "(looked for best.keras and latest.weights.h5); train first")


EXPORT_CACHE_BINS = ("all", "train")


def check_export_kernel_cache(config: ExperimentConfig, kernel_cache: Optional[str],
                              cache_bins: str = "all",
                              compute_dtype: Optional[str] = None) -> None:
  """Raises ValueError unless `kernel_cache` (None or a cache dtype), `cache_bins` and the
  cache's `compute_dtype` (None: the model's) fit the experiment."""
  if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"--export_kernel_cache_compute_dtype must be one of "
                     f"{COMPUTE_DTYPES}, got {compute_dtype!r}")
  if compute_dtype not in (None, "float32") and (kernel_cache is None
                                     or config.model.execution != "bucketed"
                                     or config.model.bucketed_inference != "loop"):
    raise ValueError("--export_kernel_cache_compute_dtype needs --export_kernel_cache and "
                     "--execution=bucketed with --bucketed_inference=loop (the default)")
  if cache_bins not in EXPORT_CACHE_BINS:
    raise ValueError(f"--export_kernel_cache_bins must be one of {EXPORT_CACHE_BINS}, got "
                     f"{cache_bins!r}")
  if kernel_cache is None:
    if cache_bins != "all":
      raise ValueError("--export_kernel_cache_bins=train needs --export_kernel_cache")
    return
  from official.puppet_cnn.modeling.puppet_classifier import CACHE_DTYPES, CACHE_DTYPES_BY_EXECUTION  # pylint: disable=import-outside-toplevel
  if kernel_cache not in CACHE_DTYPES:
    raise ValueError(f"--export_kernel_cache must be one of {CACHE_DTYPES}, got "
                     f"{kernel_cache!r}")
  if (not models.is_puppet(config.train.model)
      or config.model.execution not in CACHE_DTYPES_BY_EXECUTION):
    raise ValueError("--export_kernel_cache needs a Puppet-CNN model with "
                     "--execution=bucketed or gathered (and --complexity_bins > 0); got "
                     f"--model={config.train.model} --execution={config.model.execution}")
  if kernel_cache not in CACHE_DTYPES_BY_EXECUTION[config.model.execution]:
    raise ValueError("--export_kernel_cache=int8 needs --execution=bucketed: a gathered "
                     "model's kernel table is float32, float16 or bfloat16")


def training_bins(model, splits: Splits) -> tuple:
  """The complexity bins that one epoch of the training split's images fall into."""
  seen = set()
  for images, _ in splits.train.take(splits.steps_per_epoch):
    seen.update(model.occupied_bins(np.asarray(images)))
  logging.info("complexity bins of one epoch of training images (%d batches): %s",
               splits.steps_per_epoch, sorted(seen))
  return tuple(sorted(seen))


def batch_grouping_args(config: ExperimentConfig) -> Dict[str, Any]:
  """`build_datasets` keyword arguments for `config.data.batch_grouping`: with
  'complexity_bin', the model's bin of each image (`complexity_batching`); else none."""
  if config.data.batch_grouping == "none":
    return {}
  if config.model.execution != "bucketed":
    logging.warning(
        "--batch_grouping=%s with --execution=%s: only bucketed training runs the puppeteer "
        "per occupied bin, so only it gets cheaper; the batches are grouped all the same",
        config.data.batch_grouping, config.model.execution)
  if config.model.generator_norm != "state":
    logging.warning(
        "--batch_grouping=%s with --generator_norm=%s: each one-bin batch normalizes G by its "
        "bin's state alone in training, and inference by moving averages over all bins, so "
        "the kernels trained are not the ones served; --generator_norm=state normalizes the "
        "same way in both (docs/benchmarks_grouped.md, docs/generator_norm.md)",
        config.data.batch_grouping, config.model.generator_norm)
  return dict(batch_key_fn=complexity_batching.complexity_bin_fn(config.model),
              num_keys=config.model.complexity_bins)


@contextlib.contextmanager
def global_dtype_policy(name: str) -> Iterator[None]:
  """Keras's global dtype policy set to `name` inside the block, the previous one after."""
  previous = keras.config.dtype_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def run(config: ExperimentConfig, mode: str, model_dir: str, export_dir: Optional[str] = None,
        overwrite: bool = False, splits: Optional[Splits] = None,
        strategy: Optional[tf.distribute.Strategy] = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        export_kernel_cache: Optional[str] = None,
        export_kernel_cache_bins: str = "all",
        export_kernel_cache_compute_dtype: Optional[str] = None) -> Dict[str, Any]:
  """Trains and/or evaluates as `mode` says; returns the results dict ({} for mode=train).

  Args:
    config: the experiment.
    mode: 'train', 'eval' or 'train_and_eval'.
    model_dir: where checkpoints, logs and results go (see the module docstring).
    export_dir: if set, also export a TF Serving SavedModel there.
    overwrite: delete an existing run in model_dir first.
    splits: datasets to use instead of building them from config.data (tests, notebooks).
    strategy: a tf.distribute strategy instead of config.train.distribution_strategy.
    callbacks: extra Keras callbacks for `fit` (run after the built-in ones).
    export_kernel_cache: None: export the generating model (only the puppeteer's weights);
      a cache dtype ('float32', 'float16', 'bfloat16', 'int8'): export every bin's kernels in
      that dtype with it (a bucketed Puppet-CNN only; `serving/export.py`, "Kernel cache").
    export_kernel_cache_bins: with `export_kernel_cache`: 'all' (default) caches every bin;
      'train' only the bins the training split's images fall into, an image in another bin
      being served by the nearest cached bin (`cache_kernels(fallback='nearest')`).
    export_kernel_cache_compute_dtype: with `export_kernel_cache`: the dtype of the served
      convolutions (`cache_kernels(compute_dtype=)`): None (default): the model's (its
      dtype policy's: float32 unless trained with --dtype_policy=mixed_*), or 'float32',
      'bfloat16', 'float16'.
  """
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  if not model_dir:
    raise ValueError("--model_dir is required")
  check_export_kernel_cache(config, export_kernel_cache, export_kernel_cache_bins,
                            export_kernel_cache_compute_dtype)
  t = config.train
  keras.utils.set_random_seed(t.seed)
  with global_dtype_policy(t.dtype_policy):
    strategy = strategy or distribute_utils.get_strategy(t.distribution_strategy)
    if distribute_utils.is_chief():
      prepare_model_dir(config, model_dir, overwrite)
    if splits is None:
      splits = build_datasets(config.data, **batch_grouping_args(config))
    logging.info("data: %d train / %d val / %d test images, %d classes, %s", splits.num_train,
                 splits.num_val, splits.num_test, splits.num_classes, splits.image_shape)
    model = None
    if mode in ("train", "train_and_eval"):
      model = train(config, splits, model_dir, strategy, callbacks)
    results: Dict[str, Any] = {}
    if mode in ("eval", "train_and_eval") and distribute_utils.is_chief():
      model, which = _load_for_eval(config, splits, model_dir, strategy, model)
      results = evaluation.evaluate_model(model, splits.test, splits.num_test,
                                          bucket_edges=t.entropy_bucket_edges,
                                          verbose=min(t.verbose, 1))
      state = _read_json(os.path.join(model_dir, STATE_FILE)) or {}
      results.update(
          model=t.model, checkpoint=which, dataset=config.data.dataset,
          dtype_policy=t.dtype_policy,
          epochs_trained=state.get("epochs_done"), best_epoch=state.get("best_epoch"),
          train_seconds=state.get("train_seconds"), stored_params=int(model.count_params()),
          machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
          command=" ".join(sys.argv))
      if models.is_puppet(t.model):
        results["depth_scale"] = model.depth_scale
        from official.puppet_cnn.serving import macs  # pylint: disable=import-outside-toplevel
        if all(d is not None for d in model.config.input_shape[:2]):
          results["macs_at_mean_depth"] = macs.puppet_cnn_macs(model, results["mean_depth"])[
              "total"]
        results["parameter_breakdown"] = {
            k: v for k, v in model.parameter_breakdown().items()
            if k != "generated_kernel_params_by_depth"}
      _write_json(os.path.join(model_dir, RESULTS_FILE), results)
      logging.info("test top1 %.4f top5 %.4f on %d images", results["top1"], results["top5"],
                   results["num_test_images"])
    if export_dir and distribute_utils.is_chief():
      if model is None:
        model, _ = _load_for_eval(config, splits, model_dir, strategy, None)
      from official.puppet_cnn.serving import export  # pylint: disable=import-outside-toplevel
      cache_bins = None
      if export_kernel_cache and export_kernel_cache_bins == "train":
        cache_bins = training_bins(model, splits)
        results["export_kernel_cache_bins"] = list(cache_bins)
      path = export.export_saved_model(model, export_dir, model_name=t.model,
                                       class_names=list(splits.class_names),
                                       kernel_cache=export_kernel_cache,
                                       kernel_cache_bins=cache_bins,
                                       kernel_cache_compute_dtype=(
                                           export_kernel_cache_compute_dtype))
      results["export_path"] = path
      logging.info("exported SavedModel to %s", path)
    return results
