"""Batch normalization with a per-sample mask, as plain functions over explicit weights.

Puppet-CNN runs layers whose participation varies by sample (a sample past its depth skips
a layer), so batch statistics in training must come from the samples that actually use the
layer; Keras's `BatchNormalization` cannot take a per-sample mask inside a loop and updates
its moving statistics by assignment on every call, which backends such as JAX do not allow
inside a loop. These helpers return the batch statistics instead, and the calling layer
assigns the moving averages once per call, after its loop.
"""

from __future__ import annotations

from keras import ops


def masked_moments(x, mask=None):
  """Mean and variance over all axes but the last, counting only samples where mask > 0.

  Args:
    x: (N, ..., C) tensor.
    mask: (N,) float tensor of per-sample weights (0/1, or sample counts); None: all 1.
  Returns:
    (mean, variance), each (C,). With an all-zero mask both are 0.
  """
  axes = tuple(range(len(x.shape) - 1))
  per_sample = ops.cast(ops.prod(ops.shape(x)[1:-1]), x.dtype)
  if mask is None:
    count = ops.maximum(ops.cast(ops.shape(x)[0], x.dtype) * per_sample, 1.0)
    mean = ops.sum(x, axis=axes) / count
    variance = ops.sum(ops.square(x - mean), axis=axes) / count
    return mean, variance
  # Reduce each sample first, then weight the (N, C) sums: no full-size multiply by the mask.
  inner = axes[1:]
  weights = ops.reshape(ops.cast(mask, x.dtype), (-1, 1))
  count = ops.maximum(ops.sum(weights) * per_sample, 1.0)
  per_sample_sum = ops.sum(x, axis=inner) if inner else x
  mean = ops.sum(per_sample_sum * weights, axis=0) / count
  squares = ops.square(x - mean)
  per_sample_sq = ops.sum(squares, axis=inner) if inner else squares
  variance = ops.sum(per_sample_sq * weights, axis=0) / count
  return mean, variance


def joint_moments(xs):
  """Mean and variance over all axes but the last of the concatenation of `xs` (two-pass).

  Args:
    xs: list of (N_g, ..., C) tensors with the same trailing shape; N_g may be 0.
  Returns:
    (mean, variance), each (C,), equal to `masked_moments` of the concatenation with an
    all-ones mask (0 and 0 when every N_g is 0).
  """
  axes = tuple(range(len(xs[0].shape) - 1))
  count = ops.maximum(sum(ops.cast(ops.prod(ops.shape(x)[:-1]), x.dtype) for x in xs), 1.0)
  mean = sum(ops.sum(x, axis=axes) for x in xs) / count
  variance = sum(ops.sum(ops.square(x - mean), axis=axes) for x in xs) / count
  return mean, variance


def normalize(x, mean, variance, gamma, beta, epsilon: float):
  """gamma (x - mean) / sqrt(variance + epsilon) + beta, as x * scale + shift.

  The per-channel scale and shift are computed first, so the state- or feature-map-sized
  tensor `x` takes two elementwise operations instead of four in the forward pass.
  """
  scale = gamma * ops.rsqrt(variance + epsilon)
  return x * scale + (beta - mean * scale)


def updated_moving(moving, batch_value, momentum: float, seen):
  """Moving-average update `momentum * moving + (1 - momentum) * batch`, only where seen."""
  moving = ops.convert_to_tensor(moving)  # a variable's value (JAX cannot trace a Variable)
  new = momentum * moving + (1.0 - momentum) * batch_value
  return ops.where(seen, new, moving)
