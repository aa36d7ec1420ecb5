"""Writers of tiny fake CIFAR archives / folders and image trees for tests."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from typing import Dict, Optional

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

CIFAR10_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6)) + (
    "test_batch",)


def real_cifar10_dir() -> Optional[str]:
  """$PUPPET_CNN_DATA_DIR if set, else <repo_root>/../shared/data, if present."""
  env = os.environ.get("PUPPET_CNN_DATA_DIR", "").strip()
  candidate = env or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
  candidate = os.path.abspath(candidate)
  for path in (os.path.join(candidate, "cifar-10-python.tar.gz"),
               os.path.join(candidate, "cifar-10-batches-py", "test_batch"),
               os.path.join(candidate, "test_batch")):
    if os.path.exists(path):
      return candidate
  if os.path.isfile(candidate):
    return candidate
  return None


@functools.lru_cache(maxsize=None)
def real_cifar10_folder() -> Optional[str]:
  """real_cifar10_dir(), as an extracted `cifar-10-batches-py` folder when it is an archive.

  Decompressing the 170 MB archive takes 2-4 s per load, and the tests that train on real
  images load it dozens of times (every run, every subprocess). Those tests read the same
  images from a copy extracted once into the temp directory (keyed by the archive's path,
  size and mtime; written to a staging folder and renamed, so a copy is always complete).
  The loader's own archive reading is tested with real_cifar10_dir() (tests/data). Falls back
  to real_cifar10_dir() when there is no archive or it cannot be extracted.
  """
  found = real_cifar10_dir()
  if found is None:
    return None
  if os.path.isfile(found):
    archive = found
  else:
    if (os.path.exists(os.path.join(found, "cifar-10-batches-py", "test_batch"))
        or os.path.exists(os.path.join(found, "test_batch"))):
      return found  # already extracted (the loader prefers that over an archive beside it)
    archive = os.path.join(found, "cifar-10-python.tar.gz")
  stat = os.stat(archive)
  key = hashlib.sha1(f"{os.path.realpath(archive)}:{stat.st_size}:{stat.st_mtime_ns}"
                     .encode()).hexdigest()[:12]
  root = os.path.join(tempfile.gettempdir(), f"puppet_cnn_tests_cifar10_{key}")
  if all(os.path.isfile(os.path.join(root, "cifar-10-batches-py", m)) for m in CIFAR10_MEMBERS):
    return root
  from official.puppet_cnn.data import cifar  # pylint: disable=import-outside-toplevel
  try:
    members = cifar._read_archive(cifar.get_spec("cifar10"), archive)  # pylint: disable=protected-access
  except cifar.DataError:
    return found
  staging = None
  try:
    staging = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=os.path.dirname(root))
    folder = os.path.join(staging, "cifar-10-batches-py")
    os.makedirs(folder)
    for name, (payload, _) in members.items():
      with open(os.path.join(folder, name), "wb") as f:
        f.write(payload)
    try:
      os.rename(staging, root)
      staging = None
    except OSError:  # another process renamed its copy first
      pass
    return root
  except OSError:
    return found
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)


def cifar_batch_bytes(data: np.ndarray, labels, label_key: bytes = b"labels",
                      extra: Optional[Dict[bytes, object]] = None,
                      protocol: int = 2) -> bytes:
  """A pickled batch dict with bytes keys, like the original python-2 files."""
  d = {b"batch_label": b"fake batch", label_key: [int(v) for v in labels],
       b"data": data, b"filenames": [b"f%d.png" % i for i in range(len(data))]}
  if extra:
    d.update(extra)
  return pickle.dumps(d, protocol=protocol)


def make_cifar10_batches(num_per_batch: int = 4, seed: int = 0):
  """Returns ({member: pickle bytes}, x_train, y_train, x_test, y_test).

  Images of data_batch_1 are random except image 0, which is all zeros but
  for one red pixel (row 3, col 5) = 200, one green pixel (row 7, col 1) = 100
  and one blue pixel (row 31, col 30) = 50, written straight into the CHW
  rows of the pickle.
  """
  rng = np.random.default_rng(seed)
  payloads, xs, ys = {}, {}, {}
  for member in CIFAR10_MEMBERS:
    data = rng.integers(0, 256, (num_per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, num_per_batch)
    if member == "data_batch_1":
      data[0] = 0
      data[0, 0 * 1024 + 3 * 32 + 5] = 200
      data[0, 1 * 1024 + 7 * 32 + 1] = 100
      data[0, 2 * 1024 + 31 * 32 + 30] = 50
    payloads[member] = cifar_batch_bytes(data, labels)
    # Independent CHW -> HWC conversion, pixel by pixel.
    hwc = np.zeros((num_per_batch, 32, 32, 3), np.uint8)
    for n in range(num_per_batch):
      for ch in range(3):
        for row in range(32):
          hwc[n, row, :, ch] = data[n, ch * 1024 + row * 32:
                                    ch * 1024 + row * 32 + 32]
    xs[member], ys[member] = hwc, labels.astype(np.int64)
  x_train = np.concatenate([xs[f"data_batch_{i}"] for i in range(1, 6)])
  y_train = np.concatenate([ys[f"data_batch_{i}"] for i in range(1, 6)])
  return payloads, x_train, y_train, xs["test_batch"], ys["test_batch"]


def write_tar(path: str, files: Dict[str, bytes], mode: str = "w:gz") -> str:
  with tarfile.open(path, mode) as tar:
    folders = sorted({os.path.dirname(n) for n in files if os.path.dirname(n)})
    for folder in folders:
      info = tarfile.TarInfo(folder)
      info.type = tarfile.DIRTYPE
      info.mode = 0o755
      tar.addfile(info)
    for name, payload in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return path


def write_folder(folder: str, files: Dict[str, bytes]) -> str:
  os.makedirs(folder, exist_ok=True)
  for name, payload in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(payload)
  return folder


def cifar10_archive_files(payloads: Dict[str, bytes]) -> Dict[str, bytes]:
  files = {"cifar-10-batches-py/readme.html": b"<html></html>",
           "cifar-10-batches-py/batches.meta": pickle.dumps(
               {b"label_names": [b"a"] * 10}, protocol=2)}
  files.update({f"cifar-10-batches-py/{m}": p for m, p in payloads.items()})
  return files
