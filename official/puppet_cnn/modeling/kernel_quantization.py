"""Weight-only int8 storage of conv kernels, one float32 scale per output channel.

What `PuppetClassifier.cache_kernels(dtype='int8')` stores (the scheme of Keras's
`model.quantize('int8')` and TFLite's weight-only int8, applied to the generated kernels):
for each output channel o of a (..., C_out) kernel W,

    scale[o] = max |W[..., o]| / 127,   q[..., o] = round(W[..., o] / scale[o]) in [-127, 127]

and the kernel used is q * scale, within scale[o] / 2 of W entry by entry. A channel that is
all zeros gets scale 1 (and q = 0), so dequantizing never divides by zero. Activations stay
float32: a cached layer's kernel is dequantized just before its convolution.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from keras import ops

INT8_MAX = 127


def quantize_per_output_channel(kernel) -> Tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 quantization of `kernel` with a scale per output channel.

  Args:
    kernel: a float array (NumPy or tensor), a (K, K, C_in, C_out) kernel or a table of them
      (..., K, K, C_in, C_out); each kernel of a table gets its own scales.

  Returns:
    (q, scale): q int8 with `kernel`'s shape; scale float32 with the shape of `kernel` reduced
    over its kernel axes (K, K, C_in): (C_out,) for a kernel, (layers, C_out) for a table.
  """
  values = np.asarray(ops.convert_to_numpy(kernel), np.float32)
  if values.ndim < 4:
    raise ValueError(f"expected a (..., K, K, C_in, C_out) kernel, got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError("cannot quantize a kernel with NaN or infinite entries")
  kernel_axes = (values.ndim - 4, values.ndim - 3, values.ndim - 2)
  peak = np.max(np.abs(values), axis=kernel_axes, keepdims=True)
  scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
  q = np.clip(np.rint(values / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
  return q, np.squeeze(scale, axis=kernel_axes)


def dequantize(q, scale, dtype: str = "float32"):
  """The kernel q * scale in `dtype` (scale broadcast over the output channels, computed in
  float32); `scale=None` returns q cast to `dtype` (a float16/bfloat16/float32 kernel stored
  without scales; no cast when it is stored in `dtype`)."""
  if scale is None:
    return ops.cast(q, dtype)
  return ops.cast(ops.cast(q, "float32") * scale, dtype)
