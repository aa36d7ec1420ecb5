"""Loads CIFAR-10 / CIFAR-100 (python-pickle version) into uint8 NHWC arrays.

`load_cifar` reads the standard "python version" distribution of CIFAR
(`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`) in any of these layouts:

  * `data_dir` is a directory holding the archive
    (`<data_dir>/cifar-10-python.tar.gz`);
  * `data_dir` is the archive file itself (any file name);
  * `data_dir` is a directory holding the extracted folder
    (`<data_dir>/cifar-10-batches-py/data_batch_1`, ...);
  * `data_dir` is that extracted folder itself (`<data_dir>/data_batch_1`).

An extracted folder is preferred over an archive in the same directory.
Archives are read in one streaming pass, member by member, without extracting
anything to disk (about 1-2 s for CIFAR-10). Checksums are never verified, so
rebuilt or repacked archives load as long as their contents are valid.

When `data_dir` is None the environment variable `PUPPET_CNN_DATA_DIR` (if set
and non-empty) is used as `data_dir`. Without it, the data is fetched with
TensorFlow Datasets (`tfds.load`, if `tensorflow_datasets` is importable) and
otherwise with `keras.datasets.cifar10/cifar100.load_data()`; both download
into their own caches when online (offline, TFDS is only asked for data it has
already prepared, since its download retries for minutes). If both fail, a
`DataError` explains how to pass a data directory. Note that TFDS orders the
training images differently from the pickle batches, so seeded subsets drawn
from it select different images.

Batches are unpickled with a restricted unpickler that only allows the numpy
globals needed to rebuild an array (plus `_codecs.encode` for latin-1 bytes,
which Python 3 protocol-2 pickles use), like Keras's `load_batch`; a tampered
pickle cannot run code. Every failure (missing files, truncated archive,
corrupt pickle, wrong keys, bad shapes or labels) raises one `DataError` that
names the path and what was expected.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import os
import pickle
import posixpath
import socket
import tarfile
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from official.puppet_cnn.data.errors import DataError

# Environment variable used as the default `data_dir`.
DATA_DIR_ENV_VAR = "PUPPET_CNN_DATA_DIR"

IMAGE_SHAPE = (32, 32, 3)
_PIXELS_PER_IMAGE = 32 * 32 * 3

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck")

CIFAR100_FINE_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree",
    "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper",
    "table", "tank", "telephone", "television", "tiger", "tractor", "train",
    "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm")

CIFAR100_COARSE_CLASS_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers",
    "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals",
    "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2")

LABEL_MODES = ("fine", "coarse")


@dataclasses.dataclass(frozen=True)
class CifarSpec:
  """File layout of one CIFAR variant (python-pickle version).

  Attributes:
    name: 'cifar10' or 'cifar100'.
    display_name: human-readable name used in messages ('CIFAR-10').
    archive_name: file name of the official archive.
    folder_name: name of the folder inside the archive.
    train_members: pickle files (inside the folder) holding the train split,
      concatenated in this order.
    test_members: pickle files holding the test split.
  """
  name: str
  display_name: str
  archive_name: str
  folder_name: str
  train_members: Tuple[str, ...]
  test_members: Tuple[str, ...]

  @property
  def members(self) -> Tuple[str, ...]:
    return self.train_members + self.test_members


CIFAR_SPECS: Dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        display_name="CIFAR-10",
        archive_name="cifar-10-python.tar.gz",
        folder_name="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",)),
    "cifar100": CifarSpec(
        name="cifar100",
        display_name="CIFAR-100",
        archive_name="cifar-100-python.tar.gz",
        folder_name="cifar-100-python",
        train_members=("train",),
        test_members=("test",)),
}


@dataclasses.dataclass(frozen=True)
class CifarSource:
  """Where CIFAR data was found on disk.

  Attributes:
    kind: 'archive' (a tar(.gz) file read in one streaming pass) or 'folder'
      (a directory holding the extracted pickle files).
    path: the archive file or the folder that directly holds the pickles.
  """
  kind: str
  path: str


def get_spec(name: str) -> CifarSpec:
  """Returns the `CifarSpec` for 'cifar10' or 'cifar100'."""
  key = str(name).lower().replace("-", "").replace("_", "")
  if key not in CIFAR_SPECS:
    raise ValueError(
        f"Unknown CIFAR dataset {name!r}; expected one of "
        f"{sorted(CIFAR_SPECS)}.")
  return CIFAR_SPECS[key]


def _check_label_mode(spec: CifarSpec, label_mode: str) -> None:
  if label_mode not in LABEL_MODES:
    raise ValueError(
        f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}.")
  if spec.name == "cifar10" and label_mode != "fine":
    raise ValueError("CIFAR-10 has only one label set; use label_mode='fine'.")


def cifar_class_names(name: str, label_mode: str = "fine") -> Tuple[str, ...]:
  """Class names of 'cifar10' or 'cifar100' ('fine' or 'coarse' labels)."""
  spec = get_spec(name)
  _check_label_mode(spec, label_mode)
  if spec.name == "cifar10":
    return CIFAR10_CLASS_NAMES
  if label_mode == "coarse":
    return CIFAR100_COARSE_CLASS_NAMES
  return CIFAR100_FINE_CLASS_NAMES


def _num_classes(spec: CifarSpec, label_mode: str) -> int:
  return len(cifar_class_names(spec.name, label_mode))


def _label_key(spec: CifarSpec, label_mode: str) -> str:
  if spec.name == "cifar10":
    return "labels"
  return "fine_labels" if label_mode == "fine" else "coarse_labels"


# --------------------------------------------------------------------------
# Locating the data.


def _looked_for(spec: CifarSpec, directory: str) -> List[str]:
  first = spec.members[0]
  return [os.path.join(directory, spec.archive_name),
          os.path.join(directory, spec.folder_name, first),
          os.path.join(directory, first)]


def _folder_source(spec: CifarSpec, folder: str) -> Optional[CifarSource]:
  """A folder source if `folder` holds at least one of the pickle files."""
  if any(os.path.isfile(os.path.join(folder, m)) for m in spec.members):
    return CifarSource("folder", folder)
  return None


def locate_cifar(name: str, data_dir: str) -> CifarSource:
  """Finds CIFAR data under `data_dir` in any accepted layout.

  Args:
    name: 'cifar10' or 'cifar100'.
    data_dir: a directory holding the archive or the extracted folder, the
      archive file itself, or the extracted folder itself.

  Returns:
    A `CifarSource`.

  Raises:
    DataError: nothing usable exists at `data_dir`; the message lists every
      path that was looked for.
  """
  spec = get_spec(name)
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  expected = (f"expected {spec.archive_name}, an extracted "
              f"{spec.folder_name}/ folder, or that folder itself")
  if not os.path.exists(data_dir):
    raise DataError(
        f"{spec.display_name} data_dir does not exist: {data_dir} ({expected}).")
  if os.path.isfile(data_dir):
    return CifarSource("archive", data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(
        f"{spec.display_name} data_dir is neither a file nor a directory: "
        f"{data_dir}")
  for folder in (os.path.join(data_dir, spec.folder_name), data_dir):
    source = _folder_source(spec, folder)
    if source is not None:
      return source
  archive = os.path.join(data_dir, spec.archive_name)
  if os.path.isfile(archive):
    return CifarSource("archive", archive)
  looked = ", ".join(_looked_for(spec, data_dir))
  raise DataError(
      f"no {spec.display_name} data under {data_dir}: looked for {looked} "
      f"({expected}).")


# --------------------------------------------------------------------------
# Safe unpickling.


def _latin1_encode(obj, encoding="latin1", errors="strict"):
  """`_codecs.encode`, restricted to the latin-1 use in protocol-2 pickles."""
  if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(obj, str):
    raise pickle.UnpicklingError(
        f"refusing _codecs.encode({type(obj).__name__}, {encoding!r})")
  return codecs.encode(obj, encoding, errors)


def _numpy_globals() -> Dict[Tuple[str, str], object]:
  reconstruct = np.empty(0).__reduce__()[0]  # multiarray._reconstruct
  try:
    from numpy._core.numeric import _frombuffer  # numpy >= 2
  except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.numeric import _frombuffer  # pylint: disable=g-import-not-at-top
  allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode}
  for prefix in ("numpy.core", "numpy._core"):
    allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
    allowed[(f"{prefix}.numeric", "_frombuffer")] = _frombuffer
  return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds numpy arrays, dicts, lists and strings."""

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name} (only numpy arrays are "
          "allowed in CIFAR batches)") from None


def _unpickle(payload: bytes, where: str) -> dict:
  try:
    obj = _RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"corrupt CIFAR batch {where}: cannot unpickle it "
        f"({type(e).__name__}: {e}); expected a pickled dict with "
        "'data' and label keys.") from None
  if not isinstance(obj, dict):
    raise DataError(
        f"corrupt CIFAR batch {where}: expected a pickled dict, got "
        f"{type(obj).__name__}.")
  return {k.decode("latin1") if isinstance(k, bytes) else str(k): v
          for k, v in obj.items()}


def _decode_batch(payload: bytes, where: str, label_key: str,
                  num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N,32,32,3), labels int64 (N,)) of one batch."""
  d = _unpickle(payload, where)
  missing = [k for k in ("data", label_key) if k not in d]
  if missing:
    raise DataError(
        f"CIFAR batch {where} has keys {sorted(d)}; expected 'data' and "
        f"{label_key!r} (missing: {missing}).")
  data = d["data"]
  if not isinstance(data, np.ndarray):
    raise DataError(f"CIFAR batch {where}: 'data' is a "
                    f"{type(data).__name__}, expected a numpy array.")
  if data.ndim != 2 or data.shape[1] != _PIXELS_PER_IMAGE or not data.shape[0]:
    raise DataError(
        f"CIFAR batch {where}: 'data' has shape {data.shape}, expected "
        f"(N, {_PIXELS_PER_IMAGE}) with N > 0 (32x32 RGB, CHW order).")
  if data.dtype != np.uint8:
    if (not np.issubdtype(data.dtype, np.integer) or data.min() < 0
        or data.max() > 255):
      raise DataError(f"CIFAR batch {where}: 'data' has dtype {data.dtype}, "
                      "expected uint8 pixels in [0, 255].")
    data = data.astype(np.uint8)
  try:
    labels = np.asarray(d[label_key])
    labels_ok = labels.ndim == 1 and (
        np.issubdtype(labels.dtype, np.integer) or labels.size == 0)
  except Exception:  # pylint: disable=broad-except
    labels_ok = False
  if not labels_ok:
    raise DataError(f"CIFAR batch {where}: {label_key!r} must be a flat list "
                    "of integers.")
  labels = labels.astype(np.int64)
  if labels.shape[0] != data.shape[0]:
    raise DataError(
        f"CIFAR batch {where}: {labels.shape[0]} labels for "
        f"{data.shape[0]} images.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(
        f"CIFAR batch {where}: labels span [{labels.min()}, {labels.max()}], "
        f"expected [0, {num_classes - 1}].")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def _read_folder(spec: CifarSpec, folder: str) -> Dict[str, Tuple[bytes, str]]:
  missing = [m for m in spec.members
             if not os.path.isfile(os.path.join(folder, m))]
  if missing:
    raise DataError(
        f"incomplete {spec.display_name} folder {folder}: missing "
        f"{', '.join(missing)} (expected {', '.join(spec.members)}).")
  out = {}
  for m in spec.members:
    path = os.path.join(folder, m)
    try:
      with open(path, "rb") as f:
        out[m] = (f.read(), path)
    except OSError as e:
      raise DataError(f"cannot read CIFAR batch {path}: {e}") from None
  return out


def _read_archive(spec: CifarSpec, archive: str) -> Dict[str, Tuple[bytes, str]]:
  """Reads the needed members of a tar(.gz) in one streaming pass."""
  wanted = set(spec.members)
  out = {}
  seen = 0
  try:
    with tarfile.open(archive, mode="r|*") as tar:
      for member in tar:
        seen += 1
        base = posixpath.basename(member.name.rstrip("/"))
        parent = posixpath.basename(posixpath.dirname(member.name.rstrip("/")))
        if (not member.isfile() or base not in wanted or base in out
            or parent not in (spec.folder_name, "", ".")):
          continue
        f = tar.extractfile(member)
        out[base] = (f.read(), f"{archive}::{member.name}")
        if len(out) == len(wanted):
          break
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DataError(
        f"corrupt or truncated {spec.display_name} archive {archive} "
        f"({type(e).__name__}: {e}); expected a readable "
        f"{spec.archive_name}.") from None
  if len(out) != len(wanted):
    missing = [f"{spec.folder_name}/{m}" for m in spec.members if m not in out]
    raise DataError(
        f"{spec.display_name} archive {archive} lacks "
        f"{', '.join(missing)} ({seen} members read; expected "
        f"{spec.folder_name}/{{{','.join(spec.members)}}}).")
  return out


def _load_from_source(spec: CifarSpec, source: CifarSource,
                      label_mode: str):
  if source.kind == "archive":
    payloads = _read_archive(spec, source.path)
  else:
    payloads = _read_folder(spec, source.path)
  label_key = _label_key(spec, label_mode)
  num_classes = _num_classes(spec, label_mode)
  splits = []
  for members in (spec.train_members, spec.test_members):
    xs, ys = [], []
    for m in members:
      payload, where = payloads.pop(m)  # Frees the raw bytes as we go.
      x, y = _decode_batch(payload, where, label_key, num_classes)
      del payload
      xs.append(x)
      ys.append(y)
    splits.append((np.concatenate(xs) if len(xs) > 1 else xs[0],
                   np.concatenate(ys) if len(ys) > 1 else ys[0]))
  (x_train, y_train), (x_test, y_test) = splits
  return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# Online fallbacks (only when no data_dir and no environment variable).


# Host that TFDS and Keras download CIFAR from.
_DOWNLOAD_HOST = "www.cs.toronto.edu"


def _can_resolve(host: str) -> bool:
  """Whether `host` resolves (a cheap is-this-machine-online check)."""
  try:
    socket.getaddrinfo(host, 443)
    return True
  except (OSError, UnicodeError):
    return False


def _load_from_tfds(spec: CifarSpec, label_mode: str, download: bool = True):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  key = "label" if label_mode == "fine" else "coarse_label"
  out = []
  for split in ("train", "test"):
    d = tfds.as_numpy(tfds.load(spec.name, split=split, batch_size=-1,
                                download=download))
    out += [np.asarray(d["image"], np.uint8), np.asarray(d[key], np.int64)]
  return tuple(out)


def _load_from_keras(spec: CifarSpec, label_mode: str):
  import keras  # pylint: disable=g-import-not-at-top
  if spec.name == "cifar10":
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
  else:
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar100.load_data(
        label_mode=label_mode)
  out = []
  for x, y in ((x_train, y_train), (x_test, y_test)):
    x = np.asarray(x, np.uint8)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:  # channels_first
      x = x.transpose(0, 2, 3, 1)
    out += [np.ascontiguousarray(x), np.asarray(y, np.int64).reshape(-1)]
  return tuple(out)


def _load_online(spec: CifarSpec, label_mode: str):
  failures = []
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
    have_tfds = True
  except Exception as e:  # pylint: disable=broad-except
    have_tfds = False
    failures.append(f"tensorflow_datasets not importable ({e})")
  # Offline, TFDS would retry its download for minutes: only let it read a
  # dataset it has already prepared. Keras fails fast offline (and uses its
  # cache in ~/.keras/datasets when there is one).
  online = _can_resolve(_DOWNLOAD_HOST)
  if not online:
    failures.append(f"cannot resolve {_DOWNLOAD_HOST} (offline?)")
  loaders = []
  if have_tfds:
    loaders.append(("tfds.load" + ("" if online else "(download=False)"),
                    lambda s, m: _load_from_tfds(s, m, download=online)))
  loaders.append((f"keras.datasets.{spec.name}.load_data", _load_from_keras))
  for what, loader in loaders:
    try:
      return loader(spec, label_mode)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{what} failed ({type(e).__name__}: {e})")
  raise DataError(
      f"no {spec.display_name} data: no data_dir was given, "
      f"${DATA_DIR_ENV_VAR} is not set, and downloading failed "
      f"({'; '.join(failures)}). Pass --data_dir (or set "
      f"${DATA_DIR_ENV_VAR}) to a directory holding {spec.archive_name} or "
      f"the extracted {spec.folder_name}/ folder "
      f"({spec.folder_name}/{{{','.join(spec.members)}}}).")


# --------------------------------------------------------------------------
# Public entry point.


def _validate(spec: CifarSpec, label_mode: str, arrays, origin: str):
  num_classes = _num_classes(spec, label_mode)
  names = ("x_train", "y_train", "x_test", "y_test")
  for i in (0, 2):
    x, y = arrays[i], arrays[i + 1]
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8:
      raise DataError(f"{spec.display_name} from {origin}: {names[i]} has "
                      f"shape {x.shape} and dtype {x.dtype}, expected uint8 "
                      f"(N, 32, 32, 3).")
    if not x.shape[0]:
      raise DataError(f"{spec.display_name} from {origin}: {names[i]} is "
                      "empty.")
    if y.shape != (x.shape[0],):
      raise DataError(f"{spec.display_name} from {origin}: {names[i + 1]} "
                      f"has shape {y.shape}, expected ({x.shape[0]},).")
    if y.min() < 0 or y.max() >= num_classes:
      raise DataError(f"{spec.display_name} from {origin}: {names[i + 1]} "
                      f"spans [{y.min()}, {y.max()}], expected "
                      f"[0, {num_classes - 1}].")


def resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
  """`data_dir`, else `$PUPPET_CNN_DATA_DIR` if set and non-empty, else None."""
  if data_dir is not None and os.fspath(data_dir) != "":
    return os.fspath(data_dir)
  env = os.environ.get(DATA_DIR_ENV_VAR, "").strip()
  return env or None


def load_cifar(
    name: str,
    data_dir: Optional[str] = None,
    label_mode: str = "fine",
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads CIFAR-10 or CIFAR-100.

  Args:
    name: 'cifar10' or 'cifar100'.
    data_dir: where the data lies (see the module docstring for the accepted
      layouts). None: `$PUPPET_CNN_DATA_DIR` if set, else download with TFDS or
      Keras.
    label_mode: CIFAR-100 only: 'fine' (100 classes, default) or 'coarse'
      (20 superclasses).

  Returns:
    `(x_train, y_train, x_test, y_test)`: images as uint8 arrays of shape
    (N, 32, 32, 3) (NHWC, RGB, values in [0, 255]) and labels as int64 arrays
    of shape (N,). From the pickle files, the train split is data_batch_1..5 in
    order (CIFAR-10) and the test split is test_batch.

  Raises:
    ValueError: unknown `name` or `label_mode`.
    DataError: the data is missing, empty, corrupt or malformed.
  """
  spec = get_spec(name)
  _check_label_mode(spec, label_mode)
  resolved = resolve_data_dir(data_dir)
  if resolved is None:
    arrays = _load_online(spec, label_mode)
    origin = "TFDS/Keras download"
  else:
    source = locate_cifar(spec.name, resolved)
    arrays = _load_from_source(spec, source, label_mode)
    origin = source.path
  _validate(spec, label_mode, arrays, origin)
  return arrays
