"""How big a model is: parameters, weight bytes, SavedModel bytes on disk and gzipped.

* `stored_parameters`: every value a saved model must store: all weights, trainable or not
  (batch-norm moving statistics included), the way `keras.Model.count_params()` counts.
  Random-seed state (e.g. of Dropout) is not a weight and is left out.
* `stored_weight_bytes`: those weights at their actual dtypes (4 bytes for float32, 1 for the
  int8 kernels of a quantized layer).
* `paper_param_bytes`: float32 bytes the way the Puppet-CNN paper counts them: for Puppet-CNN
  its Table 5 "Param Size", 4 x the parameters of the puppeteer's G only (the learned initial
  state, the puppet's batch norms and the classifier are left out); for every other model
  4 x all its parameters (what the paper lists for the baselines, e.g. AlexNet 11.64 MB).
* `directory_bytes`: the sum of the sizes of the files under a folder (a SavedModel version).
* `gzipped_tar_bytes`: the size of `tar czf` of that folder (gzip level 6, gzip's default):
  what a download or a container layer costs; zeros (pruned weights) compress away.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np


def _is_puppet_cnn(model) -> bool:
  return hasattr(model, "parameter_breakdown") and hasattr(model, "puppeteer")


def stored_parameters(model) -> int:
  """Number of stored weight values (trainable and not)."""
  if _is_puppet_cnn(model) and not model.built:
    model.build()
  return int(sum(int(np.prod(w.shape, dtype=np.int64)) for w in model.weights))


def stored_weight_bytes(model) -> int:
  """Bytes of the stored weights at their dtypes."""
  if _is_puppet_cnn(model) and not model.built:
    model.build()
  return int(sum(int(np.prod(w.shape, dtype=np.int64)) * np.dtype(w.dtype).itemsize
                 for w in model.weights))


def paper_param_bytes(model) -> int:
  """float32 bytes as the paper counts them (Puppet-CNN: G alone; others: everything)."""
  if _is_puppet_cnn(model):
    return int(round(model.parameter_breakdown()["paper_param_size_mb"] * 1e6))
  return 4 * stored_parameters(model)


def directory_bytes(path: str) -> int:
  """Sum of the sizes of all regular files under `path` (symlinks not followed)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no folder at {path}")
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      if os.path.isfile(full) and not os.path.islink(full):
        total += os.path.getsize(full)
  return total


def tar_gz_bytes(path: str, compresslevel: int = 6) -> bytes:
  """A reproducible .tar.gz of folder `path` (sorted names, zeroed times and owners)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no folder at {path}")
  raw = io.BytesIO()
  with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
    with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
      base = os.path.basename(os.path.normpath(path))

      def clean(info):
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

      for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        arc_root = base if rel == "." else os.path.join(base, rel)
        tar.add(root, arcname=arc_root, recursive=False, filter=clean)
        for name in sorted(files):
          tar.add(os.path.join(root, name), arcname=os.path.join(arc_root, name),
                  recursive=False, filter=clean)
  return raw.getvalue()


def gzipped_tar_bytes(path: str, compresslevel: int = 6) -> int:
  """Size in bytes of `tar_gz_bytes(path)`."""
  return len(tar_gz_bytes(path, compresslevel))
