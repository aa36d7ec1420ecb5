"""Test-set evaluation: top-1/top-5, loss, per-sample depth histogram, accuracy by complexity.

Works for every model of `official.puppet_cnn.models`: Puppet-CNN reports its own depth and
complexity; for baselines the complexity is measured with the same `image_complexity`, so the
accuracy-by-complexity buckets compare like for like.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Sequence

import keras
import numpy as np
import tensorflow as tf

from official.puppet_cnn.modeling import complexity as complexity_lib
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier


def _predict_fn(model: keras.Model):
  if isinstance(model, PuppetClassifier):
    def fn(images):
      out = model(images, training=False, return_details=True)
      return out["logits"], out["complexity"], out["depth"]
  else:
    def fn(images):
      logits = model(images, training=False)
      return logits, complexity_lib.image_complexity(images), tf.zeros(tf.shape(logits)[:1],
                                                                        tf.int32)
  return tf.function(fn, reduce_retracing=True)


def evaluate_model(model: keras.Model, dataset: tf.data.Dataset, num_examples: int | None = None,
                   bucket_edges: Sequence[float] = (0.0, 5.0, 6.0, 6.5, 7.0, 7.5, 8.0),
                   top_k: int = 5, verbose: int = 1) -> Dict[str, Any]:
  """Evaluates `model` on every example of `dataset` ((images, labels) batches).

  Returns a JSON-ready dict with top1, top5, loss, num_test_images, nonfinite_logits (images
  whose logits hold a NaN or an infinity: counted as wrong), depth_histogram (Puppet-CNN only),
  mean_depth, and accuracy_by_entropy_bucket.
  """
  predict = _predict_fn(model)
  logits_all, labels_all, h_all, depth_all = [], [], [], []
  progress = keras.utils.Progbar(num_examples, verbose=verbose, unit_name="image")
  start = time.time()
  for images, labels in dataset:
    logits, h, depth = predict(images)
    logits_all.append(np.asarray(logits, np.float64))
    labels_all.append(np.asarray(labels))
    h_all.append(np.asarray(h))
    depth_all.append(np.asarray(depth))
    progress.add(len(labels))
  seconds = time.time() - start
  if not logits_all:
    raise ValueError("evaluation dataset is empty")
  logits = np.concatenate(logits_all)
  labels = np.concatenate(labels_all).astype(np.int64)
  h = np.concatenate(h_all)
  depth = np.concatenate(depth_all)
  n = len(labels)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = float(-log_probs[np.arange(n), labels].mean())
  # Rank of the true class = other classes scoring at least as high: a tie counts against
  # the model (an all-equal row is never "in the top 5"; e.g. SqueezeNet's ReLU'd logits).
  ranks = (logits >= logits[np.arange(n), labels][:, None]).sum(axis=1) - 1
  # A row with a NaN or infinite logit is wrong (NaN compares false everywhere, which would
  # otherwise put the true class at "rank -1", inside the top 5).
  finite = np.isfinite(logits).all(axis=1)
  correct1 = (ranks == 0) & finite
  correct_k = (ranks < top_k) & (ranks >= 0) & finite
  results: Dict[str, Any] = {
      "num_test_images": int(n),
      "top1": float(correct1.mean()),
      f"top{top_k}": float(correct_k.mean()),
      "loss": loss,
      "seconds": seconds,
      "mean_complexity": float(h.mean()),
      "nonfinite_logits": int((~finite).sum()),
  }
  if isinstance(model, PuppetClassifier):
    values, counts = np.unique(depth, return_counts=True)
    results["depth_histogram"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    results["mean_depth"] = float(depth.mean())
  buckets = []
  edges = list(bucket_edges)
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = i == len(edges) - 2
    mask = (h >= lo) & ((h <= hi) if last else (h < hi))
    entry = {"low": lo, "high": hi, "count": int(mask.sum()),
             "top1": float(correct1[mask].mean()) if mask.any() else None}
    if isinstance(model, PuppetClassifier) and mask.any():
      entry["mean_depth"] = float(depth[mask].mean())
    buckets.append(entry)
  results["accuracy_by_entropy_bucket"] = buckets
  return results
