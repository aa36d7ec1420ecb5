"""PuppeteerODE against the paper's Table 5 and a float64 NumPy integration of eq. 12."""
import math

import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.modeling import adaptive_pool
from official.puppet_cnn.modeling import puppeteer_ode
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE
from tests.modeling import reference

# Paper Table 5, "Param Size" in MB (10^6 bytes, float32) against the maximum channel C.
TABLE5_PARAM_SIZE_MB = {64: 0.02, 128: 0.07, 256: 0.28, 512: 1.08, 1024: 4.26}
# Paper Table 5, "Total Params" in millions (G plus the C x C x 9 state).
TABLE5_TOTAL_PARAMS_M = {64: 0.04, 128: 0.17, 256: 0.66, 512: 2.63, 1024: 10.50}


@pytest.mark.parametrize("c", [64, 128, 256, 512])
def test_generator_size_matches_paper_table5(c):
  # The paper's G keeps one set of batch-norm moving statistics (normalization='batch').
  layer = PuppeteerODE(stage_channels=(c // 8, c // 4, c // 2, c), init="paper",
                       normalization="batch")
  layer.build(None)
  g = sum(int(np.prod(w.shape)) for w in layer.generator_weights())
  assert round(4 * g / 1e6, 2) == TABLE5_PARAM_SIZE_MB[c]
  state = c * c * 9
  assert round((g + state) / 1e6, 2) == TABLE5_TOTAL_PARAMS_M[c]
  # With the paper's constant init nothing but G is stored.
  assert sum(int(np.prod(w.shape)) for w in layer.weights) == g
  # The default keeps them per step: 4 stages x (1 + 7) steps, 2 C values each.
  per_step = PuppeteerODE(stage_channels=(c // 8, c // 4, c // 2, c), init="paper")
  per_step.build(None)
  assert per_step.normalization == "batch_per_step"
  assert (sum(int(np.prod(w.shape)) for w in per_step.generator_weights())
          == g + 2 * c * (4 * 8 - 1))


def _np_generator(layer, state):
  """G(P) in float64 with inference-mode batch norm, one sample (C_in, KK, C_out)."""
  w = [np.asarray(v.numpy(), np.float64) for v in layer.generator_weights()]
  dw_k, dw_b, *pw, pw_b, gamma, beta, mean, var = w  # pw: [C x C] or [C x r, r x C]
  y = reference.depthwise_same(state, dw_k) + dw_b
  y = np.linalg.multi_dot([y.reshape(-1, y.shape[-1])] + pw).reshape(y.shape) + pw_b
  y = (y - mean) / np.sqrt(var + layer.epsilon) * gamma + beta
  return np.tanh(y)


def _np_kernel(state, c_in, c_out, k):
  pooled = reference.adaptive_avg_pool_1d(np.moveaxis(state, 2, 0), c_out)  # pool C_out
  pooled = np.moveaxis(pooled, 0, 2)                                          # (Cin, KK, c_out)
  pooled = reference.adaptive_avg_pool_1d(pooled, c_in)                       # (c_in, KK, c_out)
  return np.transpose(pooled, (1, 0, 2)).reshape(k, k, c_in, c_out) / math.sqrt(k * k * c_in)


def _randomize_bn(layer, rng):
  c = layer.state_channels
  shape = tuple(layer.moving_mean.shape)  # (C,), or (rows, C) per step
  layer.moving_mean.assign(rng.normal(scale=0.1, size=shape).astype(np.float32))
  layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=shape).astype(np.float32))
  layer.gamma.assign(rng.uniform(0.5, 1.5, size=c).astype(np.float32))
  layer.dw_bias.assign(rng.normal(scale=0.1, size=c).astype(np.float32))


@pytest.mark.parametrize("init,rank,width,loop,depthwise", [
    ("paper", 0, 6, False, "auto"), ("learned", 0, 6, False, "auto"),
    ("learned_additive", 0, 6, False, "auto"),
    ("learned", 2, 6, False, "auto"), ("learned", 0, 3, False, "auto"),
    ("learned", 1, 2, False, "auto"),  # state narrower than the stages: resized up
    ("learned", 0, 6, True, "auto"), ("learned", 1, 3, True, "auto"),  # steps in one loop
    ("learned", 0, 6, False, "shifted"), ("learned", 0, 6, True, "shifted")])  # G's depthwise
def test_euler_trajectory_matches_float64_reference(init, rank, width, loop, depthwise):
  rng = np.random.default_rng(0)
  # One set of moving statistics (the float64 G reads it; per-step rows: the test below).
  layer = PuppeteerODE(stage_channels=(4, 6), input_channels=3, max_depth=3, init=init,
                       init_rank=2, generator_rank=rank, state_channels=width, loop_steps=loop,
                       depthwise=depthwise, normalization="batch")
  layer.build(None)
  assert len(layer.generator_weights()) == (9 if rank else 8)
  _randomize_bn(layer, rng)
  h = np.array([2.5, 7.0], np.float32)
  dl = np.tanh(1 / h.astype(np.float64))
  depth = np.array([1, 3], np.int32)
  # (The loop exists only in a traced graph: eagerly, the steps run unrolled.)
  call = tf.function(layer.__call__) if loop else layer
  kernels = call(h, dl.astype(np.float32), depth, training=False)
  # The same kernels one at a time (what cache_kernels consumes), checked against the same
  # float64 reference below: (stage, j) in trajectory order, j None for the transition.
  streamed = list(layer.iter_kernels(h, dl.astype(np.float32), depth))
  assert [(s, j) for s, j, _ in streamed] == [(s, j) for s in range(2) for j in (None, 0, 1)]
  streamed = {(s, j): kernel for s, j, kernel in streamed}

  for b in range(2):
    fill = math.exp(1 - h[b] ** -2.0)
    state = np.full((width, 9, width), fill)
    if init != "paper":
      a, kk, o = [np.asarray(v, np.float64) for v in layer.init_factors]
      base = np.einsum("ri,rk,ro->iko", a, kk, o)
      state = base * fill if init == "learned" else base + fill
    c_prev = 3
    for s, c in enumerate((4, 6)):
      state = state + dl[b] * _np_generator(layer, state)
      want = _np_kernel(state, c_prev, c, 3)
      got = kernels[s][0][b].numpy()
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(streamed[s, None][b].numpy(), want, rtol=1e-4, atol=1e-6)
      for j in range(2):  # repeated kernels; the state freezes once the sample is done
        if depth[b] > j + 1:
          state = state + dl[b] * _np_generator(layer, state)
          np.testing.assert_allclose(kernels[s][1][b, j].numpy(), _np_kernel(state, c, c, 3),
                                     rtol=1e-4, atol=1e-6)
          np.testing.assert_allclose(streamed[s, j][b].numpy(), _np_kernel(state, c, c, 3),
                                     rtol=1e-4, atol=1e-6)
      c_prev = c


def test_generator_rank_factorizes_the_pointwise_matrix():
  c, r = 512, 64
  full = PuppeteerODE(stage_channels=(64, 128, 256, 512), init="paper", normalization="batch")
  low = PuppeteerODE(stage_channels=(64, 128, 256, 512), init="paper", generator_rank=r,
                     normalization="batch")
  full.build(None)
  low.build(None)
  count = lambda layer: sum(int(np.prod(w.shape)) for w in layer.generator_weights())  # pylint: disable=unnecessary-lambda-assignment
  # Depthwise 3x3 + bias, pointwise bias, BN (4 C): the paper's C^2 + 15 C, with the C x C
  # matrix replaced by (C x r) and (r x C).
  assert count(full) == c * c + 15 * c == 269_824
  assert count(low) == 2 * r * c + 15 * c == 73_216
  assert [tuple(w.shape) for w in low.pw_factors] == [(c, r), (r, c)]
  assert PuppeteerODE.from_config(low.get_config()).generator_rank == r
  for bad in (-1, 512, 600):
    with pytest.raises(ValueError, match="generator_rank"):
      PuppeteerODE(stage_channels=(512,), generator_rank=bad)


def test_learned_base_has_the_configured_scale():
  layer = PuppeteerODE(stage_channels=(64,), init="learned", init_rank=16, init_scale=0.5)
  layer.build(None)
  base = layer.initial_state(np.array([100.0], np.float32)).numpy() / math.exp(1 - 1e-4)
  assert 0.4 < base.std() < 0.6 and abs(base.mean()) < 0.1


def test_paper_init_is_the_constant_fill():
  layer = PuppeteerODE(stage_channels=(4,), init="paper")
  layer.build(None)
  state = layer.initial_state(np.array([0.0, 3.0], np.float32)).numpy()
  assert state.shape == (2, 4, 9, 4)
  np.testing.assert_allclose(state[0], 0.0)
  np.testing.assert_allclose(state[1], math.exp(1 - 1 / 9), rtol=1e-6)


def _trajectory_end(integrator, horizon, steps):
  """The state after `steps` steps of size horizon/steps (1 transition + steps-1 repeated)."""
  dl = horizon / steps
  layer = PuppeteerODE(stage_channels=(4,), max_depth=steps, init="paper",
                       integrator=integrator, kernel_scaling="none")
  layer.build(None)
  for i, w in enumerate(layer.generator_weights()[:4]):
    w.assign(np.random.default_rng(i).normal(scale=0.5, size=w.shape).astype(np.float32))
  h = np.array([3.0], np.float32)
  kernels = layer(h, np.array([dl], np.float32), np.array([steps], np.int32))
  return kernels[0][1][0, -1].numpy()  # the last state, pooled (identity pooling here)


def test_rk4_with_coarse_step_agrees_with_euler_with_fine_step():
  # Integrate to l = 0.5: RK4 in 4 steps vs Euler in 64 steps vs Euler in 4 steps.
  rk4 = _trajectory_end("rk4", 0.5, 4)
  mid = _trajectory_end("midpoint", 0.5, 4)
  euler_fine = _trajectory_end("euler", 0.5, 64)
  euler_coarse = _trajectory_end("euler", 0.5, 4)
  err_rk4 = np.abs(rk4 - euler_fine).max()
  err_coarse = np.abs(euler_coarse - euler_fine).max()
  # Euler's global error is O(dl): the 64-step answer is itself off by about err_coarse/16,
  # which bounds how close any 4-step method can look; RK4 must get near that floor.
  assert err_rk4 < err_coarse / 5
  assert np.abs(mid - euler_fine).max() < err_coarse


def test_inactive_samples_keep_their_state_and_training_updates_moving_stats():
  layer = PuppeteerODE(stage_channels=(4,), max_depth=4, init="paper")
  h = np.array([5.0, 5.0], np.float32)
  dl = np.array([0.2, 0.2], np.float32)
  kernels = layer(h, dl, np.array([1, 4], np.int32), training=True)
  rep = kernels[0][1].numpy()
  # Sample 0 (depth 1) never moves after the transition step: its repeated kernels are all
  # equal to each other; sample 1's change from step to step.
  assert np.abs(rep[0, 1:] - rep[0, :1]).max() == 0.0
  assert np.abs(rep[1, 1:] - rep[1, :1]).max() > 1e-4
  assert np.abs(layer.moving_mean.numpy()).max() > 0  # updated from batch statistics


def _np_state_generator(layer, state):
  """G(P) in float64 with `normalization='state'`: each channel normalized over the one
  state's (C_in, KK) positions."""
  w = [np.asarray(v.numpy(), np.float64) for v in layer.generator_weights()]
  dw_k, dw_b, *pw, pw_b, gamma, beta, _, _ = w
  y = reference.depthwise_same(state, dw_k) + dw_b
  y = np.linalg.multi_dot([y.reshape(-1, y.shape[-1])] + pw).reshape(y.shape) + pw_b
  y = (y - y.mean(axis=(0, 1))) / np.sqrt(y.var(axis=(0, 1)) + layer.epsilon) * gamma + beta
  return np.tanh(y)


@pytest.mark.parametrize("remat,loop", [(False, False), (True, False), (True, True)])
def test_state_normalization_against_float64_and_independent_of_the_batch(remat, loop):
  rng = np.random.default_rng(0)
  layer = PuppeteerODE(stage_channels=(4, 6), max_depth=3, init_rank=2,
                       normalization="state", remat=remat, loop_steps=loop)
  layer.build(None)
  _randomize_bn(layer, rng)
  moving = layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()
  h = np.array([2.5, 7.0, 5.0], np.float32)
  dl = np.tanh(1 / h.astype(np.float64))
  depth = np.array([1, 3, 2], np.int32)
  call = tf.function(layer.__call__) if loop else layer
  outputs = {training: call(h, dl.astype(np.float32), depth, training=training)
             for training in (False, True)}
  # Sample 1 alone in its batch (a batch of one complexity bin) gets the same kernels.
  alone = call(h[1:2], dl[1:2].astype(np.float32), depth[1:2], training=True)
  a, kk, o = [np.asarray(v, np.float64) for v in layer.init_factors]
  base = np.einsum("ri,rk,ro->iko", a, kk, o)
  for b in range(3):
    state = base * math.exp(1 - h[b] ** -2.0)
    for s, (c_prev, c) in enumerate(((3, 4), (4, 6))):
      state = state + dl[b] * _np_state_generator(layer, state)
      want = [_np_kernel(state, c_prev, c, 3)]
      for j in range(2):
        if depth[b] > j + 1:
          state = state + dl[b] * _np_state_generator(layer, state)
          want.append(_np_kernel(state, c, c, 3))
      for kernels in outputs.values():
        got = [kernels[s][0][b]] + [kernels[s][1][b, j] for j in range(len(want) - 1)]
        for g, w in zip(got, want):
          np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-6)
      if b == 1:
        got = [alone[s][0][0]] + [alone[s][1][0, j] for j in range(2)]
        for g, w in zip(got, want):
          np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-6)
  # The moving statistics are neither used nor updated.
  np.testing.assert_array_equal(layer.moving_mean.numpy(), moving[0])
  np.testing.assert_array_equal(layer.moving_variance.numpy(), moving[1])
  with tf.GradientTape() as tape:
    kernels = call(h, dl.astype(np.float32), depth, training=True)
    loss = sum(tf.reduce_sum(tf.square(t)) + tf.reduce_sum(tf.square(r)) for t, r in kernels)
  grads = dict(zip([w.name for w in layer.trainable_weights],
                   tape.gradient(loss, layer.trainable_weights)))
  assert all(g is not None for g in grads.values())
  assert float(tf.reduce_max(tf.abs(grads["gamma"]))) > 0
  assert float(tf.reduce_max(tf.abs(grads["pointwise_bias"]))) == 0.0  # cancels in the norm


def _np_linear(layer, state):
  """G's two convolutions with their biases, float64, one state (C_in, KK, C_out)."""
  w = [np.asarray(v.numpy(), np.float64) for v in layer.generator_weights()]
  dw_k, dw_b, *pw, pw_b = w[:-4]
  y = reference.depthwise_same(state, dw_k) + dw_b
  return np.linalg.multi_dot([y.reshape(-1, y.shape[-1])] + pw).reshape(y.shape) + pw_b


def _np_bn_tanh(layer, y, mean, var):
  gamma, beta = (np.asarray(v.numpy(), np.float64) for v in (layer.gamma, layer.beta))
  return np.tanh((y - mean) / np.sqrt(var + layer.epsilon) * gamma + beta)


@pytest.mark.parametrize("loop", [False, True])
def test_batch_per_step_inference_normalizes_each_step_by_its_own_row(loop):
  rng = np.random.default_rng(3)
  layer = PuppeteerODE(stage_channels=(4, 6), max_depth=3, init_rank=2,
                       normalization="batch_per_step", loop_steps=loop)
  layer.build(None)
  _randomize_bn(layer, rng)
  rows, c = layer.statistics_rows, layer.state_channels
  assert rows == 2 * 3 and tuple(layer.moving_mean.shape) == (rows, c)
  means = rng.normal(scale=0.3, size=(rows, c))
  variances = rng.uniform(0.3, 3.0, size=(rows, c))
  layer.moving_mean.assign(means.astype(np.float32))
  layer.moving_variance.assign(variances.astype(np.float32))
  h = np.array([2.5, 7.0], np.float32)
  dl = np.tanh(1 / h.astype(np.float64))
  depth = np.array([2, 5], np.int32)
  units = 4  # one step past the bound (max_depth - 1 = 2 repeated): it reuses the last row
  call = tf.function(layer.__call__) if loop else layer
  kernels = call(h, dl.astype(np.float32), depth, training=False, units=units)
  a, kk, o = [np.asarray(v, np.float64) for v in layer.init_factors]
  base = np.einsum("ri,rk,ro->iko", a, kk, o)
  for b in range(2):
    state = base * math.exp(1 - h[b] ** -2.0)
    c_prev = 3
    for s, c_out in enumerate((4, 6)):
      # Rows per stage: the transition (3 s), then repeated steps 0 and 1 (3 s + 1, 3 s + 2).
      row = 3 * s
      state = state + dl[b] * _np_bn_tanh(layer, _np_linear(layer, state), means[row],
                                         variances[row])
      np.testing.assert_allclose(kernels[s][0][b].numpy(), _np_kernel(state, c_prev, c_out, 3),
                                 rtol=1e-4, atol=1e-6)
      for j in range(units):
        if depth[b] > j + 1:
          row = 3 * s + 1 + min(j, 1)
          state = state + dl[b] * _np_bn_tanh(layer, _np_linear(layer, state), means[row],
                                             variances[row])
        np.testing.assert_allclose(kernels[s][1][b, j].numpy(), _np_kernel(state, c_out, c_out, 3),
                                   rtol=1e-4, atol=1e-6)
      c_prev = c_out


def _np_training_statistics(layer, h, dl, depth):
  """Float64 training trajectory with batch statistics: the (mean, var, any active) of G's
  pre-normalization output at every step, in trajectory order (per stage: transition,
  repeated steps), over the states still below their depth."""
  a, kk, o = [np.asarray(v, np.float64) for v in layer.init_factors]
  base = np.einsum("ri,rk,ro->iko", a, kk, o)
  states = np.stack([base * math.exp(1 - x ** -2.0) for x in h])
  out = []
  for _ in layer.stage_channels:
    for j in range(-1, layer.max_depth - 1):  # -1: the transition step, every state
      active = np.ones(len(h), bool) if j < 0 else depth > j + 1
      y = np.stack([_np_linear(layer, p) for p in states])
      mean = y[active].mean(axis=(0, 1, 2)) if active.any() else None
      var = y[active].var(axis=(0, 1, 2)) if active.any() else None
      out.append((mean, var, active.any()))
      if active.any():
        new = states + dl[:, None, None, None] * _np_bn_tanh(layer, y, mean, var)
        states = np.where(active[:, None, None, None], new, states)
  return out


@pytest.mark.parametrize("normalization,loop,sort", [
    ("batch_per_step", False, False), ("batch_per_step", True, False),
    ("batch_per_step", False, True), ("batch", False, False)])
def test_training_moving_statistics_against_float64_batch_statistics(normalization, loop, sort):
  rng = np.random.default_rng(4)
  layer = PuppeteerODE(stage_channels=(4, 6), max_depth=3, init_rank=2, momentum=0.0,
                       normalization=normalization, loop_steps=loop)
  layer.build(None)
  _randomize_bn(layer, rng)
  before_mean = rng.normal(size=tuple(layer.moving_mean.shape)).astype(np.float32)
  layer.moving_mean.assign(before_mean)
  h = np.array([2.5, 7.0, 4.0], np.float32)
  dl = np.tanh(1 / h.astype(np.float64))
  depth = np.array([1, 2, 2], np.int32)  # the last repeated step of a stage: nobody active
  call = tf.function(layer.__call__) if loop else layer
  call(h, dl.astype(np.float32), depth, training=True, depth_sorted=sort)
  want = _np_training_statistics(layer, h, dl, depth)
  got_mean, got_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
  if normalization == "batch":  # momentum 0: the mean over the steps anyone took
    seen = [(m, v) for m, v, any_active in want if any_active]
    np.testing.assert_allclose(got_mean, np.mean([m for m, _ in seen], axis=0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got_var, np.mean([v for _, v in seen], axis=0), rtol=1e-4,
                               atol=1e-5)
    return
  assert len(want) == layer.statistics_rows
  for row, (mean, var, any_active) in enumerate(want):
    if any_active:
      np.testing.assert_allclose(got_mean[row], mean, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got_var[row], var, rtol=1e-4, atol=1e-5)
    else:  # a step no state took keeps its row
      np.testing.assert_array_equal(got_mean[row], before_mean[row])
  assert not all(any_active for _, _, any_active in want)


def test_config_round_trip_and_errors():
  layer = PuppeteerODE(stage_channels=(8, 16), max_depth=5, kernels_per_unit=2,
                       integrator="rk4", init_rank=3)
  clone = PuppeteerODE.from_config(layer.get_config())
  assert clone.get_config() == layer.get_config()
  with pytest.raises(ValueError, match="integrator"):
    PuppeteerODE(stage_channels=(8,), integrator="leapfrog")
  with pytest.raises(ValueError, match="state_channels"):
    PuppeteerODE(stage_channels=(8,), state_channels=-1)
  with pytest.raises(ValueError, match="normalization must be one of"):
    PuppeteerODE(stage_channels=(8,), normalization="layer")
  state = PuppeteerODE(stage_channels=(8,), normalization="state")
  assert PuppeteerODE.from_config(state.get_config()).normalization == "state"
  per_step = PuppeteerODE(stage_channels=(8,), normalization="batch_per_step")
  assert PuppeteerODE.from_config(per_step.get_config()).normalization == "batch_per_step"
  legacy = per_step.get_config()
  del legacy["normalization"]  # saved before the option existed: the one set it had then
  assert PuppeteerODE.from_config(legacy).normalization == "batch"
  per_step.build(None)
  with pytest.raises(ValueError, match="row of the moving statistics"):
    per_step.derivative(tf.zeros((1, 8, 9, 8)), None, False, [])


def test_gradients_reach_every_generator_weight():
  layer = PuppeteerODE(stage_channels=(4, 8), max_depth=2)
  h = tf.constant([3.0, 6.0])
  with tf.GradientTape() as tape:
    kernels = layer(h, tf.tanh(1 / h), tf.constant([2, 2]), training=True)
    loss = sum(tf.reduce_sum(tf.square(t)) + tf.reduce_sum(tf.square(r)) for t, r in kernels)
  grads = tape.gradient(loss, layer.trainable_weights)
  assert all(g is not None for g in grads)
  for w, g in zip(layer.trainable_weights, grads):
    biggest = float(tf.reduce_max(tf.abs(g)))
    if w.name in ("depthwise_bias", "pointwise_bias"):
      # G's batch norm subtracts the batch mean in training, so the two per-channel biases
      # before it have an exactly zero gradient there (they still shift the moving mean).
      assert biggest == 0.0, w.name
    else:
      assert biggest > 0, w.name


def _end_with_units(integrator, steps, horizon=1.0):
  """State at l = horizon from one layer trained for 3 steps, run with `units` = steps - 1."""
  layer = PuppeteerODE(stage_channels=(4,), max_depth=3, init="paper", integrator=integrator,
                       kernel_scaling="none")
  layer.build(None)
  for i, w in enumerate(layer.generator_weights()[:4]):
    w.assign(np.random.default_rng(i).normal(scale=0.5, size=w.shape).astype(np.float32))
  kernels = layer(np.array([3.0], np.float32), np.array([horizon / steps], np.float32),
                  np.array([steps], np.int32), units=steps - 1)
  return kernels[0][1][0, -1].numpy().astype(np.float64)


@pytest.mark.parametrize("integrator, order", [("euler", 1), ("midpoint", 2)])
def test_more_units_converge_at_the_integrators_order(integrator, order):
  # A layer built for 3 steps, evaluated with 4, 8 and 16 (`units`, as depth_scale does):
  # the error against a 256-step RK4 solution must shrink by about 2^order per doubling.
  exact = _end_with_units("rk4", 256)
  errors = [np.abs(_end_with_units(integrator, n) - exact).max() for n in (4, 8, 16)]
  ratios = [errors[0] / errors[1], errors[1] / errors[2]]
  assert all(0.75 * 2 ** order < r < 1.4 * 2 ** order for r in ratios), (errors, ratios)


def test_kernels_at_other_widths_are_pooled_from_the_same_state():
  layer = PuppeteerODE(stage_channels=(4, 8), input_channels=3, max_depth=2, init_rank=2)
  h, dl, d = np.array([5.0], np.float32), np.array([0.2], np.float32), np.array([2], np.int32)
  full = layer(h, dl, d)
  half = layer(h, dl, d, channels=(2, 4))
  wide = layer(h, dl, d, channels=(6, 12))
  assert tuple(half[1][1].shape) == (1, 1, 3, 3, 4, 4)
  assert tuple(wide[1][1].shape) == (1, 1, 3, 3, 12, 12)
  # The fan-in-scaled 8x8 kernel averaged over 2x2 channel blocks (then rescaled to the
  # 4-channel fan-in) is the 4x4 kernel: both come from the same state.
  k8 = full[1][1][0, 0].numpy().astype(np.float64) * math.sqrt(9 * 8)
  blocks = k8.reshape(3, 3, 4, 2, 4, 2).mean(axis=(3, 5)) / math.sqrt(9 * 4)
  np.testing.assert_allclose(half[1][1][0, 0].numpy(), blocks, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="stage widths"):
    layer(h, dl, d, channels=(2,))


@pytest.mark.parametrize("n_out,n_in", [(4, 4), (2, 8), (3, 8), (8, 4), (12, 4), (6, 4),
                                        (5, 3)])
@pytest.mark.parametrize("axis", [1, 2, 3])
def test_pool_axis_is_the_pooling_matrix(n_out, n_in, axis):
  # Blocks, windows, integer factors up (a repeat) and other resizes up: each is the
  # documented window mean (adaptive_pool.pooling_matrix, itself checked against window
  # means), applied in float64 along the axis.
  rng = np.random.default_rng(n_out * 10 + n_in)
  shape = [2, 3, 2, 3]
  shape[axis] = n_in
  x = rng.normal(size=shape)
  want = np.moveaxis(np.tensordot(adaptive_pool.pooling_matrix(n_out, n_in).astype(np.float64),
                                  np.moveaxis(x, axis, 0), axes=1), 0, axis)
  got = puppeteer_ode._pool_axis(tf.constant(x, tf.float32), axis, n_out, n_in)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("integrator, modes", [("euler", (None, False, True)), ("rk4", (None,))])
@pytest.mark.parametrize("loop", [False, True])
def test_remat_gives_the_same_kernels_gradients_and_statistics(integrator, modes, loop):
  # With `loop`, the remat runs are also looped (`loop_steps`): the reference is always the
  # unrolled run without remat.
  weights = []

  def run(remat, jit):
    layer = PuppeteerODE(stage_channels=(4, 8), max_depth=3, integrator=integrator,
                         init_rank=2, remat=remat, loop_steps=loop and remat)
    layer.build(None)
    if not weights:
      _randomize_bn(layer, np.random.default_rng(1))
      weights.extend(layer.get_weights())
    layer.set_weights(weights)
    h = tf.constant([2.5, 6.0, 7.5])
    depth = tf.constant([1, 3, 2])  # masked steps: samples stop at different depths

    def step():
      with tf.GradientTape() as tape:
        kernels = layer(h, tf.tanh(1 / h), depth, training=True)
        loss = sum(tf.reduce_sum(tf.sin(t)) + tf.reduce_sum(tf.square(r)) for t, r in kernels)
      return loss, tape.gradient(loss, layer.trainable_weights)

    loss, grads = tf.function(step, jit_compile=jit)() if jit is not None else step()
    return (float(loss), [g.numpy() for g in grads],
            [layer.moving_mean.numpy(), layer.moving_variance.numpy()])

  plain = run(False, None)
  for jit in modes:  # None: eager; False: graph; True: XLA
    remat = run(True, jit)
    assert remat[0] == pytest.approx(plain[0], rel=1e-5)
    # (Biases before a batch norm have zero gradient up to rounding: ~1e-7 either way.)
    for got, want in zip(remat[1] + remat[2], plain[1] + plain[2]):
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  with pytest.raises(ValueError, match="generator_remat"):
    from official.puppet_cnn import PuppetCNNConfig  # pylint: disable=import-outside-toplevel
    PuppetCNNConfig(generator_remat="yes")


@pytest.mark.parametrize("kpu,depths", [(1, [1, 2, 2, 4]), (2, [1, 2, 2, 4]),
                                        (2, [1, 1, 2, 2])])  # last: no state past unit 1
def test_active_rows_only_keeps_the_rows_of_the_deeper_states(kpu, depths):
  # Repeated kernel j of unit u has rows only for the states with depth > u (depth-sorted:
  # the last rows), equal to those rows of the full output; the transition keeps every row.
  layer = PuppeteerODE(stage_channels=(4, 6), input_channels=3, max_depth=4, init_rank=2,
                       kernels_per_unit=kpu)
  h = np.array([1.5, 2.5, 3.0, 6.0], np.float32)
  step, depth = np.tanh(1 / h).astype(np.float32), np.array(depths, np.int32)
  full = layer(h, step, depth, depth_sorted=True, stack_repeated=False)
  rows = layer(h, step, depth, depth_sorted=True, stack_repeated=False, active_rows_only=True)
  for (t_full, r_full), (t_rows, r_rows) in zip(full, rows):
    np.testing.assert_array_equal(np.asarray(t_rows), np.asarray(t_full))
    for j, (kf, kr) in enumerate(zip(r_full, r_rows)):
      active = depth > j // kpu + 1
      assert kr.shape[0] == active.sum()
      np.testing.assert_allclose(np.asarray(kr), np.asarray(kf)[active], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="active_rows_only"):
    layer(h, step, depth, active_rows_only=True)


def _training_graph(layer, h, step, depth, **kwargs):
  """The traced training step (kernels and their gradient) of `layer`: (loss fn, node count)."""
  @tf.function
  def train(h, step, depth):
    with tf.GradientTape() as tape:
      kernels = layer(h, step, depth, training=True, stack_repeated=False, **kwargs)
      loss = sum(tf.reduce_sum(tf.sin(t)) + sum(tf.reduce_sum(tf.square(k)) for k in r)
                 for t, r in kernels)
    return loss, tape.gradient(loss, layer.trainable_weights), kernels

  graph = train.get_concrete_function(h, step, depth).graph.as_graph_def()
  return train, len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


@pytest.mark.parametrize("kpu,remat", [(1, True), (2, False)])
def test_loop_steps_gives_the_unrolled_training_step_with_a_smaller_graph(kpu, remat):
  # The classifier's bucketed training call: depth-sorted states weighted by bin counts,
  # with only the active rows of each repeated kernel. `loop_steps` must give the unrolled
  # (per-step `cond`) run's kernels, loss, gradients and moving statistics, and trace a
  # training graph well under half the size at max_depth 6.
  h = tf.constant([1.5, 3.0, 3.5, 6.0])
  step, depth = tf.tanh(1 / h), tf.constant([1, 2, 4, 5])
  weight = tf.constant([3.0, 1.0, 5.0, 2.0])
  out, weights = {}, []
  for loop in (False, True):
    layer = PuppeteerODE(stage_channels=(4, 8), max_depth=6, init_rank=2, kernels_per_unit=kpu,
                         generator_rank=2, remat=remat, loop_steps=loop)
    layer.build(None)
    if not weights:
      _randomize_bn(layer, np.random.default_rng(2))
      weights.extend(layer.get_weights())
    layer.set_weights(weights)
    train, nodes = _training_graph(layer, h, step, depth, state_weight=weight,
                                   depth_sorted=True, active_rows_only=True)
    loss, grads, kernels = train(h, step, depth)
    out[loop] = (nodes, float(loss), [g.numpy() for g in grads],
                 [layer.moving_mean.numpy(), layer.moving_variance.numpy()],
                 [np.asarray(k) for t, r in kernels for k in [t, *r]])
  (n0, l0, g0, m0, k0), (n1, l1, g1, m1, k1) = out[False], out[True]
  assert l1 == pytest.approx(l0, rel=1e-5)
  assert [k.shape for k in k1] == [k.shape for k in k0]
  for got, want in zip(k1 + m1 + g1, k0 + m0 + g0):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  assert n1 < 0.5 * n0, (n1, n0)


def test_loop_steps_round_trips_and_is_validated():
  layer = PuppeteerODE(stage_channels=(4, 8), loop_steps=True)
  assert PuppeteerODE.from_config(layer.get_config()).loop_steps is True
  from official.puppet_cnn import PuppetCNNConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="generator_loop"):
    PuppetCNNConfig(generator_loop="yes")
  with pytest.raises(ValueError, match="fused_batch_norm must be True or False"):
    PuppetCNNConfig(fused_batch_norm=1)
  with pytest.raises(ValueError, match="narrow_kernels must be True or False"):
    PuppetCNNConfig(narrow_kernels="no")


def test_narrow_kernels_are_the_full_kernels_without_their_channel_repeats():
  """kernel_from_state(expand=False) of a state narrower than the layer: the full kernel is
  the narrow one with input channel i and output channel o taken from i // f_in and
  o // f_out (checked against np.repeat), and kernel_factors gives those factors."""
  layer = PuppeteerODE(stage_channels=(4, 8), state_channels=4)
  layer.build(None)
  assert layer.kernel_factors(8, 8) == (2, 2) and layer.kernel_factors(4, 8) == (1, 2)
  assert layer.kernel_factors(3, 4) == (1, 1) and layer.kernel_factors(8, 6) == (2, 1)
  state = np.random.default_rng(2).normal(size=(2,) + layer.state_shape).astype(np.float32)
  for c_in, c_out in [(8, 8), (4, 8), (3, 4)]:
    f_in, f_out = layer.kernel_factors(c_in, c_out)
    full = layer.kernel_from_state(state, c_in, c_out).numpy()
    narrow = layer.kernel_from_state(state, c_in, c_out, expand=False).numpy()
    assert narrow.shape == (2, 3, 3, c_in // f_in, c_out // f_out)
    np.testing.assert_array_equal(np.repeat(np.repeat(narrow, f_in, 3), f_out, 4), full)
  with pytest.raises(ValueError, match="stack_repeated=False"):
    layer(np.zeros(2), np.ones(2), np.ones(2, np.int32), expand_kernels=False)
