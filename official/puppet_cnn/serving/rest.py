"""TF Serving's REST `predict` API, run in-process on a SavedModel.

    predict_rest("/models/puppet_cnn", {"instances": [image, image]})
    # == POST http://host:8501/v1/models/puppet_cnn:predict with that JSON body

Mimics the server, so it imports only TensorFlow and NumPy (never the model's Python code):
the SavedModel alone must be enough to serve it.

Request formats (https://www.tensorflow.org/tfx/serving/api_rest#predict_api):

* row ("instances"): a list with one entry per image; an entry is the image itself (nested
  lists H x W x C) or a dict naming the signature's inputs, `{"images": image}`.
  Response: `{"predictions": [...]}`, one entry per image: a dict of all outputs, or the bare
  value when the signature has a single output.
* columnar ("inputs"): the whole batch, either the batched tensor itself or `{"images": batch}`.
  Response: `{"outputs": {...}}` (TF Serving's key for this format): a dict of batched outputs,
  or the bare batched value for a single output.
* `signature_name` selects the signature (default `serving_default`).

Requests are checked before TensorFlow sees them; a bad request raises ValueError naming the
problem: no or both of instances/inputs, an empty batch, images of different shapes, a wrong
rank or image size, strings / booleans / non-integers / values outside [0, 255] for a uint8
input, or non-finite values for a float input. Errors the model raises at run time (e.g.
Puppet-CNN's pixel range check on the float signature) come back as ValueError too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Union

import numpy as np
import tensorflow as tf

DEFAULT_SIGNATURE = "serving_default"
_VERSION_RE = re.compile(r"^\d+$")
_INT_RANGES = {tf.uint8: (0, 255), tf.int8: (-128, 127), tf.uint16: (0, 65535),
               tf.int16: (-32768, 32767), tf.int32: (-2**31, 2**31 - 1)}


def resolve_saved_model_dir(path: str) -> str:
  """A SavedModel folder, or a TF Serving model base dir -> its highest numeric version."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "saved_model.pb")):
    return path
  if not os.path.isdir(path):
    raise ValueError(f"no SavedModel at {path!r}: the folder does not exist")
  versions = [int(n) for n in os.listdir(path)
              if _VERSION_RE.match(n) and os.path.isfile(os.path.join(path, n, "saved_model.pb"))]
  if not versions:
    raise ValueError(f"no SavedModel at {path!r}: it has no saved_model.pb and no numeric "
                     "version folder holding one")
  return os.path.join(path, str(max(versions)))


def load(path: str):
  """`tf.saved_model.load` of a SavedModel dir or a model base dir (highest version)."""
  return tf.saved_model.load(resolve_saved_model_dir(path))


def _signature(loaded, name: str):
  signatures = getattr(loaded, "signatures", None)
  if signatures is None:
    raise TypeError(f"expected a loaded SavedModel or a path, got {type(loaded).__name__}")
  if not isinstance(name, str) or name not in signatures:
    raise ValueError(f"unknown signature_name {name!r}; the model serves {sorted(signatures)}")
  return signatures[name]


def _input_specs(fn) -> Dict[str, tf.TensorSpec]:
  args, kwargs = fn.structured_input_signature
  if args:
    raise ValueError("signatures with positional inputs are not supported")
  return dict(kwargs)


def _as_array(value, what: str) -> np.ndarray:
  """Nested JSON lists -> a numeric ndarray, with clear errors for ragged or non-numbers."""
  if isinstance(value, dict):
    if "b64" in value:
      raise ValueError(f"{what}: base64 ({{'b64': ...}}) values are only for string inputs; "
                       "send pixels as nested lists of numbers")
    raise ValueError(f"{what}: expected nested lists of numbers, got an object with keys "
                     f"{sorted(value)}")
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{what}: expected nested lists of numbers, got a string")
  try:
    array = np.asarray(value)
  except ValueError as e:  # NumPy >= 1.24: ragged nested lists
    raise ValueError(f"{what}: ragged nested lists (rows of different lengths); every image "
                     "must be a full height x width x channels array") from e
  if array.dtype == object:
    raise ValueError(f"{what}: ragged nested lists or non-numeric values (null, objects); "
                     "every image must be a full height x width x channels array of numbers")
  if array.dtype.kind in "USa":
    raise ValueError(f"{what}: got strings; pixel values must be numbers")
  if array.dtype.kind == "b":
    raise ValueError(f"{what}: got booleans (true/false); pixel values must be numbers")
  if array.dtype.kind not in "iuf":
    raise ValueError(f"{what}: unsupported values of kind {array.dtype}")
  return array


def _convert(array: np.ndarray, spec: tf.TensorSpec, what: str) -> np.ndarray:
  """Checks values against the input's dtype and casts to it."""
  dtype = spec.dtype
  if dtype.is_integer:
    if array.dtype.kind == "f":
      fractional = array[np.mod(array, 1) != 0]
      example = f" (e.g. {fractional.ravel()[0]!r})" if fractional.size else ""
      hint = " in [0, 255], or use the float signature" if dtype == tf.uint8 else ""
      raise ValueError(f"{what}: input {spec.name!r} is {dtype.name} but got floating-point "
                       f"numbers{example}; send integer values{hint}")
    low, high = _INT_RANGES.get(dtype, (dtype.min, dtype.max))
    if array.size and (array.min() < low or array.max() > high):
      raise ValueError(f"{what}: input {spec.name!r} is {dtype.name}, values must be in "
                       f"[{low}, {high}]; got min {array.min()}, max {array.max()}")
    return array.astype(dtype.as_numpy_dtype)
  if dtype.is_floating:
    array = array.astype(dtype.as_numpy_dtype)
    if array.size and not np.all(np.isfinite(array)):
      raise ValueError(f"{what}: input {spec.name!r} got NaN or infinite values")
    return array
  raise ValueError(f"input {spec.name!r} has dtype {dtype.name}, which this helper does not "
                   "support")


def _check_shape(array: np.ndarray, spec: tf.TensorSpec, what: str) -> None:
  want = spec.shape
  if want.rank is None:
    return
  example = " x ".join("?" if d is None else str(d) for d in want.as_list()[1:])
  if array.ndim != want.rank:
    raise ValueError(
        f"{what}: input {spec.name!r} needs a batch of rank-{want.rank - 1} values (each "
        f"{example}), but each instance has rank {array.ndim - 1} (batch shape "
        f"{tuple(array.shape)})")
  for axis, (got, need) in enumerate(zip(array.shape, want.as_list())):
    if axis and need is not None and got != need:
      raise ValueError(
          f"{what}: input {spec.name!r} needs instances of shape {example}, got "
          f"{' x '.join(str(d) for d in array.shape[1:])} (dimension {axis} is {got}, not "
          f"{need})")


def _rows_to_columns(instances, specs: Mapping[str, tf.TensorSpec]) -> Dict[str, Any]:
  names = sorted(specs)
  if not isinstance(instances, list):
    raise ValueError(f"'instances' must be a list (one entry per example), got "
                     f"{type(instances).__name__}")
  if not instances:
    raise ValueError("'instances' is empty: send at least one instance")
  if any(isinstance(i, dict) and "b64" in i for i in instances):
    raise ValueError("base64 ({'b64': ...}) instances are only for string inputs; send pixels "
                     "as nested lists of numbers")
  named = [isinstance(i, dict) for i in instances]
  if any(named) and not all(named):
    raise ValueError("'instances' mixes named ({'images': ...}) and bare instances; use one form")
  if all(named):
    columns = {}
    for n, instance in enumerate(instances):
      if set(instance) != set(names):
        raise ValueError(f"instance {n} has inputs {sorted(instance)}, the signature needs "
                         f"exactly {names}")
    for name in names:
      columns[name] = [instance[name] for instance in instances]
    return columns
  if len(names) != 1:
    raise ValueError(f"bare instances only work for single-input signatures; this one needs "
                     f"{names}: send {{name: value}} per instance")
  return {names[0]: instances}


def _columnar(inputs, specs: Mapping[str, tf.TensorSpec]) -> Dict[str, Any]:
  names = sorted(specs)
  if isinstance(inputs, dict) and "b64" not in inputs:
    if set(inputs) != set(names):
      raise ValueError(f"'inputs' names {sorted(inputs)}, the signature needs exactly {names}")
    return dict(inputs)
  if len(names) != 1:
    raise ValueError(f"a bare 'inputs' value only works for single-input signatures; this one "
                     f"needs {names}")
  return {names[0]: inputs}


def _prepare(columns: Mapping[str, Any], specs: Mapping[str, tf.TensorSpec]
             ) -> Dict[str, np.ndarray]:
  batch = {}
  for name, value in columns.items():
    what = f"input {name!r}"
    array = _as_array(value, what)
    if array.ndim == 0:
      raise ValueError(f"{what}: got a single number; send a batch of images (batch x height "
                       "x width x channels)")
    if array.shape[0] == 0:
      raise ValueError(f"{what}: the batch is empty: send at least one image")
    _check_shape(array, specs[name], what)
    batch[name] = _convert(array, specs[name], what)
  sizes = {name: a.shape[0] for name, a in batch.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"inputs have different batch sizes: {sizes}")
  return batch


def _error_text(message: str) -> str:
  """The useful part of a TensorFlow run-time error (an Assert's text, else the message)."""
  found = re.search(r"assertion failed: \[(.*?)\]\s*(\n|$)", message)
  if found:
    return found.group(1).strip()
  return " ".join(line.strip() for line in message.splitlines()
                  if line.strip() and "stack traces" not in line and "most recent call" not in line)


def _to_json(value: np.ndarray):
  if value.dtype.kind == "f":
    return value.astype(np.float64).tolist()
  if value.dtype.kind in "SO":
    return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b,
                        otypes=[object])(value).tolist()
  return value.tolist()


def predict_rest(loaded_or_path: Union[str, Any], body: Union[Mapping[str, Any], str, bytes]
                 ) -> Dict[str, Any]:
  """Answers a TF Serving REST `predict` request body with the model's signature.

  Args:
    loaded_or_path: a `tf.saved_model.load` result, a SavedModel folder, or a TF Serving
      model base dir (its highest numeric version is used, as the server does).
    body: the request JSON (a dict, or its text): `{"instances": [...]}` (row format) or
      `{"inputs": ...}` (columnar), optionally with `"signature_name"`.

  Returns:
    `{"predictions": [...]}` for row requests, `{"outputs": ...}` for columnar ones, with
    plain Python lists/numbers (JSON-ready).

  Raises:
    ValueError: a malformed request or one the model rejects.
  """
  if isinstance(body, (str, bytes)):
    try:
      body = json.loads(body)
    except json.JSONDecodeError as e:
      raise ValueError(f"the request body is not valid JSON: {e}") from e
  if not isinstance(body, Mapping):
    raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
  unknown = set(body) - {"instances", "inputs", "signature_name"}
  if unknown:
    raise ValueError(f"unknown request keys {sorted(unknown)}; use 'instances' (row format) or "
                     "'inputs' (columnar format), and optionally 'signature_name'")
  has_rows, has_columns = "instances" in body, "inputs" in body
  if has_rows == has_columns:
    raise ValueError("the request needs exactly one of 'instances' (row format) or 'inputs' "
                     "(columnar format)" + (", not both" if has_rows else "; it has neither"))
  loaded = load(loaded_or_path) if isinstance(loaded_or_path, (str, os.PathLike)) \
      else loaded_or_path
  fn = _signature(loaded, body.get("signature_name", DEFAULT_SIGNATURE))
  specs = _input_specs(fn)
  if has_rows:
    columns = _rows_to_columns(body["instances"], specs)
  else:
    if body["inputs"] is None:
      raise ValueError("'inputs' is null: send the batch of images")
    columns = _columnar(body["inputs"], specs)
  batch = _prepare(columns, specs)
  try:
    outputs = fn(**{name: tf.constant(value) for name, value in batch.items()})
  except (tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as e:
    raise ValueError(f"the model rejected the request: {_error_text(e.message)}") from e
  outputs = {name: value.numpy() for name, value in outputs.items()}
  single = len(outputs) == 1
  if has_rows:
    n = next(iter(batch.values())).shape[0]
    if single:
      (value,) = outputs.values()
      return {"predictions": [_to_json(value[i]) for i in range(n)]}
    return {"predictions": [{name: _to_json(value[i]) for name, value in outputs.items()}
                            for i in range(n)]}
  if single:
    return {"outputs": _to_json(next(iter(outputs.values())))}
  return {"outputs": {name: _to_json(value) for name, value in outputs.items()}}
