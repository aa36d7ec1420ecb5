"""The one place for backend-specific code.

Everything else in `official/puppet_cnn/modeling` is written with `keras.ops` and runs on any
Keras 3 backend. The operations here have no `keras.ops` equivalent with the semantics
we need, so each has a TensorFlow implementation and a portable (JAX-ready) one:

* `per_sample_conv2d`: a convolution whose kernel differs per sample. TensorFlow folds the
  batch into the channels and runs one grouped convolution (exact, XLA-compatible, and about
  1.3x a shared-kernel conv on CPU); other backends use `keras.ops.conv` per group via the same
  folding (JAX's conv takes `feature_group_count` from the shapes).
* `batched_histogram`: per-row value counts with a size fixed at trace time (XLA).
* `bounded_while_loop`: a loop with a compile-time bound and a data-dependent early exit.
  TensorFlow: `tf.while_loop(..., maximum_iterations=bound)`, which XLA compiles and which
  stops as soon as every sample in the batch has reached its depth. JAX's `while_loop` has no
  reverse-mode gradient, so elsewhere the loop runs all `bound` iterations with `fori_loop`;
  the bodies mask finished samples, so both give the same values.
* `partition` / `stitch` / `nonzero` (bucketed execution, TensorFlow only): split a batch
  into groups of data-dependent size and put the results back in the original order
  (`tf.dynamic_partition` / `tf.dynamic_stitch`, both differentiable). Dynamic shapes: no XLA
  (`in_xla_context` lets the caller raise a clear error), and no JAX (other backends get a
  clear error naming `execution='per_sample'`).
* `group_conv2d` / `group_max_pool`: an ordinary 'same' convolution / 2x2 max pool of one
  bucketed group, which may be empty. TensorFlow's oneDNN kernels (on by default on recent
  x86 CPUs) mishandle empty batches: Conv2D returns its input's channel count and the max-pool
  gradient aborts the process. An empty group gets one zero row appended (one dummy image,
  sliced off after; no `tf.cond`), a non-empty one runs on its own buffers.
* `batch_norm_training`: a training batch norm over N, H and W that returns the batch's mean
  and population variance. TensorFlow: one fused op (`FusedBatchNormV3`), whose gradient
  keeps only the input and the statistics (bucketed training, `fused_batch_norm`;
  TensorFlow only, as the other bucketed ops).
* `selector`: picks one of several stored tensors by a run-time index (bucketed inference:
  a cached bin's kernel table). TensorFlow: a TensorList and one `TensorListGetItem`, no
  copy and no function per tensor in the graph; elsewhere `keras.ops.switch`.
* `check_images`: a run-time check that raises a clear error for NaN, infinite or
  out-of-range pixels (eagerly: a ValueError; inside a TensorFlow graph: an
  InvalidArgumentError carrying the same message).
* `vjp`: the vector-Jacobian product of a function at a point, inside a hand-written
  backward pass (`reversible_trajectory`'s readouts). TensorFlow: a `GradientTape`; JAX:
  `jax.vjp`.
* `compiled_call`: one call of a layer's function compiled as a whole (the gathered kernel
  table's build). JAX: `jax.jit` with the layer's variables passed in through a
  `StatelessScope`; TensorFlow: eager, as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import DEPTHWISE_METHODS, PER_SAMPLE_CONVS


def backend() -> str:
  return keras.backend.backend()


def _fold_conv(x, kernels):
  """The grouped-convolution forward pass (batch folded into channels), 'same' padding."""
  height, width, c_in = x.shape[1], x.shape[2], x.shape[3]
  k, c_out = kernels.shape[1], kernels.shape[4]
  h_dyn, w_dyn = ops.shape(x)[1], ops.shape(x)[2]
  # (B, H, W, C) -> (1, H, W, B*C): channel index b*C_in + c, matching groups of size C_in.
  folded = ops.reshape(ops.transpose(x, (1, 2, 0, 3)), (1, h_dyn, w_dyn, -1))
  # (B, K, K, C_in, C_out) -> (K, K, C_in, B*C_out): output group b holds sample b's filters.
  filters = ops.reshape(ops.transpose(kernels, (1, 2, 3, 0, 4)), (k, k, c_in, -1))
  if backend() == "tensorflow":
    import tensorflow as tf
    y = tf.nn.conv2d(folded, filters, strides=1, padding="SAME")
  else:
    y = ops.conv(folded, filters, strides=1, padding="same")
  y = ops.reshape(y, (h_dyn, w_dyn, -1, c_out))
  y = ops.transpose(y, (2, 0, 1, 3))
  if height is not None and width is not None:
    y = ops.reshape(y, (-1, height, width, c_out))
  return y


def _tf_per_sample_conv2d(x, kernels):
  """TensorFlow: the grouped conv with an explicit gradient.

  TensorFlow's CPU `Conv2DBackpropFilter` rejects grouped convolutions, so the gradient is
  written out: dx is the grouped conv of dy with each sample's kernel flipped and transposed
  (exact for stride 1, odd K, 'same' padding); dW[b] = patches(x[b])^T dy[b].
  """
  import tensorflow as tf

  @tf.custom_gradient
  def conv(x, kernels):
    def grad(dy):
      k = kernels.shape[1]
      flipped = tf.transpose(tf.reverse(kernels, axis=[1, 2]), (0, 1, 2, 4, 3))
      dx = _fold_conv(dy, flipped)
      patches = tf.image.extract_patches(x, sizes=[1, k, k, 1], strides=[1, 1, 1, 1],
                                         rates=[1, 1, 1, 1], padding="SAME")
      dk = tf.einsum("bhwp,bhwo->bpo", patches, dy)
      return dx, tf.reshape(dk, tf.shape(kernels))
    return _fold_conv(x, kernels), grad

  return conv(x, kernels)


def _im2col_conv(x, kernels):
  """Each sample's K x K patches (B, H, W, K*K*C_in) times its flattened kernel: a batched
  matrix product. Portable (Keras ops; both differentiable); the patches are K*K times the
  input's size, and in training they are kept for the kernel's gradient."""
  k, c_in, c_out = kernels.shape[1], kernels.shape[3], kernels.shape[4]
  patches = ops.image.extract_patches(x, (k, k), strides=(1, 1), padding="same")
  # Patch entries are ordered (row, column, channel), as a (K, K, C_in) kernel flattens.
  return ops.einsum("bhwp,bpo->bhwo", patches, ops.reshape(kernels, (-1, k * k * c_in, c_out)))


def per_sample_conv2d(x, kernels, method: str = "grouped"):
  """Convolves sample b of `x` with `kernels[b]` (stride 1, 'same' padding).

  Args:
    x: (B, H, W, C_in) features.
    kernels: (B, K, K, C_in, C_out) one kernel per sample, K odd.
    method: 'grouped' (default): one grouped convolution, the batch folded into channels
      (TensorFlow with its gradient written out); 'im2col': patches and a batched matrix
      product (`_im2col_conv`): on XLA's CPU backend 2.6x faster at 4x4x512 and batch 64,
      as fast at 32x32x64 (docs/benchmarks_jax_cpu.md), at K*K times the input's memory. The
      same values.
  Returns:
    (B, H, W, C_out).
  """
  if kernels.shape[1] % 2 != 1 or kernels.shape[1] != kernels.shape[2]:
    raise ValueError(f"per_sample_conv2d needs square odd kernels, got {kernels.shape}")
  if method not in PER_SAMPLE_CONVS:
    raise ValueError(f"per_sample_conv2d: method must be one of {PER_SAMPLE_CONVS}, got "
                     f"{method!r}")
  if method == "im2col":
    return _im2col_conv(x, kernels)
  if backend() == "tensorflow":
    return _tf_per_sample_conv2d(x, kernels)
  return _fold_conv(x, kernels)


def depthwise_conv_same(x, kernel, method: str = "auto"):
  """Depthwise convolution, stride 1, 'same' padding: x (N, H, W, C), kernel (KH, KW, C, 1).

  method: 'conv': `keras.ops.depthwise_conv`. 'shifted': the sum over the KH*KW kernel
  taps of the zero-padded input shifted by the tap, times the tap's per-channel weight
  (padding as 'same' pads: the odd pixel after); plain pads, slices, multiplies and adds,
  which XLA fuses into one pass where its depthwise convolution is slow (its CPU backend).
  'auto': 'shifted' under XLA (the JAX backend, or `in_xla_context()`), else 'conv'. The
  same values up to float rounding (the taps are summed in another order).
  """
  if method not in DEPTHWISE_METHODS:
    raise ValueError(f"depthwise_conv_same: method must be one of {DEPTHWISE_METHODS}, got "
                     f"{method!r}")
  if method == "auto":
    method = "shifted" if backend() == "jax" or in_xla_context() else "conv"
  if method == "conv":
    return ops.depthwise_conv(x, kernel, strides=1, padding="same")
  kh, kw = kernel.shape[0], kernel.shape[1]
  return _shifted_taps(x, kernel, (kh - 1) // 2, (kw - 1) // 2)


def _shifted_taps(x, kernel, top: int, left: int):
  """sum over taps (i, j) of x zero-padded by (top, left) before (and the rest of the kernel
  after), shifted by the tap, times the tap's per-channel weight kernel[i, j, :, 0]."""
  kh, kw = kernel.shape[0], kernel.shape[1]
  padded = ops.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  h, w = ops.shape(x)[1], ops.shape(x)[2]
  out = None
  for i in range(kh):
    for j in range(kw):
      term = padded[:, i:i + h, j:j + w, :] * kernel[i, j, :, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv_same_transpose(dy, kernel, method: str = "auto"):
  """The gradient of `depthwise_conv_same(x, kernel)` with respect to x, given dy.

  TensorFlow outside XLA (`method` 'auto' or 'conv'): its native input gradient. Otherwise
  the correlation of dy, padded the other way round, with the kernel flipped in both spatial
  axes (for odd kernel sizes the padding is symmetric: `depthwise_conv_same(dy, flipped
  kernel, method)`).
  """
  if _native_depthwise_gradients(method):
    import tensorflow as tf
    return tf.nn.depthwise_conv2d_backprop_input(tf.shape(dy), kernel, dy, [1, 1, 1, 1],
                                                 "SAME")
  kh, kw = kernel.shape[0], kernel.shape[1]
  flipped = ops.flip(ops.flip(kernel, axis=0), axis=1)
  if kh % 2 and kw % 2:
    return depthwise_conv_same(dy, flipped, method)
  # The forward pass pads (kh - 1) // 2 before; its transpose pads the rest before.
  return _shifted_taps(dy, flipped, kh - 1 - (kh - 1) // 2, kw - 1 - (kw - 1) // 2)


def depthwise_conv_same_filter_grad(x, dy, kernel_shape, method: str = "auto"):
  """The gradient of `depthwise_conv_same(x, kernel)` with respect to the kernel, given dy.

  TensorFlow outside XLA (`method` 'auto' or 'conv'): its native filter gradient, zeroed for
  an empty batch (for which TensorFlow returns uninitialized memory). Otherwise, for each
  tap, the sum over batch and positions of the tap-shifted, zero-padded input times dy.
  """
  kh, kw, channels = int(kernel_shape[0]), int(kernel_shape[1]), int(kernel_shape[2])
  if _native_depthwise_gradients(method):
    import tensorflow as tf
    grad = tf.nn.depthwise_conv2d_backprop_filter(x, [kh, kw, channels, 1], dy, [1, 1, 1, 1],
                                                  "SAME")
    return tf.where(tf.shape(x)[0] > 0, grad, tf.zeros_like(grad))
  top, left = (kh - 1) // 2, (kw - 1) // 2
  padded = ops.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  h, w = ops.shape(x)[1], ops.shape(x)[2]
  taps = [ops.sum(padded[:, i:i + h, j:j + w, :] * dy, axis=(0, 1, 2))
          for i in range(kh) for j in range(kw)]
  return ops.reshape(ops.stack(taps), (kh, kw, channels, 1))


def _native_depthwise_gradients(method: str) -> bool:
  if method not in DEPTHWISE_METHODS:
    raise ValueError(f"depthwise method must be one of {DEPTHWISE_METHODS}, got {method!r}")
  return backend() == "tensorflow" and method != "shifted" and not in_xla_context()


def matmul_in_dtype(x, w, dtype: str = "float32"):
  """x @ w with both operands cast to `dtype` ('float32': x @ w as it is); the product is
  cast back to x's dtype.

  Portable (`keras.ops`). In bfloat16 or float16 the backend multiplies in that dtype and
  rounds the product to it (oneDNN and cuBLAS accumulate in float32); on CPUs with AMX or
  AVX512-BF16 and on GPUs with tensor cores that is several times float32's speed. The
  gradient of the casts and the product (autodiff) is computed in `dtype` as well.
  """
  if dtype == "float32":
    return ops.matmul(x, w)
  return ops.cast(ops.matmul(ops.cast(x, dtype), ops.cast(w, dtype)), x.dtype)


def after(x, dependency):
  """`x`, computed only once `dependency` is (TensorFlow graphs: a control dependency).

  A hand-written backward pass (`reversible_trajectory`) reads tensors saved by the forward
  pass; TensorFlow's executor would otherwise run every step's work on them as soon as the
  backward pass starts, holding all steps' temporaries at once, instead of one step at a
  time as the chain of gradients reaches it. Eagerly and on other backends (which execute
  in order or schedule for memory): `x` itself.
  """
  if backend() != "tensorflow" or not builds_tf_graph():
    return x
  import tensorflow as tf
  with tf.control_dependencies([dependency]):
    return tf.identity(x)


def vjp(fn, x, cotangent):
  """The gradient of `sum(fn(x) * cotangent)` with respect to `x`: the vector-Jacobian
  product of `fn` at `x`, for a hand-written backward pass that differentiates a function
  of one tensor (`reversible_trajectory`: a step's readout, inside the trajectory's custom
  gradient). A `fn` that does not depend on `x` gives zeros."""
  name = backend()
  if name == "tensorflow":
    import tensorflow as tf
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = fn(x)
    grad = tape.gradient(y, x, output_gradients=tf.convert_to_tensor(cotangent, y.dtype))
    return tf.zeros_like(x) if grad is None else grad
  if name == "jax":
    import jax
    _, pullback = jax.vjp(fn, x)
    return pullback(ops.convert_to_tensor(cotangent))[0]
  raise NotImplementedError(f"backend_ops.vjp: no implementation for the {name!r} backend "
                            "(TensorFlow and JAX have one)")


def batched_histogram(levels, bins: int):
  """Counts of each level in [0, bins) along the last axis of int32 (N, M) -> float32 (N, bins).

  TensorFlow: `DenseBincount` with a constant size (Keras's `ops.bincount` computes its size
  from the data, which XLA cannot compile).
  """
  if backend() == "tensorflow":
    import tensorflow as tf
    counts = tf.raw_ops.DenseBincount(input=tf.cast(levels, tf.int32),
                                      size=tf.constant(bins, tf.int32),
                                      weights=tf.zeros([0], tf.float32), binary_output=False)
    return tf.cast(counts, tf.float32)
  if backend() == "jax":
    import jax
    import jax.numpy as jnp
    # `length` makes the output size static, so this traces under `jax.jit`.
    count_row = lambda row: jnp.bincount(row, length=bins)  # pylint: disable=unnecessary-lambda-assignment
    return jax.vmap(count_row)(jnp.asarray(levels, jnp.int32)).astype(jnp.float32)
  # Other backends: a one-hot sum (static shapes, more memory).
  return ops.sum(ops.one_hot(ops.cast(levels, "int32"), bins, dtype="float32"), axis=-2)


def bounded_while_loop(cond, body, loop_vars, maximum_iterations: int):
  """`while cond(*vars): vars = body(*vars)`, at most `maximum_iterations` times.

  `body` must leave every variable unchanged once `cond` is false (the callers mask finished
  samples), so that running all iterations gives the same values as stopping early.
  """
  loop_vars = tuple(loop_vars)
  if maximum_iterations <= 0:
    return loop_vars
  if backend() == "tensorflow":
    import tensorflow as tf
    return tuple(tf.while_loop(cond, lambda *v: tuple(body(*v)), loop_vars,
                               maximum_iterations=maximum_iterations))
  return tuple(ops.fori_loop(0, maximum_iterations, lambda _, v: tuple(body(*v)), loop_vars))


def sequential_while_loop(cond, body, loop_vars, maximum_iterations=None):
  """`keras.ops.while_loop` whose iterations never overlap.

  TensorFlow's `while_loop` runs up to 10 iterations at once by default: whatever in an
  iteration does not depend on the previous one starts early (in bucketed inference's layer
  loop: fetching and dequantizing the next layers' kernels, before the layers that use them
  run), and each such iteration's tensors are alive at once. `parallel_iterations=1` makes
  the loop's memory that of one iteration (docs/memory_profile.md). Other backends' loops
  are sequential.
  """
  if backend() == "tensorflow":
    import tensorflow as tf
    return tf.while_loop(cond, body, loop_vars, maximum_iterations=maximum_iterations,
                         parallel_iterations=1)
  return ops.while_loop(cond, body, loop_vars, maximum_iterations=maximum_iterations)


def recorded_loop(body, init, length: int):
  """`for i in range(length): carry = body(i, carry)`, returning every step's carry.

  Returns a list of `length` carries (each a structure like `init`); the last is the final
  one. TensorFlow: one `tf.while_loop` whose body is traced once, with each step's carry
  written to `TensorArray`s and read back per step (no stacking copy): the graph holds one
  step instead of `length` (`PuppeteerODE(loop_steps=True)`: G's repeated steps of a stage,
  in training with their gradient, docs/benchmarks_train_loop.md). Differentiable. The
  iterations never overlap (`parallel_iterations=1`): the steps depend on each other anyway,
  but in the loop's gradient each step recomputed under `keras.remat` does not, and running
  ten of them at once (TensorFlow's default) held about 200 MB more at batch 64. Executing
  eagerly and on other backends: a Python loop (the same values; no graph to shrink). `i` is
  an int32 scalar tensor in a TensorFlow graph and a Python int otherwise.
  """
  if length <= 0:
    return []
  if not builds_tf_graph():
    out, carry = [], init
    for i in range(length):
      carry = body(i, carry)
      out.append(carry)
    return out
  import tensorflow as tf
  flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(init)]
  arrays = [tf.TensorArray(t.dtype, size=length, element_shape=t.shape, clear_after_read=False)
            for t in flat]

  def step(i, carry, arrays):
    new = [tf.convert_to_tensor(t) for t in tf.nest.flatten(body(i, tf.nest.pack_sequence_as(
        init, carry)))]
    return i + 1, new, [a.write(i, t) for a, t in zip(arrays, new)]

  _, _, arrays = tf.while_loop(lambda i, *_: i < length, step,
                               (tf.constant(0, tf.int32), flat, arrays),
                               maximum_iterations=length, parallel_iterations=1)
  return [tf.nest.pack_sequence_as(init, [a.read(i) for a in arrays]) for i in range(length)]


def builds_tf_graph() -> bool:
  """Whether the caller is being traced into a TensorFlow graph (`tf.function`, Keras's
  compiled train and predict functions, a SavedModel), where a loop is one graph node
  instead of one set of nodes per iteration. False when executing eagerly and on other
  backends."""
  if backend() != "tensorflow":
    return False
  import tensorflow as tf
  return not tf.executing_eagerly()


def selector(tensors):
  """`select(index)` -> `tensors[index]` for an int32 scalar tensor `index`: picks one of
  several stored tensors (bucketed inference: one kernel table per cached bin) at run time.

  The tensors must share a dtype and a rank; their shapes may differ (the result's static
  shape keeps the dimensions they share). TensorFlow: the tensors go into one TensorList
  when `selector` is called (a list of references: nothing is copied) and `select` is one
  `TensorListGetItem`, which returns the chosen tensor itself. A `switch` with a branch per
  tensor gives the same values but puts one function per branch in the graph, each
  instantiated when the graph first runs: with 16 bins, 128 of them for the full puppet,
  about 100 MB more memory (docs/memory_profile.md). Other backends: `keras.ops.switch`,
  whose branches must then have equal shapes (bucketed execution, the only caller, is
  TensorFlow-only).
  """
  tensors = list(tensors)
  if not tensors:
    raise ValueError("selector needs at least one tensor")
  if len(tensors) == 1:
    return lambda index: tensors[0]
  if backend() != "tensorflow":
    return lambda index: ops.switch(index, [lambda t=t: t for t in tensors])
  import tensorflow as tf
  tensors = [tf.convert_to_tensor(t) for t in tensors]
  shapes = [t.shape.as_list() for t in tensors]
  if len({len(sh) for sh in shapes}) != 1 or len({t.dtype for t in tensors}) != 1:
    raise ValueError(f"selector: tensors must share a rank and a dtype, got "
                     f"{[(sh, t.dtype.name) for sh, t in zip(shapes, tensors)]}")
  element_shape = [dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes)]
  return _pushed_list_reader(tensors, element_shape)


def _pushed_list_reader(tensors, element_shape):
  """`_list_reader` of a TensorList that `tensors` are pushed into as they are (the list
  holds references to them: nothing is copied)."""
  import tensorflow as tf
  handle = tf.raw_ops.EmptyTensorList(element_shape=_list_element_shape(element_shape),
                                      max_num_elements=len(tensors),
                                      element_dtype=tensors[0].dtype)
  for t in tensors:
    handle = tf.raw_ops.TensorListPushBack(input_handle=handle, tensor=t)
  return _list_reader(handle, element_shape, tensors[0].dtype)


def _list_element_shape(element_shape):
  """A TensorList's element shape as an int32 tensor (-1: unknown)."""
  import tensorflow as tf
  return tf.constant([-1 if d is None else d for d in element_shape], tf.int32)


def _list_reader(handle, element_shape, dtype):
  """`read(index)` -> the TensorList `handle`'s entry `index` (one `TensorListGetItem`: the
  entry itself, no copy), with the static `element_shape` the entries share."""
  import tensorflow as tf
  shape = _list_element_shape(element_shape)

  def read(index):
    out = tf.raw_ops.TensorListGetItem(input_handle=handle, index=tf.cast(index, tf.int32),
                                       element_shape=shape, element_dtype=dtype)
    out.set_shape(element_shape)
    return out

  return read


def layer_reader(stacked, axis: int = 0):
  """`read(j)` -> `take(stacked, j, axis)` for an int32 scalar tensor `j` inside a loop's
  body (`DynamicConvStack`: layer j's per-sample kernels from the (N, L, ...) stack, axis
  1, in the bounded layer loop), with a gradient that costs one slice per iteration.
  `stacked` may also be a list of the layers' tensors (each the stack's slice j; `axis` is
  then not read): what `PuppeteerODE(stack_repeated=False)` returns.

  TensorFlow: the slices go into a TensorList once and `read` is one `TensorListGetItem`.
  A list's tensors are pushed as they are (the list holds references: nothing is copied); a
  stack is split into one (after one transpose that puts `axis` first, where it is not).
  A gather from the stacked tensor would give the same values, but inside a `tf.while_loop`
  TensorFlow turns each iteration's gradient of a gather into a dense tensor of the whole
  stack (all layers' kernels) and adds it to another (`while_v2_indexed_slices_rewriter`
  keeps sparse gradients only for resource variables): two copies of the stage's kernels
  per iteration at the backward pass's peak. A TensorList's gradient is a list whose
  entries are set only where read, and a pushed list hands each entry's gradient back to
  its tensor without stacking them. Other backends: `keras.ops.take` (a list is stacked
  first; JAX's loop carries a dense gradient either way).
  """
  if isinstance(stacked, (list, tuple)):
    layers = list(stacked)
    if not layers:
      raise ValueError("layer_reader needs at least one layer")
    if backend() != "tensorflow":
      stacked, axis = ops.stack(layers, axis=0), 0
    else:
      import tensorflow as tf
      layers = [tf.convert_to_tensor(t) for t in layers]
      element_shape = layers[0].shape.as_list()
      if any(t.shape.as_list() != element_shape or t.dtype != layers[0].dtype
             for t in layers):
        raise ValueError(f"layer_reader: the layers must share a shape and a dtype, got "
                         f"{[(t.shape.as_list(), t.dtype.name) for t in layers]}")
      return _pushed_list_reader(layers, element_shape)
  if backend() != "tensorflow":
    return lambda j: ops.take(stacked, j, axis=axis)
  import tensorflow as tf
  stacked = tf.convert_to_tensor(stacked)
  if axis % stacked.shape.rank:
    stacked = ops.moveaxis(stacked, axis, 0)
  handle = tf.raw_ops.TensorListFromTensor(
      tensor=stacked, element_shape=_list_element_shape(stacked.shape[1:].as_list()))
  return _list_reader(handle, stacked.shape[1:].as_list(), stacked.dtype)


def check(condition, value, message: str):
  """`value`, once the scalar bool `condition` holds: eagerly a ValueError(message) when it
  does not; inside a TensorFlow graph an InvalidArgumentError carrying `message` when the
  graph runs. Other backends: eager values only (a traced condition raises
  NotImplementedError rather than go unchecked)."""
  if backend() == "tensorflow":
    import tensorflow as tf
    if tf.executing_eagerly():
      if not bool(condition):
        raise ValueError(message)
      return value
    with tf.control_dependencies([tf.debugging.Assert(condition, [message])]):
      return tf.identity(value)
  try:
    ok = bool(ops.convert_to_numpy(condition))
  except Exception as e:  # pylint: disable=broad-except  # a traced value
    raise NotImplementedError(
        f"this run-time check needs TensorFlow inside traced functions (KERAS_BACKEND="
        f"{backend()}): {message}") from e
  if not ok:
    raise ValueError(message)
  return value


def check_images(images, pixel_max: float):
  """Raises a clear error for NaN, infinite or out-of-range pixels; returns `images`.

  Eagerly (or on concrete JAX/NumPy values) it raises ValueError. Inside a TensorFlow graph
  (`fit`, `predict`, a SavedModel) it adds `tf.debugging` checks that raise
  InvalidArgumentError with the same message; XLA-compiled functions skip them (XLA has no
  assertions), so the data pipeline checks its inputs too.
  """
  finite_msg = ("PuppetClassifier got NaN or infinite pixel values; images must be finite "
                f"pixel values in [0, {pixel_max:g}]")
  range_msg = (f"PuppetClassifier expects raw pixels in [0, {pixel_max:g}] (it normalizes "
               "inside); got values outside that range. Pass unnormalized images")
  if backend() == "tensorflow":
    import tensorflow as tf
    if tf.executing_eagerly() and not isinstance(images, keras.KerasTensor):
      values = np.asarray(images)
    else:
      if not isinstance(images, tf.Tensor) or not images.dtype.is_floating:
        return images
      if tf.config.functions_run_eagerly():
        return images
      x = tf.cast(images, tf.float32)
      ok_finite = tf.reduce_all(tf.math.is_finite(x))
      ok_range = tf.logical_and(tf.reduce_min(x) >= -_RANGE_TOL,
                                tf.reduce_max(x) <= pixel_max + _RANGE_TOL)
      ops_ = [tf.debugging.Assert(ok_finite, [finite_msg]),
              tf.debugging.Assert(tf.logical_or(tf.logical_not(ok_finite), ok_range),
                                  [range_msg])]
      with tf.control_dependencies(ops_):
        return tf.identity(images)
  else:
    try:
      values = ops.convert_to_numpy(images)
    except Exception:  # pylint: disable=broad-except  # a traced value: nothing to check
      return images
  if values.size and np.issubdtype(values.dtype, np.floating):
    if not np.all(np.isfinite(values)):
      raise ValueError(finite_msg)
    if values.min() < -_RANGE_TOL or values.max() > pixel_max + _RANGE_TOL:
      raise ValueError(f"{range_msg} (min {values.min():g}, max {values.max():g})")
  elif values.size and (values.min() < 0 or values.max() > pixel_max):
    raise ValueError(f"{range_msg} (min {values.min()}, max {values.max()})")
  return images


_RANGE_TOL = 1e-3


# ----------------------------------------------------------------------- bucketed execution
def _require_tensorflow(what: str) -> None:
  if backend() != "tensorflow":
    raise NotImplementedError(
        f"{what} needs dynamic group sizes, which this code implements for the TensorFlow "
        f"backend only (KERAS_BACKEND={backend()}); use execution='per_sample' on this backend")


def in_xla_context() -> bool:
  """Whether the current TensorFlow graph is being compiled by XLA (jit_compile=True)."""
  if backend() != "tensorflow":
    return False
  import tensorflow as tf
  if tf.executing_eagerly():
    return False
  try:
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
  except (ImportError, AttributeError):  # internal API moved: assume no XLA
    return False


def partition(x, group_ids, n_groups: int):
  """Splits the rows of `x` by int32 `group_ids` (B,) in [0, n_groups): a list of n_groups.

  Row order inside a group is the batch order. Groups may be empty.
  """
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  return tf.dynamic_partition(x, tf.cast(group_ids, tf.int32), n_groups)


def stitch(indices, parts):
  """Inverse of `partition`: `indices` are the partitioned row numbers, `parts` the rows."""
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  return tf.dynamic_stitch(indices, parts)


def nonzero(mask):
  """int32 (M,) positions where the 1-D `mask` is true (M data-dependent)."""
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  return tf.cast(tf.reshape(tf.where(mask), (-1,)), tf.int32)


def gather(x, index, axis: int = 0):
  """`x` at the non-negative int `index` (a tensor) along `axis`.

  TensorFlow: a plain `tf.gather` (`keras.ops.take` adds negative-index handling, several ops
  per call, which makes tracing the bucketed graph slow).
  """
  if backend() == "tensorflow":
    import tensorflow as tf
    return tf.gather(x, index, axis=axis)
  return ops.take(x, index, axis=axis)


class EmptyGuard(NamedTuple):
  """What `group_conv2d` and `group_max_pool` need to run a group that may be empty,
  computed once per group (`empty_guard`) and shared by all its layers.

  pad4 / pad5: paddings that append one zero row to a rank-4 / rank-5 tensor of an empty
  group, none otherwise. size4 / size5: `tf.slice` sizes that keep the group's n rows of a
  padded rank-4 tensor / the rows of its one-row kernel (1, or 0 for an empty group).
  """
  pad4: Any
  pad5: Any
  size4: Any
  size5: Any


def empty_guard(n) -> EmptyGuard:
  """The `EmptyGuard` of a group of `n` (a scalar int tensor) samples. TensorFlow only."""
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  n = tf.cast(n, tf.int32)
  missing = 1 - tf.minimum(n, 1)
  pads = [np.zeros((rank, 2), np.int32) for rank in (4, 5)]
  for p in pads:
    p[0, 1] = 1
  return EmptyGuard(pads[0] * missing, pads[1] * missing,
                    tf.stack([n, -1, -1, -1]), tf.stack([1 - missing, -1, -1, -1, -1]))


def _keep(t, size):
  import tensorflow as tf
  return tf.slice(t, np.zeros((len(t.shape),), np.int32), size)


def group_conv2d(x, kernel, may_be_empty: bool = True, guard: Optional[EmptyGuard] = None):
  """'same', stride-1 convolution of (n, H, W, C_in) `x` with (K, K, C_in, C_out), n may be 0.

  `kernel` may also be a one-row (1, K, K, C_in, C_out) tensor, which has zero rows when the
  group is empty (a bin's part of a kernel tensor split by bin).

  TensorFlow's oneDNN kernels mishandle empty batches: Conv2D returns (0, H, W, C_in) instead
  of (0, H, W, C_out), and the max-pool gradient aborts the process (TF 2.21). An empty group
  (and its empty kernel) therefore gets one zero row appended, runs a one-image convolution
  and keeps none of its rows; a non-empty group runs the plain convolution on its own
  buffers (TensorFlow's Pad and Slice forward their input's buffer when they keep all of it).
  There is no `tf.cond`: each one put four functions (its branches and their gradients) into
  the training graph, which cost process memory and time (docs/benchmarks_no_cond.md). The
  gradient is written out (`tf.custom_gradient`) so that the backward pass keeps only `x`
  and `kernel`, which stay alive anyway, and rebuilds an empty group's padded kernel when
  its gradient is due instead of keeping it. `guard`: the group's `empty_guard`, shared by
  its layers (computed here when None). A caller that knows the group is not empty
  (bucketed inference runs only the occupied bins) passes `may_be_empty=False` and gets the
  plain convolution.
  """
  rows = len(kernel.shape) == 5
  if backend() != "tensorflow" or not may_be_empty:
    return ops.conv(x, kernel[0] if rows else kernel, strides=1, padding="same")
  import tensorflow as tf
  x = tf.convert_to_tensor(x)
  kernel = tf.convert_to_tensor(kernel)
  g = empty_guard(tf.shape(x)[0]) if guard is None else guard
  static = x.shape[:3].concatenate(kernel.shape[-1:])
  row_shape = (kernel.shape[1:].as_list() if kernel.shape[1:].is_fully_defined()
               else tf.shape(kernel)[1:])  # of a one-row kernel
  strides = [1, 1, 1, 1]

  def padded_kernel(kernel):
    return tf.reshape(tf.pad(kernel, g.pad5), row_shape) if rows else kernel

  @tf.custom_gradient
  def conv(x, kernel):
    # Padded once x exists: an empty group's padded kernel then lives only for its
    # convolution (the generated kernels all exist early; their pads would run early too).
    with tf.control_dependencies([x]):
      k = padded_kernel(kernel)
    y = tf.nn.conv2d(tf.pad(x, g.pad4), k, strides=1, padding="SAME")

    def grad(dy):
      # Padded again once dy exists, so that an empty group's padded kernel lives only for
      # its two backward convolutions, and is not kept from the forward pass.
      with tf.control_dependencies([dy]):
        xp, k = tf.pad(x, g.pad4), padded_kernel(kernel)
      dyp = tf.pad(dy, g.pad4)
      dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(xp), filter=k,
                                          out_backprop=dyp, strides=strides, padding="SAME")
      dk = tf.raw_ops.Conv2DBackpropFilter(input=xp, filter_sizes=tf.shape(k),
                                           out_backprop=dyp, strides=strides, padding="SAME")
      if rows:
        one_row = ([1] + row_shape if isinstance(row_shape, list)
                   else tf.concat([[1], row_shape], 0))
        dk = _keep(tf.reshape(dk, one_row), g.size5)
      return _keep(dx, g.size4), dk

    return _keep(y, g.size4), grad

  out = conv(x, kernel)
  out.set_shape(static)
  return out


def bias_add(x, bias):
  """`x + bias` along the last axis; `tf.nn.bias_add` under TensorFlow.

  A Conv2D followed by BiasAdd (and ReLU) is the pattern TensorFlow's graph optimizer fuses
  into one convolution on CPU; a broadcast `AddV2` is not.
  """
  if backend() == "tensorflow":
    import tensorflow as tf
    return tf.nn.bias_add(x, bias)
  return x + bias


def batch_norm_training(x, gamma, beta, epsilon: float):
  """Training batch norm of (N, H, W, C) `x` over N, H and W: (y, mean, variance), with the
  batch's mean and population (biased) variance, as `masked_batch_norm.joint_moments` and
  `normalize` give them; N may be 0 (then mean and variance are 0).

  TensorFlow: one `FusedBatchNormV3`, whose gradient needs only `x` and the batch's
  statistics, where the two-pass moments and the scale-and-shift keep two more
  activation-sized tensors per layer for the backward pass (`x - mean` and `x * scale`;
  docs/benchmarks_fused_bn.md). Its variance output is Bessel-corrected for moving
  averages (n / (n - 1), n = N * H * W) and is scaled back here. TensorFlow only (bucketed
  training, its one caller, is); `DynamicConvStack(fused_batch_norm=False)` computes the
  same with `masked_batch_norm`'s two-pass moments.
  """
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  x = tf.convert_to_tensor(x)
  n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
  y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
      x, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta), epsilon=epsilon,
      is_training=True)
  seen = n > 0  # an empty batch gives NaN statistics
  mean = tf.where(seen, mean, tf.zeros_like(mean))
  variance = tf.where(seen, variance * ((n - 1.0) / tf.maximum(n, 1.0)),
                      tf.zeros_like(variance))
  return y, mean, variance


def group_max_pool(x, may_be_empty: bool = True, guard: Optional[EmptyGuard] = None):
  """2x2, stride-2, 'same' max pool of (n, H, W, C) `x`, n may be 0 (see `group_conv2d`: an
  empty group pools one zero image and keeps none of it; a non-empty one pools its own
  buffer)."""
  if backend() != "tensorflow" or not may_be_empty:
    return ops.max_pool(x, pool_size=2, strides=2, padding="same")
  import tensorflow as tf
  x = tf.convert_to_tensor(x)
  g = empty_guard(tf.shape(x)[0]) if guard is None else guard
  out = _keep(tf.nn.max_pool2d(tf.pad(x, g.pad4), ksize=2, strides=2, padding="SAME"),
              g.size4)
  half = [None if d is None else (d + 1) // 2 for d in x.shape[1:3]]
  out.set_shape(tf.TensorShape([x.shape[0]] + half + [x.shape[3]]))
  return out


def split_rows(x, sizes):
  """Splits `x` along axis 0 into parts of the given sizes (a 1-D int tensor of static
  length); inverse of a concat."""
  _require_tensorflow("execution='bucketed'")
  import tensorflow as tf
  sizes = tf.cast(sizes, tf.int32)
  return tf.split(x, sizes, num=int(sizes.shape[0]), axis=0)


def release_free_heap_memory() -> None:
  """Best effort: returns freed heap memory to the OS (glibc `malloc_trim`); else nothing.

  Filling the kernel cache frees many large temporaries between the kernels it keeps; glibc
  keeps such freed blocks resident, so without this the process's resident size grows by
  about half the cache again. Not backend-specific, but platform-specific, hence here.
  """
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def compiled_call(layer, fn, *args):
  """`fn(*args)`, which reads `layer`'s variables and assigns none, compiled as one program
  where that is cheap to arrange. JAX: `jax.jit`, the variables passed as arguments through
  a `keras.StatelessScope` (eagerly every op would run on its own: the gathered kernel table
  of the paper's G took 66 s eagerly on a 2-core CPU). TensorFlow: eager. Same values."""
  if backend() != "jax":
    return fn(*args)
  import jax
  variables = list(layer.variables)

  def pure(values, *inputs):
    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
      return fn(*inputs)

  return jax.jit(pure)([v.value for v in variables], *args)
