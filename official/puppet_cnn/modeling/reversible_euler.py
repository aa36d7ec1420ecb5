"""The puppeteer's Euler trajectory in training, with a backward pass that runs it in reverse.

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
the float32 autodiff path to about 1e-7 relative (tests/modeling/reversible_euler_test.py).
In a TensorFlow graph each step's backward work waits for the gradient to reach it
(`backend_ops.after`): otherwise the executor starts every step's recomputation at once.

For G as `PuppeteerODE` trains it with a batch norm (`normalization` 'batch' or
'batch_per_step') and the Euler integrator (the paper's; `config_definitions.
why_not_reversible`): `PuppeteerODE(backward='reversible')`, config `generator_backward`; the default 'auto' uses it wherever it applies.
The batch statistics it returns carry no gradient (they only update moving averages).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import keras
from keras import ops

from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import masked_batch_norm as mbn


def euler_trajectory(state, dl, weight, actives: Sequence, params: Sequence, epsilon: float,
                     depthwise: str = "auto", sorted_rows: bool = False,
                     matmul_dtype: str = "float32",
                     readouts: Optional[Sequence[Optional[Callable]]] = None):
  """Runs Euler steps of G from `state`; returns (states, means, variances), one per step.

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

  Returns:
    states: the state (or its readout) after each step; means: each step's batch mean of
    G's output before normalization, biases included (what `PuppeteerODE` records);
    variances: its batch variance. A step that runs on no state gives zeros.
  """
  actives = list(actives)
  readouts = [None] * len(actives) if readouts is None else list(readouts)
  if len(readouts) != len(actives):
    raise ValueError(f"euler_trajectory: {len(readouts)} readouts for {len(actives)} steps")
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
    dl4 = ops.reshape(dl, (-1, 1, 1, 1))
    saved, states, means, variances = [], [], [], []
    s = state
    for active in step_masks:
      rows = sorted_rows and active is not None
      s, y, mean, variance = (_sorted_forward(g, s, dl, weight, active) if rows
                              else _masked_forward(g, s, dl4, weight, active))
      saved.append((y, mean, variance))
      states.append(s if readouts[len(states)] is None else readouts[len(states)](s))
      means.append(mean + bias)
      variances.append(variance)
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
        y, mean, variance = (backend_ops.after(t, g_state) for t in saved[k])
        active = step_masks[k]
        if sorted_rows and active is not None:
          s, g_state, dd, dp = _sorted_backward(g, s, g_state, dl, weight, active, y, mean,
                                                variance)
        else:
          s, g_state, dd, dp = _masked_backward(g, s, g_state, dl4, weight, active, y, mean,
                                                variance)
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
  return out[:n_steps], out[n_steps:2 * n_steps], out[2 * n_steps:]


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


def _masked_forward(g, s, dl4, weight, active):
  y, mean, variance, out = g.forward(s, _mask(active, weight))
  new = s + dl4 * out
  if active is not None:
    new = ops.where(ops.reshape(active, (-1, 1, 1, 1)) > 0, new, s)
  return new, y, mean, variance


def _masked_backward(g, s_next, g_next, dl4, weight, active, y, mean, variance):
  out = g.output(y, mean, variance)
  if active is None:
    s = s_next - dl4 * out
    g_out = g_next
  else:
    on = ops.reshape(active, (-1, 1, 1, 1)) > 0
    s = ops.where(on, s_next - dl4 * out, s_next)
    g_out = ops.where(on, g_next, ops.zeros_like(g_next))
  d_dl = ops.sum(g_out * out, axis=(1, 2, 3))
  d_s, d_params = g.backward(s, y, mean, variance, out, dl4 * g_out, _mask(active, weight))
  return s, g_next + d_s, d_dl, d_params


def _done(active):
  return ops.shape(active)[0] - ops.cast(ops.sum(active), "int32")


def _sorted_forward(g, s, dl, weight, active):
  done = _done(active)
  n = ops.shape(s)[0]
  channels = g.factors[-1].shape[-1]

  def step():
    rows = s[done:]
    y, mean, variance, out = g.forward(rows, None if weight is None else weight[done:])
    new = ops.concatenate([s[:done], rows + ops.reshape(dl[done:], (-1, 1, 1, 1)) * out],
                          axis=0)
    return ops.reshape(new, ops.shape(s)), y, mean, variance

  def skip():
    empty = ops.zeros((0,) + tuple(s.shape[1:-1]) + (channels,), s.dtype)
    zeros = ops.zeros((channels,), s.dtype)
    return s, empty, zeros, zeros

  return ops.cond(done < n, step, skip)


def _sorted_backward(g, s_next, g_next, dl, weight, active, y, mean, variance):
  done = _done(active)
  n = ops.shape(s_next)[0]
  shapes = [g.dw_kernel.shape] + [f.shape for f in g.factors] + [g.gamma.shape, g.beta.shape]

  def step():
    out = g.output(y, mean, variance)
    dl4 = ops.reshape(dl[done:], (-1, 1, 1, 1))
    rows = s_next[done:] - dl4 * out
    g_rows = g_next[done:]
    d_rows = ops.sum(g_rows * out, axis=(1, 2, 3))
    d_s, d_params = g.backward(rows, y, mean, variance, out, dl4 * g_rows,
                               None if weight is None else weight[done:])
    s = ops.reshape(ops.concatenate([s_next[:done], rows], axis=0), ops.shape(s_next))
    g_s = ops.reshape(ops.concatenate([g_next[:done], g_rows + d_s], axis=0),
                      ops.shape(g_next))
    d_dl = ops.concatenate([ops.zeros((done,), dl.dtype), d_rows], axis=0)
    return (s, g_s, ops.reshape(d_dl, ops.shape(dl)), *d_params)

  def skip():
    return (s_next, g_next, ops.zeros_like(dl),
            *[ops.zeros(shape, s_next.dtype) for shape in shapes])

  out = ops.cond(done < n, step, skip)
  return out[0], out[1], out[2], list(out[3:])


__all__: List[str] = ["euler_trajectory"]
