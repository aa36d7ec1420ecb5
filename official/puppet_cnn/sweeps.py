"""Evaluating one trained Puppet-CNN at other depths, integrators, widths and binnings.

The library behind `tools/convergence_table.py` (step scale x integrator, the continuous-in-
depth view), `tools/width_sweep.py` (width multipliers, the metamorphic view) and
`tools/binning_sweep.py` (complexity bins: what the fast bucketed execution costs). Nothing here
retrains: the model's own weights are evaluated at another resolution, optionally after
re-estimating the puppet's batch-norm statistics on a few training images (which changes only
those statistics; the model is restored afterwards).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from official.puppet_cnn import evaluation
from official.puppet_cnn.data.datasets import Splits
from official.puppet_cnn.data.datasets import build_datasets
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import macs as macs_lib
from official.puppet_cnn.serving import model_loading


def load_run(model_dir: str, data_dir: Optional[str] = None,
             limit: Optional[int] = None) -> Tuple[PuppetClassifier, Splits]:
  """The best checkpoint of a training run and its data splits (from its config.json).

  Args:
    model_dir: a training run's model_dir (config.json + checkpoints/).
    data_dir: overrides the run's data_dir (the data may have moved).
    limit: keep only the first `limit` examples of each split (quick looks).

  The training split comes in uniformly shuffled batches even for a run trained with
  `batch_grouping='complexity_bin'`.
  """
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{model_dir} is not a training run: no config.json there")
  with open(config_path) as f:
    config = ExperimentConfig.from_dict(json.load(f))
  model = model_loading.load_keras_model(model_dir)
  if not isinstance(model, PuppetClassifier):
    raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a PuppetClassifier")
  # Uniformly shuffled training batches whatever the run trained with: a sweep only reads
  # them as calibration images, and a batch-norm recalibration needs mixed batches.
  data = dataclasses.replace(config.data, **({"data_dir": data_dir} if data_dir else {}),
                             **({"limit": limit} if limit else {}), batch_grouping="none")
  return model, build_datasets(data)


def calibration_images(splits: Splits, count: int) -> Optional[np.ndarray]:
  """The first `count` training images (None for count 0)."""
  if not count:
    return None
  images = []
  for batch, _ in splits.train:
    images.append(np.asarray(batch))
    if sum(len(b) for b in images) >= count:
      break
  return np.concatenate(images)[:count]


class _Progress:
  """One log line per evaluation: which setting, how far through the sweep, and its result."""

  def __init__(self, name: str, total: int):
    self.name, self.total, self.done = name, total, 0

  def __call__(self, label: str, row: Dict[str, Any]) -> None:
    self.done += 1
    logging.info("[%s %d/%d] %s: top-1 %.2f%%, mean depth %.2f (%.0f s)", self.name, self.done,
                 self.total, label, 100 * row["top1"], row["mean_depth"], row["seconds"])


def _row(model: PuppetClassifier, dataset: tf.data.Dataset, num: int,
         progress: Optional[_Progress] = None, label: str = "") -> Dict[str, Any]:
  results = evaluation.evaluate_model(model, dataset, num, verbose=0)
  total = macs_lib.puppet_cnn_macs(model, results["mean_depth"])["total"]
  row = {"top1": results["top1"], "top5": results["top5"], "loss": results["loss"],
          "mean_depth": results["mean_depth"], "macs": total,
          "nonfinite_logits": results["nonfinite_logits"], "seconds": results["seconds"]}
  if progress is not None:
    progress(label, row)
  return row


def depth_sweep(model: PuppetClassifier, dataset: tf.data.Dataset, num: int,
                scales: Sequence[float], integrators: Sequence[str],
                calibration: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
  """Accuracy, mean depth and MACs per (integrator, depth_scale); the model is restored.

  With `calibration` images, each setting is evaluated twice: as is, and after
  `recalibrate_batch_norm` on those images (then the weights are put back).
  """
  original = (model.integrator, model.depth_scale)
  weights = model.get_weights()
  rows = []
  progress = _Progress("depth sweep", len(integrators) * len(scales) *
                       (1 if calibration is None else 2))
  try:
    for integrator in integrators:
      for scale in scales:
        model.integrator = integrator
        model.depth_scale = float(scale)
        row = {"integrator": integrator, "depth_scale": float(scale)}
        label = f"{integrator}, depth scale {float(scale):g}"
        row.update(_row(model, dataset, num, progress, label))
        if calibration is not None:
          model.recalibrate_batch_norm(calibration)
          recal = _row(model, dataset, num, progress, label + ", BN recalibrated")
          row.update({f"recalibrated_{k}": v for k, v in recal.items()})
          model.set_weights(weights)
        rows.append(row)
  finally:
    model.set_weights(weights)
    model.integrator, model.depth_scale = original
  return rows


def width_sweep(model: PuppetClassifier, dataset: tf.data.Dataset, num: int,
                widths: Sequence[float],
                calibration: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
  """Accuracy, MACs and stored parameters per width multiplier (`PuppetClassifier.at_width`).

  With `calibration` images each width is evaluated as generated and after recalibrating its
  batch-norm statistics.
  """
  rows = []
  progress = _Progress("width sweep", len(widths) * (1 if calibration is None else 2))
  for width in widths:
    narrow = model.at_width(float(width))
    row = {"width": float(width), "stage_channels": list(narrow.config.channels),
           "stored_params": narrow.parameter_breakdown()["total_stored"]}
    label = f"width {float(width):g}x"
    row.update(_row(narrow, dataset, num, progress, label))
    if calibration is not None:
      narrow.recalibrate_batch_norm(calibration)
      recal = _row(narrow, dataset, num, progress, label + ", BN recalibrated")
      row.update({f"recalibrated_{k}": v for k, v in recal.items()})
    rows.append(row)
  return rows


def generator_norm_sweep(model: PuppetClassifier, dataset: tf.data.Dataset, num: int,
                         calibration: np.ndarray, batch_size: int = 64
                         ) -> Tuple[List[Dict[str, Any]], PuppetClassifier]:
  """Accuracy of a 'batch' or 'batch_per_step' model with G's moving statistics as trained,
  re-estimated as one set, and re-estimated per step (`PuppetClassifier.with_generator_norm`,
  `recalibrate_batch_norm(generator=True, puppet=False)` on the `calibration` images, in
  batches of `batch_size`: use the training batch size, since G's batch statistics are over
  a batch's states).

  Returns (rows, the per-step model re-estimated on `calibration`); `model` is not changed.
  A 'state' model has no moving statistics in G: ValueError.
  """
  norm = model.config.generator_norm
  if norm == "state":
    raise ValueError("generator_norm_sweep: the model was trained with generator_norm='state', "
                     "which keeps no moving statistics in G")
  if calibration is None or not len(calibration):
    raise ValueError("generator_norm_sweep needs calibration images")
  progress = _Progress("generator-norm sweep", 3)
  rows = [dict(generator_norm=norm, statistics="as trained",
               **_row(model, dataset, num, progress, f"{norm}, as trained"))]
  one_set = model.with_generator_norm("batch", calibration, batch_size)
  rows.append(dict(generator_norm="batch", statistics=f"re-estimated on {len(calibration)} "
                   "training images", **_row(one_set, dataset, num, progress,
                                             "batch, re-estimated")))
  per_step = model.with_generator_norm("batch_per_step", calibration, batch_size)
  rows.append(dict(generator_norm="batch_per_step", statistics=f"re-estimated on "
                   f"{len(calibration)} training images",
                   **_row(per_step, dataset, num, progress, "batch_per_step, re-estimated")))
  return rows, per_step


def generator_norm_markdown(rows: Sequence[Dict[str, Any]]) -> str:
  """One row per way of keeping G's moving statistics."""
  head = "| G's moving statistics | kept as | top-1 | top-5 | vs as trained | mean depth |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  base = rows[0]["top1"]
  for r in rows:
    lines.append(f"| {r['statistics']} | `{r['generator_norm']}` | {_pct(r['top1'])} | "
                 f"{_pct(r['top5'])} | {100 * (r['top1'] - base):+.2f} pt | "
                 f"{r['mean_depth']:.2f} |")
  return "\n".join(lines) + "\n"


def _predicted_classes(model: PuppetClassifier, dataset: tf.data.Dataset) -> np.ndarray:
  predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1))
  return np.concatenate([predict(images).numpy() for images, _ in dataset])


def _own_bins(model: PuppetClassifier, dataset: tf.data.Dataset) -> np.ndarray:
  """Each image's complexity bin under the model's current binning (no cache involved)."""
  return np.concatenate([model.image_bins(np.asarray(images)) for images, _ in dataset])


def binning_sweep(model: PuppetClassifier, dataset: tf.data.Dataset, num: int,
                  bins: Sequence[int], execution: str = "bucketed",
                  cache_dtypes: Sequence[str] = ("float32",),
                  nearest_bins: Optional[Callable[[], Sequence[int]]] = None
                  ) -> List[Dict[str, Any]]:
  """Accuracy, mean depth and agreement with exact H per number of complexity bins.

  Bins 0 is exact H (the paper, per-sample execution); n > 0 quantizes H to n bins on
  [0, max H] and runs with `execution` ('bucketed', with cached kernels: the fast path, or
  'per_sample'). Bucketed rows come once per kernel-cache storage dtype in `cache_dtypes`
  (`PuppetClassifier.cache_kernels(dtype=)`; 'float16'/'bfloat16' round the kernels).
  `agreement` is the fraction of images whose predicted class equals the exact-H
  prediction. The model's binning is restored afterwards.

  `nearest_bins`: optional; called after each change of binning, it returns the bins to
  cache (e.g. those of the training images, `train_lib.training_bins`). Each bucketed row
  then gets a twin with only those bins cached and `fallback='nearest'` (an image in another
  bin runs as the nearest cached bin), with `cache_bins` 'nearest', the `cached_bins` and
  `moved`, the fraction of the evaluated images outside them.
  """
  cache_dtypes = list(cache_dtypes) or ["float32"]
  original = (model.config.complexity_bins, model.config.execution)
  rows = []
  per_cache = 2 if nearest_bins is not None else 1
  progress = _Progress("binning sweep", sum(
      per_cache * len(cache_dtypes) if n and execution == "bucketed" else 1 for n in bins))
  try:
    model.set_binning(0, "per_sample")
    exact = _predicted_classes(model, dataset)
    for n in bins:
      model.set_binning(int(n), execution if n else "per_sample")
      cached = bool(n) and execution == "bucketed"
      keep = None
      if cached and nearest_bins is not None:
        keep = tuple(int(b) for b in nearest_bins())
        moved = float(np.mean(~np.isin(_own_bins(model, dataset), keep)))
      for dtype in cache_dtypes if cached else [None]:
        for which in ("all", "nearest") if keep is not None else ("all",):
          row = {"bins": int(n), "execution": model.config.execution, "cache_dtype": dtype}
          if cached and which == "all":
            model.cache_kernels(dtype=dtype)
          elif cached:
            model.cache_kernels(bins=keep, dtype=dtype, fallback="nearest")
            row.update(cache_bins="nearest", cached_bins=list(keep), moved=moved)
          label = f"{int(n)} bins" if n else "exact H"
          label += f", {dtype} cache" if dtype not in (None, "float32") else ""
          label += f", nearest of {len(keep)} cached bins" if which == "nearest" else ""
          row.update(_row(model, dataset, num, progress, label))
          row["agreement"] = float(np.mean(_predicted_classes(model, dataset) == exact))
          rows.append(row)
  finally:
    model.set_binning(*original)
  return rows


def binning_markdown(rows: Sequence[Dict[str, Any]]) -> str:
  """One row per number of bins."""
  head = ("| complexity bins | execution | mean depth | top-1 | top-5 | same class as exact H |"
          " MMACs/image |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    execution = r["execution"]
    if r.get("cache_dtype") not in (None, "float32"):
      execution += f", {r['cache_dtype']} kernel cache"
    if r.get("cache_bins") == "nearest":
      execution += (f", only bins {_bin_ranges(r['cached_bins'])} cached, the nearest for "
                    f"the rest ({_pct(r['moved'])} of the images)")
    lines.append(f"| {r['bins'] or 'exact H'} | {execution} | {r['mean_depth']:.2f} | "
                 f"{_pct(r['top1'])} | {_pct(r['top5'])} | {_pct(r['agreement'])} | "
                 f"{r['macs'] / 1e6:.2f} |")
  return "\n".join(lines) + "\n"


def _bin_ranges(bins: Sequence[int]) -> str:
  """[7, 8, 9, 12] -> '7-9, 12'."""
  parts, bins = [], sorted(int(b) for b in bins)
  if not bins:
    return "none"
  start = prev = bins[0]
  for b in bins[1:] + [None]:
    if b is not None and b == prev + 1:
      prev = b
      continue
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    start = prev = b
  return ", ".join(parts)


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def depth_markdown(rows: Sequence[Dict[str, Any]]) -> str:
  """A convergence table: one row per (integrator, scale)."""
  recal = any("recalibrated_top1" in r for r in rows)
  head = ("| integrator | depth scale | mean depth | top-1 | top-5 | MMACs/image |"
          + (" top-1 recalibrated |" if recal else ""))
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    line = (f"| {r['integrator']} | {r['depth_scale']:g}x | {r['mean_depth']:.2f} | "
            f"{_pct(r['top1'])} | {_pct(r['top5'])} | {r['macs'] / 1e6:.2f} |")
    if recal:
      line += f" {_pct(r.get('recalibrated_top1'))} |"
    lines.append(line)
  return "\n".join(lines) + "\n"


def width_markdown(rows: Sequence[Dict[str, Any]]) -> str:
  """One row per width."""
  recal = any("recalibrated_top1" in r for r in rows)
  head = ("| width | stage channels | stored params | MMACs/image | top-1 | top-5 |"
          + (" top-1 recalibrated | top-5 recalibrated |" if recal else ""))
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    line = (f"| {r['width']:g}x | {'-'.join(str(c) for c in r['stage_channels'])} | "
            f"{r['stored_params']:,} | {r['macs'] / 1e6:.2f} | {_pct(r['top1'])} | "
            f"{_pct(r['top5'])} |")
    if recal:
      line += f" {_pct(r.get('recalibrated_top1'))} | {_pct(r.get('recalibrated_top5'))} |"
    lines.append(line)
  return "\n".join(lines) + "\n"
