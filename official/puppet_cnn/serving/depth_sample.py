"""Puppet-CNN's per-image depth measured on real images (for the mean-depth MAC columns).

A sample's depth depends only on its input complexity H and the config (D = floor(1 /
tanh(1 / H)), clamped to [min_depth, max_depth]; paper eq. 10), not on trained weights, so an
untrained model gives the depths a trained one would. Only the complexity is computed (an FFT
and two histograms per image), not the network.

`load_cifar10_test_images(data_dir)` reads the CIFAR-10 test batch from `data_dir`, which holds
`cifar-10-python.tar.gz`, or its extracted `cifar-10-batches-py/`, or `test_batch` itself.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from typing import Any, Dict, Optional

import numpy as np
from keras import ops

from official.puppet_cnn.modeling import complexity as complexity_lib

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TEST_MEMBER = "cifar-10-batches-py/test_batch"


def _decode_batch(raw: bytes) -> np.ndarray:
  batch = pickle.loads(raw, encoding="bytes")
  data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
  if data is None:
    raise ValueError("not a CIFAR-10 batch: no 'data' entry")
  data = np.asarray(data, np.uint8)
  if data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"not a CIFAR-10 batch: data has shape {data.shape}, not (N, 3072)")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC


def load_cifar10_test_images(data_dir: str, count: Optional[int] = None) -> np.ndarray:
  """The first `count` (default all 10,000) CIFAR-10 test images, uint8 (N, 32, 32, 3)."""
  data_dir = os.fspath(data_dir)
  for path in (os.path.join(data_dir, CIFAR10_TEST_MEMBER), os.path.join(data_dir,
                                                                          "test_batch")):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        images = _decode_batch(f.read())
      break
  else:
    archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
    if not os.path.isfile(archive):
      raise FileNotFoundError(
          f"no CIFAR-10 in {data_dir}: expected {CIFAR10_ARCHIVE}, "
          f"{CIFAR10_TEST_MEMBER} or test_batch")
    with tarfile.open(archive, "r:gz") as tar:
      try:
        member = tar.extractfile(CIFAR10_TEST_MEMBER)
      except KeyError as e:
        raise ValueError(f"{archive} has no {CIFAR10_TEST_MEMBER}") from e
      images = _decode_batch(member.read())
  return images if count is None else images[:count]


def depth_statistics(model, images, batch_size: int = 500) -> Dict[str, Any]:
  """Complexity and depth of each image under `model.config` (a PuppetClassifier).

  Returns:
    dict with `count`, `mean_depth`, `mean_complexity` and `depth_histogram`
    ({depth: number of images}).
  """
  c = model.config
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"need a non-empty batch of images (N, H, W, C), got {images.shape}")
  h_all, depth_all = [], []
  for start in range(0, len(images), batch_size):
    h = complexity_lib.image_complexity(images[start:start + batch_size], c.complexity)
    if c.depth_adaptation:
      depth = complexity_lib.depth_from_step(complexity_lib.step_size(h), c.min_depth,
                                             c.max_depth)
    else:
      depth = np.full(h.shape, c.depth_when_fixed, np.int32)
    h_all.append(ops.convert_to_numpy(h))
    depth_all.append(np.asarray(ops.convert_to_numpy(depth)))
  h = np.concatenate(h_all)
  depth = np.concatenate(depth_all)
  values, counts = np.unique(depth, return_counts=True)
  return {"count": int(len(depth)), "mean_depth": float(depth.mean()),
          "mean_complexity": float(h.mean()),
          "depth_histogram": {int(v): int(n) for v, n in zip(values, counts)}}
