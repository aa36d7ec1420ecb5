"""The puppeteer's trajectory in training, with a backward pass that runs it in reverse.

An Euler step of G is `P' = P + dl * tanh(BN(pw(dw(P))))`. Its gradient needs, per step, G's
pre-normalization output y = pw(dw(P)) (for the batch norm and tanh) and the input state P
(for the weights' gradients). Plain autodiff keeps P and four more state-sized activations
per step; gradient checkpointing (`generator_remat`) keeps P only and runs G's forward pass
again, 9 C^3 multiply-adds per step, in the backward pass.

This module keeps y only. G's output is a function of y alone (the batch statistics are y's),
so the step can be undone exactly: `P = P' - dl * tanh(BN(y))`. The backward pass walks the
trajectory from its last state to its first, rebuilding each input state from the next state
and y, and computes each step's gradient by hand: no forward pass of G is repeated (the
depthwise convolution, 81 C^2 multiply-adds, is), and one state-sized tensor per step is
kept, as with checkpointing. The rebuilt states differ from the forward pass's by float
rounding (an ulp of the state per step); the gradients match float64 autodiff to 1e-4 and
the float32 autodiff path to about 1e-7 relative (tests/modeling/reversible_trajectory_test.py).
In a TensorFlow graph each step's backward work waits for the gradient to reach it
(`backend_ops.after`): otherwise the executor starts every step's recomputation at once.

The same holds for every explicit Runge-Kutta step (`TABLEAUS`: the paper's Euler step, the
midpoint rule, classic RK4). Stage i evaluates G at `U_i = P + dl * sum_j a_ij K_j`, and the
step is `P' = P + dl * sum_i b_i K_i`, where each `K_i = tanh(BN(y_i))` is again a function
of the stage's saved y_i alone. So `P = P' - dl * sum_i b_i K_i` undoes the step, the stage
inputs U_i follow from P and the K's, and the stages are differentiated last to first. One
state-sized tensor per evaluation of G is kept (2 per midpoint step, 4 per RK4 step), against
five per evaluation with autodiff.

For G as `PuppeteerODE` trains it with a batch norm (`normalization` 'batch' or
'batch_per_step'; `config_definitions.why_not_reversible`): `PuppeteerODE(backward=
'reversible')`, config `generator_backward`; the default 'auto' uses it wherever it applies.
The batch statistics it returns carry no gradient (they only update moving averages).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import keras
from keras import ops

from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import masked_batch_norm as mbn

# Butcher tableaus of the explicit Runge-Kutta steps `PuppeteerODE.integrate_step` takes:
# integrator -> (a, b). Stage i's input is P + dl * sum_j a[i-1][j] K_j (stage 0's is P) and
# the step is P + dl * sum_i b[i] K_i.
TABLEAUS = {
    "euler": ((), (1.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0)),
}


def trajectory(state, dl, weight, actives: Sequence, params: Sequence, epsilon: float,
               depthwise: str = "auto", sorted_rows: bool = False,
               matmul_dtype: str = "float32",
               readouts: Optional[Sequence[Optional[Callable]]] = None,
               integrator: str = "euler"):
  """Runs steps of G from `state`; returns (states, means, variances): a state per step, and
  the batch statistics of each evaluation of G (`config_definitions.EVALS_PER_STEP` per
  step, in order).

  Args:
    state: (N, H, W, C) initial states.
    dl: (N,) step sizes.
    weight: (N,) number of samples each state stands for in the batch statistics, or None.
    actives: one entry per step: None (every state takes the step) or an (N,) float 0/1 mask
      of the states that do; the others keep their state and are left out of the statistics.
    params: G's weights as tensors, in `PuppeteerODE._params()` order: depthwise kernel
      (g, g, C, 1), depthwise bias, pointwise factor(s), pointwise bias, gamma, beta.
    epsilon: the batch norm's epsilon.
    depthwise: `backend_ops.depthwise_conv_same` method.
    sorted_rows: the states come sorted by depth, so a step's active states are the last
      rows: G runs on those rows only, and not at all (`ops.cond`) when there are none
      (dynamic shapes: TensorFlow only, not under XLA). Same values.
    matmul_dtype: the dtype of G's pointwise products, forward and backward
      (`backend_ops.matmul_in_dtype`); everything else runs in float32.
    readouts: None, or one entry per step: None (return the state) or a function of the
      state to return instead (`PuppeteerODE`: the layer's kernel pooled from the state).
      A readout runs inside the trajectory's custom gradient, so the backward pass receives
      the gradient of the readout, often much smaller than the state's (a 64-channel
      kernel from a 512-wide state: 1/64), and turns it into the state's gradient
      (`backend_ops.vjp`) only when its step is reached. Without readouts every step's
      state-sized gradient exists at once when the backward pass starts (36 x 9.4 MB per
      trajectory of the paper's G), and every state at once after the forward pass.
    integrator: 'euler' (the paper's), 'midpoint' or 'rk4' (`TABLEAUS`): the step
      `PuppeteerODE.integrate_step` takes.

  Returns:
    states: the state (or its readout) after each step; means: each evaluation's batch mean
    of G's output before normalization, biases included (what `PuppeteerODE` records), step
    after step and within a step stage after stage; variances: its batch variance. A step
    that runs on no state gives zeros.
  """
  if integrator not in TABLEAUS:
    raise ValueError(f"reversible_trajectory: integrator must be one of {tuple(TABLEAUS)}, "
                     f"got {integrator!r}")
  tableau = TABLEAUS[integrator]
  stages = len(tableau[1])
  actives = list(actives)
  readouts = [None] * len(actives) if readouts is None else list(readouts)
  if len(readouts) != len(actives):
    raise ValueError(f"reversible_trajectory: {len(readouts)} readouts for {len(actives)} "
                     "steps")
  # Tensors, not variables (TensorFlow's eager custom gradient would otherwise ask for the
  # gradients of the variables read inside, separately from the inputs').
  params = [ops.copy(p) if isinstance(p, keras.Variable) else p for p in params]
  n_steps = len(actives)
  if n_steps == 0:
    return [], [], []
  masked = [a is not None for a in actives]
  has_weight = weight is not None
  args = [state, dl] + ([weight] if has_weight else []) + [a for a in actives if a is not None]
  args += params
  n_lead = len(args) - len(params)
  n_evals = n_steps * stages

  def run(*args):
    args = list(args)
    state, dl = args[0], args[1]
    weight = args[2] if has_weight else None
    masks = iter(args[2 + has_weight:n_lead])
    params = args[n_lead:]
    step_masks = [next(masks) if m else None for m in masked]
    dw_kernel, dw_bias, factors, pw_bias, gamma, beta = _unpack(params)
    bias = dw_bias[None]
    for factor in factors:
      bias = ops.matmul(bias, factor)
    bias = bias[0] + pw_bias
    g = _Generator(dw_kernel, factors, gamma, beta, epsilon, depthwise, matmul_dtype)
    saved, states, means, variances = [], [], [], []
    s = state
    for active in step_masks:
      rows = sorted_rows and active is not None
      s, ys, step_means, step_variances = (
          _sorted_forward(g, tableau, s, dl, weight, active) if rows
          else _masked_forward(g, tableau, s, dl, weight, active))
      saved.append((ys, step_means, step_variances))
      states.append(s if readouts[len(states)] is None else readouts[len(states)](s))
      means += [m + bias for m in step_means]
      variances += step_variances
    final = s

    def grad(*upstream, **unused_kwargs):
      if len(upstream) == 1 and isinstance(upstream[0], (tuple, list)):
        upstream = tuple(upstream[0])  # JAX: one cotangent with the outputs' structure
      up = [None if u is None else ops.convert_to_tensor(u) for u in upstream[:n_steps]]

      def state_grad(k, state):
        """Step k's output gradient as a gradient of its state (None: none). Computed once
        the backward pass has rebuilt `state` (`backend_ops.after`): a pooling's gradient
        needs no state, and TensorFlow's executor would otherwise expand every readout's
        gradient to a state-sized one as soon as the backward pass starts."""
        if up[k] is None or readouts[k] is None:
          return up[k]
        return backend_ops.vjp(readouts[k], state, backend_ops.after(up[k], state))

      g_state = _zero_if_none(state_grad(n_steps - 1, final), final)
      s = final
      d_dl = ops.zeros_like(dl)
      d_params = None
      for k in reversed(range(n_steps)):
        # Step k's work starts once the gradient reaches it (one step's temporaries at a
        # time; `backend_ops.after`).
        ys, step_means, step_variances = (
            [backend_ops.after(t, g_state) for t in group] for group in saved[k])
        active = step_masks[k]
        if sorted_rows and active is not None:
          s, g_state, dd, dp = _sorted_backward(g, tableau, s, g_state, dl, weight, active, ys,
                                                step_means, step_variances)
        else:
          s, g_state, dd, dp = _masked_backward(g, tableau, s, g_state, dl, weight, active, ys,
                                                step_means, step_variances)
        d_dl = d_dl + dd
        d_params = dp if d_params is None else [a + b for a, b in zip(d_params, dp)]
        if k > 0 and up[k - 1] is not None:
          g_state = g_state + state_grad(k - 1, s)
      d_dw, d_factors, d_gamma, d_beta = d_params[0], d_params[1:-2], d_params[-2], d_params[-1]
      grads = [g_state, d_dl] + ([ops.zeros_like(weight)] if has_weight else [])
      grads += [ops.zeros_like(m) for m in step_masks if m is not None]
      grads += [d_dw, ops.zeros_like(dw_bias), *d_factors, ops.zeros_like(pw_bias), d_gamma,
                d_beta]
      return tuple(grads)

    return tuple(states) + tuple(means) + tuple(variances), grad

  out = ops.custom_gradient(run)(*args)
  out = list(out)
  return out[:n_steps], out[n_steps:n_steps + n_evals], out[n_steps + n_evals:]


def _unpack(params):
  return params[0], params[1], list(params[2:-3]), params[-3], params[-2], params[-1]


def _zero_if_none(t, like):
  return ops.zeros_like(like) if t is None else t


def _mask(active, weight):
  """The statistics' per-state mask, as `PuppeteerODE.derivative` forms it."""
  if weight is None:
    return active
  return weight if active is None else active * weight


class _Generator:
  """G's forward pieces and their hand-written gradients (batch norm in training mode)."""

  def __init__(self, dw_kernel, factors, gamma, beta, epsilon, depthwise,
               matmul_dtype="float32"):
    self.dw_kernel, self.factors = dw_kernel, list(factors)
    self.gamma, self.beta, self.epsilon, self.depthwise = gamma, beta, epsilon, depthwise
    self.matmul_dtype = matmul_dtype

  def matmul(self, x, w):
    return backend_ops.matmul_in_dtype(x, w, self.matmul_dtype)

  def linear(self, s):
    """The depthwise output, each pointwise factor's output (the last is y)."""
    outs = [backend_ops.depthwise_conv_same(s, self.dw_kernel, self.depthwise)]
    for factor in self.factors:
      outs.append(self.matmul(outs[-1], factor))
    return outs

  def forward(self, s, mask):
    y = self.linear(s)[-1]
    mean, variance = mbn.masked_moments(y, mask)
    return y, mean, variance, self.output(y, mean, variance)

  def output(self, y, mean, variance):
    """tanh(BN(y)) from the saved y and its batch statistics (bit-for-bit the forward's)."""
    return ops.tanh(mbn.normalize(y, mean, variance, self.gamma, self.beta, self.epsilon))

  def backward(self, s, y, mean, variance, out, d_out, mask):
    """Gradients of `out = forward(s, mask)` given d_out: (d_s, [d_dw_kernel, *d_factors,
    d_gamma, d_beta])."""
    axes = (0, 1, 2)
    inv = ops.rsqrt(variance + self.epsilon)
    dz = d_out * (1.0 - ops.square(out))
    d_beta = ops.sum(dz, axis=axes)
    # sum(dz * xhat) with xhat = (y - mean) * inv, without a state-sized xhat.
    d_gamma = inv * (ops.sum(dz * y, axis=axes) - mean * d_beta)
    # The batch statistics are weighted means over the states `mask` weighs (all: 1 each):
    # d mean / d y_i = m_i / count, d var / d y_i = 2 m_i (y_i - mean) / count, so
    # dy = gamma inv (dz - m (d_beta + xhat d_gamma) / count) = a dz + m (c1 y + c0).
    positions = ops.cast(ops.prod(ops.shape(y)[1:-1]), y.dtype)
    if mask is None:
      count = ops.maximum(ops.cast(ops.shape(y)[0], y.dtype) * positions, 1.0)
    else:
      count = ops.maximum(ops.sum(ops.cast(mask, y.dtype)) * positions, 1.0)
    a = self.gamma * inv
    c1 = -a * inv * d_gamma / count
    c0 = -a * d_beta / count - c1 * mean
    correction = y * c1 + c0
    if mask is not None:
      correction = correction * ops.reshape(ops.cast(mask, y.dtype), (-1, 1, 1, 1))
    dy = dz * a + correction
    ins = self.linear(s)[:-1]  # the depthwise output and the factors' inputs, recomputed
    d_factors = []
    d = dy
    for factor, x in zip(reversed(self.factors), reversed(ins)):
      x2 = ops.reshape(x, (-1, ops.shape(x)[-1]))
      d2 = ops.reshape(d, (-1, ops.shape(d)[-1]))
      d_factors.insert(0, self.matmul(ops.transpose(x2), d2))
      d = self.matmul(d, ops.transpose(factor))
    d_s = backend_ops.depthwise_conv_same_transpose(d, self.dw_kernel, self.depthwise)
    d_dw = backend_ops.depthwise_conv_same_filter_grad(s, d, self.dw_kernel.shape,
                                                       self.depthwise)
    return d_s, [d_dw, *d_factors, ops.reshape(d_gamma, ops.shape(self.gamma)), d_beta]


def _rk_forward(g, tableau, s, dl4, mask):
  """One Runge-Kutta step of every row of `s`, the statistics over `mask`: (new state, each
  stage's y, mean and variance)."""
  a, b = tableau
  ks, ys, means, variances = [], [], [], []
  for i in range(len(b)):
    u = _stage_input(s, dl4, a[i - 1] if i else (), ks)
    y, mean, variance, k = g.forward(u, mask)
    ks.append(k)
    ys.append(y)
    means.append(mean)
    variances.append(variance)
  return s + dl4 * _combine(b, ks), ys, means, variances


def _rk_backward(g, tableau, s_next, g_next, dl4, mask, ys, means, variances, g_out=None):
  """Undoes `_rk_forward` and differentiates it: (state, d state, d dl (N,), d params).

  g_next: the gradient of the step's output; g_out: the part of it that reaches the stages
  (default g_next; the masked step passes g_next with its inactive rows zeroed, while its
  state keeps g_next whole)."""
  a, b = tableau
  g_out = g_next if g_out is None else g_out
  ks = [g.output(y, m, v) for y, m, v in zip(ys, means, variances)]
  combined = _combine(b, ks)
  s = s_next - dl4 * combined
  d_dl = ops.sum(g_out * combined, axis=(1, 2, 3))
  d_ks = [None if c == 0.0 else (dl4 * c) * g_out for c in b]
  g_s = g_next
  d_params = None
  for i in reversed(range(len(b))):
    if d_ks[i] is None:  # nothing reaches this stage
      continue
    u = _stage_input(s, dl4, a[i - 1] if i else (), ks)
    d_u, dp = g.backward(u, ys[i], means[i], variances[i], ks[i], d_ks[i], mask)
    g_s = g_s + d_u
    d_params = dp if d_params is None else [x + y for x, y in zip(d_params, dp)]
    for j, c in enumerate(a[i - 1] if i > 0 else ()):
      if c != 0.0:
        d_ks[j] = (dl4 * c) * d_u if d_ks[j] is None else d_ks[j] + (dl4 * c) * d_u
        d_dl = d_dl + c * ops.sum(d_u * ks[j], axis=(1, 2, 3))
  return s, g_s, d_dl, d_params


def _stage_input(s, dl4, coefficients, ks):
  """A stage's input P + dl * sum_j a_ij K_j (P where every a_ij is 0)."""
  combined = _combine(coefficients, ks)
  return s if combined is None else s + dl4 * combined


def _combine(coefficients, ks):
  """sum_i c_i K_i over the nonzero coefficients, None if there are none (the same
  expression forward and backward, so that the step is undone to the rounding of one
  subtraction)."""
  total = None
  for c, k in zip(coefficients, ks):
    if c == 0.0:
      continue
    term = k if c == 1.0 else c * k
    total = term if total is None else total + term
  return total


def _masked_forward(g, tableau, s, dl, weight, active):
  new, ys, means, variances = _rk_forward(g, tableau, s, ops.reshape(dl, (-1, 1, 1, 1)),
                                          _mask(active, weight))
  if active is not None:
    new = ops.where(ops.reshape(active, (-1, 1, 1, 1)) > 0, new, s)
  return new, ys, means, variances


def _masked_backward(g, tableau, s_next, g_next, dl, weight, active, ys, means, variances):
  dl4 = ops.reshape(dl, (-1, 1, 1, 1))
  if active is None:
    return _rk_backward(g, tableau, s_next, g_next, dl4, weight, ys, means, variances)
  # Inactive states kept theirs: their rows of the undone state are s_next, and no gradient
  # reaches G through them (their rows of every stage's gradient are zero).
  on = ops.reshape(active, (-1, 1, 1, 1)) > 0
  s, g_s, d_dl, d_params = _rk_backward(
      g, tableau, s_next, g_next, dl4, _mask(active, weight), ys, means, variances,
      g_out=ops.where(on, g_next, ops.zeros_like(g_next)))
  return ops.where(on, s, s_next), g_s, d_dl, d_params


def _done(active):
  return ops.shape(active)[0] - ops.cast(ops.sum(active), "int32")


def _sorted_forward(g, tableau, s, dl, weight, active):
  done = _done(active)
  n = ops.shape(s)[0]
  channels = g.factors[-1].shape[-1]
  stages = len(tableau[1])

  def step():
    rows = s[done:]
    new, ys, means, variances = _rk_forward(g, tableau, rows,
                                            ops.reshape(dl[done:], (-1, 1, 1, 1)),
                                            None if weight is None else weight[done:])
    new = ops.concatenate([s[:done], new], axis=0)
    return (ops.reshape(new, ops.shape(s)), *ys, *means, *variances)

  def skip():
    empty = ops.zeros((0,) + tuple(s.shape[1:-1]) + (channels,), s.dtype)
    zeros = ops.zeros((channels,), s.dtype)
    return (s, *[empty] * stages, *[zeros] * (2 * stages))

  out = ops.cond(done < n, step, skip)
  return (out[0], list(out[1:1 + stages]), list(out[1 + stages:1 + 2 * stages]),
          list(out[1 + 2 * stages:]))


def _sorted_backward(g, tableau, s_next, g_next, dl, weight, active, ys, means, variances):
  done = _done(active)
  n = ops.shape(s_next)[0]
  shapes = [g.dw_kernel.shape] + [f.shape for f in g.factors] + [g.gamma.shape, g.beta.shape]

  def step():
    rows, g_rows, d_rows, d_params = _rk_backward(
        g, tableau, s_next[done:], g_next[done:], ops.reshape(dl[done:], (-1, 1, 1, 1)),
        None if weight is None else weight[done:], ys, means, variances)
    s = ops.reshape(ops.concatenate([s_next[:done], rows], axis=0), ops.shape(s_next))
    g_s = ops.reshape(ops.concatenate([g_next[:done], g_rows], axis=0), ops.shape(g_next))
    d_dl = ops.concatenate([ops.zeros((done,), dl.dtype), d_rows], axis=0)
    return (s, g_s, ops.reshape(d_dl, ops.shape(dl)), *d_params)

  def skip():
    return (s_next, g_next, ops.zeros_like(dl),
            *[ops.zeros(shape, s_next.dtype) for shape in shapes])

  out = ops.cond(done < n, step, skip)
  return out[0], out[1], out[2], list(out[3:])


__all__: List[str] = ["TABLEAUS", "trajectory"]
