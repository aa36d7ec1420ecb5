"""tf.distribute strategies by name (TensorFlow-only, like Model Garden's distribute_utils)."""

from __future__ import annotations

import json
import os

import tensorflow as tf


def get_strategy(name: str) -> tf.distribute.Strategy:
  """'one_device' | 'mirrored' | 'multi_worker_mirrored' -> a tf.distribute.Strategy."""
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if name == "mirrored":
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not devices:
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if name == "multi_worker_mirrored":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("--distribution_strategy=multi_worker_mirrored needs the TF_CONFIG "
                       "environment variable (cluster and task) on every worker")
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f"unknown distribution strategy {name!r}")


def task_info() -> tuple[str, int]:
  """(task type, index) from TF_CONFIG; ('chief'-equivalent 'worker', 0) without one."""
  config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  task = config.get("task", {})
  return task.get("type", "worker"), int(task.get("index", 0))


def is_chief() -> bool:
  """The worker that writes checkpoints, logs and results (worker 0, or the 'chief')."""
  task_type, index = task_info()
  return task_type == "chief" or (task_type == "worker" and index == 0)


def use_logical_cpus(count: int) -> None:
  """Splits the CPU into `count` logical devices (to test 'mirrored' on one CPU)."""
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
