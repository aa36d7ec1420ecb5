"""PuppetClassifier: image -> complexity -> puppeteer -> puppet -> pooling -> logits.

The model takes raw pixels in [0, pixel_max] (uint8 or float; 255 for 8-bit images) and does
everything else itself, so the same model serves raw images in a SavedModel:

1. H = InputComplexity(images)                  (paper eq. 8-9; no gradient)
2. dl = tanh(1/H), depth = clip(floor(1/dl))    (eq. 10; or a fixed depth)
3. kernels = PuppeteerODE(H, dl, depth)         (eq. 11-12; or one reference H for all)
4. features = DynamicConvStack((x/255 - mean)/std, kernels, depth)
5. logits = Dense(GlobalAveragePooling(features))

`model(images)` returns logits, so `compile`/`fit` work as for any classifier;
`model(images, return_details=True)` returns a dict with the logits, each sample's complexity,
step and depth. `parameter_breakdown()` splits what is stored from what is generated.

Speed (config `complexity_bins`, `execution`): with `complexity_bins = n > 0` a sample uses
its H bin's centre, so the samples of one bin share kernels and depth. `execution='bucketed'`
then runs the puppeteer once per occupied bin and each bin's samples with ordinary
(shared-kernel) convolutions for exactly the bin's depth; `cache_kernels()` stores the
inference-mode kernels of every bin so that inference does not regenerate them.
`execution='gathered'` runs the puppeteer once per bin (every bin: static shapes, for XLA)
and gathers each sample's kernels from its bin's, then runs the per-sample puppet;
`cache_kernels()` on a gathered model stores the bins' kernels as a table, so that its
inference (XLA, `jax.jit`) runs no puppeteer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import COMPUTE_DTYPES
from official.puppet_cnn.config_definitions import DTYPE_POLICIES
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import complexity as complexity_lib
from official.puppet_cnn.modeling.dynamic_conv_stack import DynamicConvStack
from official.puppet_cnn.modeling.dynamic_conv_stack import KERNELS_PER_UNIT
from official.puppet_cnn.modeling.dynamic_conv_stack import per_sample_kernels
from official.puppet_cnn.modeling import kernel_quantization
from official.puppet_cnn.modeling import scaling
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(PuppetCNNConfig)}


CACHE_DTYPES = ("float32", "float16", "bfloat16", "int8")
# The cache dtypes each execution can store (a gathered table is gathered from by the
# compiled graph: no int8 and its per-channel scales).
CACHE_DTYPES_BY_EXECUTION = {"bucketed": CACHE_DTYPES,
                             "gathered": ("float32", "float16", "bfloat16")}
# `cache_kernels(fallback=...)`: generate uncached bins, raise, or serve the nearest cached bin.
CACHE_FALLBACKS = (True, False, "nearest")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


class _StoredKernels:
  """What the two kernel stores share; a subclass has `n_bins`, `bins` (the sorted cached
  bins) and `tensors(snapshot=...)`."""

  compute_dtype = "float32"  # the dtype its convolutions run in (a bucketed cache may differ)

  def nearest_bins(self) -> np.ndarray:
    """(n_bins,) int32: for each bin, the cached bin nearest to it (itself when cached; an
    uncached bin midway between two cached ones goes to the higher, deeper one)."""
    cached = np.asarray(self.bins, np.int64)
    if not len(cached):
      raise ValueError("an empty kernel cache has no nearest bin")
    out = np.empty((self.n_bins,), np.int32)
    for b in range(self.n_bins):
      distance = np.abs(cached - b)
      out[b] = cached[distance == distance.min()].max()
    return out

  def num_bytes(self) -> int:
    """Bytes stored: the kernels in their storage dtype, plus the int8 scales."""
    return sum(int(np.prod(k.shape)) * _ITEMSIZE[keras.backend.standardize_dtype(k.dtype)]
               for k in self.tensors(snapshot=False))


class _KernelCache(_StoredKernels):
  """Inference-mode kernels per bin (puppet batch norm folded in), with the weights they
  were generated from.

  Deliberately not a Keras/TF trackable: it is never saved with the model (`.keras`,
  weights; a SavedModel export can include it), and it does not change the model's weights
  or parameter counts.
  """
  execution = "bucketed"

  def __init__(self, n_bins, integrator, kernels, snapshot, depth_scale, dtype="float32",
               scales=None, fallback=True, compute_dtype="float32"):
    self.n_bins = n_bins
    self.compute_dtype = compute_dtype  # the dtype the cached bins' convolutions run in
    self.fallback = fallback  # True: uncached bins are generated; False / 'nearest':
                              # inference graphs have no generating path (an uncached bin
                              # raises / is served by the nearest cached bin)
    self.integrator = integrator
    self.depth_scale = depth_scale
    self.dtype = dtype
    self.kernels = kernels    # {bin: [(transition, repeated) per stage]}, `repeated` the
                              # bin's (layers, K, K, C, C) kernels stacked; each kernel times
                              # its layer's inference batch-norm scale
    self.scales = scales      # int8: {bin: [(transition scale (C,), repeated (layers, C))]}
                              # (kernel_quantization); None for float storage
    self.snapshot = snapshot  # copies of _kernel_cache_inputs() at generation time

  @property
  def bins(self):
    return tuple(sorted(self.kernels))

  def stage_scales(self, b):
    """Bin b's per-stage (transition scale, repeated scales); (None, None) per stage for
    float storage."""
    if self.scales is None:
      return [(None, None)] * len(self.kernels[b])
    return self.scales[b]

  def load(self, b):
    """Bin b's kernels in float32 (cast or dequantized from the storage dtype), per stage
    `(transition, [repeated kernels...])` (each a slice of the stored table)."""
    return [(kernel_quantization.dequantize(t, t_scale),
             [kernel_quantization.dequantize(repeated[j],
                                             None if r_scale is None else r_scale[j])
              for j in range(repeated.shape[0])])
            for (t, repeated), (t_scale, r_scale) in zip(self.kernels[b], self.stage_scales(b))]

  def num_params(self) -> int:
    total = 0
    for stages in self.kernels.values():
      for transition, repeated in stages:
        total += int(np.prod(transition.shape)) + int(np.prod(repeated.shape))
    return total

  def map(self, fn) -> "_KernelCache":
    """A copy with `fn` applied to every stored tensor, in the order of `tensors()`."""
    def tree(per_bin):
      return {b: [tuple(fn(k) for k in pair) for pair in stages]
              for b, stages in per_bin.items()}
    kernels = tree(self.kernels)
    scales = None if self.scales is None else tree(self.scales)
    return _KernelCache(self.n_bins, self.integrator, kernels,
                        [fn(w) for w in self.snapshot], self.depth_scale, self.dtype,
                        scales, self.fallback, self.compute_dtype)

  def tensors(self, snapshot: bool = True) -> List[Any]:
    """Every stored tensor: kernels, then int8 scales, then (with `snapshot`) the weight
    snapshot."""
    out = [k for stages in self.kernels.values() for pair in stages for k in pair]
    if self.scales is not None:
      out += [k for stages in self.scales.values() for pair in stages for k in pair]
    return out + (list(self.snapshot) if snapshot else [])


class _GatheredKernelTable(_StoredKernels):
  """execution='gathered': the puppeteer's inference-mode output for the cached bins as one
  static table per stage, from which each sample's kernels are gathered by its bin.

  Unlike `_KernelCache` (bucketed, shared-kernel convolutions) nothing is folded: the
  per-sample puppet applies its batch norm itself, as with generated kernels. Same
  bookkeeping (bins, fallback, snapshot, `map`, `tensors`), never saved with the model.
  """
  execution = "gathered"

  def __init__(self, n_bins, integrator, table, rows, snapshot, depth_scale,
               dtype="float32", fallback=True):
    self.n_bins = n_bins
    self.integrator = integrator
    self.table = table        # [(transition (m, K, K, Ci, Co), repeated (m, L, K, K, C, C))
                              # per stage] in the storage dtype, m cached bins in bin order
    self.rows = rows          # (n_bins,) int32 NumPy: each bin's row in the table, -1 uncached
    self.snapshot = snapshot
    self.depth_scale = depth_scale
    self.dtype = dtype
    self.fallback = fallback

  @property
  def bins(self):
    return tuple(int(b) for b in np.flatnonzero(self.rows >= 0))

  def num_params(self) -> int:
    return sum(int(np.prod(k.shape)) for pair in self.table for k in pair)

  def map(self, fn) -> "_GatheredKernelTable":
    """A copy with `fn` applied to every stored tensor, in the order of `tensors()`."""
    return _GatheredKernelTable(self.n_bins, self.integrator,
                                [tuple(fn(k) for k in pair) for pair in self.table], self.rows,
                                [fn(w) for w in self.snapshot], self.depth_scale, self.dtype,
                                self.fallback)

  def tensors(self, snapshot: bool = True) -> List[Any]:
    """Every stored tensor: the table's, then (with `snapshot`) the weight snapshot."""
    out = [k for pair in self.table for k in pair]
    return out + (list(self.snapshot) if snapshot else [])


def _precision_policy(identifier):
  """The Keras dtype policy `identifier` (a name, config or policy) if the model can follow
  it (`DTYPE_POLICIES`: float32 variables); a clear error otherwise."""
  try:
    policy = keras.dtype_policies.get(identifier)
  except (ValueError, TypeError) as e:
    policy, why = None, str(e)
  if policy is None or policy.name not in DTYPE_POLICIES:
    got = (f"{identifier!r} ({why})" if policy is None else
           f"{policy.name!r} (variables {policy.variable_dtype}, computations "
           f"{policy.compute_dtype})")
    raise ValueError(f"PuppetClassifier supports the dtype policies {DTYPE_POLICIES} "
                     f"(float32 variables), got {got}; for 16-bit convolutions use a "
                     "mixed policy")
  return policy


@keras.saving.register_keras_serializable(package="puppet_cnn")
class PuppetClassifier(keras.Model):
  """Puppet-CNN image classifier (arXiv 2411.12876).

  Args:
    config: a `PuppetCNNConfig` (or its dict form); None: the defaults.
    **kwargs: `PuppetCNNConfig` fields override the config (e.g. `num_classes=100`,
      `stage_channels=(16, 32)`); other keyword arguments go to `keras.Model` (e.g. `name`,
      `dtype`).

  Mixed precision: the model follows the Keras dtype policy it is given (`dtype=`, or else
  the global policy of `keras.mixed_precision.set_global_policy`), recorded as
  `precision_policy`. 'float32' (the default) computes everything in float32. Under
  'mixed_bfloat16' / 'mixed_float16' the puppet's convolutions run in bfloat16 / float16
  (`DynamicConvStack(conv_dtype=)`: their inputs and the generated kernels cast to it, their
  outputs back to float32), and everything else stays float32: the complexity H, the
  puppeteer's ODE (whose pointwise products have their own option,
  `generator_matmul_dtype`), batch norm, the activations between layers, the head and the
  logits. So the model itself, as a Keras layer, keeps the float32 policy (`dtype_policy`,
  its variables, inputs and outputs) whatever `precision_policy` is; `compile` wraps the
  optimizer in a `keras.optimizers.LossScaleOptimizer` under 'mixed_float16', as Keras does.
  Policies with 16-bit variables are refused.
  """

  def __init__(self, config: PuppetCNNConfig | Dict[str, Any] | None = None, **kwargs):
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    if isinstance(config, dict):
      config = PuppetCNNConfig.from_dict(config)
    config = config or PuppetCNNConfig()
    if overrides:
      config = config.replace(**overrides)
    kwargs.setdefault("name", "puppet_cnn")
    # A mixed policy sets the puppet's convolution dtype only; the model runs under float32
    # (a mixed Keras policy would also autocast float pixels and every variable it reads).
    policy = kwargs.pop("dtype", None)
    policy = _precision_policy(policy if policy is not None else keras.config.dtype_policy())
    conv_dtype = policy.compute_dtype
    super().__init__(dtype="float32", **kwargs)
    self.precision_policy = policy.name
    self.config = config
    c = config
    self.complexity_layer = complexity_lib.InputComplexity(c.complexity, name="complexity",
                                                           dtype="float32")
    self.puppeteer = PuppeteerODE(
        stage_channels=c.channels, input_channels=c.input_shape[-1], max_depth=c.max_depth,
        kernels_per_unit=KERNELS_PER_UNIT[c.block], kernel_size=c.kernel_size,
        state_channels=c.state_width, init=c.init, init_rank=c.init_rank, init_scale=c.init_scale,
        integrator=c.integrator, kernel_scaling=c.kernel_scaling, momentum=c.bn_momentum,
        epsilon=c.bn_epsilon, remat=c.generator_remat, generator_rank=c.generator_rank,
        loop_steps=c.generator_loop, depthwise=c.generator_depthwise,
        normalization=c.generator_norm, backward=c.generator_backward,
        matmul_dtype=c.generator_matmul_dtype, name="puppeteer", dtype="float32")
    self.puppet = DynamicConvStack(
        stage_channels=c.channels, block_type=c.block, max_depth=c.max_depth,
        pool_after=c.pools, kernel_size=c.kernel_size, momentum=c.bn_momentum,
        epsilon=c.bn_epsilon, fused_batch_norm=c.fused_batch_norm,
        per_sample_conv=c.per_sample_conv, conv_dtype=conv_dtype, name="puppet",
        dtype="float32")
    self.head_dropout = keras.layers.Dropout(c.head_dropout, name="head_dropout",
                                             dtype="float32")
    self.head = keras.layers.Dense(c.num_classes, name="head", dtype="float32")
    self._kernel_cache = None
    if c.execution == "bucketed":
      self.jit_compile = False  # dynamic group sizes: see `compile`

  # --------------------------------------------------------------------------- building
  def build(self, input_shape=None):
    c = self.config
    if input_shape is None:
      input_shape = (None,) + tuple(c.input_shape)
    self.puppeteer.build(None)
    self.puppet.build(input_shape)
    self.head.build((None, c.channels[-1]))
    self.built = True

  # --------------------------------------------------------------------------- forward
  def _validate(self, images):
    c = self.config
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(
          f"PuppetClassifier expects a batch of images (batch, height, width, "
          f"{c.input_shape[-1]}), got a tensor of rank {len(shape)} with shape {shape}")
    if shape[-1] != c.input_shape[-1]:
      raise ValueError(f"PuppetClassifier was configured for {c.input_shape[-1]} channels, "
                       f"got images with {shape[-1]} channels (shape {shape})")
    for axis, name in ((1, "height"), (2, "width")):
      want = c.input_shape[axis - 1]
      if want is not None and shape[axis] is not None and shape[axis] != want:
        raise ValueError(f"PuppetClassifier was configured for images of {name} {want}, got "
                         f"{shape[axis]} (shape {shape}); set input_shape with None to accept "
                         "any size")
    if shape[0] == 0:
      raise ValueError("PuppetClassifier got an empty batch (0 images)")
    dtype = keras.backend.standardize_dtype(images.dtype)
    if not (dtype.startswith("float") or dtype.startswith("int") or dtype.startswith("uint")
            or dtype.startswith("bfloat")):
      raise TypeError(f"PuppetClassifier expects numeric pixels (uint8 or float), got dtype "
                      f"{dtype}")
    return backend_ops.check_images(images, c.complexity.pixel_max)

  def call(self, images, training=None, return_details: bool = False):
    c = self.config
    images = self._validate(images)
    x = ops.cast(images, "float32")
    h = self.complexity_layer(x)
    bins = None
    if c.complexity_bins:
      centres, steps, depths = self.bin_table()
      bins = self._complexity_bin(h)
      if not training:
        bins = self._served_bins(bins)
      h_used = ops.take(ops.convert_to_tensor(centres), bins)
      dl = ops.take(ops.convert_to_tensor(steps), bins)
      depth = ops.take(ops.convert_to_tensor(depths), bins)
    else:
      h_used = h
      dl = complexity_lib.step_size(h)
      if c.depth_adaptation:
        depth = complexity_lib.depth_from_step(dl, c.min_depth, c.max_depth)
      else:
        depth = ops.full(ops.shape(h), c.depth_when_fixed, "int32")
      depth, dl = scaling.scaled_depth_and_step(depth, dl, c.depth_scale, c.max_depth)
    mean = ops.convert_to_tensor(np.asarray(c.pixel_mean, np.float32))
    std = ops.convert_to_tensor(np.asarray(c.pixel_std, np.float32))
    features = (x / c.complexity.pixel_max - mean) / std

    def forward(width):
      channels = scaling.scaled_channels(c.channels, width)
      if c.execution == "bucketed":
        pooled = self._call_bucketed(features, bins, training, channels)
      elif c.execution == "gathered":
        pooled = self._call_gathered(features, bins, depth, training, channels)
      else:
        h_kernels, dl_kernels = self._kernel_complexity(h_used, dl)
        # In training the repeated kernels stay a list per layer, which the puppet's layer
        # loop reads without stacking them (`backend_ops.layer_reader`: no copy of them and
        # none of their gradients on TensorFlow).
        kernels = self.puppeteer(h_kernels, dl_kernels, depth, training=training,
                                 channels=channels, stack_repeated=not training,
                                 **self._puppeteer_scaling())
        pooled = self._pooled_puppet(features, kernels, depth, training, channels)
      return self._head(pooled, training, channels[-1])

    logits = forward(1.0)
    if training and c.train_widths:
      # In-place distillation (universally slimmable networks): every other width learns to
      # predict what the full width predicts. All widths run every step: a per-step random
      # choice would need a switch over branches that update variables, which XLA rejects.
      target = ops.softmax(ops.stop_gradient(ops.cast(logits, "float32")))
      for width in c.train_widths:
        if width != 1.0:
          narrow = ops.log_softmax(ops.cast(forward(width), "float32"))
          kl = ops.sum(target * (ops.log(ops.maximum(target, 1e-12)) - narrow), axis=-1)
          self.add_loss(ops.mean(kl) / (len(c.train_widths) - 1))
    if return_details:
      details = {"logits": logits, "complexity": h, "step": dl, "depth": depth}
      if bins is not None:
        details["complexity_bin"] = bins
      return details
    return logits

  def _served_bins(self, bins):
    """Inference: each sample's bin as the model serves it. With a kernel cache built with
    `fallback='nearest'`, a sample in an uncached bin runs as a sample of the nearest cached
    bin (that bin's kernels and depth); otherwise its own bin."""
    cache = self._usable_kernel_cache()
    if cache is None or cache.fallback != "nearest":
      return bins
    return ops.take(ops.convert_to_tensor(cache.nearest_bins()), bins)

  def _kernel_complexity(self, h, dl):
    """The H and step the puppeteer integrates with (a fixed H without parameter adaptation).

    `dl` is the step the sample runs with (scaled by `depth_scale`); without parameter
    adaptation the reference step is scaled by the same factor.
    """
    c = self.config
    if c.parameter_adaptation:
      return h, dl
    h_kernels = ops.full(ops.shape(h), c.reference_complexity, "float32")
    dl_kernels = complexity_lib.step_size(h_kernels)
    if c.depth_scale != 1.0:
      dl_kernels = dl_kernels * ops.cast(dl, "float32") / complexity_lib.step_size(h)
    return h_kernels, dl_kernels

  def _pooled_puppet(self, features, kernels, depth, training, channels, kernel_rows=None):
    """The puppet's globally average-pooled output."""
    return ops.mean(self.puppet(features, kernels, depth, training=training, channels=channels,
                                kernel_rows=kernel_rows, **self._puppet_scaling()), axis=(1, 2))

  def _call_gathered(self, features, bins, depth, training, channels):
    """execution='gathered': every bin's kernels, generated once, gathered per sample.

    One puppeteer state per bin (all `complexity_bins`: a static count); in training each
    state's batch-norm statistics are weighted by its bin's sample count in this batch (an
    empty bin weighs 0), which are the statistics of one state per sample ('per_sample'
    with the same bins). Each sample runs with its bin's kernels, gathered layer by layer
    in the puppet's loop (`gathered_kernels='per_layer'`) or all at once first ('upfront').
    Returns the pooled puppet output.
    """
    n = self.config.complexity_bins

    def run(kernels, rows):
      if self.config.gathered_kernels == "upfront":
        kernels = [tuple(per_sample_kernels(k, rows) for k in pair) for pair in kernels]
        rows = None
      return self._pooled_puppet(features, kernels, depth, training, channels, rows)

    def generated():
      centres, steps, depths = self.bin_table()
      h_kernels, dl_kernels = self._kernel_complexity(
          ops.convert_to_tensor(centres, "float32"), ops.convert_to_tensor(steps, "float32"))
      weight = ops.sum(ops.one_hot(bins, n, dtype="float32"), axis=0) if training else None
      kernels = self.puppeteer(h_kernels, dl_kernels, ops.convert_to_tensor(depths, "int32"),
                               training=training, channels=channels, state_weight=weight,
                               **self._puppeteer_scaling())
      return run(kernels, bins)

    cache = None
    if not training and channels == self.config.channels:
      cache = self._usable_kernel_cache()
    if cache is None:
      return generated()
    # A valid table serves the batch when every sample's bin is cached (with
    # fallback='nearest', `call` has already moved each sample to a cached bin); otherwise
    # (stale weights, an uncached bin with fallback=True) the kernels are generated. A
    # conditional over the whole puppet, not an error: XLA has no run-time errors, and this
    # path must compile. (Over the puppet, not the kernels: the table's rows and the
    # generated bins differ in count and dtype, and a conditional's branches must agree.)
    rows = ops.take(ops.convert_to_tensor(cache.rows), bins)
    ok = ops.logical_and(self._kernel_cache_matches(cache), ops.all(rows >= 0))
    return ops.cond(ok, lambda: run(cache.table, ops.maximum(rows, 0)), generated)

  def _head(self, pooled, training, width):
    """Dropout + the linear classifier; at another width its input weights are resized."""
    x = self.head_dropout(pooled, training=training)
    if width == self.config.channels[-1]:
      return self.head(x)
    kernel = scaling.resize_channels(ops.convert_to_tensor(self.head.kernel), width, axis=0,
                                     preserve_sum=True)
    return ops.matmul(ops.cast(x, kernel.dtype), kernel) + self.head.bias

  def _puppeteer_scaling(self) -> Dict[str, Any]:
    """Keyword arguments of the puppeteer for this model's `depth_scale`: the units, and the
    trained step whose moving statistics each step uses (`generator_norm='batch_per_step'`;
    the puppet's batch-norm rows)."""
    c = self.config
    return {"units": scaling.scaled_max_depth(c.max_depth, c.depth_scale) - 1,
            "step_rows": self._puppet_scaling()["bn_rows"]}

  def _puppet_scaling(self) -> Dict[str, Any]:
    """Keyword arguments of the puppet for this model's `depth_scale`."""
    c = self.config
    return {"units": scaling.scaled_max_depth(c.max_depth, c.depth_scale) - 1,
            "bn_rows": tuple(int(r) for r in scaling.bn_rows(  # a tuple: Keras would make an
                c.depth_scale, c.max_depth, self.puppet.kernels_per_unit))}  # array a tensor

  def _complexity_bin(self, h):
    """(B,) int32 bin of each H: `complexity_bins` equal bins on [complexity_bin_floor,
    max_complexity], clamped at both ends."""
    return complexity_lib.config_complexity_bin(h, self.config)

  def bin_table(self):
    """NumPy (centres, steps, depths) of the `complexity_bins` bins (depth: as this model
    uses it, i.e. `fixed_depth` without depth adaptation)."""
    c = self.config
    if not c.complexity_bins:
      raise ValueError("bin_table needs complexity_bins > 0")
    centres, steps, depths = complexity_lib.bin_table(
        c.complexity_bins, c.complexity.max_complexity, c.min_depth, c.max_depth,
        h_min=c.complexity_bin_floor)
    if not c.depth_adaptation:
      depths = np.full_like(depths, c.depth_when_fixed)
    steps, depths = scaling.scaled_bin_table(steps, depths, c.depth_scale, c.max_depth)
    return centres, steps, depths

  # --------------------------------------------------------------------- bucketed execution
  def _call_bucketed(self, features, bins, training, channels):
    """Runs each occupied bin's samples as one group; returns pooled (B, C) in batch order.

    Training and `bucketed_inference='per_bin'` partition the batch by bin and run one
    branch per bin; 'loop' inference visits the occupied bins in a `while_loop`
    (`_infer_bucketed_loop`).
    """
    if backend_ops.in_xla_context():
      raise ValueError(
          "execution='bucketed' cannot be XLA-compiled (its groups have data-dependent sizes); "
          "call it without jit_compile=True, or use execution='per_sample' under XLA")
    c = self.config
    n = c.complexity_bins
    _, _, depths = self.bin_table()
    depths = [int(d) for d in depths]
    batch = ops.shape(bins)[0]
    counts = backend_ops.batched_histogram(ops.reshape(bins, (1, -1)), n)[0]
    occupied = counts > 0
    width = channels[-1]
    puppet_kwargs = dict(self._puppet_scaling(), channels=channels)
    cache = None
    if not training:
      cache = self._usable_kernel_cache() if channels == c.channels else None
    if cache is not None:
      valid = self._kernel_cache_matches(cache)
      cached = np.zeros((n,), bool)
      cached[list(cache.bins)] = True
      uncached = ops.logical_and(occupied, ops.logical_not(cached))
      if cache.fallback is not True:
        # A cache without the generating fallback: nothing is generated, so a stale cache
        # or a sample in an uncached bin is an error, never a silent wrong answer. (With
        # fallback='nearest', `call` has already moved every sample to a cached bin.)
        ok = ops.logical_and(valid, ops.logical_not(ops.any(uncached)))
        message = (f"the kernel cache was built with fallback={cache.fallback!r}, and this "
                   "batch needs kernels it does not hold (a complexity bin that is not "
                   "cached, or weights changed since cache_kernels()): call cache_kernels() "
                   "again (bins=None caches every bin), or with fallback=True")
        # Everything downstream depends on these three: nothing runs before the check.
        features, bins, occupied = (backend_ops.check(ok, t, message)
                                    for t in (features, bins, occupied))
        need = None
      else:
        need = ops.logical_or(uncached, ops.logical_and(occupied, ops.logical_not(valid)))
    else:
      need = occupied
    if training or c.bucketed_inference == "per_bin":
      parts = backend_ops.partition(features, bins, n)
      rows = backend_ops.partition(ops.arange(batch, dtype="int32"), bins, n)
    if training:
      kernels_for = self._generate_bin_kernels(occupied, counts, training=True,
                                               channels=channels)
      outputs = self.puppet.call_groups(parts, [kernels_for(b) for b in range(n)], depths,
                                        training=True, **puppet_kwargs)
      pooled = [ops.mean(o, axis=(1, 2)) for o in outputs]
      return backend_ops.stitch(rows, pooled)

    # Inference batch norm is folded into the kernels (conv + shift + ReLU per layer): the
    # cached kernels were folded when cached, generated ones are folded here. The scales and
    # shifts are computed once per call from the current weights; a valid cache was built
    # from these same weights, so its kernels carry exactly these scales.
    affine = self.puppet.inference_affine(**puppet_kwargs)
    if c.bucketed_inference == "loop":
      return self._infer_bucketed_loop(features, bins, occupied, need, cache, affine,
                                       channels)
    kernels_for = (None if need is None else
                   self._generate_bin_kernels(need, counts, training=False, channels=channels))
    kpu = self.puppet.kernels_per_unit
    pooled = []
    for b in range(n):
      if need is None and b not in cache.kernels:  # no fallback: checked to be empty
        pooled.append(ops.zeros((0, width), "float32"))
        continue

      def run(b=b):
        layers = (depths[b] - 1) * kpu

        def generated():
          return self.puppet.fold_kernels(kernels_for(b, eager=True), affine, layers=layers)

        if need is None:
          kernels = cache.load(b)
        elif cache is not None and b in cache.kernels:
          kernels = ops.cond(valid, lambda: cache.load(b), generated)
        else:
          kernels = generated()
        out = self.puppet.call_groups([parts[b]], [kernels], [depths[b]], training=False,
                                      nonempty=True, folded=affine, **puppet_kwargs)[0]
        return ops.mean(out, axis=(1, 2))
      pooled.append(ops.cond(occupied[b], run, lambda: ops.zeros((0, width), "float32")))
    return backend_ops.stitch(rows, pooled)

  def _infer_bucketed_loop(self, features, bins, occupied, need, cache, affine,
                           channels):
    """Bucketed inference as one loop over the occupied bins (`bucketed_inference='loop'`).

    The bins that `need` generating (no valid cached kernels) are generated together in one
    puppeteer call; each iteration gathers one bin's samples, runs them through
    `DynamicConvStack.call_indexed` with every kernel picked by (bin, layer) from the cache
    or from the generated kernels (a `cond` on the bin's source; within each, a
    `backend_ops.selector` picks the bin's table or the layer's kernels), and scatters the
    pooled features back to the samples' rows. Returns pooled (B, C).
    """
    c = self.config
    n = c.complexity_bins
    _, _, depths = self.bin_table()
    width = channels[-1]
    # need=None: a cache without fallback, every occupied bin checked to be cached.
    generated, position = (None, None) if need is None else (
        self._generate_inference_kernels(need, channels))

    # Where each bin's kernels come from: its slot among the cached bins, or the kernels
    # generated in this call for the bins that `need` generating (slot len(cached bins);
    # folded here). Each cached bin keeps a stage's repeated kernels as one table; a
    # `selector` per stage (built once, outside the loop) returns the bin's table, the stored
    # tensor itself, and layer j is a slice of it: no copy, and no branch per bin in the
    # graph.
    cached_bins = list(cache.bins) if cache is not None else []
    slot = np.zeros((n,), np.int32)
    slot[cached_bins] = np.arange(len(cached_bins), dtype=np.int32)
    slot = ops.convert_to_tensor(slot)
    if need is not None:
      slot = ops.where(need, len(cached_bins), slot)
    dequantize = kernel_quantization.dequantize
    int8 = cache is not None and cache.scales is not None
    pick = []  # per stage: selectors of the transitions, their int8 scales, the repeated
               # tables and their int8 scales (None for float storage)
    for s in range(len(channels) if cached_bins else 0):
      stages = [cache.kernels[b][s] for b in cached_bins]
      scales = [cache.stage_scales(b)[s] for b in cached_bins]
      pick.append([backend_ops.selector([t for t, _ in stages]),
                   backend_ops.selector([t for t, _ in scales]) if int8 else None,
                   backend_ops.selector([r for _, r in stages]),
                   backend_ops.selector([r for _, r in scales]) if int8 else None])

    compute_dtype = cache.compute_dtype if cache is not None else self.puppet.conv_dtype

    def cached_kernel(s, j, source):
      t, t_scale, table, scales = pick[s]
      if j is None:
        return dequantize(t(source), None if t_scale is None else t_scale(source),
                          compute_dtype)
      return dequantize(table(source)[j], None if scales is None else scales(source)[j],
                        compute_dtype)

    # The generated kernels of a stage's repeated layers (each (M, K, K, C, C), M the bins
    # generated) and their folding scales, picked by layer with a selector (no stacking
    # copy, no branch per layer).
    generated_layers = []
    for s in range(len(channels) if generated is not None else 0):
      r_gen, r_affine = generated[s][1], affine[s][1]
      generated_layers.append(
          (backend_ops.selector(r_gen), ops.stack([scale for scale, _ in r_affine]))
          if r_gen else (None, None))

    def kernel_at(s, j, b, p):
      source = backend_ops.gather(slot, b)
      if generated is None:
        return cached_kernel(s, j, source)

      def make():  # in the cached kernels' dtype (the branches of the cond must agree)
        if j is None:
          kernel = backend_ops.gather(generated[s][0], p) * affine[s][0][0]
        else:
          layer, scales = generated_layers[s]
          kernel = backend_ops.gather(layer(j), p) * backend_ops.gather(scales, j)
        return ops.cast(kernel, compute_dtype)

      if not cached_bins:
        return make()
      return ops.cond(source < len(cached_bins), lambda: cached_kernel(s, j, source), make)

    occupied_ids = backend_ops.nonzero(occupied)
    depth_table = ops.convert_to_tensor(np.asarray(depths, np.int32))
    puppet_kwargs = dict(self._puppet_scaling(), channels=channels)

    def body(i, out):
      b = backend_ops.gather(occupied_ids, i)
      rows = backend_ops.nonzero(ops.equal(bins, b))
      p = None if position is None else backend_ops.gather(position, b)
      x = self.puppet.call_indexed(
          backend_ops.gather(features, rows), lambda s, j: kernel_at(s, j, b, p),
          backend_ops.gather(depth_table, b), affine, compute_dtype=compute_dtype,
          **puppet_kwargs)
      pooled = ops.mean(x, axis=(1, 2))
      return i + 1, ops.scatter_update(out, ops.expand_dims(rows, 1), pooled)

    batch = ops.shape(bins)[0]
    # Bins run concurrently (TensorFlow's default, up to 10 iterations at once: each bin's
    # convolutions use the cores that a small bin leaves idle; 1.05x to 1.18x the throughput
    # of one bin at a time, docs/benchmarks_cache_dtype.md); inside a bin the layers are
    # sequential (`DynamicConvStack.call_indexed`), so only one kernel per bin is ever
    # dequantized at a time.
    _, pooled = ops.while_loop(
        lambda i, _: i < ops.shape(occupied_ids)[0], body,
        (ops.convert_to_tensor(0, "int32"), ops.zeros((batch, width), "float32")),
        maximum_iterations=n)
    return pooled

  def _generate_bin_kernels(self, mask, counts, training: bool, channels=None):
    """Runs the puppeteer once per bin where `mask` is true (weighted by `counts`).

    Returns `kernels_for(b)`: bin b's kernels as `call_groups` takes them, per stage
    `(transition, repeated)` with `repeated` a callable j -> kernel j (inference: one gather
    per layer; training: bin b's part of the layer's kernels split by bin).
    With `eager=True` the repeated kernels are a list (`ops.cond` branches must return
    tensors); only call it for a bin that is in `mask`.
    """
    c = self.config
    _, _, depths = self.bin_table()
    channels = tuple(channels or c.channels)
    kpu = self.puppet.kernels_per_unit
    if training:
      ids, h, dl, depth, depth_sorted = self._bin_states(mask)
      kernels = self.puppeteer(h, dl, depth, training=True, state_weight=ops.take(counts, ids),
                               depth_sorted=depth_sorted, stack_repeated=False,
                               active_rows_only=depth_sorted,
                               expand_kernels=not c.narrow_kernels,
                               channels=channels, **self._puppeteer_scaling())
      # Bin b's kernel of a layer is that layer's kernels split by bin: one row when the bin
      # was generated, none otherwise (`group_conv2d` pads an empty group's with a zero row).
      # With narrow_kernels, a kernel of a state narrower than the layer comes narrow
      # (`DynamicConvStack._conv`).
      # The states come in bin order, so a split along the rows with sizes `mask` does it: its
      # parts share the kernels' memory (a partition copied every generated kernel), and its
      # gradient is one concatenation of the groups' own kernel gradients (a per-bin gather
      # instead sums one dense, mostly-zero gradient per bin and layer; measured: 0.4 s of a
      # 3.6 s full-puppet step).
      # With depth-sorted states, repeated kernel j has rows only for the bins deeper than
      # its unit (`active_rows_only`): those bins' rows, in bin order.
      split: Dict[Any, list] = {}
      occupied = ops.cast(mask, "int32")
      row_sizes: Dict[int, Any] = {}

      def sizes(unit):  # one (bins,) tensor per unit, shared by the stages' splits
        if unit not in row_sizes:
          row_sizes[unit] = occupied * np.array([int(d) > unit for d in depths], np.int32)
        return row_sizes[unit]

      def parts(key, tensor, unit=0):
        if key not in split:
          split[key] = backend_ops.split_rows(tensor, sizes(unit if depth_sorted else 0))
        return split[key]

      def kernels_for_training(b, eager=False):
        del eager
        out = []
        for s, (transition, repeated) in enumerate(kernels):
          take = lambda j, s=s, repeated=repeated: parts(  # pylint: disable=unnecessary-lambda-assignment
              (s, j), repeated[j], j // kpu + 1)[b]
          out.append((parts((s, "t"), transition)[b], take))
        return out
      return kernels_for_training

    kernels, position = self._generate_inference_kernels(mask, channels)

    def kernels_for(b, eager=False):
      p = position[b]
      out = []
      for transition, repeated in kernels:
        take = lambda j, repeated=repeated: backend_ops.gather(repeated[j], p)  # pylint: disable=unnecessary-lambda-assignment
        if eager:
          take = [take(j) for j in range((depths[b] - 1) * kpu)]
        out.append((backend_ops.gather(transition, p), take))
      return out
    return kernels_for

  def _bin_states(self, mask):
    """The puppeteer's inputs for the bins where `mask` is true, one state each:
    (ids, H, step, depth, depth_sorted). Bins come in increasing order and depth never
    decreases with H, so the states come sorted by depth; `depth_sorted` checks it on the
    bin table."""
    centres, steps, depths = self.bin_table()
    ids = backend_ops.nonzero(mask)
    h, dl = self._kernel_complexity(ops.take(ops.convert_to_tensor(centres), ids),
                                    ops.take(ops.convert_to_tensor(steps), ids))
    depth = ops.take(ops.convert_to_tensor(depths), ids)
    return ids, h, dl, depth, bool(np.all(np.diff(depths) >= 0))

  def _generate_inference_kernels(self, mask, channels):
    """Inference-mode kernels of the bins where `mask` is true (none generated when no bin
    is), and each bin's position among them: (kernels, position). `kernels` is per stage
    `(transition (M, ...), [repeated kernel j (M, ...)])`; position[b] is bin b's row
    (clamped: meaningless for a bin not in `mask`)."""
    c = self.config
    ids, h, dl, depth, depth_sorted = self._bin_states(mask)
    scaled = self._puppeteer_scaling()
    k = c.kernel_size

    def generate():
      return self.puppeteer(h, dl, depth, training=False, depth_sorted=depth_sorted,
                            stack_repeated=False, channels=channels, **scaled)

    def nothing():
      out, c_prev = [], c.input_shape[-1]
      layers = scaled["units"] * self.puppet.kernels_per_unit
      for ch in channels:
        out.append((ops.zeros((0, k, k, c_prev, ch)), [ops.zeros((0, k, k, ch, ch))] * layers))
        c_prev = ch
      return out
    kernels = ops.cond(ops.shape(ids)[0] > 0, generate, nothing)
    position = ops.maximum(ops.cumsum(ops.cast(mask, "int32")) - 1, 0)
    return kernels, position

  # ------------------------------------------------------------------ inference kernel cache
  def image_bins(self, images, batch_size: int = 256) -> np.ndarray:
    """(N,) int32 NumPy: the complexity bin of each raw image (N, H, W, C), computed
    `batch_size` images at a time. Needs complexity_bins > 0."""
    c = self.config
    if not c.complexity_bins:
      raise ValueError("image_bins needs complexity_bins > 0")
    images = np.asarray(images)
    out = [np.zeros((0,), np.int32)]
    for start in range(0, len(images), batch_size):
      h = self.complexity_layer(ops.cast(images[start:start + batch_size], "float32"))
      out.append(ops.convert_to_numpy(self._complexity_bin(h)).astype(np.int32))
    return np.concatenate(out)

  def occupied_bins(self, images, batch_size: int = 256) -> tuple:
    """The sorted tuple of complexity bins that raw `images` fall into (`image_bins`), e.g.
    the bins to cache for a dataset (`cache_kernels(bins=...)`)."""
    return tuple(sorted({int(b) for b in self.image_bins(images, batch_size)}))

  def cache_kernels(self, bins=None, images=None, dtype: str = "float32",
                    fallback: bool | str = True, compute_dtype: str | None = None):
    """Generates and stores the inference-mode kernels of complexity bins.

    In inference the puppeteer's output for a bin depends only on the weights, so bucketed
    inference can use stored kernels instead of integrating the ODE. Each cached kernel has
    its puppet layer's inference batch-norm scale folded in (conv(x, k) * scale + shift ==
    conv(x, k * scale) + shift; bucketed inference folds generated kernels the same way), so
    a cached layer is one convolution, a bias and a ReLU.

    The cache is safe against staleness: it keeps a copy of every weight it depends on (the
    puppeteer's and the puppet's batch norm, trainable and moving statistics) and each call
    compares the current weights with that copy; if any differs (training, `load_weights`,
    an assignment) the stale kernels are not used: with `fallback=True` (the default) the
    kernels are generated on the fly as without a cache (correct, but slower: call
    `cache_kernels()` again), with `fallback=False` or 'nearest' the call raises. Changing
    `integrator` drops the cache. It is never saved with the model (`.keras`, weights); a SavedModel
    export can include it (`serving/export.py`).

    Call it after training or loading and before tracing your own `tf.function`s (a function
    traced before the cache existed keeps generating); Keras's predict/evaluate functions are
    reset here. Needs execution='bucketed' or 'gathered'. Bins without cached kernels are
    generated on the fly (`fallback=True`), raise (False) or run as the nearest cached bin
    ('nearest').

    With execution='gathered' (XLA, `jax.jit`) the cache is one table per stage of the
    puppeteer's inference-mode kernels (not folded: the per-sample puppet applies its batch
    norm), from which each sample's kernels are gathered, so inference runs no puppeteer.
    It takes dtype 'float32', 'float16' or 'bfloat16' and fallback True or 'nearest'; a
    batch the table cannot serve (stale weights, or an uncached bin with fallback=True) has
    all bins' kernels generated instead, through a conditional (XLA has no run-time errors).

    Args:
      bins: bin indices to cache; None: every bin (or the bins of `images`).
      images: optional raw images; caches only the bins they fall into.
      dtype: storage of the cached kernels. 'float32' (default) gives the generating
        path's predictions (within float rounding); 'float16' or 'bfloat16' halve the cache's
        memory, each kernel rounded to 16 bits and cast back to float32 for its convolution;
        'int8' quarters it: weight-only int8 with a float32 scale per layer and output
        channel (`kernel_quantization`), dequantized before each convolution. The 16-bit and
        int8 caches are lossy approximations (accuracy: docs/binning_cache_dtype.md; speed
        and memory: docs/benchmarks_cache_dtype.md).
      fallback: True (default): inference graphs keep the generating path, used for the bins
        that are not cached and whenever the cache is stale. False: they have none (a
        smaller graph that takes less memory to trace and run, docs/memory_profile.md); a
        batch with an image in an uncached bin, or a call after the weights changed, then
        raises an error instead. Meant for serving a fixed model with every bin cached
        (`bins=None`), e.g. an exported SavedModel. 'nearest': no generating path either,
        and an image in an uncached bin runs as an image of the nearest cached bin (its
        kernels and its depth; midway between two, the higher bin): a coarser binning
        where the cache has gaps, so that a cache of the bins a dataset occupies (`images=`
        a sample of the training set) serves any image, in a fraction of all bins' memory.
        Inference outputs (`return_details`) then give the bin, step and depth the image ran
        with. What it costs in accuracy: docs/binning_nearest.md; in memory:
        docs/memory_profile.md. A stale cache raises, as with False.
      compute_dtype: the dtype bucketed inference's convolutions run in while this cache is
        used (execution='bucketed' with bucketed_inference='loop'): None (default): the
        model's (its dtype policy's compute dtype, `DynamicConvStack.conv_dtype`; float32
        unless the model is mixed precision); 'float32', or 'bfloat16' / 'float16': the
        features, the kernels (cached, dequantized, or generated
        for an uncached bin) and their biases are cast to it through the puppet; the pooled
        features and the head stay float32. Faster where the hardware has 16-bit arithmetic
        (CPUs with AMX / AVX512-BF16, GPUs), and rounded (docs/benchmarks_bf16_serving.md).
        With dtype='bfloat16' the stored kernels are used as they are.
    Returns:
      The sorted tuple of cached bins.
    """
    c = self.config
    if c.execution not in ("bucketed", "gathered"):
      raise ValueError("cache_kernels needs execution='bucketed' or 'gathered' (and "
                       f"complexity_bins > 0); this model has execution={c.execution!r}")
    if dtype not in CACHE_DTYPES:
      raise ValueError(f"cache_kernels: dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"cache_kernels: compute_dtype must be one of {COMPUTE_DTYPES} or "
                       f"None (the model's), got {compute_dtype!r}")
    if compute_dtype not in (None, "float32") and (c.execution != "bucketed"
                                                   or c.bucketed_inference != "loop"):
      raise ValueError(
          f"cache_kernels(compute_dtype={compute_dtype!r}) needs execution='bucketed' with "
          "bucketed_inference='loop' (the default); this model has execution="
          f"{c.execution!r}, bucketed_inference={c.bucketed_inference!r}")
    if not (isinstance(fallback, (bool, np.bool_)) or fallback == "nearest"):
      raise ValueError(f"cache_kernels: fallback must be one of {CACHE_FALLBACKS}, got "
                       f"{fallback!r}")
    fallback = bool(fallback) if isinstance(fallback, (bool, np.bool_)) else "nearest"
    if c.execution == "gathered" and (dtype not in CACHE_DTYPES_BY_EXECUTION["gathered"]
                                      or fallback is False):
      raise ValueError(
          "cache_kernels with execution='gathered' (a table the XLA-compiled graph gathers "
          "from) takes dtype float32, float16 or bfloat16 and fallback=True or 'nearest'; "
          f"got dtype={dtype!r}, fallback={fallback!r} (int8 and fallback=False are "
          "execution='bucketed''s)")
    if not self.built:
      self.build()
    n = c.complexity_bins
    if images is not None:
      seen = set(self.occupied_bins(images))
      wanted = sorted(seen if bins is None else seen & {int(b) for b in bins})
    else:
      wanted = sorted({int(b) for b in (range(n) if bins is None else bins)})
    if any(not 0 <= b < n for b in wanted):
      raise ValueError(f"bins must be in [0, {n}), got {wanted}")
    if (fallback == "nearest" or c.execution == "gathered") and not wanted:
      raise ValueError(f"cache_kernels(fallback={fallback!r}) with execution="
                       f"{c.execution!r} needs at least one bin to cache")
    snapshot = [ops.convert_to_tensor(np.array(ops.convert_to_numpy(w)))
                for w in self._kernel_cache_inputs()]
    if c.execution == "gathered":
      self._kernel_cache = self._gathered_kernel_table(wanted, snapshot, dtype, fallback)
      self._reset_compiled_functions()
      return self._kernel_cache.bins
    centres, steps, depths = self.bin_table()
    kpu = self.puppet.kernels_per_unit
    affine = self.puppet.inference_affine(**self._puppet_scaling())
    stored, scales = {}, ({} if dtype == "int8" else None)
    k = c.kernel_size

    def store(kernel):
      """(kernel in the storage dtype as NumPy, its int8 scales or None)."""
      if dtype == "int8":
        return kernel_quantization.quantize_per_output_channel(kernel)
      kernel = kernel if dtype == "float32" else ops.cast(kernel, dtype)
      return ops.convert_to_numpy(kernel), None

    for b in wanted:
      # One bin at a time, integrated only as far as the bin's depth (a sample past its depth
      # keeps its state exactly, so the kernels it uses are the same). The puppeteer hands
      # over one kernel at a time (`iter_kernels`); each is folded, stored in the storage
      # dtype in a NumPy buffer and released before the next is computed, so the build never
      # holds more than one generated float32 kernel: TensorFlow's CPU allocator, which keeps
      # the largest set of temporaries it has served pooled and resident (oneDNN's, the
      # default on x86), then pools about one kernel instead of a bin's whole set.
      index = np.asarray([b], np.int32)
      h, dl = self._kernel_complexity(ops.convert_to_tensor(centres[index]),
                                      ops.convert_to_tensor(steps[index]))
      units = int(depths[b]) - 1
      layers = units * kpu
      stages, stage_scales = [], []
      folded = folded_scale = table = table_scale = None
      for s, j, kernel in self.puppeteer.iter_kernels(
          h, dl, ops.convert_to_tensor(depths[index]), units=units,
          step_rows=self._puppeteer_scaling()["step_rows"]):
        (t_scale, _), rep = affine[s]
        if j is None:
          folded, folded_scale = store(kernel[0] * t_scale)
          # The stage's repeated kernels as one (layers, K, K, C, C) table, filled in a NumPy
          # buffer one folded kernel at a time; its TensorFlow copy is made once it is full.
          c_s = int(folded.shape[-1])
          table = np.empty((layers, k, k, c_s, c_s), folded.dtype)
          table_scale = np.empty((layers, c_s), np.float32) if scales is not None else None
        else:
          table[j], scale = store(kernel[0] * rep[j][0])
          if table_scale is not None:
            table_scale[j] = scale
        del kernel
        if (j is None and layers == 0) or j == layers - 1:  # the stage is complete
          stages.append((ops.convert_to_tensor(folded), ops.convert_to_tensor(table)))
          if scales is not None:
            stage_scales.append((ops.convert_to_tensor(folded_scale),
                                 ops.convert_to_tensor(table_scale)))
          folded = folded_scale = table = table_scale = None
      stored[int(b)] = stages
      if scales is not None:
        scales[int(b)] = stage_scales
      del stages
      backend_ops.release_free_heap_memory()
    self._kernel_cache = _KernelCache(n, self.puppeteer.integrator, stored, snapshot,
                                      c.depth_scale, dtype, scales, fallback,
                                      compute_dtype or self.puppet.conv_dtype)
    self._reset_compiled_functions()
    return self._kernel_cache.bins

  def _gathered_kernel_table(self, wanted, snapshot, dtype, fallback):
    """`cache_kernels` for execution='gathered': the puppeteer's inference-mode kernels of
    the `wanted` bins, generated together (as gathered inference generates every bin's),
    stored in `dtype` as one table per stage and kernel role."""
    c = self.config
    centres, steps, depths = self.bin_table()
    index = np.asarray(wanted, np.int32)
    h, dl = self._kernel_complexity(ops.convert_to_tensor(centres[index]),
                                    ops.convert_to_tensor(steps[index]))
    kernels = backend_ops.compiled_call(
        self.puppeteer,
        lambda h, dl, depth: self.puppeteer(h, dl, depth, training=False, channels=c.channels,
                                            **self._puppeteer_scaling()),
        h, dl, ops.convert_to_tensor(depths[index]))
    table = [tuple(ops.convert_to_tensor(ops.convert_to_numpy(
        k if dtype == "float32" else ops.cast(k, dtype))) for k in pair) for pair in kernels]
    del kernels
    rows = np.full((c.complexity_bins,), -1, np.int32)
    rows[index] = np.arange(len(index), dtype=np.int32)
    return _GatheredKernelTable(c.complexity_bins, self.puppeteer.integrator, table, rows,
                                snapshot, c.depth_scale, dtype, fallback)

  def clear_kernel_cache(self) -> None:
    """Drops the inference kernel cache (inference then generates kernels)."""
    self._kernel_cache = None
    self._reset_compiled_functions()

  def kernel_cache_info(self) -> Dict[str, Any]:
    """What is cached: bins, stored kernel parameters, bytes (the kernels in their storage
    dtype, plus the int8 cache's scales), and whether it matches the weights."""
    cache = self._kernel_cache
    if cache is None:
      return {"bins": (), "params": 0, "bytes_float32": 0, "bytes": 0, "dtype": None,
              "valid": False, "fallback": None, "compute_dtype": None}
    usable = self._usable_kernel_cache() is not None
    valid = usable and bool(ops.convert_to_numpy(self._kernel_cache_matches(cache)))
    params = cache.num_params()
    return {"bins": cache.bins, "params": params, "bytes_float32": 4 * params,
            "bytes": cache.num_bytes(), "dtype": cache.dtype, "valid": valid,
            "fallback": cache.fallback,
            "compute_dtype": cache.compute_dtype}

  @contextlib.contextmanager
  def temporary_kernel_cache(self, **cache_kwargs) -> Iterator[tuple]:
    """`cache_kernels(**cache_kwargs)` for the block only; the previous cache (or none) is
    back afterwards, also when the block raises. Yields the cached bins."""
    previous = self._kernel_cache
    try:
      yield self.cache_kernels(**cache_kwargs)
    finally:
      self._kernel_cache = previous
      self._reset_compiled_functions()

  @contextlib.contextmanager
  def kernel_cache_stored_as(self, fn: Callable[[Any], Any]) -> Iterator[List[Any]]:
    """Within the block, every tensor of the kernel cache is `fn(tensor)`.

    For exporting: `fn=lambda t: tf.Variable(t, trainable=False)` makes a function traced in
    the block read the cache from variables, which a SavedModel stores with its other
    variables (captured tensors would be constants inside the graph). Yields the new tensors
    (to be tracked by the exported module); an empty list without a usable cache. The
    original cache is back after the block.

    `fn` is called once per tensor, in the order of the yielded list, so under `jax.jit`
    the cache can be an argument of the compiled function, like the weights
    (tools/jax_benchmark.py): `with model.kernel_cache_stored_as(lambda t: t) as tensors`
    gives the tensors to pass, and inside the jitted function
    `supply = iter(args); with model.kernel_cache_stored_as(lambda _: next(supply)): ...`.
    """
    original = self._kernel_cache
    cache = self._usable_kernel_cache()
    if cache is None:
      yield []
      return
    self._kernel_cache = cache.map(fn)
    try:
      yield self._kernel_cache.tensors()
    finally:
      self._kernel_cache = original

  def _usable_kernel_cache(self):
    cache = self._kernel_cache
    if (cache is None or cache.n_bins != self.config.complexity_bins
        or cache.execution != self.config.execution
        or cache.integrator != self.puppeteer.integrator
        or cache.depth_scale != self.config.depth_scale):
      return None
    return cache

  def _kernel_cache_inputs(self):
    """The weights cached kernels depend on: the puppeteer's, and the puppet's batch norm
    (its inference scales are folded into the cached kernels)."""
    return list(self.puppeteer.weights) + list(self.puppet.weights)

  def _kernel_cache_matches(self, cache):
    """Scalar bool tensor: every weight the cache depends on equals its value when the
    cache was built."""
    same = [ops.all(ops.equal(ops.convert_to_tensor(w), snap))
            for w, snap in zip(self._kernel_cache_inputs(), cache.snapshot)]
    return ops.all(ops.stack(same))

  def _reset_compiled_functions(self, train: bool = False):
    for name in ("predict_function", "test_function") + (("train_function",) if train else ()):
      if hasattr(self, name):
        setattr(self, name, None)

  def compile(self, *args, jit_compile="auto", **kwargs):  # pylint: disable=arguments-differ
    """`keras.Model.compile`; with execution='bucketed', 'auto' means no XLA and True raises."""
    if self.config.execution == "bucketed":
      if jit_compile is True:
        raise ValueError("execution='bucketed' cannot be XLA-compiled (data-dependent group "
                         "sizes): compile with jit_compile=False (or 'auto'), or use "
                         "execution='per_sample' for XLA")
      jit_compile = False
    if self.precision_policy == "mixed_float16":
      # What Keras's compile does under this policy (the model's own policy is float32).
      # The optimizer is compile's first argument.
      optimizer, args = ((args[0], args[1:]) if args
                         else (kwargs.pop("optimizer", "rmsprop"), args))
      optimizer = keras.optimizers.get(optimizer)
      if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      args = (optimizer,) + tuple(args)
    super().compile(*args, jit_compile=jit_compile, **kwargs)

  def compile_from_config(self, config):
    """Recompiles a loaded model as it was saved (optimizer, loss, metrics, jit_compile).

    Keras skips this, with a warning, for a model whose `compile` is overridden; ours only
    adjusts `jit_compile`, so the saved settings are passed through it unchanged.
    """
    config = keras.saving.deserialize_keras_object(config)
    self.compile(**config)
    if getattr(self, "optimizer", None) is not None and self.built:
      self.optimizer.build(self.trainable_variables)

  def predict_details(self, images, batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Eager inference in batches; numpy dict with logits, complexity, step and depth."""
    images = np.asarray(images)
    outputs = []
    for start in range(0, len(images), batch_size):
      result = self(images[start:start + batch_size], training=False, return_details=True)
      outputs.append({k: ops.convert_to_numpy(v) for k, v in result.items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  # --------------------------------------------------------------------------- reporting
  def parameter_breakdown(self) -> Dict[str, Any]:
    """Stored parameters by part, against the kernel parameters the puppeteer generates.

    Counts include batch-norm moving statistics (they are stored). `paper_param_size_mb` is
    G alone in float32 MB (10^6 bytes), the quantity of the paper's Table 5 "Param Size".
    """
    if not self.built:
      self.build()
    size = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # pylint: disable=unnecessary-lambda-assignment
    generator = size(self.puppeteer.generator_weights())
    initial_state = size(self.puppeteer.init_factors)
    puppet_bn = size(self.puppet.weights)
    head = size(self.head.weights)
    stored = generator + initial_state + puppet_bn + head
    c = self.config
    generated = {d: self.puppet.generated_kernel_params(c.input_shape[-1], d)
                 for d in range(c.min_depth, c.max_depth + 1)}
    return {
        "puppeteer_generator": generator,
        "puppeteer_initial_state": initial_state,
        "puppet_batch_norm": puppet_bn,
        "head": head,
        "total_stored": stored,
        "stored_bytes_float32": 4 * stored,
        "paper_param_size_mb": 4 * generator / 1e6,
        "generated_kernel_params_by_depth": generated,
    }

  @property
  def integrator(self) -> str:
    return self.puppeteer.integrator

  @integrator.setter
  def integrator(self, name: str) -> None:
    """Switches the puppeteer's integrator (no retraining needed; recompile `predict`)."""
    self.config = self.config.replace(integrator=name)
    self.puppeteer.integrator = self.config.integrator
    self.clear_kernel_cache()

  @property
  def depth_scale(self) -> float:
    return self.config.depth_scale

  @depth_scale.setter
  def depth_scale(self, scale: float) -> None:
    """Evaluates (or trains) with steps scaled by `scale` (see `PuppetCNNConfig.depth_scale`).

    No weights change; compiled Keras functions are reset and the kernel cache is dropped.
    """
    self.config = self.config.replace(depth_scale=scale)
    self.clear_kernel_cache()
    self._reset_compiled_functions(train=True)

  @property
  def complexity_bins(self) -> int:
    return self.config.complexity_bins

  def set_binning(self, complexity_bins: int, execution: str | None = None,
                  floor: float | None = None) -> None:
    """Evaluates (or trains) with H quantized to `complexity_bins` bins (0: exact H), on
    [floor, max_complexity] (`complexity_bin_floor`; None keeps the current floor).

    The weights do not depend on the binning, so a model trained with exact H can be run
    with bins (fast bucketed inference) and the reverse; `tools/binning_sweep.py` measures
    what that costs. `execution` defaults to the current one when it is valid for the new
    binning, else 'per_sample' for 0 bins. Compiled Keras functions and the kernel cache are
    reset; compile again (without XLA for 'bucketed') before `fit`/`evaluate`/`predict` if
    the model was compiled with jit_compile=True.
    """
    if execution is None:
      execution = self.config.execution
      if execution in ("bucketed", "gathered") and not complexity_bins:
        execution = "per_sample"
    floor = self.config.complexity_bin_floor if floor is None else floor
    self.config = self.config.replace(complexity_bins=complexity_bins, execution=execution,
                                      complexity_bin_floor=floor)
    self.clear_kernel_cache()
    self._reset_compiled_functions(train=True)

  def refine_depth(self, scale: float) -> Dict[int, int]:
    """Moves to a finer `depth_scale` during incremental-in-depth training.

    Batch-norm rows of the puppet that the new scale uses and the current one does not (they
    were never trained) start from the nearest trained row (`scaling.refinement_sources`), and
    so do G's per-step moving statistics (`generator_norm='batch_per_step'`); every other
    weight is unchanged. Returns {new row: source row} (unit indices).
    """
    c = self.config
    if not self.built:
      self.build()
    sources = scaling.refinement_sources(c.depth_scale, float(scale), c.max_depth)
    kpu = self.puppet.kernels_per_unit
    for stage in self.puppet.bn_weights:
      for variable in stage.get("repeated", []):
        values = np.array(ops.convert_to_numpy(variable))
        for row, source in sources.items():
          values[row * kpu:(row + 1) * kpu] = values[source * kpu:(source + 1) * kpu]
        variable.assign(values)
    self.puppeteer.refine_statistics_rows(sources)
    self.depth_scale = scale
    return sources

  def at_width(self, width_multiplier: float, calibration_images=None,
               batch_size: int = 64) -> "PuppetClassifier":
    """A new model whose puppet is `width_multiplier` times as wide, from these weights.

    The puppeteer is shared as is (the state keeps its width; kernels are pooled out of it at
    the new layer shapes), the puppet's batch-norm parameters and the classifier's input
    weights are resized along channels (`scaling.py`). `at_width(1.0)` reproduces this model
    exactly. Batch-norm moving statistics resized from another width describe that width's
    activations only roughly; pass `calibration_images` (a few hundred training images) to
    re-estimate them (`recalibrate_batch_norm`). The result is an ordinary PuppetClassifier
    (save it, export it, count its MACs); it does not sample widths in training.
    """
    c = self.config
    if not self.built:
      self.build()
    if not (isinstance(width_multiplier, (int, float)) and np.isfinite(width_multiplier)
            and width_multiplier > 0):
      raise ValueError(f"width_multiplier must be a number > 0, got {width_multiplier!r}")
    channels = scaling.scaled_channels(c.channels, float(width_multiplier))
    config = c.replace(stage_channels=channels, state_channels=c.state_width, train_widths=())
    model = PuppetClassifier(config, name=f"{self.name}_w{width_multiplier:g}",
                             dtype=self.precision_policy)
    model.build((None,) + tuple(c.input_shape))
    for dst, src in zip(model.puppeteer.weights, self.puppeteer.weights):
      dst.assign(src)
    for s, stage in enumerate(self.puppet.bn_weights):
      for prefix, variables in stage.items():
        for dst, src in zip(model.puppet.bn_weights[s][prefix], variables):
          dst.assign(scaling.resize_channels(ops.convert_to_tensor(src), channels[s]))
    model.head.kernel.assign(scaling.resize_channels(
        ops.convert_to_tensor(self.head.kernel), channels[-1], axis=0, preserve_sum=True))
    model.head.bias.assign(self.head.bias)
    if calibration_images is not None:
      model.recalibrate_batch_norm(calibration_images, batch_size=batch_size)
    return model

  def recalibrate_batch_norm(self, images, batch_size: int = 64, generator: bool = False,
                             puppet: bool = True) -> int:
    """Re-estimates batch-norm moving statistics on `images`; returns batches used.

    puppet: each of the puppet's layers' moving mean and variance become the mean of its
    batch statistics over the batches (layers a batch does not reach keep their values).
    generator: G's moving statistics (every step's row with `generator_norm=
    'batch_per_step'`) become the mean of its batch statistics over the batches that reached
    them (`PuppeteerODE.calibration`); nothing to do with 'state'. Nothing else changes: the
    puppeteer's other weights, the head's and (puppet=False) the puppet's are restored
    afterwards. Use it after `at_width`, after changing `depth_scale`, or after
    `with_generator_norm`, with a few hundred to a few thousand training images (mixed
    complexity: G's statistics are over the batch's states).
    """
    images = np.asarray(images)
    if len(images) == 0:
      raise ValueError("recalibrate_batch_norm needs at least one image")
    if not (generator or puppet):
      raise ValueError("recalibrate_batch_norm: nothing to do with generator=False and "
                       "puppet=False")
    if not self.built:
      self.build()
    g = self.puppeteer
    statistics = (g.moving_mean, g.moving_variance) if generator else ()
    kept = [w for w in g.weights if not any(w is v for v in statistics)]
    if not puppet:
      kept += list(self.puppet.weights)
    keep = [np.array(ops.convert_to_numpy(w)) for w in kept]
    momentum = self.puppet.momentum
    batches = 0
    try:
      with g.calibration():
        for start in range(0, len(images), batch_size):
          self.puppet.momentum = batches / (batches + 1.0)  # running mean of the batch stats
          self(images[start:start + batch_size], training=True)
          batches += 1
    finally:
      self.puppet.momentum = momentum
      for w, value in zip(kept, keep):
        w.assign(value)
    if self._kernel_cache is not None:  # its folded kernels hold the old statistics; compiled
      self.clear_kernel_cache()         # functions read the statistics' variables and stay
    return batches

  def with_generator_norm(self, generator_norm: str, calibration_images=None,
                          batch_size: int = 64) -> "PuppetClassifier":
    """A new model with G's moving statistics kept one way or the other, from these weights.

    'batch' and 'batch_per_step' train alike (batch statistics per step) and differ only in
    the moving statistics that normalize G at inference: one set for every step, or one per
    step. Converting copies every weight; the one set becomes every step's row, and the rows
    average to the one set. Without `calibration_images` the new model predicts as this one
    (from 'batch'). With them (a few thousand training images), G's statistics are
    re-estimated (`recalibrate_batch_norm(generator=True, puppet=False)`): a model trained
    with 'batch' then normalizes each step at inference as it was normalized in training
    (docs/generator_norm.md measures what that is worth). 'state' normalizes
    differently in training, so converting to or from it is refused.
    """
    c = self.config
    norms = ("batch", "batch_per_step")
    if generator_norm not in norms or c.generator_norm not in norms:
      raise ValueError(f"with_generator_norm converts between {norms} (they train alike); "
                       f"got {c.generator_norm!r} -> {generator_norm!r} ('state' normalizes "
                       "differently in training: train with it instead)")
    if not self.built:
      self.build()
    model = PuppetClassifier(c.replace(generator_norm=generator_norm),
                             name=f"{self.name}_{generator_norm}", dtype=self.precision_policy)
    model.build((None,) + tuple(c.input_shape))
    statistics = (self.puppeteer.moving_mean, self.puppeteer.moving_variance)
    pairs = [(d, s) for a, b in ((model.puppeteer, self.puppeteer), (model.puppet, self.puppet),
                                 (model.head, self.head)) for d, s in zip(a.weights, b.weights)]
    for dst, src in pairs:
      value = np.asarray(ops.convert_to_numpy(src))
      if any(src is v for v in statistics) and value.shape != tuple(dst.shape):
        value = (np.broadcast_to(value, tuple(dst.shape)) if value.ndim == 1
                 else value.mean(axis=0))
      dst.assign(value)
    if calibration_images is not None:
      model.recalibrate_batch_norm(calibration_images, batch_size=batch_size, generator=True,
                                   puppet=False)
    return model

  # --------------------------------------------------------------------------- config
  def get_config(self):
    return {"config": self.config.to_dict(), "name": self.name,
            "dtype": self.precision_policy}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    return cls(config=PuppetCNNConfig.from_saved_dict(config.pop("config")), **config)
