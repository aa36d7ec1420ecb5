"""DynamicConvStack: the puppet, a CNN whose kernels and depth come from outside.

Paper section 3.5: stages of 3x3 conv + BN + ReLU with output channels 64, 128, 256, 512, a
2x2 max pool between stages, and a per-sample number of layers in each stage.

A stage is a transition unit (a conv from the previous width to the stage's width; every
sample runs it) followed by up to `max_depth - 1` repeated units, of which a sample of depth d
runs the first d - 1. A repeated unit is one conv-BN-ReLU layer ('plain', VGG-style) or a basic
residual block of two convs ('residual', ResNet-style). The repeated units run in a bounded
loop (`backend_ops.bounded_while_loop`: a `tf.while_loop` whose bound, max_depth - 1, is known
when the layer is built, as XLA requires; it exits as soon as every sample has reached its
depth). A sample past its depth passes through a unit unchanged (a per-sample mask), so its
output does not depend on the depth of the other samples.

The stack stores no conv kernels: only each layer's batch norm (one BN per layer index, shared
by the samples that reach that index; batch statistics in training count only those samples).
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import BLOCK_TYPES, COMPUTE_DTYPES, PER_SAMPLE_CONVS
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import masked_batch_norm as mbn
from official.puppet_cnn.modeling import scaling

KERNELS_PER_UNIT = {"plain": 1, "residual": 2}


def per_sample_kernels(kernel, kernel_rows=None):
  """`kernel` as (B, ...) per-sample kernels: itself (`kernel_rows` None), or its rows
  `kernel_rows` (B,) cast to float32 (kernels stored at a lower precision)."""
  if kernel_rows is None:
    return kernel
  return ops.cast(ops.take(kernel, kernel_rows, axis=0), "float32")


@keras.saving.register_keras_serializable(package="puppet_cnn")
class DynamicConvStack(keras.layers.Layer):
  """A CNN with per-sample generated kernels and per-sample depth.

  Args:
    stage_channels: output channels of each stage (paper: 64, 128, 256, 512).
    block_type: 'plain' (conv-BN-ReLU units) or 'residual' (basic blocks).
    max_depth: bound on units per stage, the transition unit included.
    pool_after: per stage, whether a 2x2 max pool ('same' padding) follows it; default: after
      every stage but the last.
    kernel_size: K of the kernels it expects.
    momentum, epsilon: batch norm settings.
    fused_batch_norm: bucketed training (`call_groups`) normalizes each layer with
      `backend_ops.batch_norm_training` (TensorFlow's fused batch norm: same values, two
      fewer activation-sized tensors kept per layer); False: the two-pass moments and a
      scale and shift (`masked_batch_norm`).
    per_sample_conv: how the per-sample path (`call`) convolves each sample with its own
      kernel (`backend_ops.per_sample_conv2d`): 'grouped' (default) or 'im2col'. Same
      values.
    conv_dtype: the dtype the convolutions' arithmetic runs in: 'float32' (default), or
      'bfloat16' / 'float16' (mixed precision: `PuppetClassifier` passes its Keras dtype
      policy's compute dtype). Each convolution casts its input and its kernel to it and its
      output back to float32, so batch norm, ReLU, pooling and the activations kept between
      layers stay float32 (as do the batch-norm weights). Training and inference, every
      path (`call`, `call_groups`, `call_indexed`).

  Call args:
    features: (B, H, W, C_in) input features.
    kernels: what `PuppeteerODE` returns: per stage `(transition, repeated)` with transition
      (B, K, K, C_prev, C_s) and repeated (B, (max_depth - 1) * kernels_per_unit, K, K, C_s, C_s),
      or repeated as a list of that many (B, K, K, C_s, C_s) tensors (`stack_repeated=False`;
      in training TensorFlow then reads them without stacking them: less memory).
      With `kernel_rows`, R rows of such kernels instead of B (R, K, K, ...), in any float
      dtype.
    depth: (B,) int32 units per stage, in [1, max_depth] (or [1, units + 1]).
    training: batch statistics (True) or moving statistics (False).
    units: repeated units per stage (None: max_depth - 1); with scaled steps
      (`scaling.py`) the puppet may run more or fewer than it was trained with.
    bn_rows: per repeated layer (units * kernels_per_unit), the index of the trained
      batch-norm row it uses (None: layer j uses row j). Rows shared by several layers get
      the mean of their batch statistics as the moving-average update.
    channels: stage widths to run at (None: `stage_channels`). At another width the batch-norm
      parameters are resized along channels (`scaling.resize_channels`), and in training the
      moving statistics are left alone (they are learned at full width).
    kernel_rows: None (default: `kernels` are per sample), or (B,) int32 indices into the
      R rows of `kernels`: sample b runs with row kernel_rows[b]. Each layer's per-sample
      kernels are then gathered (and cast to float32) where the layer runs, inside the
      layer loop, so that only one layer's (B, K, K, C, C) exists at a time instead of
      every layer's (execution='gathered': R = one row per complexity bin, or a kernel
      table's rows). Same values as gathering all of them first.

  Returns:
    (B, H', W', stage_channels[-1]) features.
  """

  def __init__(self, stage_channels: Sequence[int] = (64, 128, 256, 512),
               block_type: str = "plain", max_depth: int = 8,
               pool_after: Sequence[bool] | None = None, kernel_size: int = 3,
               momentum: float = 0.99, epsilon: float = 1e-3, fused_batch_norm: bool = True,
               per_sample_conv: str = "grouped", conv_dtype: str = "float32", **kwargs):
    super().__init__(**kwargs)
    if block_type not in BLOCK_TYPES:
      raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
    self.stage_channels = tuple(int(c) for c in stage_channels)
    self.block_type = block_type
    self.max_depth = int(max_depth)
    if pool_after is None:
      pool_after = [True] * (len(self.stage_channels) - 1) + [False]
    self.pool_after = tuple(bool(p) for p in pool_after)
    if len(self.pool_after) != len(self.stage_channels):
      raise ValueError(f"pool_after needs {len(self.stage_channels)} entries, "
                       f"got {len(self.pool_after)}")
    self.kernel_size = int(kernel_size)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.fused_batch_norm = bool(fused_batch_norm)
    if per_sample_conv not in PER_SAMPLE_CONVS:
      raise ValueError(f"per_sample_conv must be one of {PER_SAMPLE_CONVS}, got "
                       f"{per_sample_conv!r}")
    self.per_sample_conv = per_sample_conv
    if conv_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"conv_dtype must be one of {COMPUTE_DTYPES}, got {conv_dtype!r}")
    self.conv_dtype = conv_dtype

  def _in_conv_dtype(self, conv, x, kernel):
    """`conv(x, kernel)` with both cast to `conv_dtype`, its output cast back to float32."""
    if self.conv_dtype == "float32":
      return conv(x, kernel)
    dtype = self.conv_dtype
    return ops.cast(conv(ops.cast(x, dtype), ops.cast(kernel, dtype)), "float32")

  @property
  def kernels_per_unit(self) -> int:
    return KERNELS_PER_UNIT[self.block_type]

  @property
  def repeated_kernels_per_stage(self) -> int:
    return (self.max_depth - 1) * self.kernels_per_unit

  def kernel_shapes(self, input_channels: int) -> List[Tuple[Tuple[int, ...], int]]:
    """Per stage: the (K, K, C_in, C_out) of its transition kernel and its repeated count."""
    shapes, c_prev, k = [], input_channels, self.kernel_size
    for c in self.stage_channels:
      shapes.append(((k, k, c_prev, c), self.repeated_kernels_per_stage))
      c_prev = c
    return shapes

  def generated_kernel_params(self, input_channels: int, depth: int) -> int:
    """Kernel parameters a sample of the given depth uses (all generated, none stored)."""
    total = 0
    for (k, _, c_in, c_out), _ in self.kernel_shapes(input_channels):
      total += k * k * c_in * c_out
      total += (depth - 1) * self.kernels_per_unit * k * k * c_out * c_out
    return total

  def build(self, input_shape=None):
    self.bn_weights = []
    repeated = self.repeated_kernels_per_stage
    for s, c in enumerate(self.stage_channels):
      stage = {}
      for prefix, shape in (("transition", (c,)), ("repeated", (repeated, c))):
        if prefix == "repeated" and repeated == 0:
          continue
        stage[prefix] = [
            self.add_weight(name=f"stage{s}_{prefix}_gamma", shape=shape, initializer="ones"),
            self.add_weight(name=f"stage{s}_{prefix}_beta", shape=shape, initializer="zeros"),
            self.add_weight(name=f"stage{s}_{prefix}_moving_mean", shape=shape,
                            initializer="zeros", trainable=False, aggregation="mean"),
            self.add_weight(name=f"stage{s}_{prefix}_moving_variance", shape=shape,
                            initializer="ones", trainable=False, aggregation="mean")]
      self.bn_weights.append(stage)

  def _resolve(self, units, bn_rows, channels):
    """(units, bn_rows as NumPy, channels, at_trained_width) with the defaults filled in."""
    units = self.max_depth - 1 if units is None else int(units)
    layers = units * self.kernels_per_unit
    rows = (np.arange(layers, dtype=np.int32) if bn_rows is None
            else np.asarray(bn_rows, np.int32).reshape(-1))
    if units < 0 or len(rows) != layers or (layers and (
        rows.min() < 0 or rows.max() >= self.repeated_kernels_per_stage)):
      raise ValueError(f"DynamicConvStack: need units >= 0 and {layers} batch-norm rows in "
                       f"[0, {self.repeated_kernels_per_stage}), got units={units}, "
                       f"bn_rows={rows.tolist()}")
    channels = self.stage_channels if channels is None else tuple(int(c) for c in channels)
    if len(channels) != len(self.stage_channels) or min(channels) < 1:
      raise ValueError(f"DynamicConvStack has {len(self.stage_channels)} stages; channels must "
                       f"give a positive width for each, got {channels}")
    return units, rows, channels, channels == self.stage_channels

  def _stage_bn(self, s, width):
    """Stage s's batch-norm weights at `width` channels: the variables, or resized tensors."""
    stage = self.bn_weights[s]
    if width == self.stage_channels[s]:
      return stage
    return {prefix: [scaling.resize_channels(ops.convert_to_tensor(w), width) for w in ws]
            for prefix, ws in stage.items()}

  def _check_kernels(self, features, kernels, units=None, channels=None, kernel_rows=None):
    if len(kernels) != len(self.stage_channels):
      raise ValueError(f"DynamicConvStack has {len(self.stage_channels)} stages but got "
                       f"kernels for {len(kernels)}")
    lead = "(batch,)" if kernel_rows is None else "(rows,)"
    if kernel_rows is not None:
      if len(kernel_rows.shape) != 1 or (kernel_rows.shape[0] is not None and features.shape[0]
                                         is not None and kernel_rows.shape[0] != features.shape[0]):
        raise ValueError(f"kernel_rows must be (batch,) = ({features.shape[0]},) indices into "
                         f"the kernels' rows, got shape {tuple(kernel_rows.shape)}")
      if not keras.backend.standardize_dtype(kernel_rows.dtype).startswith("int"):
        raise TypeError(f"kernel_rows must be integers, got {kernel_rows.dtype}")
    units = self.max_depth - 1 if units is None else units
    k, c_prev, shapes = self.kernel_size, features.shape[-1], []
    for c in (channels or self.stage_channels):
      shapes.append(((k, k, c_prev, c), units * self.kernels_per_unit))
      c_prev = c
    for s, ((shape, repeated), (transition, rep)) in enumerate(zip(shapes, kernels)):
      if tuple(transition.shape[1:]) != shape:
        raise ValueError(f"stage {s}: transition kernel must be {lead} + {shape}, "
                         f"got {tuple(transition.shape)}")
      want = (repeated,) + (shape[0], shape[1], shape[3], shape[3])
      if isinstance(rep, (list, tuple)):  # one (batch or rows, K, K, C, C) tensor per layer
        got = [tuple(r.shape) for r in rep]
        if len(rep) != repeated or any(g[1:] != want[1:] or g[0] != transition.shape[0]
                                       for g in got):
          raise ValueError(f"stage {s}: repeated kernels as a list must be {repeated} "
                           f"tensors of {lead} + {want[1:]}, got {got}")
        continue
      if tuple(rep.shape[1:]) != want:
        raise ValueError(f"stage {s}: repeated kernels must be {lead} + {want}, "
                         f"got {tuple(rep.shape)}")
      if kernel_rows is not None and rep.shape[0] != transition.shape[0]:
        raise ValueError(f"stage {s}: the transition kernels have {transition.shape[0]} rows "
                         f"and the repeated ones {rep.shape[0]}")

  def _conv_bn(self, x, kernel, bn, index, active, training):
    """conv -> BN for layer `index` of a BN group (None: the transition BN)."""
    gamma, beta, moving_mean, moving_var = (
        bn if index is None else [ops.take(w, index, axis=0) for w in bn])
    y = self._in_conv_dtype(
        lambda x, k: backend_ops.per_sample_conv2d(x, k, self.per_sample_conv), x, kernel)
    if training:
      mean, var = mbn.masked_moments(y, active)
    else:
      mean, var = moving_mean, moving_var
    return mbn.normalize(y, mean, var, gamma, beta, self.epsilon), (mean, var)

  def call(self, features, kernels, depth, training=None, units=None, bn_rows=None,
           channels=None, kernel_rows=None):
    training = bool(training)
    units, rows, channels, trained_width = self._resolve(units, bn_rows, channels)
    if kernel_rows is not None:
      kernel_rows = ops.convert_to_tensor(kernel_rows)
    self._check_kernels(features, kernels, units, channels, kernel_rows)
    update = training and trained_width
    depth = ops.cast(depth, "int32")
    x = ops.cast(features, "float32")
    everyone = ops.ones_like(ops.cast(depth, "float32"))
    for s, (transition, repeated) in enumerate(kernels):
      bn = self._stage_bn(s, channels[s])
      y, stats = self._conv_bn(x, per_sample_kernels(transition, kernel_rows), bn["transition"],
                               None, everyone, training)
      if update:
        self._assign_moving(bn["transition"], stats[0], stats[1], ops.convert_to_tensor(True))
      x = ops.relu(y)
      if units:
        x = self._repeated_units(x, repeated, bn["repeated"], depth, training, units, rows,
                                 update, kernel_rows)
      if self.pool_after[s]:
        x = ops.max_pool(x, pool_size=2, strides=2, padding="same")
    return x

  def _repeated_units(self, x, kernels, bn, depth, training, n_units, bn_rows, update,
                      kernel_rows=None):
    kpu = self.kernels_per_unit

    if training or isinstance(kernels, (list, tuple)):
      # One layer at a time with a gradient of one layer's kernels per iteration
      # (`backend_ops.layer_reader`): a gather from (N or R, L, ...) in the loop would make
      # TensorFlow add a dense gradient of all L layers' kernels at every iteration
      # (docs/paper_protocol_memory.md). Kernels given as a list of layers are read without
      # being stacked, in training and inference.
      read = backend_ops.layer_reader(kernels, axis=1)
      rows_of = None if kernel_rows is None else ops.cast(kernel_rows, "int32")

      def layer_kernel(j):  # layer j's per-sample kernels (row kernel_rows[b], layer j)
        return per_sample_kernels(read(j), rows_of)
    elif kernel_rows is None:
      def layer_kernel(j):  # layer j's per-sample kernels
        return ops.take(kernels, j, axis=1)
    else:
      # Rows x layers as one axis (a reshape, no copy), so that one gather reads exactly the
      # batch's kernels of layer j (taking layer j of every row first would copy R of them).
      flat = ops.reshape(kernels, (-1,) + tuple(kernels.shape[2:]))
      layers, rows_of = kernels.shape[1], ops.cast(kernel_rows, "int32")

      def layer_kernel(j):  # layer j's per-sample kernels: row kernel_rows[b], layer j
        return per_sample_kernels(flat, rows_of * layers + j)

    rows = self.repeated_kernels_per_stage
    row_of = ops.convert_to_tensor(bn_rows)
    channels = x.shape[-1]
    max_depth_in_batch = ops.max(depth)

    def cond(i, *_):
      return ops.logical_and(i < n_units, i + 1 < max_depth_in_batch)

    def body(i, x, acc_mean, acc_var, acc_seen):
      active = ops.cast(depth > i + 1, "float32")
      if self.block_type == "plain":
        b = ops.take(row_of, i)
        y, (m, v) = self._conv_bn(x, layer_kernel(i), bn, b, active, training)
        new_x = ops.relu(y)
        layer_stats = [(b, m, v)]
      else:
        r0, r1 = kpu * i, kpu * i + 1
        b0, b1 = ops.take(row_of, r0), ops.take(row_of, r1)
        y, (m0, v0) = self._conv_bn(x, layer_kernel(r0), bn, b0, active, training)
        y, (m1, v1) = self._conv_bn(ops.relu(y), layer_kernel(r1), bn, b1, active, training)
        new_x = ops.relu(y + x)
        layer_stats = [(b0, m0, v0), (b1, m1, v1)]
      x = ops.where(ops.reshape(active, (-1, 1, 1, 1)) > 0, new_x, x)
      if update:
        any_active = ops.cast(ops.sum(active) > 0, "float32")
        for row, m, v in layer_stats:
          onehot = ops.one_hot(row, rows, dtype="float32") * any_active
          acc_mean = acc_mean + onehot[:, None] * m[None, :]
          acc_var = acc_var + onehot[:, None] * v[None, :]
          acc_seen = acc_seen + onehot
      return i + 1, x, acc_mean, acc_var, acc_seen

    zeros = ops.zeros((rows, channels), "float32")
    _, x, acc_mean, acc_var, acc_seen = backend_ops.bounded_while_loop(
        cond, body, (ops.convert_to_tensor(0, "int32"), x, zeros, zeros,
                     ops.zeros((rows,), "float32")), maximum_iterations=n_units)
    if update:
      count = ops.maximum(acc_seen, 1.0)[:, None]
      self._assign_moving(bn, acc_mean / count, acc_var / count, (acc_seen > 0)[:, None])
    return x

  # ------------------------------------------------------------------ bucketed execution
  def inference_affine(self, units=None, bn_rows=None, channels=None):
    """Each layer's inference-mode batch norm as `y * scale + shift`, per stage.

    Returns a list over stages of `(transition, repeated)`, `transition` a `(scale, shift)`
    pair of (C_s,) tensors and `repeated` a list of one pair per repeated layer (units *
    kernels_per_unit, each layer at its batch-norm row, `bn_rows`), from the moving
    statistics: scale = gamma / sqrt(moving_variance + epsilon), shift = beta - moving_mean *
    scale. Computed once per call and shared by every group (`fold_kernels`, `call_groups`).
    """
    units, rows, channels, _ = self._resolve(units, bn_rows, channels)

    def affine(gamma, beta, moving_mean, moving_var):
      scale = gamma * ops.rsqrt(moving_var + self.epsilon)
      return scale, beta - moving_mean * scale

    out = []
    for s in range(len(self.stage_channels)):
      bn = self._stage_bn(s, channels[s])
      transition = affine(*[ops.convert_to_tensor(w) for w in bn["transition"]])
      repeated = []
      if units:
        scale, shift = affine(*[ops.convert_to_tensor(w) for w in bn["repeated"]])
        repeated = [(scale[int(r)], shift[int(r)]) for r in rows]
      out.append((transition, repeated))
    return out

  @staticmethod
  def fold_kernels(stage_kernels, affine, layers=None):
    """Folds inference batch-norm scales into one group's kernels (`inference_affine`).

    conv(x, k) * scale + shift == conv(x, k * scale) + shift, scale along the output
    channels (the last axis). `stage_kernels` is one group's kernels as `call_groups` takes
    them; `layers` (default: every layer of `affine`) bounds the repeated kernels folded per
    stage. Returns the same structure with `repeated` as a list.
    """
    out = []
    for (transition, repeated), ((t_scale, _), rep) in zip(stage_kernels, affine):
      n = len(rep) if layers is None else min(int(layers), len(rep))
      get = repeated if callable(repeated) else repeated.__getitem__
      out.append((transition * t_scale, [get(j) * rep[j][0] for j in range(n)]))
    return out

  def call_groups(self, groups, group_kernels, group_depths, training=None, units=None,
                  bn_rows=None, channels=None, nonempty: bool = False, folded=None):
    """Runs groups of samples that share their kernels and depth (bucketed execution).

    Each group runs an ordinary convolution with its own kernels for exactly its depth (a
    Python int), so there are no masks and no loop. In training, each layer's batch-norm
    statistics are computed jointly over every group that reaches the layer (their summed
    activations over their summed sample counts), which is what `call` computes with
    per-sample kernels, masks and the same depths; moving statistics are updated once per call
    for the layers some sample reached.

    Args:
      groups: list of (n_g, H, W, C_in) features; n_g may be 0.
      group_kernels: per group, a list over stages of `(transition, repeated)`: transition
        (K, K, C_prev, C_s) and `repeated` a sequence of at least (depth_g - 1) *
        kernels_per_unit kernels (K, K, C_s, C_s) (or a callable j -> kernel j). A kernel
        may also come as a one-row (1, K, K, C_in, C_out) tensor with zero rows for an empty
        group (`backend_ops.group_conv2d`).
      group_depths: per group, its depth as a Python int in [1, units + 1].
      training: joint batch statistics (True) or moving statistics (False).
      units, bn_rows, channels: as in `call`.
      nonempty: the caller guarantees that no group is empty (bucketed inference, which runs
        only occupied bins): the convolutions and pools then run without the empty-group
        guard of `backend_ops.group_conv2d`.
      folded: inference only: the `inference_affine` of these settings, whose scales the
        caller has folded into every kernel (`fold_kernels`); each layer is then conv + shift
        + ReLU, with no batch-norm arithmetic on the activations.

    Returns:
      list of (n_g, H', W', stage_channels[-1]) features.
    """
    training = bool(training)
    if training and folded is not None:
      raise ValueError("call_groups: folded batch norm is for inference (training=False) only")
    units, rows, channels, trained_width = self._resolve(units, bn_rows, channels)
    update = training and trained_width
    depths = [int(d) for d in group_depths]
    if not len(groups) == len(group_kernels) == len(depths):
      raise ValueError("call_groups needs one kernel set and one depth per group, got "
                       f"{len(groups)} groups, {len(group_kernels)} kernel sets and "
                       f"{len(depths)} depths")
    if any(not 1 <= d <= units + 1 for d in depths):
      raise ValueError(f"group depths must be in [1, {units + 1}], got {depths}")
    xs = [ops.cast(g, "float32") for g in groups]
    sizes = [ops.shape(x)[0] for x in xs]
    # Each group's empty-group handling, computed once for all its layers.
    guards = (None if nonempty or backend_ops.backend() != "tensorflow"
              else [backend_ops.empty_guard(n) for n in sizes])
    stacked_sizes = {}

    def sizes_of(members):  # the sizes of these groups as one tensor, once per set of groups
      key = tuple(members)
      if key not in stacked_sizes:
        stacked_sizes[key] = ops.stack([ops.cast(sizes[g], "int32") for g in key])
      return stacked_sizes[key]
    kpu = self.kernels_per_unit

    def kernel(g, s, j):
      repeated = group_kernels[g][s][1]
      return repeated(j) if callable(repeated) else repeated[j]

    for s in range(len(self.stage_channels)):
      bn = self._stage_bn(s, channels[s])
      if folded is not None:  # per layer: ((scale, shift) of the transition, [per row ...])
        t_affine, r_affine = folded[s]
        bn = {"transition": t_affine, "repeated": [None] * self.repeated_kernels_per_stage}
        for j, r in enumerate(rows):
          bn["repeated"][int(r)] = r_affine[j]
      everyone = list(range(len(xs)))
      layer = functools.partial(self._group_layer, guards=guards, folded=folded is not None,
                                width=channels[s])
      repeated_bn = bn["repeated"]
      if folded is None:  # each weight's rows, split once per stage when first needed
        repeated_bn = functools.lru_cache(maxsize=None)(
            lambda k, ws=tuple(bn["repeated"]): ops.unstack(ops.convert_to_tensor(ws[k])))
      out, stats = layer({g: (xs[g], group_kernels[g][s][0]) for g in everyone},
                         sizes_of, bn["transition"], None, training)
      if update:
        self._assign_moving(bn["transition"], stats[0], stats[1], ops.convert_to_tensor(True))
      xs = [out[g] for g in everyone]
      row_stats = {}
      for unit in range(1, units + 1):
        active = [g for g in everyone if depths[g] > unit]
        if not active:
          break
        any_seen = (ops.sum(sizes_of(active)) > 0) if update else None
        r0 = kpu * (unit - 1)
        if self.block_type == "plain":
          out, stats = layer({g: (xs[g], kernel(g, s, r0)) for g in active},
                             sizes_of, repeated_bn, int(rows[r0]), training)
          row_stats.setdefault(int(rows[r0]), []).append((stats, any_seen))
        else:
          r1 = r0 + 1
          mid, stats = layer({g: (xs[g], kernel(g, s, r0)) for g in active},
                             sizes_of, repeated_bn, int(rows[r0]), training)
          row_stats.setdefault(int(rows[r0]), []).append((stats, any_seen))
          out, stats = layer({g: (mid[g], kernel(g, s, r1)) for g in active},
                             sizes_of, repeated_bn, int(rows[r1]), training,
                             skip={g: xs[g] for g in active})
          row_stats.setdefault(int(rows[r1]), []).append((stats, any_seen))
        for g in active:
          xs[g] = out[g]
      if update and row_stats:
        self._assign_rows(bn["repeated"], row_stats, self.stage_channels[s])
      if self.pool_after[s]:
        xs = [backend_ops.group_max_pool(x, may_be_empty=not nonempty,
                                         guard=None if guards is None else guards[g])
              for g, x in enumerate(xs)]
    return xs

  def call_indexed(self, x, kernel_at, depth, folded, units=None, bn_rows=None,
                   channels=None, compute_dtype: str | None = None):
    """Inference of one group of samples that share their kernels and their depth, with
    the depth a scalar tensor and the kernels fetched by index (bucketed inference's
    `loop` graph).

    Per stage: the transition layer, then a `while_loop` over the group's repeated layers,
    then the pool. Every layer is conv + shift + ReLU with the batch-norm scale folded into
    its kernel (`folded`: the `inference_affine` of these settings, as in `call_groups`), so
    the graph has one subgraph per stage whatever the depth or the number of groups.

    Args:
      x: (n, H, W, C_in) features, n >= 1.
      kernel_at: `kernel_at(s, j)` returns stage s's folded kernel, (K, K, C_prev, C_s) for
        the transition (j is None) and (K, K, C_s, C_s) for repeated layer j (an int32
        scalar tensor in [0, (depth - 1) * kernels_per_unit)).
      depth: int32 scalar tensor in [1, units + 1], the group's units per stage.
      folded, units, bn_rows, channels: as in `call_groups`.
      compute_dtype: the dtype of the features, kernels and shifts through the stack
        ('float32', or 'bfloat16' / 'float16': a cache's `compute_dtype`; None: `conv_dtype`);
        kernels and shifts in another dtype are cast to it.

    Returns:
      (n, H', W', C_last) features, float32.
    """
    units = self._resolve(units, bn_rows, channels)[0]
    kpu = self.kernels_per_unit
    compute_dtype = compute_dtype or self.conv_dtype
    x = ops.cast(x, compute_dtype)
    repeats = ops.minimum(ops.cast(depth, "int32") - 1, units)

    def layer(x, kernel, shift, skip=None):
      kernel, shift = ops.cast(kernel, compute_dtype), ops.cast(shift, compute_dtype)
      y = backend_ops.bias_add(backend_ops.group_conv2d(x, kernel, may_be_empty=False), shift)
      return ops.relu(y if skip is None else y + skip)

    for s in range(len(self.stage_channels)):
      (_, t_shift), rep = folded[s]
      x = layer(x, kernel_at(s, None), t_shift)
      if units:
        shifts = ops.stack([shift for _, shift in rep])  # (units * kpu, C_s), in layer order

        def body(i, x, s=s, shifts=shifts):
          if self.block_type == "plain":
            return i + 1, layer(x, kernel_at(s, i), ops.take(shifts, i, axis=0))
          r0 = kpu * i
          y = layer(x, kernel_at(s, r0), ops.take(shifts, r0, axis=0))
          return i + 1, layer(y, kernel_at(s, r0 + 1), ops.take(shifts, r0 + 1, axis=0),
                              skip=x)

        _, x = backend_ops.sequential_while_loop(
            lambda i, x, n=repeats: i < n, body, (ops.convert_to_tensor(0, "int32"), x),
            maximum_iterations=units)
      if self.pool_after[s]:
        x = backend_ops.group_max_pool(x, may_be_empty=False)
    return ops.cast(x, "float32")

  def _group_layer(self, inputs, sizes_of, bn, index, training, skip=None, guards=None,
                   folded: bool = False, *, width: int):
    """relu(BN(conv(x_g, k_g)) [+ skip_g]) for each group g of `inputs` {g: (x_g, k_g)}.

    Training: the groups' conv outputs are concatenated, so that the batch statistics (and the
    normalization) are one computation over every sample that reaches the layer, then split
    back into groups. Inference: per group, with the moving statistics folded into a scale
    and a shift. `folded`: the scale is already in the kernels and `bn` is the layer's
    (scale, shift) list (or `bn[index]`): conv + shift. Otherwise `bn` is the transition's
    (gamma, beta, moving mean, moving variance) (index None), or a function k -> the rows of
    the repeated layers' weight k (the layer's row: `index`). `sizes_of(groups)`: their sizes
    as one tensor. `guards`: per group, its `backend_ops.empty_guard` when groups may be
    empty (None: none is). `width`: the layer's output channels (a narrow kernel's are
    repeated up to it, `_conv`). Returns ({g: output}, (mean, variance)), (None, None) when
    folded.
    """
    groups = list(inputs)
    ys = [self._conv(x, k, width, None if guards is None else guards[g])
          for g, (x, k) in inputs.items()]
    if folded:
      _, shift = bn if index is None else bn[index]
      out = {}
      for g, y in zip(groups, ys):
        y = backend_ops.bias_add(y, shift)
        out[g] = ops.relu(y if skip is None else y + skip[g])
      return out, (None, None)
    def weight(k):
      return bn[k] if index is None else bn(k)[index]

    gamma, beta = weight(0), weight(1)
    if training:
      y = ys[0] if len(ys) == 1 else ops.concatenate(ys, axis=0)
      if self.fused_batch_norm:
        y, mean, var = backend_ops.batch_norm_training(y, gamma, beta, self.epsilon)
      else:
        mean, var = mbn.joint_moments([y])
        y = mbn.normalize(y, mean, var, gamma, beta, self.epsilon)
      if skip is not None:
        y = y + (skip[groups[0]] if len(groups) == 1
                 else ops.concatenate([skip[g] for g in groups], axis=0))
      y = ops.relu(y)
      parts = [y] if len(groups) == 1 else backend_ops.split_rows(y, sizes_of(groups))
      return dict(zip(groups, parts)), (mean, var)
    moving_mean, moving_var = weight(2), weight(3)
    scale = gamma * ops.rsqrt(ops.convert_to_tensor(moving_var) + self.epsilon)
    shift = beta - ops.convert_to_tensor(moving_mean) * scale
    out = {}
    for g, y in zip(groups, ys):
      y = y * scale + shift
      out[g] = ops.relu(y if skip is None else y + skip[g])
    return out, (moving_mean, moving_var)

  def _conv(self, x, kernel, width, guard=None):
    """A group's 'same' convolution with a full kernel, or with a narrow one (the puppeteer's
    `kernel_from_state(expand=False)`: (K, K, C_in / f_in, width / f_out), the full kernel
    without its channel repeats): each block of f_in input channels summed, the narrow
    convolution, each output channel repeated f_out times. That is the convolution with the
    full kernel, whose input channel i and output channel o are the narrow kernel's
    i // f_in and o // f_out. `guard`: the group's `backend_ops.empty_guard` when it may be
    empty (None: it is not, or the backend is not TensorFlow)."""
    c_x, c_k, o_k = x.shape[-1], kernel.shape[-2], kernel.shape[-1]
    if c_x % c_k or width % o_k:
      raise ValueError(f"a ({c_k} -> {o_k})-channel kernel cannot make {c_x} input channels "
                       f"into {width}: the channels must be integer multiples")
    f_in, f_out = c_x // c_k, width // o_k
    if f_in > 1:
      shape = ops.shape(x)
      x = ops.sum(ops.reshape(x, (-1, shape[1], shape[2], c_k, f_in)), axis=-1)
    y = self._in_conv_dtype(
        lambda x, k: backend_ops.group_conv2d(x, k, may_be_empty=guard is not None,
                                              guard=guard), x, kernel)
    return y if f_out == 1 else ops.repeat(y, f_out, axis=-1)

  def _assign_rows(self, bn, row_stats, channels):
    rows = self.repeated_kernels_per_stage
    zeros = ops.zeros((channels,), "float32")
    means, variances, seen = [], [], []
    for r in range(rows):
      if r in row_stats:
        entries = row_stats[r]  # several scaled layers may share a row: their mean
        means.append(ops.mean(ops.stack([m for (m, _), _ in entries]), axis=0))
        variances.append(ops.mean(ops.stack([v for (_, v), _ in entries]), axis=0))
        seen.append(ops.any(ops.stack([a for _, a in entries])))
      else:
        means.append(zeros)
        variances.append(zeros)
        seen.append(ops.convert_to_tensor(False))
    self._assign_moving(bn, ops.stack(means), ops.stack(variances), ops.stack(seen)[:, None])

  def _assign_moving(self, bn, mean, var, seen):
    _, _, moving_mean, moving_var = bn
    moving_mean.assign(mbn.updated_moving(moving_mean, mean, self.momentum, seen))
    moving_var.assign(mbn.updated_moving(moving_var, var, self.momentum, seen))

  def get_config(self):
    config = super().get_config()
    config.update(stage_channels=list(self.stage_channels), block_type=self.block_type,
                  max_depth=self.max_depth, pool_after=list(self.pool_after),
                  kernel_size=self.kernel_size, momentum=self.momentum, epsilon=self.epsilon,
                  fused_batch_norm=self.fused_batch_norm,
                  per_sample_conv=self.per_sample_conv, conv_dtype=self.conv_dtype)
    return config
