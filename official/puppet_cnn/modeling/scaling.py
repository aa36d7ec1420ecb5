"""Depth and width resolution of a trained Puppet-CNN: what changes when either is scaled.

The puppeteer describes the kernels as a continuous trajectory P(l) (one integration horizon
per stage, covered by D steps of size dl with D * dl ~ 1), and every kernel is pooled out of one
(C_max, C_max, K*K) state. Both make the trained model usable at other resolutions:

Depth (`depth_scale` = s, the continuous-in-depth idea of Queiruga et al. 2020): a sample of
depth D and step dl runs D' = clip(round(s * D), 1, U) layers per stage with step
dl' = dl * D / D', so it covers the same stretch of the trajectory (D' dl' = D dl) with a finer
(s > 1) or coarser (s < 1) discretization. U = max(1, round(s * max_depth)) is the new bound.
The puppet's per-layer batch norm is indexed by layer: repeated layer j' (0-based) of the
scaled puppet sits at time (j' + 1) dl', i.e. at trained layer round((j' + 1) / s) - 1, whose
batch-norm row it uses (`bn_rows`). s = 1 changes nothing (bit for bit).

Width (`width_multiplier` = w, the metamorphic-network idea): stage widths become
max(1, round(w * C_s)); the kernels are pooled out of the same state at the new shape; the
per-channel batch-norm parameters are resized along channels with the same adaptive average
pooling; the classifier's input weights are resized and multiplied by C / C' so that a pooled
feature vector gives the same logits (`resize_channels`).

Everything here is static (NumPy / Python ints) or `keras.ops`.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
from keras import ops

from official.puppet_cnn.modeling import adaptive_pool


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def scaled_max_depth(max_depth: int, depth_scale: float) -> int:
  """U: the depth bound per stage of a model whose steps are scaled by `depth_scale`."""
  if depth_scale == 1.0:
    return int(max_depth)
  return max(1, _round_half_up(depth_scale * max_depth))


def scaled_depth_and_step(depth, step, depth_scale: float, max_depth: int):
  """(D', dl') per sample: D' = clip(round(s D), 1, U), dl' = dl D / D' (tensors or numpy)."""
  if depth_scale == 1.0:
    return depth, step
  bound = scaled_max_depth(max_depth, depth_scale)
  d = ops.cast(depth, "float32")
  new_depth = ops.clip(ops.floor(d * depth_scale + 0.5), 1.0, float(bound))
  new_step = ops.cast(step, "float32") * d / new_depth
  return ops.cast(new_depth, "int32"), new_step


def scaled_bin_table(steps: np.ndarray, depths: np.ndarray, depth_scale: float,
                     max_depth: int) -> Tuple[np.ndarray, np.ndarray]:
  """NumPy twin of `scaled_depth_and_step` for the bin table (float32 steps, int32 depths)."""
  if depth_scale == 1.0:
    return steps, depths
  bound = scaled_max_depth(max_depth, depth_scale)
  d = depths.astype(np.float32)
  new_depth = np.clip(np.floor(d * np.float32(depth_scale) + np.float32(0.5)), 1.0, bound)
  new_step = (steps.astype(np.float32) * d / new_depth.astype(np.float32)).astype(np.float32)
  return new_step, new_depth.astype(np.int32)


def unit_rows(depth_scale: float, max_depth: int) -> np.ndarray:
  """Trained repeated-unit index (0-based) used by each repeated unit of the scaled puppet."""
  units = scaled_max_depth(max_depth, depth_scale) - 1
  if depth_scale == 1.0:
    return np.arange(units, dtype=np.int32)
  rows = [_round_half_up((j + 1) / depth_scale) - 1 for j in range(units)]
  return np.clip(np.asarray(rows, np.int32), 0, max(max_depth - 2, 0))


def bn_rows(depth_scale: float, max_depth: int, kernels_per_unit: int) -> np.ndarray:
  """Batch-norm row of each repeated layer of the scaled puppet (kernels_per_unit per unit)."""
  units = unit_rows(depth_scale, max_depth)
  return (units[:, None] * kernels_per_unit
          + np.arange(kernels_per_unit, dtype=np.int32)[None, :]).reshape(-1)


def refinement_sources(old_scale: float, new_scale: float, max_depth: int) -> dict:
  """{trained unit row: source row} for rows the new scale uses and the old one did not.

  Incremental-in-depth training trains at a coarse scale first; refining to a finer scale
  starts each newly used batch-norm row from the nearest row that was trained (ties: the
  earlier one), as continuous-in-depth networks interpolate their parameters when refining.
  """
  old = sorted(set(unit_rows(old_scale, max_depth).tolist()))
  new = sorted(set(unit_rows(new_scale, max_depth).tolist()))
  if not old:
    return {}
  return {r: min(old, key=lambda o, r=r: (abs(o - r), o)) for r in new if r not in old}


def scaled_channels(channels: Sequence[int], width_multiplier: float) -> Tuple[int, ...]:
  """Stage widths at a width multiplier: max(1, round(w * C)) (w = 1: unchanged)."""
  if width_multiplier == 1.0:
    return tuple(int(c) for c in channels)
  return tuple(max(1, _round_half_up(width_multiplier * c)) for c in channels)


def resize_channels(values, n_out: int, axis: int = -1, preserve_sum: bool = False):
  """Adaptive average pooling of `values` along `axis` to n_out entries (keras.ops or NumPy).

  preserve_sum: multiply by n_in / n_out (for weights that are summed over channels, such as
  the classifier's input weights, so that a pooled feature vector gives the same output).
  """
  n_in = int(values.shape[axis])
  if n_out == n_in:
    return values
  matrix = adaptive_pool.pooling_matrix(int(n_out), n_in)
  if preserve_sum:
    matrix = matrix * np.float32(n_in / n_out)
  moved = ops.moveaxis(values, axis, -1)
  return ops.moveaxis(ops.matmul(moved, ops.convert_to_tensor(matrix.T)), -1, axis)
