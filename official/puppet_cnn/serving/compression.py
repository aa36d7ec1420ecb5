"""What a user would do instead to shrink a conventional CNN: int8 weights or pruning.

* `quantize_int8(model)`: Keras 3's own post-training quantization, `model.quantize("int8")`
  (weight-only int8 kernels with a float32 scale per output channel; activations are
  quantized on the fly). In Keras 3.15 only Dense, EinsumDense and Embedding layers have a
  `quantize` method: convolutions stay float32, so conv nets barely shrink. The
  tensorflow-model-optimization toolkit (TFMOT: QAT, pruning, clustering) works only with
  tf_keras (Keras 2) models, not Keras 3 ones, so it is not used here.
* `magnitude_prune(model, sparsity)`: zeroes the `sparsity` fraction of smallest-magnitude
  values of every conv/dense kernel, layer by layer (what TFMOT's magnitude pruning converges
  to, without the fine-tuning that recovers accuracy). The dense SavedModel keeps its size;
  the zeros show up in the gzipped size.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import numpy as np

KERNEL_SUFFIXES = ("kernel",)  # kernel, depthwise_kernel, pointwise_kernel


def kernel_weights(model) -> List:
  """The trainable conv/dense kernels of `model` (what pruning acts on)."""
  return [w for w in model.weights
          if w.trainable and w.path.rsplit("/", 1)[-1].endswith(KERNEL_SUFFIXES)]


def prune_array(values: np.ndarray, sparsity: float) -> np.ndarray:
  """A copy of `values` with the floor(sparsity * size) smallest |values| set to 0."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  values = np.array(values, copy=True)
  n = int(np.floor(sparsity * values.size))
  if n:
    flat = values.reshape(-1)
    smallest = np.argpartition(np.abs(flat), n - 1)[:n]
    flat[smallest] = 0
  return values


def magnitude_prune(model, sparsity: float) -> Dict[str, int]:
  """Prunes every kernel of `model` in place to `sparsity`; returns counts.

  Returns:
    dict with `kernels` (number of kernel tensors), `kernel_params` and `zeroed`.
  """
  kernels = kernel_weights(model)
  if not kernels:
    raise ValueError(f"model {model.name!r} has no conv/dense kernels to prune")
  zeroed = total = 0
  for w in kernels:
    pruned = prune_array(np.asarray(w.numpy()), sparsity)
    w.assign(pruned)
    zeroed += int(np.floor(sparsity * pruned.size))
    total += int(pruned.size)
  return {"kernels": len(kernels), "kernel_params": total, "zeroed": zeroed}


def quantize_int8(model) -> List[str]:
  """`model.quantize("int8")` in place; returns the paths of the weights now stored as int8.

  Raises:
    ValueError: no layer of the model could be quantized.
  """
  with warnings.catch_warnings():
    # Keras warns once per layer type without a `quantize` method (conv, BN, ...).
    warnings.filterwarnings("ignore", message=".*does not have a `quantize` method.*")
    model.quantize("int8")
  quantized = [w.path for w in model.weights if str(w.dtype) == "int8"]
  if not quantized:
    raise ValueError(f"model {model.name!r} has no layer Keras can quantize to int8 "
                     "(Dense, EinsumDense, Embedding)")
  return quantized


def ideal_int8_bytes(model) -> int:
  """Bytes if every conv/dense kernel were int8 and everything else float32.

  Each kernel costs 1 byte per value plus a float32 scale per slice of its last axis (its
  output channels); the bound for weight-only int8 quantization of the whole network, which
  Keras 3.15 cannot do for convolutions.
  """
  kernels = {id(w) for w in kernel_weights(model)}
  total = 0
  for w in model.weights:
    size = int(np.prod(w.shape, dtype=np.int64))
    if id(w) in kernels:
      total += size + 4 * int(w.shape[-1])
    else:
      total += size * np.dtype(w.dtype).itemsize
  return total
