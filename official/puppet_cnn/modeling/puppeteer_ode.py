"""PuppeteerODE: the neural ODE that generates every conv kernel of the puppet.

Paper (arXiv 2411.12876) section 3.3-3.4. The state P has shape (C_out_max, C_in_max, K*K)
and evolves by `dP/dl = G(P)`, integrated with per-sample steps of size dl (eq. 7, 12):

    P_l = P_{l - dl} + dl * G(P_{l - dl}),   P_0 = exp(1 - H^-2)  (+ a learned base, optional)

G is one depthwise-separable conv + batch norm + tanh. We lay the state out as an image with
C_out_max channels and a (C_in_max, K*K) spatial plane, so G is a 3x3 depthwise conv (with
bias) + a C x C pointwise conv (with bias) + BN. Its parameter count, C^2 + 15 C (BN moving
statistics included), reproduces the paper's Table 5 "Param Size" at every width
(C = 512: 269,824 params = 1.08 MB in float32) with one set of moving statistics
(`normalization='batch'`); the default keeps one set per Euler step ('batch_per_step': the
same training, and at inference each step normalized by its own step's averages). `generator_rank` r > 0 factorizes the
pointwise matrix as (C x r)(r x C) (not the paper: a speed option).

Every Euler step emits one kernel: the state average-pooled to the layer's (C_out, C_in) and
laid out as Keras's (K, K, C_in, C_out). One trajectory runs through all stages
("integration horizon" reading of the paper): each stage emits one transition kernel (the
width change, every sample runs it) and `(max_depth - 1) * kernels_per_unit` repeated kernels,
of which a sample of depth d uses the first `(d - 1) * kernels_per_unit`. A sample's state
stops moving once it has passed its depth, so the kernels it uses do not depend on the bound.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, List, Sequence, Tuple

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import EVALS_PER_STEP
from official.puppet_cnn.config_definitions import DEPTHWISE_METHODS, INITS, INTEGRATORS
from official.puppet_cnn.config_definitions import GENERATOR_BACKWARDS
from official.puppet_cnn.config_definitions import COMPUTE_DTYPES
from official.puppet_cnn.config_definitions import GENERATOR_NORMS, KERNEL_SCALINGS
from official.puppet_cnn.config_definitions import SAVED_BEFORE_FIELD, why_not_reversible
from official.puppet_cnn.modeling import adaptive_pool
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import complexity as complexity_lib
from official.puppet_cnn.modeling import masked_batch_norm as mbn
from official.puppet_cnn.modeling import reversible_trajectory


@keras.saving.register_keras_serializable(package="puppet_cnn")
class PuppeteerODE(keras.layers.Layer):
  """Generates per-sample conv kernels for every layer of a puppet.

  Args:
    stage_channels: output channels of each puppet stage.
    input_channels: channels of the puppet's input (3 for RGB).
    max_depth: bound on the units per stage (unit 0 is the stage's transition layer).
    kernels_per_unit: generated kernels per repeated unit (1 plain, 2 residual).
    kernel_size: K of the generated kernels.
    state_channels: C_max of the square state; None: max(stage_channels). A smaller state
      is resized up to wider layers (adaptive pooling with windows of 1-2 entries), which is
      what a puppet generated at a width multiplier above 1 does.
    init: 'paper': the constant fill exp(1 - H^-2) (eq. 11); 'learned' (default): a learned
      base state scaled by that fill, base * exp(1 - H^-2); 'learned_additive': base + fill.
    init_rank: rank of the learned base (CP factors); 0: a full learned tensor.
    init_scale: standard deviation of the learned base at initialization. 0.5 makes the
      generated kernels roughly He-scaled (std ~ sqrt(2 / fan_in) with the fill near e and
      `kernel_scaling='fan_in'`), so activations neither explode nor vanish before training.
    integrator: 'euler' (paper), 'midpoint' or 'rk4'. May be changed after training.
    kernel_scaling: 'fan_in' divides kernels by sqrt(K*K*C_in); 'none' keeps them as pooled.
    generator_kernel_size: spatial size of G's depthwise conv (3, decoded from Table 5).
    generator_rank: 0 (the paper): G's pointwise conv is a full C x C matrix. r > 0: it is
      factorized as (C x r)(r x C), which costs 2 r / C of the full matrix's multiply-adds
      per step and 2 r C parameters instead of C^2 (C = 512, r = 64: a quarter). Not in the
      paper: a speed option, see docs/generator_profile.md.
    momentum, epsilon: G's batch norm settings.
    normalization: how G's batch norm normalizes (`GENERATOR_NORMS`). 'batch' (the paper's
      batch norm, one set of moving statistics as its Table 5 counts): in training over every state in the call (weighted by
      `state_weight`), at inference with the moving statistics. 'state': each state by its
      own statistics over its (C_in, K*K) positions, per channel, in training and at
      inference alike (an instance norm; the moving statistics are neither used nor
      updated). A state's kernels then do not depend on the other states in the batch, so
      training on batches of one complexity bin (`DataConfig.batch_grouping`) generates
      the kernels that inference generates. Not the paper's.
      'batch_per_step' (default): the paper's batch norm in training, as 'batch'; the moving
      statistics are kept per step of the trajectory (`statistics_rows` rows: each stage's
      transition step and each of its repeated steps), and at inference each step is
      normalized by its own step's, not by one set shared by every step. The evaluations of
      a multi-stage integrator share their step's row; steps past the bound (`units` above
      max_depth - 1) use their stage's last row. The paper does not say how G's batch norm
      runs at inference; 2 C moving values per row instead of 2 C in all.
    depthwise: how G's depthwise conv is computed (`backend_ops.depthwise_conv_same`):
      'auto' (default; shifted copies under XLA, the backend's conv otherwise), 'conv' or
      'shifted'. Same values.
    remat: recompute G's activations in the backward pass (`keras.remat`) instead of keeping
      them: less training memory for one more forward pass of G.
    loop_steps: False (default): the steps are unrolled (one set of graph nodes per step,
      and `depth_sorted` runs each step on the states still below their depth). True: each
      stage's repeated steps run in one loop (`backend_ops.recorded_loop`) whose body is
      traced once; each step runs G on the states still below their depth (the last rows
      with `depth_sorted`, else every state, masked) and is skipped once none is. Same
      values; a graph about a third the size in training. Only where a TensorFlow graph
      is traced (`backend_ops.builds_tf_graph`: `tf.function`,
      Keras's compiled functions, SavedModels): eagerly, and on other backends, the steps
      run unrolled, as without the option (there is no graph to shrink; and TensorFlow's
      eager `recompute_grad` of the looped step with `remat` gave wrong gradients). The
      transition steps and `iter_kernels` stay unrolled.
    backward: how training differentiates the trajectory (`GENERATOR_BACKWARDS`).
      'autodiff': the backend's automatic differentiation of every step (with `remat` and
      `loop_steps` as set). 'reversible': the whole trajectory is one custom-gradient
      function (`reversible_trajectory.trajectory`) that keeps one state-sized tensor per
      evaluation of G, its output before its batch norm (one per Euler step, two per
      midpoint step, four per RK4 step), and in the backward pass undoes the steps one by
      one (Euler: P = P' - dl * G, G rebuilt from that tensor) instead of recomputing G:
      the memory of `remat` without its extra forward pass of G. The kernels are pooled
      from the states inside that function, so its backward pass receives kernel-sized
      gradients. Needs a batch-normalized G, and excludes `remat` and `loop_steps`; any
      integrator. 'auto' (default): 'reversible' where it applies, else
      'autodiff', decided at each training call (`training_backward`). Same values;
      gradients equal to float rounding. Inference is unaffected.
    matmul_dtype: the dtype of G's pointwise matrix products (`COMPUTE_DTYPES`,
      `backend_ops.matmul_in_dtype`), in training and inference, forward and backward.
      'float32' (default, the paper's). 'bfloat16' / 'float16': both operands are rounded
      to 16 bits and the product is rounded to 16 bits; the state, G's depthwise
      convolution, batch norm, tanh and the Euler update stay float32. The products are
      9 C^3 of G's 9 C^3 + 81 C^2 multiply-adds per step, and 16-bit products run several
      times faster on CPUs with AMX / AVX512-BF16 and on GPU tensor cores (measured:
      docs/benchmarks_bf16.md). Not in the paper.

  Call args:
    complexity: (N,) input complexity H (drives the initial state).
    step: (N,) step size dl.
    depth: (N,) int depth per stage.
    training: whether G's batch norm uses batch statistics.
    state_weight: optional (N,) number of samples each state stands for (bucketed execution:
      one state per complexity bin, weighted by the bin's sample count); G's batch-norm
      statistics in training then equal those of one state per sample. None: 1 each.
    depth_sorted: the states come sorted by depth (non-decreasing); a repeated step then runs
      G only on the states still below their depth, and not at all once every state has
      reached its depth (a dynamic slice under `ops.cond`: not for XLA or `jax.jit`) instead
      of masking the finished ones. Same values, less work.
    stack_repeated: False returns each stage's repeated kernels as a list of
      (N, K, K, C_s, C_s) tensors instead of one stacked tensor (no stacking copy).
    active_rows_only: with `depth_sorted` and `stack_repeated=False`: repeated kernel j
      (unit u = j // kernels_per_unit + 1) has rows only for the states with depth > u, the
      last rows of the batch (a state past its depth does not use the kernel, so it is
      neither pooled from the state nor kept for the backward pass).
    units: repeated units per stage to generate (None: max_depth - 1); a model evaluated
      with scaled steps (`scaling.scaled_max_depth`) generates more or fewer.
    channels: stage widths to pool the kernels to (None: `stage_channels`); a narrower or
      wider puppet from the same state (`PuppetClassifier.at_width`, width-sampled training).
    step_rows: with `normalization='batch_per_step'`, the trained repeated step whose moving
      statistics each repeated step uses (`statistics_row`; a model at another depth scale).
    expand_kernels: True (default): full kernels. False (with `stack_repeated=False`): a
      kernel whose channels repeat the state's by an integer factor (`kernel_factors`: a
      state narrower than the layer) comes narrow, without the repeats
      (`kernel_from_state(expand=False)`); bucketed training convolves with it directly.

  Returns:
    A list with one `(transition, repeated)` pair per stage: transition (N, K, K, C_in, C_s),
    repeated (N, units * kernels_per_unit, K, K, C_s, C_s) (units: max_depth - 1 by
    default); with `stack_repeated=False` a list of units * kernels_per_unit (N, K, K, C_s,
    C_s) tensors, each with only the rows of the states that use it under `active_rows_only`.
  """

  def __init__(self, stage_channels: Sequence[int], input_channels: int = 3,
               max_depth: int = 8, kernels_per_unit: int = 1, kernel_size: int = 3,
               state_channels: int | None = None, init: str = "learned", init_rank: int = 16,
               init_scale: float = 0.5,
               integrator: str = "euler", kernel_scaling: str = "fan_in",
               generator_kernel_size: int = 3, generator_rank: int = 0,
               momentum: float = 0.99, epsilon: float = 1e-3, remat: bool = False,
               loop_steps: bool = False, depthwise: str = "auto",
               normalization: str = "batch_per_step", backward: str = "auto",
               matmul_dtype: str = "float32", **kwargs):
    super().__init__(**kwargs)
    self.stage_channels = tuple(int(c) for c in stage_channels)
    self.input_channels = int(input_channels)
    self.max_depth = int(max_depth)
    self.kernels_per_unit = int(kernels_per_unit)
    self.kernel_size = int(kernel_size)
    self.state_channels = int(state_channels or max(self.stage_channels))
    self.init = init
    self.init_rank = int(init_rank)
    self.init_scale = float(init_scale)
    self.integrator = integrator
    self.kernel_scaling = kernel_scaling
    self.generator_kernel_size = int(generator_kernel_size)
    self.generator_rank = int(generator_rank)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.remat = bool(remat)
    self.loop_steps = bool(loop_steps)
    if depthwise not in DEPTHWISE_METHODS:
      raise ValueError(f"depthwise must be one of {DEPTHWISE_METHODS}, got {depthwise!r}")
    self.depthwise = depthwise
    if normalization not in GENERATOR_NORMS:
      raise ValueError(f"normalization must be one of {GENERATOR_NORMS}, got "
                       f"{normalization!r}")
    self.normalization = normalization
    if backward not in GENERATOR_BACKWARDS:
      raise ValueError(f"backward must be one of {GENERATOR_BACKWARDS}, got {backward!r}")
    if backward == "reversible":
      if self.remat or self.loop_steps:
        raise ValueError("PuppeteerODE: backward='reversible' replaces remat and loop_steps "
                         "(it keeps one tensor per step without recomputing G); leave them off")
      why = why_not_reversible(integrator, normalization)
      if why:
        raise ValueError(f"PuppeteerODE: backward='reversible' needs {why}")
    self.backward = backward
    if matmul_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"matmul_dtype must be one of {COMPUTE_DTYPES}, got "
                       f"{matmul_dtype!r}")
    self.matmul_dtype = matmul_dtype
    self._calibration_counts = None  # per-row update counts while calibrating (eager)
    if init not in INITS:
      raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if integrator not in INTEGRATORS:
      raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
    if kernel_scaling not in KERNEL_SCALINGS:
      raise ValueError(f"kernel_scaling must be one of {KERNEL_SCALINGS}, got {kernel_scaling!r}")
    if self.state_channels < 1:
      raise ValueError(f"state_channels must be >= 1, got {self.state_channels}")
    if not 0 <= self.generator_rank < self.state_channels:
      raise ValueError(f"generator_rank must be in [0, state_channels={self.state_channels}) "
                       f"(0: a full C x C pointwise matrix), got {self.generator_rank}")
    if self.max_depth < 1 or self.kernels_per_unit < 1:
      raise ValueError("max_depth and kernels_per_unit must be >= 1")

  # ----------------------------------------------------------------------------- weights
  @property
  def state_shape(self) -> Tuple[int, int, int]:
    """(C_in_max, K*K, C_out_max): the state as an image with C_out_max channels."""
    return (self.state_channels, self.kernel_size ** 2, self.state_channels)

  @property
  def repeated_kernels_per_stage(self) -> int:
    return (self.max_depth - 1) * self.kernels_per_unit

  @property
  def statistics_rows(self) -> int:
    """Rows of G's moving statistics with `normalization='batch_per_step'`: one per step of
    the trajectory at the depth bound (per stage, the transition and the repeated steps)."""
    return len(self.stage_channels) * (1 + self.repeated_kernels_per_stage)

  def statistics_row(self, stage: int, j=None, step_rows: Sequence[int] | None = None):
    """The moving-statistics row of stage `stage`'s transition step (j None) or its repeated
    step j (an int or an int scalar tensor).

    step_rows: the trained repeated step whose row each repeated step j uses (a model at
    another `depth_scale`: `scaling.bn_rows`, the puppet's batch-norm rows); None: step j's
    own, and steps past the bound the stage's last.
    """
    last = self.repeated_kernels_per_stage - 1
    first = stage * (last + 2)
    if j is None or last < 0:
      return first
    if isinstance(j, int):
      trained = j if step_rows is None else int(step_rows[j])
      return first + 1 + min(max(trained, 0), last)
    j = ops.cast(j, "int32")
    if step_rows is not None:
      j = ops.take(ops.convert_to_tensor(tuple(step_rows), "int32"), j)
    return first + 1 + ops.clip(j, 0, last)

  def build(self, input_shape=None):
    c, g = self.state_channels, self.generator_kernel_size
    self.dw_kernel = self.add_weight(name="depthwise_kernel", shape=(g, g, c, 1),
                                     initializer="glorot_uniform")
    self.dw_bias = self.add_weight(name="depthwise_bias", shape=(c,), initializer="zeros")
    r = self.generator_rank
    if r:
      # (C x r)(r x C); G's batch norm follows, so the product's scale does not matter.
      self.pw_factors = [
          self.add_weight(name="pointwise_down", shape=(c, r), initializer="glorot_uniform"),
          self.add_weight(name="pointwise_up", shape=(r, c), initializer="glorot_uniform")]
    else:
      self.pw_factors = [self.add_weight(name="pointwise_kernel", shape=(c, c),
                                         initializer="glorot_uniform")]
    self.pw_bias = self.add_weight(name="pointwise_bias", shape=(c,), initializer="zeros")
    self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
    self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
    stats_shape = (self.statistics_rows, c) if self.normalization == "batch_per_step" else (c,)
    self.moving_mean = self.add_weight(name="moving_mean", shape=stats_shape,
                                       initializer="zeros", trainable=False, aggregation="mean")
    self.moving_variance = self.add_weight(name="moving_variance", shape=stats_shape,
                                           initializer="ones", trainable=False, aggregation="mean")
    self.init_factors = []
    if self.init != "paper":
      c_in, kk, c_out = self.state_shape
      if self.init_rank == 0:
        self.init_factors = [self.add_weight(
            name="init_base", shape=self.state_shape,
            initializer=keras.initializers.RandomNormal(stddev=self.init_scale))]
      else:
        # Each CP term is a product of three N(0, s^2) factors: variance s^6 per term, so
        # s = (init_scale^2 / rank)^(1/6) gives the base the standard deviation init_scale.
        init = keras.initializers.RandomNormal(
            stddev=(self.init_scale ** 2 / self.init_rank) ** (1.0 / 6.0))
        self.init_factors = [
            self.add_weight(name="init_in", shape=(self.init_rank, c_in), initializer=init),
            self.add_weight(name="init_k", shape=(self.init_rank, kk), initializer=init),
            self.add_weight(name="init_out", shape=(self.init_rank, c_out), initializer=init)]

  def generator_weights(self) -> List:
    """The weights of G (what the paper's "Param Size" counts)."""
    return [self.dw_kernel, self.dw_bias, *self.pw_factors, self.pw_bias, self.gamma,
            self.beta, self.moving_mean, self.moving_variance]

  # ----------------------------------------------------------------------------- math
  def initial_state(self, complexity):
    """P0 (N, C_in_max, K*K, C_out_max) from the fill exp(1 - H^-2) and `init`.

    'paper' fills the state with the constant; 'learned' multiplies a learned base by it;
    'learned_additive' adds the two. With the constant alone (or dominating, as in the
    additive form once kernels are pooled), every kernel entry is nearly equal and a layer's
    output channels are copies of one box filter; see README ("Initial state").
    """
    fill = ops.reshape(complexity_lib.initial_fill(complexity), (-1, 1, 1, 1))
    if self.init == "paper":
      return ops.ones((1,) + self.state_shape, "float32") * fill
    if self.init_rank == 0:
      base = self.init_factors[0]
    else:
      a, k, o = self.init_factors
      base = ops.einsum("ri,rk,ro->iko", a, k, o)
    if self.init == "learned":
      return base[None] * fill
    return base[None] + fill

  def derivative(self, state, active, training: bool, stats: list, weight=None,
                 remat: bool | None = None, params=None, row=None):
    """G(P) = tanh(BN(pointwise(depthwise(P)))); appends batch stats to `stats` in training.

    `active` (N,) 0/1 selects the states in the batch statistics (None: all); `weight` (N,)
    optionally counts each state that many times. `remat`: None follows the layer's setting.
    `params`: G's trainable weights as tensors, in `_params()` order (None: the variables).
    With `normalization='state'` the statistics are each state's own, in training and at
    inference, and the batch statistics appended are zeros marked unseen.
    `row`: with `normalization='batch_per_step'`, the step's row of the moving statistics
    (`statistics_row`), read at inference.
    """
    if self.normalization == "state":
      remat = (self.remat if remat is None else remat) and training
      g = keras.remat(self._state_derivative) if remat else self._state_derivative
      out = g(state, *params) if params is not None else g(state)
      if training:
        zeros = ops.zeros((self.state_channels,), "float32")
        stats.append((zeros, zeros, False))
      return out
    if training:
      mask = active if weight is None else (weight if active is None else active * weight)
      # With `remat`, only G's input is kept for the backward pass: its convolution, batch
      # norm and tanh activations (four state-sized tensors per evaluation) are recomputed.
      remat = self.remat if remat is None else remat
      g = keras.remat(self._train_derivative) if remat else self._train_derivative
      if params is not None:
        out, mean, variance = g(state, mask, *params)
      else:
        out, mean, variance = g(state, mask) if mask is not None else g(state)
      seen = ops.shape(state)[0] > 0 if mask is None else ops.sum(mask) > 0
      stats.append((mean, variance, seen))
      return out
    y, bias = self._linear(state, params)
    _, _, _, _, gamma, beta = self._unpack(params)
    mean, variance = self._moving_statistics(row)
    return ops.tanh(mbn.normalize(y, mean - bias, variance, gamma, beta, self.epsilon))

  def _moving_statistics(self, row=None):
    """The moving mean and variance (C,) that normalize G at inference: the one set, or with
    `normalization='batch_per_step'` the step's `row`."""
    if self.normalization != "batch_per_step":
      return self.moving_mean, self.moving_variance
    if row is None:
      raise ValueError("PuppeteerODE: normalization='batch_per_step' needs the step's row "
                       "of the moving statistics at inference")
    row = ops.convert_to_tensor(row, "int32")
    return (ops.take(ops.convert_to_tensor(self.moving_mean), row, axis=0),
            ops.take(ops.convert_to_tensor(self.moving_variance), row, axis=0))

  def _params(self) -> list:
    """G's trainable weights, flat: depthwise kernel and bias, pointwise factor(s) and bias,
    batch-norm gamma and beta."""
    return [self.dw_kernel, self.dw_bias, *self.pw_factors, self.pw_bias, self.gamma,
            self.beta]

  def _unpack(self, params):
    """(dw_kernel, dw_bias, pw_factors, pw_bias, gamma, beta) from `_params()`'s order."""
    params = self._params() if params is None else list(params)
    return params[0], params[1], params[2:-3], params[-3], params[-2], params[-1]

  def _linear(self, state, params=None):
    """G's two convolutions without their biases, and the biases' combined effect (C,).

    pointwise(depthwise(P) + b_dw) + b_pw = pointwise(depthwise(P)) + (pointwise(b_dw) +
    b_pw): the two per-channel constants are folded into one vector, which the batch norm
    then absorbs into its shift, so no state-sized tensor is spent on a bias. In training
    they cancel in the normalization (the batch mean includes them) and only shift the
    recorded mean; in inference they are subtracted from the moving mean.
    """
    dw_kernel, dw_bias, pw_factors, pw_bias, _, _ = self._unpack(params)
    y = backend_ops.depthwise_conv_same(state, dw_kernel, self.depthwise)
    bias = dw_bias[None]
    for factor in pw_factors:
      y = backend_ops.matmul_in_dtype(y, factor, self.matmul_dtype)
      bias = ops.matmul(bias, factor)
    return y, bias[0] + pw_bias

  def _train_derivative(self, state, mask=None, *params):
    """G in training: (G(P), batch mean, batch variance) over the states `mask` selects.

    `params`: G's trainable weights as tensors (`_params()` order); none: the variables."""
    params = params or None
    y, bias = self._linear(state, params)
    _, _, _, _, gamma, beta = self._unpack(params)
    mean, variance = mbn.masked_moments(y, mask)
    mean = mean + bias  # the batch mean of G's pre-normalization output, biases included
    # (mean - bias) is the mean of `y`; subtracting the bias back (a (C,) vector) keeps the
    # biases' gradient an exact 0 instead of None (Keras warns about missing gradients).
    out = ops.tanh(mbn.normalize(y, mean - bias, variance, gamma, beta, self.epsilon))
    return out, mean, variance

  def _state_derivative(self, state, *params):
    """G with `normalization='state'`: each state normalized by its own per-channel
    statistics. `params`: G's trainable weights as tensors (`_params()` order); none: the
    variables."""
    params = params or None
    y, bias = self._linear(state, params)
    _, _, _, _, gamma, beta = self._unpack(params)
    mean = ops.mean(y, axis=(1, 2), keepdims=True)
    variance = ops.mean(ops.square(y - mean), axis=(1, 2), keepdims=True)
    # As in `_train_derivative`: the biases cancel in the normalization; adding and
    # subtracting them keeps their gradient an exact 0 instead of None.
    mean = (mean + bias) - bias
    return ops.tanh(mbn.normalize(y, mean, variance, gamma, beta, self.epsilon))

  def integrate_step(self, state, dl, active, training: bool, stats: list, weight=None,
                     remat: bool | None = None, params=None, row=None):
    """One step of the chosen integrator; samples with active == 0 keep their state.

    active: (N,) 0/1, or None when every state takes the step (no masking).
    row: the step's row of the moving statistics (`derivative`).
    """
    dl4 = ops.reshape(dl, (-1, 1, 1, 1))
    g = lambda p: self.derivative(p, active, training, stats, weight, remat, params, row)  # pylint: disable=unnecessary-lambda-assignment
    if self.integrator == "euler":
      new = state + dl4 * g(state)
    elif self.integrator == "midpoint":
      new = state + dl4 * g(state + 0.5 * dl4 * g(state))
    else:  # rk4
      k1 = g(state)
      k2 = g(state + 0.5 * dl4 * k1)
      k3 = g(state + 0.5 * dl4 * k2)
      k4 = g(state + dl4 * k3)
      new = state + dl4 / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    if active is None:
      return new
    return ops.where(ops.reshape(active, (-1, 1, 1, 1)) > 0, new, state)

  def _guarded_step(self, state, dl, active, weight, training: bool, done=None,
                    params=None, row=None):
    """One repeated step of the states still below their depth, skipped as a whole
    (`ops.cond`) when none is; returns `(new,)`, in training `(new, means, variances, seen)`
    with one row per evaluation of G (`_record_stats` takes them).

    done: None: `active` (N,) 0/1 marks the states below their depth, and G runs on every
    state, masked. An int32 scalar: the states come sorted by depth, the first `done` are
    past it, and G runs only on the last rows (a bin of depth d pays for d steps per stage,
    not for the bound; dynamic shapes: not for XLA or `jax.jit`; `active` is not read).
    Same values either way. (G on an empty batch is not an option: TensorFlow's
    depthwise-conv filter gradient of an empty batch is uninitialized memory, measured up to
    1e29.)
    params: G's weights as tensors (`_params()` order), for a step inside a loop.
    row: the step's row of the moving statistics (`derivative`).
    """
    per_step = EVALS_PER_STEP[self.integrator] if training else 0

    def advance(state):
      local: list = []
      if done is not None:
        rows = self.integrate_step(state[done:], dl[done:], None, training, local,
                                   None if weight is None else weight[done:], remat=False,
                                   params=params, row=row)
        new = ops.concatenate([state[:done], rows], axis=0)
      else:
        new = self.integrate_step(state, dl, active, training, local, weight, remat=False,
                                  params=params, row=row)
      if not per_step:
        return (new,)
      return (new, ops.stack([m for m, _, _ in local]), ops.stack([v for _, v, _ in local]),
              ops.stack([ops.cast(seen, "float32") for _, _, seen in local]))

    runs = ops.any(active > 0) if done is None else done < ops.shape(state)[0]
    return ops.cond(runs, lambda: advance(state), lambda: self._skipped_step(state, training))

  def _skipped_step(self, state, training: bool):
    """`_guarded_step`'s output for a step that does not run: the state and, in training,
    zero statistics marked unseen."""
    per_step = EVALS_PER_STEP[self.integrator] if training else 0
    if not per_step:
      return (state,)
    zeros = ops.zeros((per_step, self.state_channels), "float32")
    return state, zeros, zeros, ops.zeros((per_step,), "float32")

  @staticmethod
  def _record_stats(out, stats: list):
    """Appends a `_guarded_step` output's batch statistics to `stats`; returns its state."""
    if len(out) > 1:
      _, means, variances, seen = out
      for i in range(means.shape[0]):
        stats.append((means[i], variances[i], seen[i] > 0))
    return out[0]

  def _unrolled_steps(self, state, dl, depth, steps: int, training: bool, stats: list, weight,
                      depth_sorted: bool, stage: int, step_rows, done_at):
    """A stage's `steps` repeated steps of G, unrolled; yields each step's state.

    Step j belongs to unit j // kernels_per_unit + 1. With `depth_sorted` each step is a
    `_guarded_step` on the last rows, those after the `done_at(unit)` states at or past
    their depth (with `remat`, the whole conditional step is recomputed in the backward
    pass: TensorFlow cannot differentiate a recomputed function inside a `cond` branch);
    otherwise a masked `integrate_step`.
    """
    for j in range(steps):
      unit = j // self.kernels_per_unit + 1
      row = self.statistics_row(stage, j, step_rows)
      if depth_sorted:
        step = lambda state, done=done_at(unit), row=row: self._guarded_step(  # pylint: disable=unnecessary-lambda-assignment
            state, dl, None, weight, training, done=done, row=row)
        state = self._record_stats(
            keras.remat(step)(state) if training and self.remat else step(state), stats)
      else:
        state = self.integrate_step(state, dl, ops.cast(depth > unit, "float32"), training,
                                    stats, weight, row=row)
      yield state

  def _looped_steps(self, state, dl, depth, steps: int, training: bool, stats: list, weight,
                    depth_sorted: bool, stage: int, step_rows):
    """A stage's `steps` repeated steps of G in one loop (`loop_steps`); returns every step's
    state (a list of `steps` tensors).

    Each step is a `_guarded_step` (on the last rows with `depth_sorted`, else masked): the
    same values as `_unrolled_steps`. With `remat`, the whole step is recomputed in the
    backward pass.
    """
    kpu = self.kernels_per_unit
    # G's weights are read once, outside the loop, and passed in as tensors.
    params = [ops.convert_to_tensor(p) for p in self._params()]

    def run(state, dl, active, weight, *params, row=None):
      done = (ops.shape(state)[0] - ops.cast(ops.sum(active), "int32") if depth_sorted
              else None)
      out = self._guarded_step(state, dl, active, weight, training, done, params, row)
      # The reshape restores the rows' static count (lost by the concatenation of the last
      # rows' step to the others), which a loop carry must keep.
      return (ops.reshape(out[0], ops.shape(state)),) + tuple(out[1:])

    def step(i, carry):
      active = ops.cast(depth > i // kpu + 1, "float32")
      # Everything the step reads from outside the loop is an argument (TensorFlow cannot
      # differentiate a recomputed function that captures a tensor from outside the loop).
      inputs = (carry[0], dl, active, ops.ones_like(dl) if weight is None else weight, *params)
      if training:  # the batch statistics normalize; no moving-statistics row is read
        return keras.remat(run)(*inputs) if self.remat else run(*inputs)
      return run(*inputs, row=self.statistics_row(stage, i, step_rows))

    init = self._skipped_step(state, training)  # the carry has the step's output structure
    return [self._record_stats(out, stats)
            for out in backend_ops.recorded_loop(step, init, steps)]

  def kernel_factors(self, c_in: int, c_out: int) -> Tuple[int, int]:
    """(f_in, f_out): the integer factors by which a (c_in, c_out) kernel repeats its state's
    channels (a state narrower than the layer, e.g. 256 wide for a 512-channel layer); 1
    where the state is as wide or wider, or the factor is not an integer."""
    n_in, _, n_out = self.state_shape
    return tuple(c // n if c > n and c % n == 0 else 1
                 for c, n in ((c_in, n_in), (c_out, n_out)))

  def kernel_from_state(self, state, c_in: int, c_out: int, expand: bool = True):
    """Adaptive-average-pools the state to a (N, K, K, c_in, c_out) kernel.

    expand=False: the channel repeats of `kernel_factors` are left out, giving the narrow
    (N, K, K, c_in / f_in, c_out / f_out) kernel; convolving with it after summing each
    block of f_in input channels, then repeating each output channel f_out times, is the
    convolution with the full kernel (`DynamicConvStack.call_groups` does this).
    """
    n_in, kk, n_out = self.state_shape
    f_in, f_out = (1, 1) if expand else self.kernel_factors(c_in, c_out)
    k = self.kernel_size
    # Pooling, the transpose and the fan-in scale are linear and act on different axes, so
    # their order is free: the axes that shrink are pooled first and the axes that grow
    # (a state narrower than the layer) last, so that the transpose and the scale run on
    # the smallest tensor (a 256-wide state resized to a 512-channel layer: a quarter of
    # the kernel's size) and the backward pass keeps fewer kernel-sized tensors.
    x = state                                                # (N, C_in_max, KK, C_out_max)
    if c_out <= n_out:
      x = _pool_axis(x, axis=3, n_out=c_out, n_in=n_out)
    if c_in <= n_in:
      x = _pool_axis(x, axis=1, n_out=c_in, n_in=n_in)
    if self.kernel_scaling == "fan_in":
      x = x * (1.0 / math.sqrt(kk * c_in))
    x = ops.transpose(x, (0, 2, 1, 3))                       # (N, KK, in, out)
    if c_in > n_in and f_in == 1:
      x = _pool_axis(x, axis=2, n_out=c_in, n_in=n_in)
    if c_out > n_out and f_out == 1:
      x = _pool_axis(x, axis=3, n_out=c_out, n_in=n_out)
    return ops.reshape(x, (-1, k, k, c_in // f_in, c_out // f_out))

  def call(self, complexity, step, depth, training=None, state_weight=None,
           depth_sorted: bool = False, stack_repeated: bool = True, units: int | None = None,
           channels: Sequence[int] | None = None, active_rows_only: bool = False,
           expand_kernels: bool = True, step_rows: Sequence[int] | None = None):
    training = bool(training)
    if not expand_kernels and stack_repeated:
      raise ValueError("PuppeteerODE: expand_kernels=False needs stack_repeated=False")
    units, channels = self._resolve(units, channels)
    if active_rows_only and (stack_repeated or not depth_sorted):
      raise ValueError("PuppeteerODE: active_rows_only needs depth_sorted=True and "
                       "stack_repeated=False")
    stats: list = []
    per_stage = [[None, []] for _ in channels]
    for s, j, kernel in self._kernels(complexity, step, depth, training, stats, state_weight,
                                      depth_sorted, units, channels, active_rows_only,
                                      loop=self.loop_steps and backend_ops.builds_tf_graph(),
                                      expand=expand_kernels, step_rows=step_rows):
      if j is None:
        per_stage[s][0] = kernel
      else:
        per_stage[s][1].append(kernel)
    kernels, k = [], self.kernel_size
    for (transition, repeated), c_out in zip(per_stage, channels):
      if stack_repeated:
        repeated = (ops.stack(repeated, axis=1) if repeated else ops.zeros(
            (ops.shape(transition)[0], 0, k, k, c_out, c_out), "float32"))
      kernels.append((transition, repeated))
    if training and stats and self.normalization != "state":
      self._update_moving_statistics(stats, units, step_rows)
    return kernels

  def iter_kernels(self, complexity, step, depth, units: int | None = None,
                   channels: Sequence[int] | None = None,
                   step_rows: Sequence[int] | None = None):
    """Inference-mode kernels one at a time, in the order the trajectory produces them.

    Yields `(stage, j, kernel)`: j is None for the stage's transition kernel (N, K, K, C_in,
    C_s), else repeated kernel j (N, K, K, C_s, C_s); the same kernels as `call(...,
    training=False)`. Called eagerly, each kernel can be consumed (folded, quantized, stored)
    before the next one is computed, so that only one generated kernel exists at a time:
    what `PuppetClassifier.cache_kernels` does, instead of holding a bin's whole kernel set
    in memory while it stores it.
    """
    units, channels = self._resolve(units, channels)
    yield from self._kernels(complexity, step, depth, False, [], None, False, units, channels,
                             False, step_rows=step_rows)

  def _resolve(self, units, channels):
    units = self.max_depth - 1 if units is None else int(units)
    channels = self.stage_channels if channels is None else tuple(int(c) for c in channels)
    if units < 0 or len(channels) != len(self.stage_channels) or min(channels) < 1:
      raise ValueError(f"PuppeteerODE: need units >= 0 and {len(self.stage_channels)} positive "
                       f"stage widths, got units={units}, channels={channels}")
    return units, channels

  def _kernels(self, complexity, step, depth, training, stats, state_weight, depth_sorted,
               units, channels, active_rows_only, loop=False, expand=True, step_rows=None):
    """The trajectory: yields (stage, j or None, kernel) as `iter_kernels` documents."""
    complexity = ops.cast(complexity, "float32")
    dl = ops.cast(step, "float32")
    depth = ops.cast(depth, "int32")
    weight = None if state_weight is None else ops.cast(state_weight, "float32")
    state = self.initial_state(complexity)
    dones = {}

    def done_at(unit):
      """How many states are at or past their depth at `unit` (the first rows when sorted);
      computed once per unit, for the steps and the kernels' rows."""
      if unit not in dones:
        dones[unit] = ops.sum(ops.cast(depth <= unit, "int32"))
      return dones[unit]

    steps = units * self.kernels_per_unit
    if training and self.training_backward == "reversible":
      # The kernels are read out of the states inside the trajectory's custom gradient
      # (`reversible_trajectory.trajectory(readouts=)`): its backward pass then gets each
      # kernel's gradient rather than a state-sized one per step, all at once.
      readouts, c_prev = [], self.input_channels
      for c_out in channels:
        readouts.append(functools.partial(self.kernel_from_state, c_in=c_prev, c_out=c_out,
                                          expand=expand))
        for j in range(steps):
          rows = done_at(j // self.kernels_per_unit + 1) if active_rows_only else None
          readouts.append(functools.partial(self._rows_kernel, rows=rows, c_in=c_out,
                                            c_out=c_out, expand=expand))
        c_prev = c_out
      for s, (transition, repeated) in enumerate(self._reversible_states(
          state, dl, depth, weight, stats, depth_sorted, steps, len(channels), readouts)):
        yield s, None, transition
        for j, kernel in enumerate(repeated):
          yield s, j, kernel
      return
    c_prev = self.input_channels
    for s, c_out in enumerate(channels):
      state = self.integrate_step(state, dl, None, training, stats, weight,
                                  row=self.statistics_row(s))
      yield s, None, self.kernel_from_state(state, c_prev, c_out, expand)
      args = (state, dl, depth, steps, training, stats, weight, depth_sorted, s, step_rows)
      trajectory = (self._looped_steps(*args) if loop and steps
                    else self._unrolled_steps(*args, done_at))
      for j, state in enumerate(trajectory):
        rows = done_at(j // self.kernels_per_unit + 1) if active_rows_only else None
        yield s, j, self._rows_kernel(state, rows, c_out, c_out, expand)
      c_prev = c_out

  def _rows_kernel(self, state, rows, c_in: int, c_out: int, expand: bool):
    """`kernel_from_state` of the states from row `rows` on (None: all rows)."""
    return self.kernel_from_state(state if rows is None else state[rows:], c_in, c_out, expand)

  @property
  def training_backward(self) -> str:
    """'autodiff' or 'reversible': how a training call differentiates the trajectory now
    (`backward` 'auto' resolved against the integrator, normalization, remat and loop)."""
    if self.backward != "auto":
      return self.backward
    if self.remat or self.loop_steps:
      return "autodiff"
    return ("reversible" if why_not_reversible(self.integrator, self.normalization) is None
            else "autodiff")

  def _reversible_states(self, state, dl, depth, weight, stats: list, depth_sorted: bool,
                         steps: int, stages: int, readouts=None):
    """The training trajectory with `backward='reversible'`: per stage, (transition state,
    [repeated states]), or each state's readout where `readouts` (one per step, in that
    order) gives one; appends each step's batch statistics to `stats` in the order of the
    autodiff path."""
    why = why_not_reversible(self.integrator, self.normalization)
    if why:
      raise ValueError(f"PuppeteerODE: backward='reversible' trains with {why}")
    kpu = self.kernels_per_unit
    actives = []
    for _ in range(stages):
      actives.append(None)
      actives += [ops.cast(depth > j // kpu + 1, "float32") for j in range(steps)]
    params = [ops.convert_to_tensor(p) for p in self._params()]
    sorted_rows = depth_sorted and backend_ops.backend() == "tensorflow"
    states, means, variances = reversible_trajectory.trajectory(
        state, dl, weight, actives, params, self.epsilon, self.depthwise, sorted_rows,
        self.matmul_dtype, readouts, integrator=self.integrator)
    evals = EVALS_PER_STEP[self.integrator]
    for k, active in enumerate(actives):
      mask = active if weight is None else (weight if active is None else active * weight)
      seen = ops.shape(state)[0] > 0 if mask is None else ops.sum(mask) > 0
      for mean, variance in zip(means[k * evals:(k + 1) * evals],
                                variances[k * evals:(k + 1) * evals]):
        stats.append((mean, variance, seen))
    per_stage = 1 + steps
    return [(states[s * per_stage], states[s * per_stage + 1:(s + 1) * per_stage])
            for s in range(stages)]

  def _update_moving_statistics(self, stats, units: int, step_rows=None):
    """One moving-average update per call, from the mean of the per-step batch statistics
    (over every step; with `normalization='batch_per_step'` over each row's steps)."""
    rows = self._stats_rows(units, step_rows)
    if len(rows) != len(stats):
      raise AssertionError(f"PuppeteerODE: {len(stats)} batch statistics for {len(rows)} "
                           "evaluations of G")
    seen = [ops.cast(s, "float32") for _, _, s in stats]
    means, variances, row_seen = [], [], []
    for r in range(max(rows) + 1):
      entries = [i for i, row in enumerate(rows) if row == r]
      count = sum(seen[i] for i in entries) if entries else 0.0
      means.append(sum(stats[i][0] * seen[i] for i in entries) / ops.maximum(count, 1.0)
                   if entries else ops.zeros((self.state_channels,), "float32"))
      variances.append(sum(stats[i][1] * seen[i] for i in entries) / ops.maximum(count, 1.0)
                       if entries else ops.zeros((self.state_channels,), "float32"))
      row_seen.append(ops.convert_to_tensor(count, "float32") > 0)
    if self.normalization == "batch_per_step":
      mean, var = ops.stack(means), ops.stack(variances)
      any_seen = ops.stack(row_seen)[:, None]
      if mean.shape[0] < self.statistics_rows:  # fewer units than the bound: rows unseen
        pad = self.statistics_rows - mean.shape[0]
        mean = ops.pad(mean, ((0, pad), (0, 0)))
        var = ops.pad(var, ((0, pad), (0, 0)))
        any_seen = ops.pad(any_seen, ((0, pad), (0, 0)))
    else:
      mean, var, any_seen = means[0], variances[0], row_seen[0]
    momentum = self.momentum
    if self._calibration_counts is not None:
      # A running mean per row: the k-th update of a row weighs 1 / k, whatever the calls
      # that did not reach the row (`calibration`).
      counts = self._calibration_counts
      if isinstance(counts, int):
        counts = ops.zeros(ops.shape(any_seen), "float32")
      momentum = counts / (counts + 1.0)
      self._calibration_counts = counts + ops.cast(any_seen, "float32")
    self.moving_mean.assign(mbn.updated_moving(self.moving_mean, mean, momentum, any_seen))
    self.moving_variance.assign(
        mbn.updated_moving(self.moving_variance, var, momentum, any_seen))

  @contextlib.contextmanager
  def calibration(self):
    """Within it, training calls set G's moving statistics (each row of them, with
    'batch_per_step') to the plain mean of the batch statistics of the calls that reached it,
    instead of a moving average (`PuppetClassifier.recalibrate_batch_norm(generator=True)`).
    Eager calls only."""
    self._calibration_counts = 0
    try:
      yield
    finally:
      self._calibration_counts = None

  def refine_statistics_rows(self, sources: Dict[int, int]) -> None:
    """With `normalization='batch_per_step'`: each stage's repeated-step rows of the units in
    `sources` ({unit: source unit}, `scaling.refinement_sources`) take the source unit's
    values (`PuppetClassifier.refine_depth`, as for the puppet's batch-norm rows)."""
    if self.normalization != "batch_per_step" or not sources:
      return
    kpu, per_stage = self.kernels_per_unit, 1 + self.repeated_kernels_per_stage
    for variable in (self.moving_mean, self.moving_variance):
      values = np.array(ops.convert_to_numpy(variable))
      for s in range(len(self.stage_channels)):
        for unit, source in sources.items():
          dst, src = s * per_stage + 1 + unit * kpu, s * per_stage + 1 + source * kpu
          values[dst:dst + kpu] = values[src:src + kpu]
      variable.assign(values)

  def _stats_rows(self, units: int, step_rows=None) -> List[int]:
    """The moving-statistics row of each evaluation of G in one training call, in the order
    the batch statistics are recorded: per stage, the transition step's evaluations, then
    each repeated step's. All 0 unless `normalization='batch_per_step'`."""
    evals = EVALS_PER_STEP[self.integrator]
    rows = []
    for s in range(len(self.stage_channels)):
      rows += [self.statistics_row(s)] * evals
      for j in range(units * self.kernels_per_unit):
        rows += [self.statistics_row(s, j, step_rows)] * evals
    if self.normalization != "batch_per_step":
      return [0] * len(rows)
    return rows

  def get_config(self):
    config = super().get_config()
    config.update(
        stage_channels=list(self.stage_channels), input_channels=self.input_channels,
        max_depth=self.max_depth, kernels_per_unit=self.kernels_per_unit,
        kernel_size=self.kernel_size, state_channels=self.state_channels, init=self.init,
        init_rank=self.init_rank, init_scale=self.init_scale, integrator=self.integrator,
        kernel_scaling=self.kernel_scaling, generator_kernel_size=self.generator_kernel_size,
        generator_rank=self.generator_rank,
        momentum=self.momentum, epsilon=self.epsilon, remat=self.remat,
        loop_steps=self.loop_steps, depthwise=self.depthwise,
        normalization=self.normalization, backward=self.backward,
        matmul_dtype=self.matmul_dtype)
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    # Saved before the option existed: the one set it had then.
    config.setdefault("normalization", SAVED_BEFORE_FIELD["generator_norm"])
    return cls(**config)


def _pool_axis(x, axis: int, n_out: int, n_in: int):
  """Adaptive average pooling of one axis of a 4-D tensor from n_in to n_out entries."""
  if n_out == n_in:
    return x
  if n_in % n_out == 0:  # exact blocks: a reshape and a mean, no matrix product
    shape = list(x.shape)
    shape[0] = -1
    shape[axis:axis + 1] = [n_out, n_in // n_out]
    return ops.mean(ops.reshape(x, shape), axis=axis + 1)
  if n_out % n_in == 0:
    # An integer factor up (a 256-wide state to 512 channels): output i's window is the one
    # input i // factor, so the pooling is a repeat (one copy; its gradient a reshape and a
    # sum) instead of the prefix-sum difference below (five state-sized tensors).
    return ops.repeat(x, n_out // n_in, axis=axis)
  # Windows [start, stop) from adaptive_pool; each window's mean is a difference of a prefix
  # sum. Only 2 * n_out indices enter the graph (a dense pooling matrix would be a constant of
  # n_out * n_in floats at every generated layer, 14 MB in the AlexNet puppet's SavedModel).
  starts, stops = adaptive_pool.windows(n_out, n_in)
  zero = ops.zeros_like(ops.take(x, ops.convert_to_tensor([0]), axis=axis))
  prefix = ops.concatenate([zero, ops.cumsum(x, axis=axis)], axis=axis)
  total = (ops.take(prefix, ops.convert_to_tensor(stops), axis=axis)
           - ops.take(prefix, ops.convert_to_tensor(starts), axis=axis))
  shape = [1] * 4
  shape[axis] = n_out
  counts = ops.reshape(ops.convert_to_tensor((stops - starts).astype("float32")), shape)
  return total / counts
