"""Typed configuration for Puppet-CNN models.

Every choice that the paper (arXiv 2411.12876) leaves open is a named field here with a
documented default; `README.md` ("Choices the paper leaves open") explains each one.
Configs validate themselves on construction, so an impossible setting fails with a clear
message before any TensorFlow graph is built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Optional, Tuple

# Puppet presets (paper section 3.5 and Table 3). Each maps to the stage output channels,
# the kind of repeated unit in every stage, and after which stages a 2x2 max pool follows.
PUPPET_PRESETS = {
    # The paper's puppet: VGG-style plain conv layers, pooling whenever the width changes.
    "vgg": dict(stage_channels=(64, 128, 256, 512), block_type="plain",
                pool_after=(True, True, True, False)),
    # ResNet-style: every repeated unit is a basic residual block (two generated kernels).
    "resnet": dict(stage_channels=(64, 128, 256, 512), block_type="residual",
                   pool_after=(True, True, True, False)),
    # AlexNet-style (CIFAR scale): five stages 64-192-384-256-256, pools after 1, 2 and 5.
    "alexnet": dict(stage_channels=(64, 192, 384, 256, 256), block_type="plain",
                    pool_after=(True, True, False, False, True)),
}

COLOR_MODES = ("luminance", "channel_mean")
SPECTRUM_SCALINGS = ("log_minmax", "log_fixed")
INITS = ("paper", "learned", "learned_additive")
INTEGRATORS = ("euler", "midpoint", "rk4")
# Evaluations of the puppeteer's G per integration step, for each integrator.
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}
KERNEL_SCALINGS = ("fan_in", "none")
BLOCK_TYPES = ("plain", "residual")
EXECUTIONS = ("per_sample", "gathered", "bucketed")
# How the per-sample path convolves each sample with its own kernel
# (`PuppetCNNConfig.per_sample_conv`, `backend_ops.per_sample_conv2d`).
PER_SAMPLE_CONVS = ("grouped", "im2col")
# How G's depthwise convolution is computed (`PuppetCNNConfig.generator_depthwise`,
# `backend_ops.depthwise_conv_same`).
DEPTHWISE_METHODS = ("auto", "conv", "shifted")
# How G's batch norm normalizes (`PuppetCNNConfig.generator_norm`, `PuppeteerODE`).
GENERATOR_NORMS = ("batch", "state", "batch_per_step")
# How training differentiates the puppeteer's trajectory (`PuppetCNNConfig.generator_backward`,
# `PuppeteerODE(backward=)`, `modeling/reversible_trajectory.py`).
GENERATOR_BACKWARDS = ("auto", "autodiff", "reversible")
# The dtypes arithmetic can run in: G's pointwise products (`PuppetCNNConfig.
# generator_matmul_dtype`, `PuppeteerODE(matmul_dtype=)`, `backend_ops.matmul_in_dtype`) and
# a bucketed kernel cache's convolutions (`PuppetClassifier.cache_kernels(compute_dtype=)`).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# The Keras dtype policies `PuppetClassifier` follows (float32 variables; its convolutions in
# the policy's compute dtype) and `--dtype_policy` takes.
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def why_not_reversible(integrator: str, generator_norm: str) -> Optional[str]:
  """What `generator_backward='reversible'` needs and this G lacks, or None when it can
  train it (`PuppetCNNConfig`, `PuppeteerODE`)."""
  if integrator not in INTEGRATORS:  # every one is an explicit Runge-Kutta step it undoes
    return f"an integrator from {INTEGRATORS} (got {integrator!r})"
  if generator_norm not in ("batch", "batch_per_step"):
    return (f"a batch-normalized G (generator_norm / normalization 'batch' or "
            f"'batch_per_step'), got {generator_norm!r}")
  return None

# Fields whose default changed after models were saved without them: the value such a saved
# config meant (`PuppetCNNConfig.from_saved_dict`). generator_norm: 'batch' until 2026-12-04.
SAVED_BEFORE_FIELD = {"generator_norm": "batch"}
# When execution='gathered' gathers each sample's kernels from its bin's
# (`PuppetCNNConfig.gathered_kernels`).
GATHERED_KERNELS = ("per_layer", "upfront")
# How bucketed inference lays out its graph (`PuppetCNNConfig.bucketed_inference`).
BUCKETED_INFERENCES = ("loop", "per_bin")
# Bucketed training (and `bucketed_inference='per_bin'`) builds one branch per complexity bin,
# so the bin count is bounded.
MAX_BUCKETED_BINS = 1024
# Bound on the layers per stage that a `depth_scale` may ask for (the loops are unrolled or
# bounded at build time).
MAX_SCALED_DEPTH = 64

# CIFAR-10 training-set statistics (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass
class ComplexityConfig:
  """How the input complexity H (paper eq. 8-9) is measured.

  H = pixel_weight * E(pixels) + (1 - pixel_weight) * E(Fourier magnitude), with E the Shannon
  entropy of a value histogram.

  Attributes:
    color_mode: 'luminance' (default): entropy of the ITU-R BT.601 luma plane
      (0.299 R + 0.587 G + 0.114 B); 'channel_mean': mean of per-channel entropies.
    bins: number of histogram bins for both entropies (default 256: one bin per 8-bit level).
    log_base: base of the logarithm (default 2: H in bits, so H <= log2(bins) = 8).
    spectrum_scaling: how the Fourier magnitude is turned into `bins` levels.
      'log_minmax' (default): log(1 + |F|/N) rescaled per image to [0, bins - 1];
      'log_fixed': log(1 + |F|/N) / log(1 + pixel_max) * bins (a fixed, image-independent scale).
      In both, the DC term (the image mean, already in the pixel histogram) is left out, so a
      constant image has spectrum entropy 0.
    spectrum_floor: a per-image log-magnitude range below this counts as a flat spectrum (entropy
      0) under 'log_minmax'; it keeps float32 FFT round-off on constant images from being
      stretched into a histogram.
    pixel_weight: weight of the pixel entropy (paper: 0.5).
    pixel_max: value of a white pixel in the model's input (255 for 8-bit images).

  `max_complexity` = log_base(bins) is the largest H (8 bits by default).
  """
  color_mode: str = "luminance"
  bins: int = 256
  log_base: float = 2.0
  spectrum_scaling: str = "log_minmax"
  spectrum_floor: float = 1e-3
  pixel_weight: float = 0.5
  pixel_max: float = 255.0

  def __post_init__(self):
    _check(self.color_mode in COLOR_MODES,
           f"complexity.color_mode must be one of {COLOR_MODES}, got {self.color_mode!r}")
    _check(self.spectrum_scaling in SPECTRUM_SCALINGS,
           f"complexity.spectrum_scaling must be one of {SPECTRUM_SCALINGS}, "
           f"got {self.spectrum_scaling!r}")
    _check(int(self.bins) >= 2, f"complexity.bins must be >= 2, got {self.bins}")
    _check(self.log_base > 1.0, f"complexity.log_base must be > 1, got {self.log_base}")
    _check(0.0 <= self.pixel_weight <= 1.0,
           f"complexity.pixel_weight must be in [0, 1], got {self.pixel_weight}")
    _check(self.pixel_max > 0, f"complexity.pixel_max must be > 0, got {self.pixel_max}")
    _check(self.spectrum_floor >= 0,
           f"complexity.spectrum_floor must be >= 0, got {self.spectrum_floor}")
    self.bins = int(self.bins)

  @property
  def max_complexity(self) -> float:
    """The largest possible H: log_base(bins) (8 bits for 256 bins in base 2)."""
    return math.log(self.bins) / math.log(self.log_base)


@dataclasses.dataclass
class PuppetCNNConfig:
  """Configuration of a `PuppetClassifier`.

  Attributes:
    num_classes: number of output logits.
    input_shape: (height, width, channels) of the raw images; height/width may be None.
    puppet: 'vgg' (the paper's puppet), 'resnet' or 'alexnet'; selects the defaults of
      `stage_channels`, `block_type` and `pool_after` (see PUPPET_PRESETS).
    stage_channels: output channels of each stage (None: the preset's; paper: 64-128-256-512).
    block_type: repeated unit of each stage, 'plain' (conv-BN-ReLU) or 'residual' (basic
      block of two generated convs). None: the preset's.
    pool_after: for each stage, whether a 2x2 max pool follows it. None: the preset's.
    min_depth, max_depth: clamp of the per-sample depth D = floor(1/dl) (paper eq. 10). With
      H in bits, D <= floor(1/tanh(1/8)) = 8, the default `max_depth`. `max_depth` is the
      compile-time bound of the per-sample loops.
    kernel_size: K of every generated kernel (paper: 3).
    state_channels: C_max of the puppeteer state (C_out_max, C_in_max, K*K); None: the
      largest stage width (paper). A state narrower than a stage is resized up to it
      (`PuppetClassifier.at_width` with a multiplier above 1 does this): each state entry
      then serves several kernel entries, e.g. a 256-wide state gives a 512-wide stage pairs
      of identical output channels (before batch norm). A narrower state makes G cheaper in
      training (docs/generator_profile.md); not the paper.
    init: initial puppeteer state. 'paper': a constant fill exp(1 - H^-2) (eq. 11);
      'learned' (default): a learned rank-`init_rank` base state multiplied by that fill;
      'learned_additive': the base plus the fill. The constant fill makes nearly all kernel
      entries equal; measurements in README ("Initial state").
    init_rank: rank of the learned base state (CP decomposition; 0 = a full learned tensor,
      which is the "Total Params" reading of the paper's Table 5).
    init_scale: standard deviation of the learned base at initialization (0.5: roughly
      He-scaled generated kernels).
    integrator: 'euler' (paper eq. 7), 'midpoint' or 'rk4'; may be changed after training.
    kernel_scaling: 'fan_in' (default) divides each generated kernel by sqrt(K*K*C_in) so
      conv outputs start at unit scale; 'none' uses the pooled state as is.
    depth_adaptation: if False every sample gets `fixed_depth` layers per stage.
    fixed_depth: depth used when depth_adaptation is False (None: max_depth).
    parameter_adaptation: if False kernels come from one fixed complexity
      `reference_complexity` for every input (paper Table 3 "without parameter adaptation").
    reference_complexity: the H used when parameter_adaptation is False (bits).
    pixel_mean, pixel_std: per-channel normalization of the puppet's input, on [0, 1] pixels.
    bn_momentum, bn_epsilon: batch norm settings of the puppet and of the puppeteer's G
      (momentum 0.9 = PyTorch's default, which suits short CIFAR-scale schedules).
    head_dropout: dropout rate before the linear classifier (0: none, the paper).
    complexity: how H is measured (ComplexityConfig).
    complexity_bins: 0 (default, the paper): every sample uses its exact H. n > 0: H is
      quantized to n equal bins on [complexity_bin_floor, complexity.max_complexity] (= [0, 8]
      bits by default) and a sample uses its bin centre's H for its step, depth and initial
      puppeteer state, so all samples of one bin share their kernels and depth. The logits
      then depend on the image only through the bin (and the puppet's input).
      `return_details` reports the exact H as 'complexity' and the bin as 'complexity_bin'.
    complexity_bin_floor: the lower edge of the binned range (bits; default 0.0: bins on
      [0, max_complexity], as before this option existed). With a floor f the n bins are
      equal bins on [f, max_complexity], and an H below f falls in the first bin (it runs at
      that bin's centre: a deeper network than its exact H would give). Not in the paper: it
      puts the bins where the data is. CIFAR-10's images have H in [3.55, 7.33] bits (9 of
      the 50,000 training images below 4; docs/runs/cifar_complexity_range_2218.txt), so 8
      bins on [0, 8] leave 3 bins empty and a 4th nearly so, while 4 bins on [4, 8] are
      bins 4-7 of those 8 (same centres, depths and kernels) with a bucketed training graph
      of half the bins (13-18% fewer nodes: the bins below 4 bits are shallow;
      docs/benchmarks_kernel_remat.md); 8 bins on [4, 8] give the resolution of 16 on
      [0, 8] with the graph of 8.
    execution: how a batch is run.
      'per_sample' (default): the puppeteer integrates one state per sample and the puppet
      runs per-sample kernels (a grouped conv) in a bounded loop with per-sample masks.
      XLA-compatible; exact H or binned H.
      'gathered' (needs complexity_bins >= 1; any backend): the puppeteer integrates one
      state per bin, for all `complexity_bins` bins (a count fixed when the model is built,
      so the shapes are static), its batch-norm statistics weighted by each bin's sample
      count, and each sample's kernels are gathered from its bin's; the puppet then runs as
      in 'per_sample'. The same loss, gradients, moving statistics and predictions as
      'per_sample' with the same bins (to float rounding), with G run on n bins instead of
      on every sample of the batch: cheaper when a batch holds more samples than there are
      bins. XLA-compatible: the fast mode under `jax.jit` and `jit_compile=True`, where
      'bucketed' cannot run (tools/jax_benchmark.py, docs/benchmarks_gpu.md).
      'bucketed' (needs 1 <= complexity_bins <= MAX_BUCKETED_BINS, TensorFlow backend): the
      batch is partitioned by bin; the puppeteer integrates one state per occupied bin (its
      batch-norm statistics weighted by the bin's sample count), and each bin's samples run
      their shared kernels with an ordinary conv for exactly the bin's depth (no masks; in
      training one unrolled branch per bin, in inference see `bucketed_inference`). In
      training the puppet's batch-norm statistics are computed jointly over all groups
      that reach a layer, so the loss, gradients and moving
      statistics are those of 'per_sample' with the same bins. Not XLA-compatible (dynamic
      group sizes): `compile(jit_compile='auto')` turns XLA off, `jit_compile=True` and
      `tf.function(jit_compile=True)` raise a ValueError. In inference the kernels depend
      only on the weights: `PuppetClassifier.cache_kernels()` stores them (see there).
    gathered_kernels: when execution='gathered' gathers each sample's kernels from its
      bin's (or from the rows of a kernel table). 'per_layer' (default): each layer's, in the
      layer loop where the layer runs (`DynamicConvStack(kernel_rows=...)`), so one layer's
      (batch, K, K, C, C) exists at a time and the gradient is accumulated per bin.
      'upfront': every layer's at once before the puppet runs, (batch, layers, K, K, C, C)
      per stage (the code before 2026-12-04: at batch 256 with the paper's G, 52 GB of
      device memory with the kernel table on an H200, docs/benchmarks_gpu.md). Same values.
      XLA's plan at batch 256: 3.5 GB per layer, 19.4 GB upfront; 'upfront' is faster only
      when a batch holds fewer images than there are bins
      (docs/benchmarks_gathered_per_layer.md).
    bucketed_inference: the graph of bucketed inference (execution='bucketed', training=False;
      training always runs one branch per bin). 'loop' (default): one `tf.while_loop` over
      the occupied bins runs each bin's samples through one shared subgraph per stage (a
      `while_loop` over the bin's layers, each kernel picked by bin and layer from the kernel
      cache or from the kernels generated in this call), so the puppet's part of the graph
      does not grow with the number of bins (a kernel cache adds one small `switch` branch
      per cached bin and stage). 'per_bin': one branch per bin under its own `cond`, each
      with its layers unrolled; the bins can run concurrently, but the graph holds every
      bin's layers.
      Same predictions (within float rounding); docs/benchmarks_cached.md and
      docs/memory_profile.md measure both.
    depth_scale: s, the resolution in depth (default 1.0: as trained, the paper). A sample
      of depth D and step dl runs round(s * D) layers per stage (at least 1, at most
      round(s * max_depth)) with the step scaled so that it covers the same stretch of the
      puppeteer's trajectory; scaled layers use the batch norm of the trained layer at the
      same time (`modeling/scaling.py`). Set it on a trained model to evaluate it coarser or
      finer (`PuppetClassifier.depth_scale = 2.0`, `tools/convergence_table.py`);
      incremental-in-depth training (`TrainConfig.depth_refinements`) trains at 2^-k and
      doubles it during training.
    train_widths: widths trained beside the full model (default (): width 1 only, the paper).
      Must include 1.0. Every training step runs the full width (cross-entropy) and each
      other listed width, whose kernels are pooled out of the same puppeteer state and whose
      batch-norm parameters and classifier weights are resized from the full-width ones
      (`modeling/scaling.py`); each narrower or wider model learns to predict what the full
      model predicts (in-place distillation as in universally slimmable networks: a KL loss,
      averaged over the extra widths). All widths run every step, because a per-step random
      choice would need a switch over branches that update variables, which XLA rejects; a
      step costs about the sum of the widths' costs. Batch-norm moving statistics are updated
      only at width 1.0. `PuppetClassifier.at_width(w, calibration_images)` then generates a
      model of any width with its batch-norm statistics recalibrated.
    generator_remat: False (default): the backward pass keeps every activation of G (its
      convolutions, batch norm and tanh: four state-sized tensors per evaluation of G, per
      trajectory, per step). True: only each evaluation's input state is kept and the rest is
      recomputed in the backward pass (`keras.remat`, gradient checkpointing): less training
      memory for one more forward pass of G. Same values and gradients either way; inference
      is unaffected. docs/benchmarks_remat.md measures both. With it the default
      `generator_backward='auto'` trains with autodiff; the reversible backward keeps as
      little memory without the extra pass (docs/benchmarks_reversible.md).
    generator_rank: 0 (default, the paper): G's pointwise conv is a full C x C matrix (C =
      the state width), the reading that reproduces the paper's Table 5. r in [1, C): the
      matrix is factorized as (C x r)(r x C), so each step of G costs about 2 r / C of the
      pointwise multiply-adds (C = 512, r = 64: G's step falls from 1.23 G to 0.32 G
      multiply-adds) and G stores 2 r C pointwise parameters instead of C^2. Not in the paper:
      a speed option (docs/generator_profile.md measures what it saves,
      docs/ablations_generator.md what it costs in accuracy).
    generator_loop: False (default): the puppeteer's steps are unrolled, one set of graph
      nodes per step. True: each stage's repeated steps run in one loop whose body is traced
      once (`PuppeteerODE(loop_steps=True)`: a `tf.while_loop` under TensorFlow), so the
      training graph holds one step of G per stage instead of max_depth - 1 (its gradient
      and, with `generator_remat`, its recomputation included). Each step runs G on the
      states still below their depth and is skipped once none is. Same values and
      gradients. With the lighter puppeteer (`state_channels=256`, `generator_rank=32`) and
      remat it trains with about 400 MB less process memory, ~100 MB more tensors and a
      similar step; with the paper's 512-wide state the loop's gradient holds each stage's
      states at once and costs more than it saves (docs/benchmarks_train_loop.md), hence
      off by default.
    fused_batch_norm: True (default): bucketed training normalizes each puppet layer with
      one fused batch-norm op (TensorFlow's FusedBatchNormV3, `backend_ops.
      batch_norm_training`), whose gradient needs only the layer's input and the batch
      statistics. False: the two-pass moments and a scale and shift (the code before
      2026-12-03), which keep two more activation-sized tensors per layer for the backward
      pass. Same values and gradients (to float rounding); docs/benchmarks_fused_bn.md.
    narrow_kernels: True (default): in bucketed training, a kernel generated from a state
      narrower than its layer by an integer factor (`state_channels` 256 for 512 channels:
      the state's channels are repeated, `PuppeteerODE.kernel_factors`) is kept narrow;
      the layer sums its input channels in blocks of that factor, convolves with the
      narrow kernel and repeats each output channel (the same convolution: a quarter of
      the kernel's memory and multiply-adds at 512 channels). False: the full kernel is
      built and kept (the code before 2026-12-04). No effect with the paper's state (as
      wide as the widest stage). Same values and gradients to float rounding;
      docs/benchmarks_no_cond.md.
    per_sample_conv: how execution='per_sample' and 'gathered' convolve each sample with its
      own kernel (`backend_ops.per_sample_conv2d`). 'grouped' (default): one grouped
      convolution with the batch folded into channels. 'im2col': each sample's K x K
      patches times its flattened kernel, a batched matrix product, at K*K times the
      input's memory (kept in training for the kernel's gradient). Same values; on XLA's CPU
      backend im2col was 2.6x faster for one layer at the 512-channel stage but slower in
      the whole model's inference (docs/benchmarks_jax_cpu.md); on an H200 its per-image
      convolutions took 2.2x less time than grouped in gathered inference at batch 256
      (docs/benchmarks_gpu.md).
    generator_depthwise: how G's 3x3 depthwise convolution of the state is computed (same
      values either way). 'conv': the backend's depthwise convolution. 'shifted': the sum of
      the K*K shifted copies of the padded state, each times its per-channel weight
      (`backend_ops.depthwise_conv_same`), which XLA fuses into one pass: under `jax.jit`
      on a 2-core CPU 5.7x-13x faster than XLA's depthwise convolution forward and 5.5x-15x
      in the gradient (docs/benchmarks_jax_cpu.md). 'auto' (default): 'shifted' under XLA
      (the JAX backend, or a TensorFlow function compiled with jit_compile=True), else
      'conv' (TensorFlow's own kernels, and a graph with one node instead of 2 K*K + 1).
      Memory: XLA's CPU backend materializes the shifted copies, so training the paper's G
      under JAX on a CPU plans 31.3 GB at batch 8 with 'shifted' and 12.3 GB with 'conv'
      (docs/benchmarks_gathered_per_layer.md); XLA's GPU backend does not need that memory.
    generator_norm: how G's batch norm normalizes (`PuppeteerODE(normalization=...)`).
      'batch' (the paper's "batch norm", one set of moving averages as its Table 5 counts):
      in training over the batch's states (one per sample, or one per bin weighted by its
      count), at inference with the moving averages. 'state': each state by its own
      per-channel statistics, in training and at inference alike, so a bin's kernels do not
      depend on which other bins share its batch.
      With `DataConfig.batch_grouping='complexity_bin'` (one bin per training batch) 'batch'
      normalizes each bin's state by itself in training but by the moving averages at
      inference; 'state' does the same in both (docs/benchmarks_grouped.md). Not the paper's.
      'batch_per_step' (default): the paper's batch norm in training (the same training,
      bit for bit), with moving averages kept per step of the trajectory, so that at
      inference each Euler step is normalized by the averages of its own step's batch
      statistics rather than by one set pooled over all steps (2 C non-trainable values per
      step: the full puppet's G grows from 269,824 to 301,568 values, 1.08 to 1.21 MB). The
      paper does not say how G's batch norm runs at inference; on the ablation protocol
      the same training scored 6.3 points of top-1 more this way on three seeds of the
      8-16-32 puppet and 1.7 at 16-32-64 (docs/generator_norm.md).
      A config saved without this field (before it existed) reads as 'batch'.
    generator_backward: how training differentiates the puppeteer's trajectory
      (`PuppeteerODE(backward=...)`). 'autodiff': the backend's automatic differentiation,
      with `generator_remat` and `generator_loop` as set. 'reversible': one custom gradient
      for the whole trajectory (`modeling/reversible_trajectory.py`) that keeps G's
      pre-normalization output per evaluation of G (one per Euler step, two per midpoint
      step, four per RK4 step) and, in the backward pass, undoes the steps one by one
      (Euler: P = P' - dl * G) instead of keeping the states or recomputing G: the memory of
      `generator_remat` without its extra forward pass of G. Works with every integrator;
      needs a batch-normalized G ('batch' or 'batch_per_step'), and excludes
      `generator_remat` and `generator_loop`. 'auto' (default): 'reversible' where it
      applies, else 'autodiff' (decided when training calls the puppeteer). Same values;
      gradients equal to float rounding. Measured (docs/benchmarks_reversible.md): the full
      puppet's bucketed training step at 0.95x autodiff's time and 0.47x its memory on mixed
      batches, on one-bin batches the memory of remat and loop at autodiff's speed; the
      16-32-64 puppet's XLA-compiled per-sample step at 0.57x autodiff's time; with the
      midpoint and RK4 integrators at batch 64, 5.4 GB instead of 15.2 GB and 8.2 GB where
      autodiff passed 16 GB (docs/benchmarks_reversible_rk.md). Not in the paper (a way to
      compute its gradients, not a change to them).
    generator_matmul_dtype: the dtype of G's pointwise matrix products, 9 C^3 of the
      9 C^3 + 81 C^2 multiply-adds of an Euler step (`PuppeteerODE(matmul_dtype=...)`,
      `backend_ops.matmul_in_dtype`). 'float32' (default, the paper's). 'bfloat16' /
      'float16': both operands and the product are rounded to 16 bits (the backend
      accumulates in float32), in training and inference, forward and backward; the state,
      G's depthwise convolution and batch norm, the Euler update and the puppet's own
      convolutions stay float32. Several times faster on CPUs with AMX or AVX512-BF16 and on
      GPU tensor cores; slower where the CPU lacks 16-bit arithmetic. A model option: the
      kernels it generates differ from float32's by the rounding (exact modes still agree
      with each other). Speed and accuracy: docs/benchmarks_bf16.md. Not in the paper.
  """
  num_classes: int = 10
  input_shape: Tuple[Optional[int], Optional[int], int] = (32, 32, 3)
  puppet: str = "vgg"
  stage_channels: Optional[Tuple[int, ...]] = None
  block_type: Optional[str] = None
  pool_after: Optional[Tuple[bool, ...]] = None
  min_depth: int = 1
  max_depth: int = 8
  kernel_size: int = 3
  state_channels: Optional[int] = None
  init: str = "learned"
  init_rank: int = 16
  init_scale: float = 0.5
  integrator: str = "euler"
  kernel_scaling: str = "fan_in"
  depth_adaptation: bool = True
  fixed_depth: Optional[int] = None
  parameter_adaptation: bool = True
  reference_complexity: float = 6.0
  pixel_mean: Tuple[float, ...] = CIFAR10_MEAN
  pixel_std: Tuple[float, ...] = CIFAR10_STD
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  head_dropout: float = 0.0
  complexity: ComplexityConfig = dataclasses.field(default_factory=ComplexityConfig)
  complexity_bins: int = 0
  complexity_bin_floor: float = 0.0
  execution: str = "per_sample"
  bucketed_inference: str = "loop"
  gathered_kernels: str = "per_layer"
  depth_scale: float = 1.0
  train_widths: Tuple[float, ...] = ()
  generator_remat: bool = False
  generator_rank: int = 0
  generator_loop: bool = False
  fused_batch_norm: bool = True
  per_sample_conv: str = "grouped"
  generator_depthwise: str = "auto"
  narrow_kernels: bool = True
  generator_norm: str = "batch_per_step"
  generator_backward: str = "auto"
  generator_matmul_dtype: str = "float32"

  def __post_init__(self):
    if isinstance(self.complexity, dict):
      self.complexity = ComplexityConfig(**self.complexity)
    _check(self.puppet in PUPPET_PRESETS,
           f"puppet must be one of {tuple(PUPPET_PRESETS)}, got {self.puppet!r}")
    if self.stage_channels is not None:
      self.stage_channels = tuple(int(c) for c in self.stage_channels)
    if self.pool_after is not None:
      self.pool_after = tuple(bool(p) for p in self.pool_after)
    self.input_shape = tuple(None if d is None else int(d) for d in self.input_shape)
    self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
    self.pixel_std = tuple(float(v) for v in self.pixel_std)
    _check(int(self.num_classes) >= 2, f"num_classes must be >= 2, got {self.num_classes}")
    _check(len(self.input_shape) == 3,
           f"input_shape must be (height, width, channels), got {self.input_shape}")
    _check(self.input_shape[-1] is not None and self.input_shape[-1] >= 1,
           f"input_shape must give the channel count, got {self.input_shape}")
    channels = self.channels
    _check(len(channels) >= 1 and all(c >= 1 for c in channels),
           f"stage_channels must be a non-empty list of positive ints, got {channels}")
    _check(len(self.pools) == len(channels),
           f"pool_after has {len(self.pools)} entries but there are {len(channels)} stages")
    _check(self.block in BLOCK_TYPES,
           f"block_type must be one of {BLOCK_TYPES}, got {self.block!r}")
    _check(1 <= self.min_depth <= self.max_depth,
           f"need 1 <= min_depth <= max_depth, got min_depth={self.min_depth}, "
           f"max_depth={self.max_depth}")
    _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
           f"kernel_size must be a positive odd int, got {self.kernel_size}")
    _check(self.state_width >= 1, f"state_channels must be >= 1, got {self.state_channels}")
    _check(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
    _check(self.init_rank >= 0, f"init_rank must be >= 0, got {self.init_rank}")
    _check(self.init_scale > 0, f"init_scale must be > 0, got {self.init_scale}")
    _check(self.integrator in INTEGRATORS,
           f"integrator must be one of {INTEGRATORS}, got {self.integrator!r}")
    _check(self.kernel_scaling in KERNEL_SCALINGS,
           f"kernel_scaling must be one of {KERNEL_SCALINGS}, got {self.kernel_scaling!r}")
    _check(1 <= self.depth_when_fixed <= self.max_depth,
           f"fixed_depth must be in [1, max_depth={self.max_depth}], got {self.fixed_depth}")
    _check(self.reference_complexity > 0,
           f"reference_complexity must be > 0, got {self.reference_complexity}")
    in_ch = self.input_shape[-1]
    _check(len(self.pixel_mean) == in_ch and len(self.pixel_std) == in_ch,
           f"pixel_mean/pixel_std need {in_ch} values (one per input channel), got "
           f"{len(self.pixel_mean)} and {len(self.pixel_std)}")
    _check(all(s > 0 for s in self.pixel_std), f"pixel_std must be > 0, got {self.pixel_std}")
    _check(0.0 <= self.head_dropout < 1.0,
           f"head_dropout must be in [0, 1), got {self.head_dropout}")
    try:
      bins = operator.index(self.complexity_bins)
    except TypeError:
      bins = -1
    _check(bins >= 0 and not isinstance(self.complexity_bins, bool),
           f"complexity_bins must be an int >= 0 (0: exact H), got {self.complexity_bins!r}")
    self.complexity_bins = int(bins)
    _check(isinstance(self.complexity_bin_floor, numbers.Real)
           and not isinstance(self.complexity_bin_floor, bool)
           and 0.0 <= self.complexity_bin_floor < self.complexity.max_complexity,
           f"complexity_bin_floor must be a number in [0, complexity.max_complexity = "
           f"{self.complexity.max_complexity:g}), got {self.complexity_bin_floor!r}")
    self.complexity_bin_floor = float(self.complexity_bin_floor)
    _check(self.execution in EXECUTIONS,
           f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
    _check(self.gathered_kernels in GATHERED_KERNELS,
           f"gathered_kernels must be one of {GATHERED_KERNELS}, got {self.gathered_kernels!r}")
    _check(self.bucketed_inference in BUCKETED_INFERENCES,
           f"bucketed_inference must be one of {BUCKETED_INFERENCES}, got "
           f"{self.bucketed_inference!r}")
    _check(isinstance(self.generator_remat, bool),
           f"generator_remat must be True or False, got {self.generator_remat!r}")
    _check(isinstance(self.generator_loop, bool),
           f"generator_loop must be True or False, got {self.generator_loop!r}")
    _check(self.generator_depthwise in DEPTHWISE_METHODS,
           f"generator_depthwise must be one of {DEPTHWISE_METHODS}, got "
           f"{self.generator_depthwise!r}")
    _check(self.generator_norm in GENERATOR_NORMS,
           f"generator_norm must be one of {GENERATOR_NORMS}, got {self.generator_norm!r}")
    _check(self.generator_backward in GENERATOR_BACKWARDS,
           f"generator_backward must be one of {GENERATOR_BACKWARDS}, got "
           f"{self.generator_backward!r}")
    if self.generator_backward == "reversible":
      _check(not self.generator_remat and not self.generator_loop,
             "generator_backward='reversible' replaces generator_remat and generator_loop (it "
             "keeps one tensor per step of G without recomputing G); leave them off")
      why = why_not_reversible(self.integrator, self.generator_norm)
      _check(why is None, f"generator_backward='reversible' needs {why}")
    _check(self.generator_matmul_dtype in COMPUTE_DTYPES,
           f"generator_matmul_dtype must be one of {COMPUTE_DTYPES}, got "
           f"{self.generator_matmul_dtype!r}")
    _check(self.per_sample_conv in PER_SAMPLE_CONVS,
           f"per_sample_conv must be one of {PER_SAMPLE_CONVS}, got {self.per_sample_conv!r}")
    _check(isinstance(self.fused_batch_norm, bool),
           f"fused_batch_norm must be True or False, got {self.fused_batch_norm!r}")
    _check(isinstance(self.narrow_kernels, bool),
           f"narrow_kernels must be True or False, got {self.narrow_kernels!r}")
    _check(isinstance(self.generator_rank, int) and not isinstance(self.generator_rank, bool)
           and 0 <= self.generator_rank < self.state_width,
           f"generator_rank must be an int in [0, {self.state_width}) (0: the paper's full "
           f"C x C pointwise matrix; the state width is {self.state_width}), got "
           f"{self.generator_rank!r}")
    _check(isinstance(self.depth_scale, (int, float)) and not isinstance(self.depth_scale, bool)
           and math.isfinite(self.depth_scale) and self.depth_scale > 0,
           f"depth_scale must be a finite number > 0, got {self.depth_scale!r}")
    self.depth_scale = float(self.depth_scale)
    _check(self.depth_scale * self.max_depth <= MAX_SCALED_DEPTH,
           f"depth_scale={self.depth_scale} gives up to {self.depth_scale * self.max_depth:g} "
           f"layers per stage; at most {MAX_SCALED_DEPTH} are supported")
    self.train_widths = tuple(float(w) for w in self.train_widths)
    _check(all(math.isfinite(w) and w > 0 for w in self.train_widths),
           f"train_widths must be positive width multipliers, got {self.train_widths}")
    _check(not self.train_widths or 1.0 in self.train_widths,
           f"train_widths must include 1.0 (batch-norm moving statistics are learned at full "
           f"width), got {self.train_widths}")
    _check(len(set(self.train_widths)) == len(self.train_widths),
           f"train_widths has repeated values: {self.train_widths}")
    if self.execution == "gathered":
      _check(self.complexity_bins >= 1,
             f"execution='gathered' needs complexity_bins >= 1 (kernels are generated once per "
             f"complexity bin), got complexity_bins={self.complexity_bins}; set e.g. "
             "complexity_bins=16, or use execution='per_sample'")
    if self.execution == "bucketed":
      _check(1 <= self.complexity_bins <= MAX_BUCKETED_BINS,
             f"execution='bucketed' needs 1 <= complexity_bins <= {MAX_BUCKETED_BINS} (samples "
             f"are grouped by complexity bin), got complexity_bins={self.complexity_bins}; "
             "set e.g. complexity_bins=16, or use execution='per_sample'")

  # Resolved values: the preset's where a field is None.
  @property
  def channels(self) -> Tuple[int, ...]:
    return tuple(self.stage_channels or PUPPET_PRESETS[self.puppet]["stage_channels"])

  @property
  def block(self) -> str:
    return self.block_type or PUPPET_PRESETS[self.puppet]["block_type"]

  @property
  def pools(self) -> Tuple[bool, ...]:
    if self.pool_after is not None:
      return tuple(self.pool_after)
    n = len(self.channels)
    preset = tuple(PUPPET_PRESETS[self.puppet]["pool_after"])
    return preset if len(preset) == n else tuple([True] * (n - 1) + [False])

  @property
  def state_width(self) -> int:
    return int(self.state_channels or max(self.channels))

  @property
  def depth_when_fixed(self) -> int:
    return int(self.fixed_depth or self.max_depth)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "PuppetCNNConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f"unknown PuppetCNNConfig fields: {sorted(unknown)}")
    return cls(**values)

  @classmethod
  def from_saved_dict(cls, values: dict) -> "PuppetCNNConfig":
    """`from_dict` for a config a model or run saved (`to_dict`: every field): a field it
    lacks was added after it was saved, and takes the value that reproduces that model
    (`SAVED_BEFORE_FIELD`), not today's default."""
    values = dict(values)
    for name, value in SAVED_BEFORE_FIELD.items():
      values.setdefault(name, value)
    return cls.from_dict(values)

  def replace(self, **changes: Any) -> "PuppetCNNConfig":
    return dataclasses.replace(self, **changes)
