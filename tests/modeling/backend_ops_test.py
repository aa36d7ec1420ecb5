"""Backend-specific ops against float64 loops and TensorFlow's plain per-sample ops."""
import functools

import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.modeling import backend_ops
from tests.modeling import reference


def _data(b=3, h=6, w=5, ci=4, co=3, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, h, w, ci)).astype(np.float32)
  kernels = rng.normal(size=(b, k, k, ci, co)).astype(np.float32)
  return x, kernels


def _weighted_sum_grads(fn, x, kernel, w):
  """NumPy gradients of sum(fn(x, kernel) * w) with respect to x and kernel."""
  xv, kv = tf.constant(x), tf.constant(kernel)
  with tf.GradientTape() as tape:
    tape.watch([xv, kv])
    loss = tf.reduce_sum(fn(xv, kv) * w)
  return [g.numpy() for g in tape.gradient(loss, [xv, kv])]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("method", ["grouped", "im2col"])
def test_per_sample_conv_matches_float64_loop(jit, k, method):
  x, kernels = _data(k=k)
  fn = tf.function(lambda a, b: backend_ops.per_sample_conv2d(a, b, method), jit_compile=jit)
  got = fn(tf.constant(x), tf.constant(kernels)).numpy()
  want = np.stack([reference.conv2d_same(x[b], kernels[b]) for b in range(len(x))])
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 1e-5


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method", ["grouped", "im2col"])
def test_per_sample_conv_gradients_match_per_sample_tf_conv(jit, method):
  x, kernels = _data(seed=1)
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 6, 5, 3)).astype(np.float32)

  def grads(fn):
    return _weighted_sum_grads(fn, x, kernels, w)

  def loop(xv, kv):  # TensorFlow's ordinary conv, one sample at a time
    return tf.concat([tf.nn.conv2d(xv[b:b + 1], kv[b], 1, "SAME") for b in range(3)], 0)

  got = grads(tf.function(lambda a, b: backend_ops.per_sample_conv2d(a, b, method),
                          jit_compile=jit))
  want = grads(loop)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_per_sample_conv_rejects_even_kernels():
  x, kernels = _data(k=2)
  with pytest.raises(ValueError, match="odd"):
    backend_ops.per_sample_conv2d(x, kernels)
  x, kernels = _data(k=3)
  with pytest.raises(ValueError, match="method must be one of"):
    backend_ops.per_sample_conv2d(x, kernels, "winograd")


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("method,jit", [("conv", False), ("shifted", False), ("shifted", True),
                                        ("auto", True)])
def test_depthwise_conv_same_matches_float64_loop(k, method, jit):
  """G's depthwise conv, as the backend's op or as shifted copies (XLA's choice under 'auto'),
  against a float64 loop; its gradients against TensorFlow's depthwise conv."""
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 7, 5, 4)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 4, 1)).astype(np.float32)
  fn = tf.function(lambda a, b: backend_ops.depthwise_conv_same(a, b, method), jit_compile=jit)
  got = fn(tf.constant(x), tf.constant(kernel)).numpy()
  want = np.stack([reference.depthwise_same(x[n], kernel) for n in range(2)])
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  w = rng.normal(size=(2, 7, 5, 4)).astype(np.float32)
  for g, r in zip(_weighted_sum_grads(fn, x, kernel, w), _weighted_sum_grads(
      lambda a, b: tf.nn.depthwise_conv2d(a, b, [1, 1, 1, 1], "SAME"), x, kernel, w)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_same_even_kernel_pads_like_same_and_rejects_bad_methods():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(1, 6, 4, 3)).astype(np.float32)
  kernel = rng.normal(size=(2, 2, 3, 1)).astype(np.float32)
  want = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME").numpy()  # odd pad after
  np.testing.assert_allclose(backend_ops.depthwise_conv_same(x, kernel, "shifted").numpy(),
                             want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="method must be one of"):
    backend_ops.depthwise_conv_same(x, kernel, "fft")


def test_batched_histogram_matches_numpy_and_compiles():
  rng = np.random.default_rng(3)
  levels = rng.integers(0, 16, (4, 50)).astype(np.int32)
  want = np.stack([np.bincount(r, minlength=16) for r in levels])
  eager = backend_ops.batched_histogram(levels, 16).numpy()
  compiled = tf.function(lambda v: backend_ops.batched_histogram(v, 16),
                         jit_compile=True)(tf.constant(levels)).numpy()
  np.testing.assert_array_equal(eager, want)
  np.testing.assert_array_equal(compiled, want)


def test_bounded_while_loop_stops_early_and_respects_bound():
  calls = tf.Variable(0)

  def body(i, total):
    calls.assign_add(1)
    return i + 1, total + i

  @tf.function
  def run(limit):
    return backend_ops.bounded_while_loop(lambda i, _: i < limit, body,
                                          (tf.constant(0), tf.constant(0)), 5)

  i, total = run(tf.constant(3))
  assert (int(i), int(total), int(calls.numpy())) == (3, 0 + 1 + 2, 3)
  i, total = run(tf.constant(100))  # capped at 5 iterations
  assert (int(i), int(total)) == (5, 10)


def test_sequential_while_loop_values_and_no_overlapping_iterations():
  # Fibonacci pairs against a Python loop, with an early exit and a bound.
  def run(limit, bound):
    return backend_ops.sequential_while_loop(
        lambda i, a, b: a < limit, lambda i, a, b: (i + 1, b, a + b),
        (tf.constant(0), tf.constant(0), tf.constant(1)), maximum_iterations=bound)

  i, a, b = [int(v) for v in run(50, 100)]
  want = (0, 0, 1)
  while want[1] < 50:
    want = (want[0] + 1, want[2], want[1] + want[2])
  assert (i, a, b) == want == (10, 55, 89)
  assert [int(v) for v in run(50, 4)] == [4, 3, 5]
  graph = tf.function(lambda: run(50, 100)).get_concrete_function().graph.as_graph_def()
  loops = [n for n in graph.node if n.op in ("While", "StatelessWhile")]
  assert loops and all(n.attr["parallel_iterations"].i == 1 for n in loops)


def test_selector_returns_each_tensor_without_a_branch_per_tensor():
  rng = np.random.default_rng(0)
  # Tables of different lengths (bins of different depths), one of them empty.
  tables = [rng.standard_normal((n, 3, 3, 2, 4)).astype(np.float32) for n in (2, 0, 5, 1)]
  select = backend_ops.selector([tf.constant(t) for t in tables])
  for i, t in enumerate(tables):
    np.testing.assert_array_equal(select(tf.constant(i)).numpy(), t)
  fn = tf.function(lambda i, j: select(i)[j])
  concrete = fn.get_concrete_function(tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32))
  assert concrete.structured_outputs.shape.as_list() == [3, 3, 2, 4]  # shared dims kept
  for i, t in enumerate(tables):
    for j in range(len(t)):
      np.testing.assert_array_equal(fn(tf.constant(i), tf.constant(j)).numpy(), t[j])
  graph = concrete.graph.as_graph_def()
  assert not graph.library.function  # no branch functions
  assert not [n for n in graph.node if n.op in ("Case", "StatelessCase", "If", "StatelessIf")]
  one = tf.constant(tables[0])
  assert backend_ops.selector([one])(tf.constant(0)) is one
  with pytest.raises(ValueError, match="share a rank and a dtype"):
    backend_ops.selector([tf.zeros((2, 3)), tf.zeros((2, 3), tf.int8)])
  with pytest.raises(ValueError, match="at least one tensor"):
    backend_ops.selector([])


@pytest.mark.parametrize("graph,axis", [(False, 0), (True, 0), ("xla", 0), (True, 1),
                                        (False, "list"), (True, "list"), ("xla", "list")])
def test_layer_reader_reads_layers_in_a_loop_and_routes_their_gradients(graph, axis):
  """Inside a bounded while loop that reads layers 0, 1, 1, 3 of four (layer 2 never), the
  reads are the stacked slices, and the gradient of sum_i w_i * f(read(j_i)) with respect
  to the stack is, written out, w_i * f'(stack[j_i]) summed into row j_i, zero in row 2.
  axis 'list': the reader gets the four layers as a list."""
  rng = np.random.default_rng(5)
  stacked = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
  order = np.array([0, 1, 1, 3], np.int32)
  weights = rng.uniform(0.5, 2.0, size=4).astype(np.float32)

  def loss_and_reads(stack):
    if axis == "list":
      read = backend_ops.layer_reader([stack[j] for j in range(4)])
    else:
      read = backend_ops.layer_reader(tf.experimental.numpy.moveaxis(stack, 0, axis), axis)

    def body(i, total, reads):
      layer = read(tf.gather(order, i))
      total = total + tf.gather(weights, i) * tf.reduce_sum(tf.sin(layer))
      return i + 1, total, tf.tensor_scatter_nd_update(reads, [[i]], layer[None])

    _, total, reads = backend_ops.bounded_while_loop(
        lambda i, *_: i < 4, body, (tf.constant(0), tf.constant(0.0), tf.zeros((4, 2, 3, 3))),
        maximum_iterations=4)
    return total, reads

  def run(stack):
    with tf.GradientTape() as tape:
      tape.watch(stack)
      total, reads = loss_and_reads(stack)
    return reads, tape.gradient(total, stack)

  if graph:
    run = tf.function(run, jit_compile=graph == "xla", autograph=False)
  reads, grad = run(tf.constant(stacked))
  np.testing.assert_array_equal(reads.numpy(), stacked[order])
  want = np.zeros(stacked.shape, np.float64)
  for i, j in enumerate(order):
    want[j] += weights[i] * np.cos(stacked[j].astype(np.float64))
  np.testing.assert_allclose(grad.numpy(), want, rtol=1e-5, atol=1e-6)
  assert not want[2].any()


@pytest.mark.parametrize("graph", [False, True])
def test_vjp_is_the_transposed_jacobian_product(graph):
  """Against the written-out products: a pooling (linear: J^T c is c spread over each pool),
  an elementwise square (2 x c) and a constant (zeros)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 6)).astype(np.float32)
  c_pool = rng.normal(size=(2, 4, 3)).astype(np.float32)
  c_full = rng.normal(size=x.shape).astype(np.float32)

  def pool(t):
    return tf.reduce_mean(tf.reshape(t, (2, 4, 3, 2)), axis=-1)

  def products(x, c_pool, c_full):
    return (backend_ops.vjp(pool, x, c_pool),
            backend_ops.vjp(tf.square, x, c_full),
            backend_ops.vjp(lambda t: tf.ones((3,)), x, tf.ones((3,))))

  fn = tf.function(products, autograph=False) if graph else products
  got_pool, got_square, got_const = fn(tf.constant(x), tf.constant(c_pool),
                                       tf.constant(c_full))
  np.testing.assert_allclose(got_pool.numpy(), np.repeat(c_pool, 2, axis=-1) / 2, rtol=1e-6)
  np.testing.assert_allclose(got_square.numpy(), 2 * x * c_full, rtol=1e-6)
  np.testing.assert_array_equal(got_const.numpy(), np.zeros_like(x))


def test_check_passes_values_and_raises_with_the_message():
  x = tf.constant([1.0, 2.0])
  assert backend_ops.check(tf.constant(True), x, "never").numpy().tolist() == [1.0, 2.0]
  with pytest.raises(ValueError, match="bins are missing"):
    backend_ops.check(tf.constant(False), x, "bins are missing")
  fn = tf.function(lambda ok: backend_ops.check(ok, x, "bins are missing") * 2)
  assert fn(tf.constant(True)).numpy().tolist() == [2.0, 4.0]
  with pytest.raises(tf.errors.InvalidArgumentError, match="bins are missing"):
    fn(tf.constant(False))


def test_check_images_messages():
  with pytest.raises(ValueError, match="NaN or infinite"):
    backend_ops.check_images(np.array([[np.nan]], np.float32), 255.0)
  with pytest.raises(ValueError, match="raw pixels"):
    backend_ops.check_images(np.array([[-1.5]], np.float32), 255.0)
  ok = np.array([[0.0, 255.0]], np.float32)
  assert backend_ops.check_images(ok, 255.0) is ok


def test_check_images_in_graph_raises_with_message():
  fn = tf.function(lambda x: backend_ops.check_images(x, 255.0))
  with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
    fn(tf.constant([[np.inf]], tf.float32))


@pytest.mark.parametrize("compiled", [False, True])
def test_group_ops_with_empty_and_nonempty_groups(compiled):
  """Bucketed groups may be empty. oneDNN's Conv2D returns (0, H, W, C_in) for an empty batch
  and its max-pool gradient aborts; the group ops must give (0, H', W', C_out), the float64
  references for the non-empty group, and the gradients of the non-empty group alone."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  w_conv = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
  w_pool = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)

  def run(empty, full, k):
    with tf.GradientTape() as tape:
      tape.watch([full, k])
      convs = [backend_ops.group_conv2d(empty, k), backend_ops.group_conv2d(full, k)]
      pools = [backend_ops.group_max_pool(y) for y in convs]
      y, p = tf.concat(convs, 0), tf.concat(pools, 0)  # fails if the shapes disagree
      loss = tf.reduce_sum(y * w_conv) + tf.reduce_sum(p * w_pool)
    return convs, pools, tape.gradient(loss, [full, k])

  fn = tf.function(run) if compiled else run
  empty = tf.zeros((0, 6, 5, 3))
  convs, pools, (g_x, g_k) = fn(empty, tf.constant(x), tf.constant(kernel))
  assert tuple(convs[0].shape) == (0, 6, 5, 4) and tuple(pools[0].shape) == (0, 3, 3, 4)
  want = np.stack([reference.conv2d_same(x[b], kernel) for b in range(2)])
  np.testing.assert_allclose(convs[1].numpy(), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pools[1].numpy(),
                             np.stack([reference.max_pool_2x2_same(v) for v in want]),
                             rtol=1e-4, atol=1e-4)
  # Gradients against plain TensorFlow ops on the non-empty group only.
  xv, kv = tf.constant(x), tf.constant(kernel)
  with tf.GradientTape() as tape:
    tape.watch([xv, kv])
    y = tf.nn.conv2d(xv, kv, 1, "SAME")
    loss = tf.reduce_sum(y * w_conv) + tf.reduce_sum(tf.nn.max_pool2d(y, 2, 2, "SAME") * w_pool)
  want_x, want_k = tape.gradient(loss, [xv, kv])
  np.testing.assert_allclose(g_x.numpy(), want_x.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_k.numpy(), want_k.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_group_conv_of_split_kernel_rows_with_an_empty_group(compiled):
  """Bucketed training splits a layer's generated kernels by bin: a bin gets one row
  (1, K, K, C_in, C_out) when occupied and zero rows when empty. The empty group must give
  (0, H, W, C_out) and an empty kernel gradient, the occupied one the float64 convolution and
  the gradients of plain TensorFlow ops, for the kernel tensor before the split as well."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
  kernels = rng.normal(size=(1, 3, 3, 2, 4)).astype(np.float32)  # one occupied bin
  w = rng.normal(size=(3, 5, 4, 4)).astype(np.float32)

  def run(xs, ks):
    with tf.GradientTape() as tape:
      tape.watch([xs, ks])
      empty_k, full_k = tf.split(ks, tf.constant([0, 1]), num=2, axis=0)
      ys = [backend_ops.group_conv2d(tf.zeros((0, 5, 4, 2)), empty_k),
            backend_ops.group_conv2d(xs, full_k)]
      loss = tf.reduce_sum(tf.concat(ys, 0) * w)
    return ys, tape.gradient(loss, [xs, ks])

  fn = tf.function(run) if compiled else run
  (y_empty, y_full), (g_x, g_k) = fn(tf.constant(x), tf.constant(kernels))
  assert tuple(y_empty.shape) == (0, 5, 4, 4)
  np.testing.assert_allclose(
      y_full.numpy(), np.stack([reference.conv2d_same(v, kernels[0]) for v in x]),
      rtol=1e-4, atol=1e-4)
  xv, kv = tf.constant(x), tf.constant(kernels[0])
  with tf.GradientTape() as tape:
    tape.watch([xv, kv])
    loss = tf.reduce_sum(tf.nn.conv2d(xv, kv, 1, "SAME") * w)
  want_x, want_k = tape.gradient(loss, [xv, kv])
  np.testing.assert_allclose(g_x.numpy(), want_x.numpy(), rtol=1e-4, atol=1e-4)
  assert tuple(g_k.shape) == (1, 3, 3, 2, 4)
  np.testing.assert_allclose(g_k.numpy()[0], want_k.numpy(), rtol=1e-4, atol=1e-4)


def test_group_ops_build_no_cond():
  """The empty-group handling is data flow, not a `tf.cond`: each cond put four functions
  (branches and their gradients) into a training graph (docs/benchmarks_no_cond.md)."""
  @functools.partial(tf.function, autograph=False)
  def step(x, k):
    with tf.GradientTape() as tape:
      tape.watch([x, k])
      loss = tf.reduce_sum(backend_ops.group_max_pool(backend_ops.group_conv2d(x, k)))
    return tape.gradient(loss, [x, k])

  graph = step.get_concrete_function(tf.TensorSpec((None, 4, 4, 2)),
                                     tf.TensorSpec((None, 3, 3, 2, 3))).graph
  op_types = {op.type for op in graph.get_operations()}
  assert not op_types & {"If", "StatelessIf"}, op_types
  assert not graph.as_graph_def().library.function


def test_group_ops_of_a_known_nonempty_group_match_the_references():
  """may_be_empty=False (bucketed inference, each bin under its own cond): no guard, the same
  float64 references, and one-row kernels (a partitioned kernel tensor) are accepted."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  want = np.stack([reference.conv2d_same(x[b], kernel) for b in range(3)])
  for k in (kernel, kernel[None]):
    got = backend_ops.group_conv2d(tf.constant(x), tf.constant(k), may_be_empty=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
  pooled = backend_ops.group_max_pool(tf.constant(want, tf.float32), may_be_empty=False)
  np.testing.assert_allclose(pooled.numpy(),
                             np.stack([reference.max_pool_2x2_same(v) for v in want]),
                             rtol=1e-4, atol=1e-4)


def test_recorded_loop_records_every_step_and_differentiates_like_a_python_loop():
  # carry (x, s) -> (x * w + i, s + x): the recorded carries and the gradient of a loss on
  # all of them against the same recurrence unrolled in float64 NumPy, with the gradient
  # d loss / d w from forward-mode differentiation of that recurrence.
  w0, x0, n = 0.9, np.array([1.0, -2.0, 0.5]), 5

  def reference():
    x, s, dx, ds, out, loss, dloss = x0.copy(), 0.0 * x0, 0.0 * x0, 0.0 * x0, [], 0.0, 0.0
    for i in range(n):
      x, s, dx, ds = x * w0 + i, s + x, dx * w0 + x, ds + dx
      out.append((x, s))
      loss, dloss = loss + np.sum(x ** 2) + np.sum(s), dloss + np.sum(2 * x * dx) + np.sum(ds)
    return out, loss, dloss

  w = tf.Variable(w0, dtype=tf.float32)

  @tf.function
  def run():
    with tf.GradientTape() as tape:
      steps = backend_ops.recorded_loop(
          lambda i, c: (c[0] * w + tf.cast(i, tf.float32), c[1] + c[0]),
          (tf.constant(x0, tf.float32), tf.zeros(3)), n)
      loss = sum(tf.reduce_sum(x ** 2) + tf.reduce_sum(s) for x, s in steps)
    return steps, loss, tape.gradient(loss, w)

  steps, loss, grad = run()
  want, want_loss, want_grad = reference()
  assert len(steps) == n
  for (x, s), (wx, ws) in zip(steps, want):
    np.testing.assert_allclose(x.numpy(), wx, rtol=1e-5)
    np.testing.assert_allclose(s.numpy(), ws, rtol=1e-5)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  assert float(grad) == pytest.approx(want_grad, rel=1e-4)
  assert backend_ops.recorded_loop(lambda i, c: c, (tf.zeros(1),), 0) == []


@pytest.mark.parametrize("compiled", [False, True])
def test_batch_norm_training_matches_float64_and_the_two_pass_gradient(compiled):
  """The fused training batch norm: float64 mean, population variance and normalized
  output; gradients equal to those of the two-pass moments; an empty batch gives (0, ...)
  and zero statistics, with finite gradients."""
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(5, 4, 3, 6)) * 3 + 1).astype(np.float32)
  gamma = rng.normal(size=(6,)).astype(np.float32)
  beta = rng.normal(size=(6,)).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  x64 = x.astype(np.float64)
  mean64 = x64.mean(axis=(0, 1, 2))
  var64 = x64.var(axis=(0, 1, 2))
  y64 = gamma * (x64 - mean64) / np.sqrt(var64 + 1e-3) + beta

  def run(xv, g, b, fused):
    with tf.GradientTape() as tape:
      tape.watch([xv, g, b])
      if fused:
        y, mean, var = backend_ops.batch_norm_training(xv, g, b, 1e-3)
      else:
        xc = xv - tf.reduce_mean(xv, axis=(0, 1, 2))
        var = tf.reduce_mean(tf.square(xc), axis=(0, 1, 2))
        mean = tf.reduce_mean(xv, axis=(0, 1, 2))
        y = g * xc / tf.sqrt(var + 1e-3) + b
      loss = tf.reduce_sum(y * tf.constant(w)[:tf.shape(xv)[0]])
    return y, mean, var, tape.gradient(loss, [xv, g, b])

  fn = tf.function(run, reduce_retracing=True) if compiled else run
  y, mean, var, grads = fn(tf.constant(x), tf.constant(gamma), tf.constant(beta), True)
  np.testing.assert_allclose(mean.numpy(), mean64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var.numpy(), var64, rtol=1e-4)
  np.testing.assert_allclose(y.numpy(), y64, rtol=1e-4, atol=1e-4)
  want = run(tf.constant(x), tf.constant(gamma), tf.constant(beta), False)[3]
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-3, atol=1e-4)
  y, mean, var, grads = fn(tf.constant(x[:0]), tf.constant(gamma), tf.constant(beta), True)
  assert tuple(y.shape) == (0, 4, 3, 6)
  assert not np.any(mean.numpy()) and not np.any(var.numpy())
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_matmul_in_dtype_rounds_operands_and_product_like_a_float64_reference(dtype):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  low = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 64)).astype(np.float32)
  w = rng.normal(size=(64, 48)).astype(np.float32)
  # Reference: operands rounded to 16 bits, an exact (float64) product, rounded to 16 bits.
  want = ((x.astype(low).astype(np.float64) @ w.astype(low).astype(np.float64))
          .astype(low).astype(np.float32))
  got = backend_ops.matmul_in_dtype(tf.constant(x), tf.constant(w), dtype)
  assert got.dtype == tf.float32
  full = backend_ops.matmul_in_dtype(tf.constant(x), tf.constant(w), "float32").numpy()
  ulp = np.abs(want) * {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}[dtype]
  # float32 accumulation may flip a rounding: at most one 16-bit ulp, and rarely.
  diff = np.abs(got.numpy() - want)
  assert np.all(diff <= ulp + 1e-6)
  assert np.mean(diff > 0) < 0.02
  # ...while float32 products differ from the rounded reference almost everywhere.
  assert np.mean(np.abs(full - want) > 0) > 0.5
