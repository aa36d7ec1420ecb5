"""The reversible trajectory (Euler, midpoint, RK4) against float64 autodiff and PuppeteerODE's
autodiff path."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from official.puppet_cnn.config_definitions import EVALS_PER_STEP, INTEGRATORS, PuppetCNNConfig
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import reversible_trajectory
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE

EPS = 1e-3


def _round(x, dtype):
  """x rounded to `dtype` and back (the identity for None); its gradient passes through."""
  return x if dtype is None else x + tf.stop_gradient(tf.cast(tf.cast(x, dtype), x.dtype) - x)


def _reference_trajectory(state, dl, weight, actives, params, epsilon, rounding=None,
                          integrator="euler"):
  """Steps of G = tanh(BN(pw(dw(P)))) in float64, written out from the definition: the
  batch statistics are weighted by active * weight over each state's positions. `rounding`
  (a dtype): each pointwise product's operands and result rounded to it. `integrator`: the
  step, written out as in the textbook (Euler; midpoint P + dl G(P + dl/2 G(P)); classic
  RK4)."""
  dw_kernel, dw_bias, factors, pw_bias, gamma, beta = (params[0], params[1], params[2:-3],
                                                       params[-3], params[-2], params[-1])
  states, means = [], []
  s = state
  n = s.shape[0]

  def g(p, m4, count):
    a = tf.nn.depthwise_conv2d(p, dw_kernel, [1, 1, 1, 1], "SAME") + dw_bias
    y = a
    if rounding is None:
      for f in factors:
        y = tf.tensordot(y, f, 1)
    else:  # rounded products of the depthwise output; the bias folded in after them
      y, bias = a - dw_bias, dw_bias
      for f in factors:
        y = _round(tf.tensordot(_round(y, rounding), _round(f, rounding), 1), rounding)
        bias = tf.tensordot(bias, f, 1)
      y = y + bias
    y = y + pw_bias
    mean = tf.reduce_sum(y * m4, axis=(0, 1, 2)) / count
    var = tf.reduce_sum(tf.square(y - mean) * m4, axis=(0, 1, 2)) / count
    means.append(mean)
    return tf.tanh((y - mean) / tf.sqrt(var + epsilon) * gamma + beta)

  for active in actives:
    m = tf.ones([n], tf.float64) if active is None else active
    if weight is not None:
      m = m * weight
    m4 = tf.reshape(m, (-1, 1, 1, 1))
    count = tf.reduce_sum(m) * float(s.shape[1] * s.shape[2])
    h = tf.reshape(dl, (-1, 1, 1, 1))
    if integrator == "euler":
      new = s + h * g(s, m4, count)
    elif integrator == "midpoint":
      new = s + h * g(s + h / 2 * g(s, m4, count), m4, count)
    else:
      k1 = g(s, m4, count)
      k2 = g(s + h / 2 * k1, m4, count)
      k3 = g(s + h / 2 * k2, m4, count)
      k4 = g(s + h * k3, m4, count)
      new = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    if active is not None:
      new = tf.where(tf.reshape(active, (-1, 1, 1, 1)) > 0, new, s)
    s = new
    states.append(s)
  return states, means


def _problem(rank, seed=0, n=5, c=6, hw=(6, 4), ksize=3):
  rng = np.random.default_rng(seed)
  state = rng.normal(1.0, 0.7, size=(n,) + hw + (c,))
  dl = rng.uniform(0.1, 0.6, size=n)
  weight = rng.integers(1, 4, size=n).astype(np.float64)
  depth = np.sort(rng.integers(1, 5, size=n))  # sorted: the active states are the last rows
  actives = [None] + [(depth > u).astype(np.float64) for u in (1, 2, 3)] + [None]
  factors = ([rng.normal(0, 0.5, size=(c, c))] if rank == 0 else
             [rng.normal(0, 0.5, size=(c, rank)), rng.normal(0, 0.5, size=(rank, c))])
  params = ([rng.normal(0, 0.5, size=(ksize, ksize, c, 1)), rng.normal(0, 0.1, size=c)]
            + factors + [rng.normal(0, 0.1, size=c), rng.uniform(0.5, 1.5, size=c),
                         rng.normal(0, 0.2, size=c)])
  cots = [rng.normal(size=state.shape) for _ in actives]  # d loss / d each step's state
  return state, dl, weight, actives, params, cots


def _gradients(fn, state, dl, params, cots):
  with tf.GradientTape() as tape:
    tape.watch([state, dl] + params)
    states, means = fn(state, dl, params)
    loss = sum(tf.reduce_sum(s * c) for s, c in zip(states, cots))
  return states, means, tape.gradient(loss, [state, dl] + params)


@pytest.mark.parametrize("rank,weighted,sorted_rows,graph,integrator", [
    (0, False, False, False, "euler"), (0, True, False, False, "euler"),
    (0, True, True, False, "euler"), (2, True, False, False, "euler"),
    (0, True, True, True, "euler"),
    (0, True, False, False, "midpoint"), (0, False, True, True, "midpoint"),
    (0, True, False, False, "rk4"), (2, True, True, False, "rk4"),
    (0, True, True, True, "rk4")])
def test_values_and_gradients_match_float64_autodiff(rank, weighted, sorted_rows, graph,
                                                     integrator):
  state, dl, weight, actives, params, cots = _problem(rank)
  weight = weight if weighted else None
  f64 = lambda x: tf.constant(x, tf.float64)  # pylint: disable=unnecessary-lambda-assignment
  f32 = lambda x: tf.constant(x, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  want_states, want_means, want = _gradients(
      lambda s, d, p: _reference_trajectory(
          s, d, None if weight is None else f64(weight),
          [None if a is None else f64(a) for a in actives], p, EPS, integrator=integrator),
      f64(state), f64(dl), [f64(p) for p in params], [f64(c) for c in cots])
  assert len(want_means) == len(actives) * {"euler": 1, "midpoint": 2, "rk4": 4}[integrator]

  def run(s, d, p):
    states, means, _ = reversible_trajectory.trajectory(
        s, d, None if weight is None else f32(weight),
        [None if a is None else f32(a) for a in actives], p, EPS, sorted_rows=sorted_rows,
        integrator=integrator)
    return states, means

  def grads(state, dl, params, cots):
    return _gradients(run, state, dl, params, cots)

  fn = tf.function(grads) if graph else grads
  got_states, got_means, got = fn(f32(state), f32(dl), [f32(p) for p in params],
                                  [f32(c) for c in cots])
  for a, b in zip(want_states, got_states):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)
  assert len(got_means) == len(want_means)
  for a, b in zip(want_means, got_means):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
  names = ["state", "dl", "dw_kernel", "dw_bias"] + [f"factor{i}" for i in range(len(params) - 5)]
  names += ["pw_bias", "gamma", "beta"]
  for name, a, b in zip(names, want, got):
    a = a.numpy()
    # The biases cancel in the batch norm: their gradient is 0 up to float64 rounding.
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-4, atol=1e-4 * np.abs(a).max() + 1e-9,
                               err_msg=name)


@pytest.mark.parametrize("graph", [False, True])
def test_readouts_match_float64_autodiff_of_the_read_out_trajectory(graph):
  """Readouts run inside the custom gradient: the outputs are the readouts of the states,
  and the gradients those of float64 autodiff through the readouts. One readout is linear
  (a pooling, as a generated kernel's), one is not (its gradient needs the rebuilt state),
  and some steps have none (their state itself)."""
  state, dl, weight, actives, params, _ = _problem(0)
  rng = np.random.default_rng(7)

  def pool(s):  # (N, H, W, C) -> (N, H, W // 2, C), a mean over column pairs
    return 0.5 * (s[:, :, 0::2] + s[:, :, 1::2])

  readouts = [pool, None, lambda s: tf.square(s) * 0.3, pool, None]
  f64 = lambda x: tf.constant(x, tf.float64)  # pylint: disable=unnecessary-lambda-assignment
  f32 = lambda x: tf.constant(x, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  shapes = [(f(tf.zeros(state.shape)) if f else tf.zeros(state.shape)).shape for f in readouts]
  cots = [rng.normal(size=sh) for sh in shapes]

  def reference(s, d, p):
    states, means = _reference_trajectory(s, d, f64(weight),
                                          [None if a is None else f64(a) for a in actives],
                                          p, EPS)
    return [f(x) if f else x for f, x in zip(readouts, states)], means

  want_outs, _, want = _gradients(reference, f64(state), f64(dl), [f64(p) for p in params],
                                  [f64(c) for c in cots])

  def run(s, d, p):
    outs, means, _ = reversible_trajectory.trajectory(
        s, d, f32(weight), [None if a is None else f32(a) for a in actives], p, EPS,
        readouts=readouts)
    return outs, means

  def grads(state, dl, params, cots):
    return _gradients(run, state, dl, params, cots)

  fn = tf.function(grads) if graph else grads
  got_outs, _, got = fn(f32(state), f32(dl), [f32(p) for p in params], [f32(c) for c in cots])
  for a, b in zip(want_outs, got_outs):
    assert b.shape == a.shape
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)
  for a, b in zip(want, got):
    a = a.numpy()
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-4, atol=1e-4 * np.abs(a).max() + 1e-9)
  with pytest.raises(ValueError, match="integrator must be one of"):
    reversible_trajectory.trajectory(f32(state), f32(dl), None, [None] * 5,
                                     [f32(p) for p in params], EPS, integrator="heun")
  with pytest.raises(ValueError, match="2 readouts for 5 steps"):
    reversible_trajectory.trajectory(f32(state), f32(dl), None, [None] * 5,
                                      [f32(p) for p in params], EPS, readouts=[None, None])


@pytest.mark.parametrize("rank,dtype", [(0, "bfloat16"), (2, "bfloat16"), (0, "float16")])
def test_16_bit_products_match_a_float64_reference_rounded_at_the_same_points(rank, dtype):
  """matmul_dtype rounds G's pointwise operands and products and nothing else: the states
  follow a float64 trajectory rounded at those points (far closer than to float32's), and
  the gradients (whose products are 16-bit too) match its float64 autodiff to 16-bit
  precision."""
  state, dl, weight, actives, params, cots = _problem(rank, seed=1, c=16, hw=(12, 6))
  # Every step runs on some state (the float64 reference has no guard for an empty step).
  assert all(a is None or a.sum() > 0 for a in actives)
  f64 = lambda x: tf.constant(x, tf.float64)  # pylint: disable=unnecessary-lambda-assignment
  f32 = lambda x: tf.constant(x, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  want_states, _, want = _gradients(
      lambda s, d, p: _reference_trajectory(s, d, f64(weight), [None if a is None else f64(a)
                                                                for a in actives], p, EPS,
                                            rounding=dtype),
      f64(state), f64(dl), [f64(p) for p in params], [f64(c) for c in cots])

  def run(matmul_dtype):
    return _gradients(
        lambda s, d, p: reversible_trajectory.trajectory(
            s, d, f32(weight), [None if a is None else f32(a) for a in actives], p, EPS,
            matmul_dtype=matmul_dtype)[:2],
        f32(state), f32(dl), [f32(p) for p in params], [f32(c) for c in cots])

  got_states, _, got = run(dtype)
  full_states, _, _ = run("float32")
  err = np.mean([np.mean(np.abs(g.numpy() - w.numpy())) for g, w in zip(got_states,
                                                                       want_states)])
  err_full = np.mean([np.mean(np.abs(g.numpy() - w.numpy())) for g, w in zip(full_states,
                                                                            want_states)])
  assert err_full > 1e-4  # the rounding matters at this size...
  assert err < 0.1 * err_full  # ...and happens where the reference puts it
  # Measured: at most 0.4% (bfloat16) and 0.03% (float16) relative.
  tol = {"bfloat16": 1e-2, "float16": 1e-3}[dtype]
  for name, w, g in zip(["state", "dl", "dw_kernel"], want, got):
    w, g = w.numpy(), g.numpy()
    assert np.linalg.norm(g - w) < tol * np.linalg.norm(w), name
  for w, g in zip(want[4:-3], got[4:-3]):  # the pointwise factor(s)
    assert np.linalg.norm(g.numpy() - w.numpy()) < tol * np.linalg.norm(w.numpy())


def test_an_all_inactive_sorted_step_is_skipped_with_zero_gradients():
  state, dl, weight, _, params, cots = _problem(0)
  actives = [None, np.zeros(5), None]
  f32 = lambda x: tf.constant(x, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  s0 = f32(state)
  with tf.GradientTape() as tape:
    p = [f32(x) for x in params]
    tape.watch([s0] + p)
    states, _, _ = reversible_trajectory.trajectory(
        s0, f32(dl), f32(weight), [None if a is None else f32(a) for a in actives], p, EPS,
        sorted_rows=True)
    loss = sum(tf.reduce_sum(s * f32(c)) for s, c in zip(states, cots))
  np.testing.assert_array_equal(states[1].numpy(), states[0].numpy())  # no state moved
  grads = tape.gradient(loss, [s0] + p)
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)


@pytest.mark.parametrize("ksize", [2, 3, 5])
def test_depthwise_transpose_and_filter_gradient_match_autodiff(ksize):
  rng = np.random.default_rng(ksize)
  x = tf.constant(rng.normal(size=(2, 7, 5, 3)), tf.float32)
  kernel = tf.constant(rng.normal(size=(ksize, ksize, 3, 1)), tf.float32)
  dy = tf.constant(rng.normal(size=(2, 7, 5, 3)), tf.float32)
  with tf.GradientTape() as tape:
    tape.watch([x, kernel])
    out = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
  want_x, want_k = tape.gradient(out, [x, kernel], output_gradients=dy)
  for method in ("conv", "shifted"):
    got_x = backend_ops.depthwise_conv_same_transpose(dy, kernel, method)
    np.testing.assert_allclose(np.asarray(got_x), want_x.numpy(), rtol=1e-5, atol=1e-5)
  got_k = backend_ops.depthwise_conv_same_filter_grad(x, dy, kernel.shape)
  np.testing.assert_allclose(np.asarray(got_k), want_k.numpy(), rtol=1e-5, atol=1e-5)


def _puppeteer_grads(backward, depth_sorted, weight, graph, rank=0, matmul_dtype="float32",
                     integrator="euler", normalization="batch"):
  keras.utils.set_random_seed(0)
  layer = PuppeteerODE((4, 8, 8), max_depth=4, state_channels=8, generator_rank=rank,
                       backward=backward, matmul_dtype=matmul_dtype, integrator=integrator,
                       normalization=normalization)
  layer.build()
  h = tf.constant([3.0, 4.5, 6.0, 7.0])
  dl = tf.constant([0.5, 0.3, 0.25, 0.2])
  depth = tf.constant([1, 2, 3, 4])  # sorted
  w = tf.constant([1.0, 2.0, 3.0, 1.0]) if weight else None

  def step():
    with tf.GradientTape() as tape:
      kernels = layer(h, dl, depth, training=True, state_weight=w, depth_sorted=depth_sorted,
                      stack_repeated=False, active_rows_only=depth_sorted)
      loss = 0.0
      for i, (transition, repeated) in enumerate(kernels):
        loss += tf.reduce_sum(tf.sin(transition * (i + 1.0)))
        for j, kernel in enumerate(repeated):
          loss += tf.reduce_sum(tf.cos(kernel * (j + 2.0)))
    return loss, tape.gradient(loss, layer.trainable_weights)

  if graph == "xla":
    step = tf.function(step, jit_compile=True)
  elif graph:
    step = tf.function(step)
  loss, grads = step()
  return (float(loss), [g.numpy() for g in grads],
          [v.numpy() for v in layer.non_trainable_weights])


@pytest.mark.parametrize("depth_sorted,weight,graph,rank,integrator,normalization", [
    (False, False, False, 0, "euler", "batch"), (True, True, False, 0, "euler", "batch"),
    (True, False, True, 0, "euler", "batch"), (False, True, True, 3, "euler", "batch"),
    (False, True, "xla", 0, "euler", "batch"),
    (True, True, True, 0, "midpoint", "batch"), (False, True, False, 0, "rk4", "batch"),
    (True, True, False, 0, "rk4", "batch_per_step"), (False, False, "xla", 0, "rk4", "batch")])
def test_puppeteer_reversible_matches_its_autodiff_path(depth_sorted, weight, graph, rank,
                                                        integrator, normalization):
  """Same loss, gradients and moving statistics (one row per step with 'batch_per_step',
  fed by each evaluation of G in the order autodiff records them)."""
  args = (depth_sorted, weight, graph, rank, "float32", integrator, normalization)
  loss_a, grads_a, stats_a = _puppeteer_grads("autodiff", *args)
  loss_r, grads_r, stats_r = _puppeteer_grads("reversible", *args)
  assert loss_r == pytest.approx(loss_a, rel=1e-6)
  scale = max(np.abs(g).max() for g in grads_a)
  for a, b in zip(grads_a, grads_r):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)
  assert any(np.abs(g).max() > 0 for g in grads_r)
  for a, b in zip(stats_a, stats_r):  # the same moving statistics
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth_sorted,graph", [(True, False), (False, "xla")])
def test_puppeteer_bfloat16_reversible_matches_its_autodiff_path(depth_sorted, graph):
  """Both differentiate the same bfloat16 products; their backward products are bfloat16 as
  well, rounded in different places, so they agree to bfloat16's precision."""
  loss_a, grads_a, _ = _puppeteer_grads("autodiff", depth_sorted, True, graph, 0, "bfloat16")
  loss_r, grads_r, _ = _puppeteer_grads("reversible", depth_sorted, True, graph, 0, "bfloat16")
  # float32 products, eagerly (the float32 path under XLA: the tests above).
  loss_f, _, _ = _puppeteer_grads("reversible", depth_sorted, True, False, 0, "float32")
  assert loss_r == pytest.approx(loss_a, rel=1e-6)
  assert loss_r != loss_f  # the option is in effect
  for a, b in zip(grads_a, grads_r):
    assert np.linalg.norm(b - a) <= 2e-2 * np.linalg.norm(a) + 1e-6


def test_a_tableau_for_every_integrator_with_its_evaluations_per_step():
  assert set(reversible_trajectory.TABLEAUS) == set(INTEGRATORS)
  for name, (a, b) in reversible_trajectory.TABLEAUS.items():
    assert len(b) == EVALS_PER_STEP[name] and len(a) == len(b) - 1
    assert abs(sum(b) - 1.0) < 1e-12  # consistent: the step integrates dP/dl = G
    assert all(len(row) == i + 1 for i, row in enumerate(a))  # explicit


def test_matmul_dtype_round_trips_and_refuses_unknown_dtypes():
  layer = PuppeteerODE((4, 8), matmul_dtype="bfloat16")
  assert PuppeteerODE.from_config(layer.get_config()).matmul_dtype == "bfloat16"
  legacy = {k: v for k, v in layer.get_config().items() if k != "matmul_dtype"}
  assert PuppeteerODE.from_config(legacy).matmul_dtype == "float32"  # saved before it existed
  with pytest.raises(ValueError, match="matmul_dtype must be one of"):
    PuppeteerODE((4, 8), matmul_dtype="int8")
  with pytest.raises(ValueError, match="generator_matmul_dtype must be one of"):
    PuppetCNNConfig(generator_matmul_dtype="float64")
  assert PuppetCNNConfig().generator_matmul_dtype == "float32"


@pytest.mark.parametrize("kwargs,message", [
    (dict(remat=True), "replaces remat"),
    (dict(loop_steps=True), "replaces remat"),
    (dict(normalization="state"), "batch-normalized G")])
def test_puppeteer_refuses_what_it_cannot_reverse(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PuppeteerODE((4, 8), backward="reversible", **kwargs)


def test_puppeteer_refuses_an_unknown_integrator_set_after_construction():
  layer = PuppeteerODE((4, 8), max_depth=2, backward="reversible")
  layer.build()
  layer.integrator = "rk4"  # changed after construction: trains reversibly as well
  one = tf.ones([2])
  layer(one * 5.0, one * 0.5, tf.constant([1, 2]), training=True)
  layer.integrator = "heun"
  with pytest.raises(ValueError, match="an integrator from"):
    layer(one * 5.0, one * 0.5, tf.constant([1, 2]), training=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(generator_remat=True), "replaces generator_remat"),
    (dict(generator_loop=True), "replaces generator_remat"),
    (dict(generator_norm="state"), "generator_norm"),
    (dict(), "generator_backward must be one of")])
def test_config_refuses_impossible_combinations(kwargs, message):
  backward = "reversible" if kwargs else "adjoint"
  with pytest.raises(ValueError, match=message):
    PuppetCNNConfig(generator_backward=backward, **kwargs)


def test_the_option_round_trips_through_get_config():
  layer = PuppeteerODE((4, 8), backward="reversible")
  assert layer.get_config()["backward"] == "reversible"
  assert PuppeteerODE.from_config(layer.get_config()).backward == "reversible"
  legacy = {k: v for k, v in layer.get_config().items() if k != "backward"}
  assert PuppeteerODE.from_config(legacy).backward == "auto"


@pytest.mark.parametrize("kwargs,want", [
    (dict(), "reversible"), (dict(normalization="batch"), "reversible"),
    (dict(remat=True), "autodiff"), (dict(loop_steps=True), "autodiff"),
    (dict(integrator="rk4"), "reversible"), (dict(integrator="midpoint"), "reversible"),
    (dict(normalization="state"), "autodiff")])
def test_auto_resolves_to_reversible_where_it_applies(kwargs, want):
  layer = PuppeteerODE((4, 8), **kwargs)
  assert layer.backward == "auto" and layer.training_backward == want
  assert PuppetCNNConfig().generator_backward == "auto"


def test_auto_follows_settings_changed_after_construction():
  layer = PuppeteerODE((4, 8), max_depth=2)
  layer.integrator = "midpoint"
  assert layer.training_backward == "reversible"
  layer.remat = True
  assert layer.training_backward == "autodiff"
