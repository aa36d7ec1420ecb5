"""Exports a classifier as a SavedModel in TensorFlow Serving's directory layout.

    path = export_saved_model(model, "/models", "puppet_cnn")   # -> /models/puppet_cnn/1
    # tensorflow_model_server --model_base_path=/models/puppet_cnn --model_name=puppet_cnn

Layout (TF Serving loads the highest numeric version and ignores everything else):

    <export_dir>/<model_name>/<version>/saved_model.pb
                                       /variables/...
                                       /assets.extra/model_info.json

Signatures (all outputs are batched, B = number of images):

* `serving_default`: input `images`, uint8 [None, H, W, C] raw pixels (H, W, C from the model's
  input shape; a None height/width stays None). Outputs `probabilities` float32 [B, classes]
  (softmax of the logits), `top_k_classes` int32 [B, k], `top_k_probabilities` float32 [B, k]
  and, for Puppet-CNN only, `depth` int32 [B] (units per stage the image got) and `complexity`
  float32 [B] (its input complexity H in bits). Baselines have no `depth` output: their depth is
  a constant of the architecture, not a per-image quantity.
* `float_images` (only with `float_signature=True`): the same outputs for float32 pixels in
  [0, 255]; Puppet-CNN rejects out-of-range pixels at run time (InvalidArgumentError). Off by
  default: it stores a second copy of the graph (for Puppet-CNN about 0.7 MB).

The functions are traced in inference mode (`training=False`) and are not XLA-compiled. The
trace keeps every data-dependent step in the graph (complexity, depth, the puppeteer's kernel
generation, or the kernel cache, and the bounded depth loop), so each request gets its own
depth and kernels.

Kernel cache: a bucketed Puppet-CNN exported with a kernel cache serves the cached bins from
stored kernels instead of integrating the ODE per request (docs/benchmarks_cache_dtype.md:
about the speed of the static twin). `kernel_cache='int8'` (or another dtype) here caches
every bin without the generating fallback, so the served graph has no generating path
(`cache_kernels(fallback=False)`: a smaller graph, less memory; the served weights never
change, and a request the cache cannot serve would be an error, not a wrong answer). With
`kernel_cache_bins` it caches only those bins (e.g. the bins of the training images,
`PuppetClassifier.occupied_bins`) and a request in another bin runs as the nearest cached bin
(`fallback='nearest'`): a smaller SavedModel that still serves every image
(docs/memory_profile.md, docs/binning_nearest.md). The
cache's copy of the weights it was built from (about 1.3 MB for the full puppet) is saved
and checked on every request, like the Keras model's. A cache made with
`model.cache_kernels(...)` before exporting is exported as it is (with its fallback, by
default). The cache is saved as non-trainable variables next to the weights (`variables/`),
not inside the graph, and is described in model_info.json; it makes the SavedModel larger
(float32: roughly one set of the puppet's kernels per bin, int8 a quarter). Without a cache
(the default) the SavedModel holds only the puppeteer's weights.

A gathered Puppet-CNN (`execution='gathered'`) exports its kernel table the same way
(`kernel_cache='float32'`, 'float16' or 'bfloat16'; int8 is bucketed only). The table always
keeps its generating path (a conditional: a request in an uncached bin, or a stale table, runs
the puppeteer), so `kernel_cache` alone caches every bin with `fallback=True`, and
`kernel_cache_bins` caches those bins with `fallback='nearest'`.

The version is written to a hidden temporary folder and renamed into place, so a running
server never sees a half-written version; an existing version is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from official.puppet_cnn.modeling.puppet_classifier import CACHE_DTYPES
from official.puppet_cnn.modeling.puppet_classifier import CACHE_DTYPES_BY_EXECUTION
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier

SERVING_DEFAULT = "serving_default"
FLOAT_SIGNATURE = "float_images"
INPUT_NAME = "images"
MODEL_INFO_DIR = "assets.extra"
MODEL_INFO_FILE = "model_info.json"
_VERSION_RE = re.compile(r"^\d+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def is_puppet_cnn(model) -> bool:
  return isinstance(model, PuppetClassifier)


def model_input_shape(model) -> tuple:
  """(H, W, C) of the raw images `model` takes (H/W may be None)."""
  if is_puppet_cnn(model):
    return tuple(model.config.input_shape)
  try:
    shape = model.input_shape
  except (AttributeError, ValueError) as e:
    raise ValueError(
        f"cannot tell the input shape of model {model.name!r}: export needs a PuppetClassifier "
        "or a functional keras.Model built on keras.Input(shape=(H, W, C))") from e
  if isinstance(shape, list):
    if len(shape) != 1:
      raise ValueError(f"model {model.name!r} has {len(shape)} inputs; export supports "
                       "single-input image classifiers")
    shape = shape[0]
  shape = tuple(shape)
  if len(shape) != 4:
    raise ValueError(f"model {model.name!r} takes inputs of shape {shape}; export needs images "
                     "(batch, height, width, channels)")
  return shape[1:]


def model_num_classes(model) -> int:
  if is_puppet_cnn(model):
    return int(model.config.num_classes)
  shape = tuple(model.output_shape)
  if len(shape) != 2 or shape[-1] is None:
    raise ValueError(f"model {model.name!r} returns outputs of shape {shape}; export needs "
                     "logits of shape (batch, num_classes)")
  return int(shape[-1])


def existing_versions(model_base_dir: str) -> list:
  """Sorted numeric version folders of a TF Serving model base dir (empty if it is missing)."""
  if not os.path.isdir(model_base_dir):
    return []
  return sorted(int(n) for n in os.listdir(model_base_dir)
                if _VERSION_RE.match(n) and os.path.isdir(os.path.join(model_base_dir, n)))


def next_version(model_base_dir: str) -> int:
  """1 for a new model, else one more than the highest numeric version folder."""
  versions = existing_versions(model_base_dir)
  return versions[-1] + 1 if versions else 1


def _json_ready(value):
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def model_info(model, model_name: str, top_k: int,
               class_names: Optional[Sequence[str]] = None,
               float_signature: bool = False) -> Dict[str, Any]:
  """What `assets.extra/model_info.json` holds (TF Serving ignores the file)."""
  puppet = is_puppet_cnn(model)
  outputs = ["probabilities", "top_k_classes", "top_k_probabilities"]
  if puppet:
    outputs += ["depth", "complexity"]
  info = {
      "model_name": model_name,
      "keras_model_name": model.name,
      "architecture": "puppet_cnn" if puppet else "keras_functional",
      "num_classes": model_num_classes(model),
      "class_names": list(class_names) if class_names is not None else None,
      "input_shape": list(model_input_shape(model)),
      "input_dtype": "uint8",
      "input_range": [0, 255],
      "top_k": int(top_k),
      "signatures": {SERVING_DEFAULT: {"inputs": {INPUT_NAME: "uint8"}, "outputs": outputs}},
      "tensorflow_version": tf.__version__,
      "keras_version": keras.__version__,
      # The Keras dtype policy the model computes under (Puppet-CNN: its convolutions).
      "dtype_policy": getattr(model, "precision_policy", model.dtype_policy.name),
  }
  if float_signature:
    info["signatures"][FLOAT_SIGNATURE] = {"inputs": {INPUT_NAME: "float32"},
                                           "outputs": outputs}
  if puppet:
    info["puppet_cnn_config"] = model.config.to_dict()
    info["parameter_breakdown"] = model.parameter_breakdown()
    cache = model.kernel_cache_info()
    info["kernel_cache"] = ({"bins": list(cache["bins"]), "dtype": cache["dtype"],
                             "bytes": cache["bytes"], "fallback": cache["fallback"],
                             "compute_dtype": cache["compute_dtype"]}
                            if cache["valid"] else None)
  else:
    info["parameter_breakdown"] = {
        "total_stored": int(sum(int(np.prod(w.shape)) for w in model.weights))}
  return _json_ready(info)


def serving_outputs(model, images, top_k: int) -> Dict[str, tf.Tensor]:
  """The serving outputs of `model` for a batch of raw pixels (any numeric dtype)."""
  puppet = is_puppet_cnn(model)
  if puppet:
    details = model(images, training=False, return_details=True)
    logits = details["logits"]
  else:
    logits = model(images, training=False)
  probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
  top_p, top_i = tf.math.top_k(probabilities, k=int(top_k), sorted=True)
  result = {"probabilities": probabilities,
            "top_k_classes": tf.cast(top_i, tf.int32),
            "top_k_probabilities": top_p}
  if puppet:
    result["depth"] = tf.cast(details["depth"], tf.int32)
    result["complexity"] = tf.cast(details["complexity"], tf.float32)
  return result


def build_serving_module(model, top_k: int, float_signature: bool = False):
  """A `tf.Module` holding the model's variables and serving functions, and its signatures.

  The module tracks the underlying `tf.Variable`s, not the Keras model or Keras variables:
  the SavedModel then loads with plain TensorFlow (no Keras, no repository) and with the
  TF1-style session loader that TF Serving and `saved_model_cli run` use. (Tracking Keras 3
  variables exports a renamed copy of each one that the session loader restores instead of
  the variable the graph reads: "Could not find variable ...".)
  """
  spec = [None] + list(model_input_shape(model))
  module = tf.Module(name="serving_module")
  module.model_variables = [getattr(v, "value", v) for v in model.variables]

  @tf.function(input_signature=[tf.TensorSpec(spec, tf.uint8, name=INPUT_NAME)],
               jit_compile=False, autograph=False)
  def serve(images):
    return serving_outputs(model, images, top_k)

  cache = (model.kernel_cache_stored_as(lambda t: tf.Variable(t, trainable=False))
           if is_puppet_cnn(model) else contextlib.nullcontext([]))
  with cache as cache_variables:
    # Traced while the cache's tensors are variables: the graph reads them, the module
    # tracks them, and the SavedModel stores them in variables/ (empty without a cache).
    module.kernel_cache_variables = cache_variables
    signatures = {SERVING_DEFAULT: serve.get_concrete_function()}
    if float_signature:
      @tf.function(input_signature=[tf.TensorSpec(spec, tf.float32, name=INPUT_NAME)],
                   jit_compile=False, autograph=False)
      def serve_float(images):
        return serving_outputs(model, images, top_k)

      signatures[FLOAT_SIGNATURE] = serve_float.get_concrete_function()
  return module, signatures


def _check_args(model, model_name, version, top_k, class_names):
  if not isinstance(model, keras.Model):
    raise TypeError(f"export_saved_model needs a keras.Model, got {type(model).__name__}")
  if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
    raise ValueError(f"model_name must be a plain folder name (letters, digits, '_', '-', '.', "
                     f"not starting with '.' or '-'), got {model_name!r}")
  if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                              or version < 0):
    raise ValueError(f"version must be a non-negative integer (TF Serving's numeric version "
                     f"folder) or None for the next one, got {version!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
  num_classes = model_num_classes(model)
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
      raise ValueError(f"got {len(class_names)} class names for a model with {num_classes} "
                       "classes")
  return num_classes, class_names


def export_saved_model(model, export_dir: str, model_name: str, version: Optional[int] = None,
                       top_k: int = 5, class_names: Optional[Sequence[str]] = None,
                       float_signature: bool = False, kernel_cache: Optional[str] = None,
                       kernel_cache_bins: Optional[Sequence[int]] = None,
                       kernel_cache_compute_dtype: Optional[str] = None) -> str:
  """Writes `model` to `<export_dir>/<model_name>/<version>/` for TF Serving.

  Args:
    model: a `PuppetClassifier` or a functional Keras classifier taking raw [0, 255] pixels
      and returning logits (e.g. `build_baseline(...)`).
    export_dir: the folder holding one subfolder per model name (TF Serving's model root).
    model_name: the model's folder (and TF Serving `--model_name`).
    version: the numeric version folder; None: one more than the highest existing version
      (1 for a new model). An existing version is never overwritten.
    top_k: classes in `top_k_classes`; clipped to the number of classes.
    class_names: optional class names, stored in `assets.extra/model_info.json`.
    float_signature: also add the `float_images` signature (float32 pixels in [0, 255]).
    kernel_cache: None (default): export the model as it is (with its kernel cache if it has
      one). A storage dtype of `PuppetClassifier.cache_kernels` ('float32', 'float16',
      'bfloat16', 'int8'): first cache every bin's kernels in that dtype without the
      generating fallback (`cache_kernels(dtype=..., fallback=False)`) for the export; the
      model's own cache (or none) is back afterwards. A bucketed or gathered Puppet-CNN
      (gathered: no int8, and its table keeps the generating path, `fallback=True`). See
      "Kernel cache" above.
    kernel_cache_bins: with `kernel_cache`: cache only these bins, and serve an image in
      another bin with the nearest cached bin's kernels and depth
      (`cache_kernels(bins=..., fallback='nearest')`). None (default): every bin.
    kernel_cache_compute_dtype: with `kernel_cache` (bucketed, `bucketed_inference='loop'`):
      the dtype the served convolutions run in (`cache_kernels(compute_dtype=...)`): None
      (default): the model's, i.e. its dtype policy's (float32, or bfloat16 / float16 for a
      mixed-precision model: the SavedModel serves what the model computes); 'float32', or
      'bfloat16' / 'float16' (16-bit features through the puppet: faster where the serving
      CPU or GPU has 16-bit arithmetic, and rounded).

  Returns:
    The version folder's path.

  Raises:
    FileExistsError: the explicit `version` already exists.
    ValueError / TypeError: bad arguments (name, version, top_k, class names, model,
      kernel_cache), or a stale kernel cache (the weights changed after `cache_kernels`).
  """
  num_classes, class_names = _check_args(model, model_name, version, top_k, class_names)
  args = (model, export_dir, model_name, version, top_k, num_classes, class_names,
          float_signature)
  if kernel_cache is None:
    if kernel_cache_bins is not None:
      raise ValueError("kernel_cache_bins needs kernel_cache (the cache's storage dtype)")
    if kernel_cache_compute_dtype not in (None, "float32"):
      raise ValueError("kernel_cache_compute_dtype needs kernel_cache (the cache's storage "
                       "dtype)")
    return _write_version(*args)
  if not is_puppet_cnn(model) or model.config.execution not in CACHE_DTYPES_BY_EXECUTION:
    raise ValueError(f"kernel_cache={kernel_cache!r} needs a Puppet-CNN with "
                     "execution='bucketed' or 'gathered' (complexity_bins > 0)")
  if kernel_cache not in CACHE_DTYPES:
    raise ValueError(f"kernel_cache must be None or one of {CACHE_DTYPES}, got "
                     f"{kernel_cache!r}")
  gathered = model.config.execution == "gathered"
  if kernel_cache not in CACHE_DTYPES_BY_EXECUTION[model.config.execution]:
    raise ValueError("kernel_cache='int8' needs execution='bucketed': a gathered model's "
                     "kernel table is float32, float16 or bfloat16")
  if kernel_cache_bins is None:
    # A gathered table always keeps its generating path (cache_kernels refuses False).
    cache_kwargs = dict(fallback=True if gathered else False)
  else:
    cache_kwargs = dict(bins=[int(b) for b in kernel_cache_bins], fallback="nearest")
  cache_kwargs["compute_dtype"] = kernel_cache_compute_dtype
  with model.temporary_kernel_cache(dtype=kernel_cache, **cache_kwargs):
    return _write_version(*args)


def _write_version(model, export_dir, model_name, version, top_k, num_classes, class_names,
                   float_signature) -> str:
  """`export_saved_model` after its arguments were checked."""
  cache = model.kernel_cache_info() if is_puppet_cnn(model) else {}
  if cache.get("bins") and not cache["valid"]:
    raise ValueError("the model's kernel cache is stale (its weights changed after "
                     "cache_kernels()): call cache_kernels() again, or clear_kernel_cache() "
                     "to export without one")
  top_k = min(int(top_k), num_classes)
  input_shape = model_input_shape(model)
  if not model.built:
    model.build((None,) + tuple(input_shape))
  base = os.path.join(os.fspath(export_dir), model_name)
  if version is None:
    version = next_version(base)
  final = os.path.join(base, str(version))
  if os.path.exists(final):
    raise FileExistsError(
        f"version {version} of model {model_name!r} already exists at {final}; versions are "
        "never overwritten: pass another version or version=None for the next one "
        f"({next_version(base)})")
  os.makedirs(base, exist_ok=True)

  module, signatures = build_serving_module(model, top_k, float_signature)
  # Hidden, non-numeric: TF Serving ignores it until the rename below.
  staging = tempfile.mkdtemp(prefix=f".export-{version}-", dir=base)
  try:
    tf.saved_model.save(module, staging, signatures=signatures,
                        # Keeps the per-sample conv's custom gradient: loads without warnings.
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=True))
    info_dir = os.path.join(staging, MODEL_INFO_DIR)
    os.makedirs(info_dir, exist_ok=True)
    info = model_info(model, model_name, top_k, class_names, float_signature)
    info["version"] = int(version)
    with open(os.path.join(info_dir, MODEL_INFO_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    if os.path.exists(final):  # someone exported the same version meanwhile
      raise FileExistsError(f"version {version} of model {model_name!r} appeared at {final} "
                            "during the export; not overwriting it")
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a server may run as another user
    os.rename(staging, final)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return final


def read_model_info(version_dir: str) -> Dict[str, Any]:
  """The `model_info.json` written next to an exported version."""
  path = os.path.join(version_dir, MODEL_INFO_DIR, MODEL_INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {MODEL_INFO_DIR}/{MODEL_INFO_FILE} in {version_dir}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
