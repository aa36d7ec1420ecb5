"""DynamicConvStack against a float64 NumPy puppet, and its per-sample depth semantics."""
import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling.dynamic_conv_stack import DynamicConvStack
from tests.modeling import reference

CHANNELS = (4, 6)


def _stack(block_type="plain", max_depth=3):
  stack = DynamicConvStack(stage_channels=CHANNELS, block_type=block_type,
                           max_depth=max_depth)
  stack.build((None, 8, 8, 3))
  rng = np.random.default_rng(5)
  for w in stack.weights:  # non-trivial BN so the reference checks every parameter
    if "variance" in w.name:
      w.assign(rng.uniform(0.5, 2.0, w.shape).astype(np.float32))
    else:
      w.assign(rng.normal(scale=0.3, size=w.shape).astype(np.float32)
               + (1.0 if "gamma" in w.name else 0.0))
  return stack


def _kernels(stack, batch, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for shape, repeated in stack.kernel_shapes(3):
    k, _, _, c = shape
    out.append((rng.normal(size=(batch,) + shape).astype(np.float32),
                rng.normal(size=(batch, repeated, k, k, c, c)).astype(np.float32)))
  return out


def _np_bn(y, stack, s, prefix, row=None):
  gamma, beta, mean, var = [np.asarray(w.numpy(), np.float64) for w in stack.weights
                            if w.name.startswith(f"stage{s}_{prefix}_")]
  if row is not None:
    gamma, beta, mean, var = gamma[row], beta[row], mean[row], var[row]
  return (y - mean) / np.sqrt(var + stack.epsilon) * gamma + beta


def _np_forward(stack, x, kernels, depth):
  """Float64 per-sample loop over layers (inference mode)."""
  outs = []
  for b in range(len(x)):
    h = x[b].astype(np.float64)
    for s, (transition, repeated) in enumerate(kernels):
      h = np.maximum(_np_bn(reference.conv2d_same(h, transition[b]), stack, s, "transition"),
                     0)
      for u in range(1, depth[b]):
        if stack.block_type == "plain":
          y = _np_bn(reference.conv2d_same(h, repeated[b, u - 1]), stack, s, "repeated", u - 1)
          h = np.maximum(y, 0)
        else:
          r0, r1 = 2 * (u - 1), 2 * (u - 1) + 1
          y = np.maximum(_np_bn(reference.conv2d_same(h, repeated[b, r0]), stack, s,
                                "repeated", r0), 0)
          y = _np_bn(reference.conv2d_same(y, repeated[b, r1]), stack, s, "repeated", r1)
          h = np.maximum(y + h, 0)
      if stack.pool_after[s]:
        h = reference.max_pool_2x2_same(h)
    outs.append(h)
  return np.stack(outs)


def _as_lists(kernels):
  """The repeated kernels as a list of one (B, K, K, C, C) array per layer."""
  return [(t, [r[:, j] for j in range(r.shape[1])]) for t, r in kernels]


@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_matches_float64_reference(block_type, jit, as_list):
  """as_list: the repeated kernels given as a list of one tensor per layer."""
  stack = _stack(block_type)
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
  kernels = _kernels(stack, 3)
  depth = np.array([1, 3, 2], np.int32)
  fn = tf.function(lambda a, k, d: stack(a, k, d, training=False), jit_compile=jit)
  got = fn(x, _as_lists(kernels) if as_list else kernels, depth).numpy()
  want = _np_forward(stack, x, kernels, depth)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_repeated_kernels_as_a_list_train_as_the_stack_does(block_type):
  """In training the list is read without stacking it (`backend_ops.layer_reader`): the
  same features and the same gradients, per layer, as the stacked kernels'."""
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
  depth = np.array([1, 3, 2], np.int32)
  kernels = [(tf.constant(t), tf.constant(r)) for t, r in _kernels(_stack(block_type), 3)]

  def run(as_list):
    stack = _stack(block_type)

    @tf.function
    def step(kernels):
      with tf.GradientTape() as tape:
        tape.watch(kernels)
        given = [(t, tf.unstack(r, axis=1)) if as_list else (t, r) for t, r in kernels]
        out = stack(x, given, depth, training=True)
        loss = tf.reduce_sum(tf.sin(out))
      return out, tape.gradient(loss, kernels)
    return step(kernels)

  (out_s, grads_s), (out_l, grads_l) = run(False), run(True)
  np.testing.assert_allclose(out_l.numpy(), out_s.numpy(), rtol=1e-5, atol=1e-6)
  for (ts, rs), (tl, rl) in zip(grads_s, grads_l):
    np.testing.assert_allclose(tl.numpy(), ts.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl.numpy(), rs.numpy(), rtol=1e-5, atol=1e-6)
  # Depth 3 is the deepest: the second stage's last repeated layer has a gradient; no
  # sample reaches beyond the layers it has.
  assert np.abs(grads_l[1][1].numpy()[:, -1]).max() > 0


@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_folded_batch_norm_groups_match_float64_reference(block_type):
  # Inference with each layer's BN scale folded into its kernels (the kernel cache's form):
  # two groups of different depths, against the float64 loop that applies BN to activations.
  stack = _stack(block_type)
  x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype(np.float32)
  kernels = _kernels(stack, 2, seed=3)
  depth = [3, 2]
  affine = stack.inference_affine()
  layers = stack.kernels_per_unit
  groups = [stack.fold_kernels([(t[g], r[g]) for t, r in kernels], affine,
                               layers=(depth[g] - 1) * layers) for g in range(2)]
  assert [len(r) for _, r in groups[1]] == [layers] * len(CHANNELS)
  fn = tf.function(lambda a, b: stack.call_groups([a, b], groups, depth, training=False,
                                                  nonempty=True, folded=affine))
  got = [o.numpy() for o in fn(x[:2], x[2:])]
  want = _np_forward(stack, x, [(np.repeat(t, [2, 1], 0), np.repeat(r, [2, 1], 0))
                                for t, r in kernels], np.array([3, 3, 2]))
  got = np.concatenate(got)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  # The same folded kernels through `call_indexed` (bucketed inference's loop), per group.
  got = np.concatenate([_run_indexed(stack, x[:2], groups[0], 3, affine),
                        _run_indexed(stack, x[2:], groups[1], 2, affine)])
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  with pytest.raises(ValueError, match="inference"):
    stack.call_groups([x], groups[:1], [3], training=True, folded=affine)


@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_layers_past_a_samples_depth_do_not_touch_it(block_type):
  stack = _stack(block_type, max_depth=4)
  x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
  kernels = _kernels(stack, 2)
  depth = np.array([2, 4], np.int32)
  base = stack(x, kernels, depth).numpy()
  # Replace, for both samples, every kernel of units >= 2 (which sample 0, of depth 2, must
  # not use) by huge random values.
  kpu = stack.kernels_per_unit
  changed = []
  for transition, repeated in kernels:
    repeated = repeated.copy()
    repeated[:, kpu:] = 1e3 * np.random.default_rng(3).normal(size=repeated[:, kpu:].shape)
    changed.append((transition, repeated))
  after = stack(x, changed, depth).numpy()
  np.testing.assert_array_equal(after[0], base[0])
  assert np.abs(after[1] - base[1]).max() > 1e-3  # sample 1 does use them


def _moving(stack, name):
  return [w for w in stack.weights if w.name == name][0].numpy()


def test_batch_statistics_count_only_active_samples():
  # momentum 0: after one training call the moving statistics are that call's batch stats.
  stack = DynamicConvStack(stage_channels=(2,), max_depth=2, momentum=0.0, pool_after=(False,))
  stack.build((None, 4, 4, 1))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
  k_t = rng.normal(size=(2, 3, 3, 1, 2)).astype(np.float32)
  k_r = rng.normal(size=(2, 1, 3, 3, 2, 2)).astype(np.float32)
  stack(x, [(k_t, k_r)], np.array([1, 2], np.int32), training=True)
  # Transition layer: statistics over both samples.
  t = np.stack([reference.conv2d_same(x[b], k_t[b]) for b in range(2)])
  np.testing.assert_allclose(_moving(stack, "stage0_transition_moving_mean"),
                             t.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Repeated layer: statistics over sample 1 alone (sample 0 has depth 1).
  h = np.maximum((t - t.mean(axis=(0, 1, 2))) / np.sqrt(t.var(axis=(0, 1, 2)) + 1e-3), 0)
  r = reference.conv2d_same(h[1], k_r[1, 0])
  np.testing.assert_allclose(_moving(stack, "stage0_repeated_moving_mean")[0],
                             r.mean(axis=(0, 1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(_moving(stack, "stage0_repeated_moving_variance")[0],
                             r.var(axis=(0, 1)), rtol=1e-4, atol=1e-6)


def test_stores_no_conv_kernels():
  stack = _stack("residual", max_depth=5)
  names = [w.name for w in stack.weights]
  assert names and all(any(t in n for t in ("gamma", "beta", "moving")) for n in names)
  # One BN per layer index: 2 stages x (1 transition + 4 units x 2 convs) x 4 vectors.
  assert sum(int(np.prod(w.shape)) for w in stack.weights) == 4 * (4 + 8 * 4) + 4 * (6 + 8 * 6)


def test_generated_kernel_params_by_hand():
  stack = DynamicConvStack(stage_channels=(4, 6), max_depth=3)
  # depth 2: (3*3*3*4 + 1*3*3*4*4) + (3*3*4*6 + 1*3*3*6*6) = 108 + 144 + 216 + 324
  assert stack.generated_kernel_params(3, 2) == 792


def test_wrong_kernel_shapes_are_reported():
  stack = _stack()
  x = np.zeros((2, 8, 8, 3), np.float32)
  kernels = _kernels(stack, 2)
  with pytest.raises(ValueError, match="stage 1: transition kernel"):
    stack(x, [kernels[0], (kernels[0][0], kernels[1][1])], np.array([1, 1]))
  with pytest.raises(ValueError, match="2 stages"):
    stack(x, kernels[:1], np.array([1, 1]))
  as_lists = _as_lists(kernels)
  with pytest.raises(ValueError, match="stage 0: repeated kernels as a list must be 2 "):
    stack(x, [(as_lists[0][0], as_lists[0][1][:1]), as_lists[1]], np.array([1, 1]))


@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_kernel_rows_gather_each_samples_row(block_type):
  """`kernel_rows`: R rows of kernels (float16 here), sample b running with row rows[b],
  against the float64 loop given NumPy's per-sample kernels (the float16 values), eagerly and
  XLA-compiled; in training the loss and the gradient of each row equal those of the
  per-sample kernels summed over the samples that use the row."""
  stack = _stack(block_type)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  table = [tuple(k.astype(np.float16) for k in pair) for pair in _kernels(stack, 3, seed=2)]
  rows, depth = np.array([2, 0, 2, 1], np.int32), np.array([3, 1, 2, 3], np.int32)
  per_sample = [tuple(k[rows].astype(np.float32) for k in pair) for pair in table]
  want = _np_forward(stack, x, per_sample, depth)
  for jit in (False, True):
    fn = tf.function(lambda a, k, d, r: stack(a, k, d, training=False, kernel_rows=r),
                     jit_compile=jit)
    got = fn(x, table, depth, rows).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5

  table = [tuple(tf.constant(k.astype(np.float32)) for k in pair) for pair in table]
  with tf.GradientTape() as tape:
    tape.watch(table)
    loss = tf.reduce_sum(stack(x, table, depth, training=True, kernel_rows=rows) ** 2)
  grads = tape.gradient(loss, table)
  per_sample = [tuple(tf.constant(k) for k in pair) for pair in per_sample]
  with tf.GradientTape() as tape:
    tape.watch(per_sample)
    want_loss = tf.reduce_sum(stack(x, per_sample, depth, training=True) ** 2)
  want_grads = tape.gradient(want_loss, per_sample)
  assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
  for got_pair, want_pair in zip(grads, want_grads):
    for g, w in zip(got_pair, want_pair):
      w = tf.math.unsorted_segment_sum(w, rows, 3).numpy()  # the samples of each row, summed
      np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), w,
                                 atol=1e-5 * np.abs(w).max())


def test_bad_kernel_rows_are_reported():
  stack = _stack()
  x = np.zeros((2, 8, 8, 3), np.float32)
  kernels, depth = _kernels(stack, 3), np.array([1, 1])
  with pytest.raises(ValueError, match=r"kernel_rows must be \(batch,\) = \(2,\)"):
    stack(x, kernels, depth, kernel_rows=np.array([0, 1, 2], np.int32))
  with pytest.raises(TypeError, match="kernel_rows must be integers"):
    stack(x, kernels, depth, kernel_rows=np.array([0.0, 1.0], np.float32))
  with pytest.raises(ValueError, match="transition kernels have 3 rows and the repeated ones 2"):
    stack(x, [kernels[0], (kernels[1][0], kernels[1][1][:2])], depth,
          kernel_rows=np.array([0, 1], np.int32))
  with pytest.raises(ValueError, match=r"transition kernel must be \(rows,\)"):
    stack(x, [kernels[0], (kernels[0][0], kernels[1][1])], depth,
          kernel_rows=np.array([0, 1], np.int32))


def test_config_round_trip():
  stack = DynamicConvStack(stage_channels=(8, 16, 32), block_type="residual", max_depth=6,
                           pool_after=(True, False, True))
  assert DynamicConvStack.from_config(stack.get_config()).get_config() == stack.get_config()


def _np_forward_mapped(stack, x, kernels, depth, rows, channels):
  """Float64 reference with a batch-norm row per repeated layer and resized BN parameters."""
  def bn(y, s, prefix, row=None):
    params = [np.asarray(w.numpy(), np.float64) for w in stack.weights
              if w.name.startswith(f"stage{s}_{prefix}_")]
    if row is not None:
      params = [p[row] for p in params]
    gamma, beta, mean, var = [reference.adaptive_avg_pool_1d(p[:, None], channels[s])[:, 0]
                              for p in params]
    return (y - mean) / np.sqrt(var + stack.epsilon) * gamma + beta

  outs = []
  for b in range(len(x)):
    h = x[b].astype(np.float64)
    for s, (transition, repeated) in enumerate(kernels):
      h = np.maximum(bn(reference.conv2d_same(h, transition[b]), s, "transition"), 0)
      for u in range(1, depth[b]):
        y = bn(reference.conv2d_same(h, repeated[b, u - 1]), s, "repeated", rows[u - 1])
        h = np.maximum(y, 0)
      if stack.pool_after[s]:
        h = reference.max_pool_2x2_same(h)
    outs.append(h)
  return np.stack(outs)


def _run_indexed(stack, x, group, depth, affine, **kwargs):
  """`call_indexed` of one group (folded kernels), its depth a tensor, in a tf.function."""
  tables = [(t, tf.stack(r)) for t, r in group]

  @tf.function
  def run(x, depth):
    return stack.call_indexed(
        x, lambda s, j: tables[s][0] if j is None else tf.gather(tables[s][1], j), depth,
        affine, **kwargs)
  return run(x, tf.constant(depth, tf.int32)).numpy()


@pytest.mark.parametrize("mode", ["masked", "groups", "folded", "indexed"])
def test_more_units_with_mapped_rows_and_narrower_width_match_reference(mode):
  # Trained for 3 units per stage (2 BN rows); run with 5 repeated units mapped to rows
  # [0, 0, 1, 1, 1] at widths (2, 3) instead of (4, 6).
  stack = _stack("plain", max_depth=3)
  rows, channels, units = [0, 0, 1, 1, 1], (2, 3), 5
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  kernels, c_prev = [], 3
  for c in channels:
    kernels.append((rng.normal(size=(3, 3, 3, c_prev, c)).astype(np.float32),
                    rng.normal(size=(3, units, 3, 3, c, c)).astype(np.float32)))
    c_prev = c
  depth = np.array([1, 4, 6], np.int32)
  want = _np_forward_mapped(stack, x, kernels, depth, rows, channels)
  kwargs = dict(units=units, bn_rows=rows, channels=channels)
  if mode != "masked":
    affine = stack.inference_affine(**kwargs) if mode in ("folded", "indexed") else None
    got = []
    for b in range(3):
      group = [(t[b], [r[b, j] for j in range(units)]) for t, r in kernels]
      if affine is not None:
        group = stack.fold_kernels(group, affine)
      if mode == "indexed":  # the depth a tensor, a while loop over the layers
        got.append(_run_indexed(stack, x[b:b + 1], group, int(depth[b]), affine, **kwargs))
        continue
      got.append(stack.call_groups([x[b:b + 1]], [group], [int(depth[b])], folded=affine,
                                   **kwargs)[0].numpy())
    got = np.concatenate(got)
  else:
    got = stack(x, kernels, depth, **kwargs).numpy()
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_other_width_in_training_leaves_moving_statistics_alone():
  stack = _stack("plain", max_depth=3)
  before = [w.numpy().copy() for w in stack.non_trainable_weights]
  rng = np.random.default_rng(8)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  kernels = [(rng.normal(size=(2, 3, 3, 3, 2)).astype(np.float32),
              rng.normal(size=(2, 2, 3, 3, 2, 2)).astype(np.float32)),
             (rng.normal(size=(2, 3, 3, 2, 3)).astype(np.float32),
              rng.normal(size=(2, 2, 3, 3, 3, 3)).astype(np.float32))]
  stack(x, kernels, np.array([3, 3], np.int32), training=True, channels=(2, 3))
  for w, old in zip(stack.non_trainable_weights, before):
    np.testing.assert_array_equal(w.numpy(), old)


def test_shared_rows_get_the_mean_of_their_batch_statistics():
  # momentum 0 and two repeated layers sharing row 0: its moving mean is the mean of both.
  stack = DynamicConvStack(stage_channels=(2,), max_depth=2, momentum=0.0, pool_after=(False,))
  stack.build((None, 4, 4, 1))
  rng = np.random.default_rng(9)
  x = rng.normal(size=(1, 4, 4, 1)).astype(np.float32)
  k_t = rng.normal(size=(1, 3, 3, 1, 2)).astype(np.float32)
  k_r = rng.normal(size=(1, 2, 3, 3, 2, 2)).astype(np.float32)
  stack(x, [(k_t, k_r)], np.array([3], np.int32), training=True, units=2, bn_rows=[0, 0])
  t = reference.conv2d_same(x[0], k_t[0])
  norm = lambda y: (y - y.mean(axis=(0, 1))) / np.sqrt(y.var(axis=(0, 1)) + 1e-3)  # gamma 1
  h1 = np.maximum(norm(t), 0)
  r1 = reference.conv2d_same(h1, k_r[0, 0])
  r2 = reference.conv2d_same(np.maximum(norm(r1), 0), k_r[0, 1])
  np.testing.assert_allclose(_moving(stack, "stage0_repeated_moving_mean")[0],
                             (r1.mean(axis=(0, 1)) + r2.mean(axis=(0, 1))) / 2,
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="batch-norm rows"):
    stack(x, [(k_t, k_r)], np.array([3], np.int32), units=2, bn_rows=[0, 1])


@pytest.mark.parametrize("f_in,f_out", [(1, 2), (2, 2), (2, 1), (1, 1)])
def test_narrow_kernel_convolution_is_the_full_kernels(f_in, f_out):
  """A narrow kernel (the puppeteer's kernel_from_state(expand=False)) in a group layer is the
  convolution with the full kernel, whose channel i / o is the narrow one's i // f_in /
  o // f_out: against a float64 convolution with the explicitly repeated kernel."""
  rng = np.random.default_rng(11)
  c_in, c_out = 3, 2
  x = rng.normal(size=(2, 5, 4, c_in * f_in)).astype(np.float32)
  narrow = rng.normal(size=(3, 3, c_in, c_out)).astype(np.float32)
  full = np.repeat(np.repeat(narrow, f_in, axis=2), f_out, axis=3)
  stack = DynamicConvStack(stage_channels=(c_out * f_out,), max_depth=1)
  for k in (narrow, narrow[None]):
    got = stack._conv(tf.constant(x), tf.constant(k), c_out * f_out,
                      guard=backend_ops.empty_guard(len(x)))
    want = np.stack([reference.conv2d_same(v.astype(np.float64), full) for v in x])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="integer multiples"):
    stack._conv(tf.constant(x), tf.constant(narrow), c_out * f_out + 1)


def _low(dtype):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]


def _stack_like(stack, conv_dtype):
  """A stack with `stack`'s settings and weights and another conv_dtype."""
  other = DynamicConvStack.from_config(dict(stack.get_config(), conv_dtype=conv_dtype))
  other.build((None, 8, 8, 3))
  for mine, theirs in zip(other.weights, stack.weights):
    mine.assign(theirs)
  return other


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("block_type", ["plain", "residual"])
def test_conv_dtype_matches_float64_reference_rounded_at_the_same_points(block_type, dtype):
  """conv_dtype: each convolution's input, kernel and output rounded to 16 bits, everything
  else float32. Against the float64 loop with the same three roundings per convolution
  (ml_dtypes), and far from the unrounded float64 loop (the rounding did happen)."""
  stack = _stack_like(_stack(block_type), dtype)
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
  kernels = [(0.3 * t, 0.3 * r) for t, r in _kernels(stack, 3)]  # float16 stays finite
  depth = np.array([1, 3, 2], np.int32)
  low = _low(dtype)
  exact = reference.conv2d_same
  rounded = lambda a: np.asarray(a).astype(low).astype(np.float64)  # pylint: disable=unnecessary-lambda-assignment
  want_unrounded = _np_forward(stack, x, kernels, depth)
  try:
    reference.conv2d_same = lambda h, k: rounded(exact(rounded(h), rounded(k)))
    want = _np_forward(stack, x, kernels, depth)
  finally:
    reference.conv2d_same = exact
  for jit in (False, True):
    fn = tf.function(lambda a, k, d: stack(a, k, d, training=False), jit_compile=jit)
    got = fn(x, kernels, depth).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).mean() / scale < 1e-6, jit
    assert np.abs(got - want).max() / scale < 1e-3, jit  # at most a 16-bit ulp here and there
    assert np.abs(got - want_unrounded).mean() / scale > 1e-5, jit


@pytest.mark.parametrize("path", ["call", "groups_training", "groups_folded", "indexed"])
def test_conv_dtype_reaches_every_convolution_of_every_path(path, monkeypatch):
  """Every convolution of each path gets bfloat16 input and kernel (a spy on the two conv
  ops), its output comes back float32, and the result is within bfloat16's precision of the
  float32 stack's."""
  stack32 = _stack("residual")
  stack = _stack_like(stack32, "bfloat16")
  x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
  kernels = [(0.3 * t, 0.3 * r) for t, r in _kernels(stack, 2, seed=3)]
  depth = [3, 2]
  seen = []

  def spying(original):
    def spy(x, kernel, *args, **kwargs):
      seen.append((x.dtype.name, kernel.dtype.name))
      return original(x, kernel, *args, **kwargs)
    return spy

  def run(s):
    if path == "call":
      return s(x, kernels, np.array(depth, np.int32), training=False).numpy()
    if path == "groups_training":
      groups = [[(t[g], r[g]) for t, r in kernels] for g in range(2)]
      out = s.call_groups([x[:1], x[1:]], groups, depth, training=True)
      return np.concatenate([o.numpy() for o in out])
    affine = s.inference_affine()
    groups = [s.fold_kernels([(t[g], r[g]) for t, r in kernels], affine,
                             layers=(depth[g] - 1) * 2) for g in range(2)]
    if path == "groups_folded":
      out = s.call_groups([x[:1], x[1:]], groups, depth, training=False, nonempty=True,
                          folded=affine)
      return np.concatenate([o.numpy() for o in out])
    return np.concatenate([_run_indexed(s, x[g:g + 1], groups[g], depth[g], affine)
                           for g in range(2)])

  want = run(stack32)
  monkeypatch.setattr(backend_ops, "per_sample_conv2d", spying(backend_ops.per_sample_conv2d))
  monkeypatch.setattr(backend_ops, "group_conv2d", spying(backend_ops.group_conv2d))
  got = run(stack)
  assert seen and set(seen) == {("bfloat16", "bfloat16")}
  assert got.dtype == np.float32
  scale = np.abs(want).max()
  assert 1e-5 < np.abs(got - want).max() / scale < 5e-2


def test_conv_dtype_config_and_errors():
  stack = DynamicConvStack(stage_channels=(4,), conv_dtype="float16")
  assert DynamicConvStack.from_config(stack.get_config()).conv_dtype == "float16"
  with pytest.raises(ValueError, match="conv_dtype must be one of"):
    DynamicConvStack(stage_channels=(4,), conv_dtype="int8")
