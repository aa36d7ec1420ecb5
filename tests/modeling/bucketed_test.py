"""Binned complexity, bucketed execution and the inference kernel cache."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn import PuppetCNNConfig
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import complexity as cx
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE

# bn_momentum=0: one training call sets the moving statistics to batch statistics, so that
# inference-mode logits are of order 1 and absolute tolerances mean something.
TINY = dict(stage_channels=(4, 8), max_depth=3, num_classes=5, input_shape=(16, 16, 3),
            bn_momentum=0.0)


def _images(n=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
  images[0] = 90                                    # H = 0: bin 0, depth 1
  images[1, :, :8] = 10                             # two levels: low H, depth 1
  images[1, :, 8:] = 200
  images[2] = (rng.integers(0, 4, (16, 16, 1)) * 60).astype(np.uint8)  # 4 levels: depth 3
  return images


def _loss():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _pair(bins=16, layout="loop", **kw):
  """A per_sample and a bucketed model (inference graph `layout`) with identical weights and
  sensible BN statistics."""
  a = PuppetClassifier(**TINY, complexity_bins=bins, **kw)
  b = PuppetClassifier(**TINY, complexity_bins=bins, execution="bucketed",
                       bucketed_inference=layout, **kw)
  a(_images(8, seed=1), training=True)
  b(_images(3)[:1])
  b.set_weights(a.get_weights())
  return a, b


def _close(got, want, tol=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max()


# ----------------------------------------------------------------------------- binning
def _assert_same_training_step(a, b, step, grad_tol=1e-3):
  """`step(model)` -> (loss, gradients) gives the same loss and gradients (to `grad_tol` of
  each tensor's scale) for the reference model `a` and the model under test `b`, and leaves
  the same moving statistics."""
  loss_a, grads_a = step(a)
  loss_b, grads_b = step(b)
  assert abs(loss_a - loss_b) < 1e-5
  for w, ga, gb in zip(a.trainable_weights, grads_a, grads_b):
    scale = max(float(np.abs(ga).max()), 1e-3 * max(float(np.abs(g).max()) for g in grads_a))
    assert np.abs(ga - gb).max() <= grad_tol * scale, w.path
  for wa, wb in zip(a.non_trainable_weights, b.non_trainable_weights):  # moving statistics
    np.testing.assert_allclose(wb.numpy(), wa.numpy(), rtol=1e-4, atol=1e-4, err_msg=wa.path)


def test_config_validation():
  with pytest.raises(ValueError, match="execution='bucketed' needs 1 <= complexity_bins"):
    PuppetCNNConfig(execution="bucketed")
  with pytest.raises(ValueError, match="complexity_bins must be an int >= 0"):
    PuppetCNNConfig(complexity_bins=-2)
  with pytest.raises(ValueError, match="execution must be one of"):
    PuppetCNNConfig(execution="grouped")
  config = PuppetCNNConfig(complexity_bins=np.int64(16), execution="bucketed")
  assert config.complexity_bins == 16 and type(config.complexity_bins) is int
  assert PuppetCNNConfig().complexity_bins == 0 and PuppetCNNConfig().execution == "per_sample"
  assert PuppetCNNConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("n", [1, 3, 8, 16, 64, 100, 1000])
def test_bin_table_matches_the_formulas(n):
  centres, steps, depths = cx.bin_table(n, 8.0, 1, 8)
  np.testing.assert_allclose(centres, (np.arange(n) + 0.5) * 8.0 / n, rtol=1e-6)
  np.testing.assert_allclose(steps, cx.step_size(centres), rtol=1e-6)
  # The NumPy depths equal the keras.ops formula on the same centres, bin for bin.
  np.testing.assert_array_equal(depths, cx.depth_from_step(cx.step_size(centres), 1, 8))


def test_complexity_bin_edges():
  h = np.array([0.0, 0.49, 0.5, 7.99, 8.0, 9.0], np.float32)
  np.testing.assert_array_equal(cx.complexity_bin(h, 16, 8.0), [0, 0, 1, 15, 15, 15])


def test_complexity_bin_floor_edges_and_centres():
  # 4 bins on [4, 8]: edges 5, 6, 7; below 4 -> bin 0, above 8 -> bin 3 (by hand).
  h = np.array([0.0, 3.99, 4.0, 4.99, 5.0, 6.5, 7.99, 8.0, 9.0], np.float32)
  np.testing.assert_array_equal(cx.complexity_bin(h, 4, 8.0, h_min=4.0),
                                [0, 0, 0, 0, 1, 2, 3, 3, 3])
  np.testing.assert_allclose(cx.bin_centres(4, 8.0, h_min=4.0), [4.5, 5.5, 6.5, 7.5])
  # The same bins as the upper half of 8 bins on [0, 8], bit for bit.
  for got, want in zip(cx.bin_table(4, 8.0, 1, 8, h_min=4.0), cx.bin_table(8, 8.0, 1, 8)):
    np.testing.assert_array_equal(got, want[4:])
  with pytest.raises(ValueError, match="0 <= h_min < h_max"):
    cx.bin_centres(4, 8.0, h_min=8.0)
  for bad in (-1.0, 8.0, 9.5, True, "4"):
    with pytest.raises(ValueError, match="complexity_bin_floor must be a number in"):
      PuppetCNNConfig(complexity_bins=4, complexity_bin_floor=bad)
  config = PuppetCNNConfig(complexity_bins=4, complexity_bin_floor=4)
  assert config.complexity_bin_floor == 4.0 and PuppetCNNConfig().complexity_bin_floor == 0.0
  assert PuppetCNNConfig.from_dict(config.to_dict()) == config


def _floor_images():
  """Images with H >= 4 bits in at least two bins of 8 on [0, 8] (a gradient plus noise:
  the more noise, the higher H)."""
  rng = np.random.default_rng(7)
  y, x = np.mgrid[0:16, 0:16]
  ramp = (x * 8 + y * 4 + 60).astype(np.float64)[..., None]
  images = np.stack([np.clip(ramp + rng.normal(0, amp, (16, 16, 3)), 0, 255).astype(np.uint8)
                     for amp in (2, 5, 10, 20, 40, 80)])
  h = cx.image_complexity(images).numpy()
  assert h.min() >= 4.0 and len(set(np.floor(h).astype(int))) >= 2, h
  return images


@pytest.mark.parametrize("execution", ["per_sample", "bucketed"])
def test_bin_floor_runs_the_same_bins_as_the_full_range(execution):
  # 8 bins on [0, 8] and 4 bins on [4, 8] have the same bins above 4 bits: the same logits,
  # loss, gradients and moving statistics for images above the floor.
  full = PuppetClassifier(**TINY, complexity_bins=8, execution=execution)
  upper = PuppetClassifier(**TINY, complexity_bins=4, complexity_bin_floor=4.0,
                           execution=execution)
  images, labels = _floor_images(), np.arange(6) % 5
  full(images, training=True)
  upper(images[:1])
  upper.set_weights(full.get_weights())
  _close(upper(images, training=False), full(images, training=False), 1e-5)
  losses, grads = [], []
  for model in (full, upper):
    with tf.GradientTape() as tape:
      loss = _loss()(labels, model(images, training=True))
    losses.append(float(loss))
    grads.append([tf.convert_to_tensor(g).numpy() for g in
                  tape.gradient(loss, model.trainable_weights)])
  assert abs(losses[0] - losses[1]) < 1e-6
  for w, ga, gb in zip(full.trainable_weights, *grads):
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6, err_msg=w.path)
  for wa, wb in zip(full.non_trainable_weights, upper.non_trainable_weights):
    np.testing.assert_allclose(wb.numpy(), wa.numpy(), rtol=1e-5, atol=1e-6, err_msg=wa.path)
  # Bins as numbered on each range: bin b + 4 of 8 is bin b of 4.
  np.testing.assert_array_equal(upper.image_bins(images), full.image_bins(images) - 4)
  want = full(images, training=False)
  full.set_binning(4, floor=4.0)  # the same model moved onto the upper range
  _close(full(images, training=False), want, 1e-5)
  assert full.config.complexity_bin_floor == 4.0 and full.config.execution == execution
  # An image below the floor (constant: H = 0) runs at the first bin's centre, 4.5 bits
  # (eq. 10 in float64), where the full range would give it bin 0 (centre 0.5).
  out = upper(np.full((1, 16, 16, 3), 90, np.uint8), return_details=True)
  step = np.tanh(1.0 / 4.5)
  assert int(out["complexity_bin"][0]) == 0
  np.testing.assert_allclose(float(out["step"][0]), step, rtol=1e-6)
  assert int(out["depth"][0]) == min(int(np.floor(1.0 / step)), TINY["max_depth"])


def test_binned_details_and_shared_depth():
  model = PuppetClassifier(**TINY, complexity_bins=16)
  out = model(_images(), return_details=True)
  h = cx.image_complexity(_images()).numpy()
  np.testing.assert_allclose(out["complexity"], h, rtol=1e-6)  # the exact H is reported
  bins = np.minimum(np.floor(h * 2), 15).astype(int)
  np.testing.assert_array_equal(out["complexity_bin"], bins)
  _, steps, depths = model.bin_table()
  np.testing.assert_array_equal(out["depth"], depths[bins])
  np.testing.assert_array_equal(out["step"], steps[bins])


def test_very_fine_bins_match_exact_h():
  exact = PuppetClassifier(**TINY)
  fine = PuppetClassifier(**TINY, complexity_bins=10**6)
  images = _images()
  exact(_images(8, seed=1), training=True)
  fine(images[:1])
  fine.set_weights(exact.get_weights())
  _close(fine(images, training=False), exact(images, training=False), 1e-4)
  with tf.GradientTape(persistent=True) as tape:
    loss_exact = _loss()(np.arange(8) % 5, exact(images, training=True))
    loss_fine = _loss()(np.arange(8) % 5, fine(images, training=True))
  assert abs(float(loss_exact) - float(loss_fine)) < 1e-4


# ------------------------------------------------------------------------ bucketed
@pytest.mark.parametrize("layout", ["loop", "per_bin"])
@pytest.mark.parametrize("puppet", ["vgg", "resnet"])
def test_bucketed_inference_matches_per_sample(puppet, layout):
  a, b = _pair(puppet=puppet, layout=layout)
  images = _images()
  want = a(images, training=False)
  _close(b(images, training=False), want)
  graph = tf.function(lambda x: b(x, training=False))
  _close(graph(tf.constant(images)), want)
  for i in (0, 2, 5):  # a batch of one (every other bin is empty)
    _close(b(images[i:i + 1], training=False)[0], want[i])


def _graph_nodes(model, images):
  """Nodes of the traced inference graph, the bodies of its loops and branches included."""
  fn = tf.function(lambda x: model(x, training=False))
  graph_def = fn.get_concrete_function(tf.TensorSpec((None,) + images.shape[1:],
                                                     tf.uint8)).graph.as_graph_def()
  return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def test_loop_graph_does_not_grow_with_bins():
  # 'loop' runs every bin through one subgraph per stage; 'per_bin' has a branch per bin
  # with its layers unrolled. Quadrupling the bins must leave the loop's graph the same
  # size and add a branch's worth of nodes per bin to the per-bin graph.
  images = _images()
  nodes = {}
  for layout in ("loop", "per_bin"):
    for bins in (4, 16):
      model = PuppetClassifier(**TINY, complexity_bins=bins, execution="bucketed",
                               bucketed_inference=layout)
      model(images[:1])
      nodes[layout, bins] = _graph_nodes(model, images)
  assert nodes["loop", 16] == nodes["loop", 4], nodes
  assert nodes["per_bin", 16] - nodes["per_bin", 4] > 12 * 20, nodes


def _tape_step(images, labels, traced=None):
  """`step(model)` for `_assert_same_training_step`: the loss and gradients of one batch,
  eagerly, or in a `tf.function` for the model `traced`."""
  def step(model):
    def run(x):
      with tf.GradientTape() as tape:
        loss = _loss()(labels, model(x, training=True))
      return loss, tape.gradient(loss, model.trainable_weights)

    loss, grads = (tf.function(run) if model is traced else run)(tf.constant(images))
    return float(loss), [tf.convert_to_tensor(g).numpy() for g in grads]

  return step


@pytest.mark.parametrize("puppet,rank,fused,graph,state", [
    ("vgg", 0, True, False, None), ("resnet", 0, True, False, None), ("vgg", 3, True, False, None),
    ("vgg", 0, False, False, None), ("vgg", 0, True, True, None),
    ("vgg", 0, True, False, 4), ("resnet", 0, True, True, 4), ("vgg", 0, True, False, "full")])
def test_bucketed_training_matches_per_sample(puppet, rank, fused, graph, state):
  # fused: the puppet's training batch norm as TensorFlow's fused op (the default) or as
  # two-pass moments (fused_batch_norm=False); the per-sample model uses masked moments.
  # 16 bins for 8 images: most groups are empty, eagerly and in a traced step (graph).
  # state=4: a puppeteer state half as wide as the 8-channel stage; bucketed training then
  # convolves with narrow kernels (narrow_kernels, the default), the per-sample model with
  # the full ones. "full": the same with narrow_kernels=False.
  extra = {} if state is None else dict(state_channels=4, narrow_kernels=state != "full")
  a, b = _pair(puppet=puppet, generator_rank=rank, fused_batch_norm=fused, **extra)
  images, labels = _images(8, seed=3), np.arange(8) % 5
  images[:3] = _images(3)

  _assert_same_training_step(a, b, _tape_step(images, labels, b if graph else None))


@pytest.mark.parametrize("graph", [False, True])
def test_reversible_bucketed_training_matches_autodiff_per_sample(graph):
  """generator_backward='reversible' in bucketed training (one state per occupied bin, the
  steps on the depth-sorted last rows) against the per-sample model's plain autodiff."""
  a = PuppetClassifier(**TINY, complexity_bins=16)
  b = PuppetClassifier(**TINY, complexity_bins=16, execution="bucketed",
                       generator_backward="reversible")
  a(_images(8, seed=1), training=True)
  b(_images(3)[:1])
  b.set_weights(a.get_weights())
  images, labels = _images(8, seed=3), np.arange(8) % 5
  images[:3] = _images(3)

  _assert_same_training_step(a, b, _tape_step(images, labels, b if graph else None))


def test_bucketed_uses_shared_kernels_and_one_state_per_bin(monkeypatch):
  _, b = _pair()
  images = _images()
  seen = {}
  original = b.puppeteer.call

  def spy(h, step, depth, training=None, state_weight=None, **kwargs):
    seen["states"] = int(h.shape[0])
    seen["weight"] = None if state_weight is None else np.asarray(state_weight)
    return original(h, step, depth, training=training, state_weight=state_weight, **kwargs)

  def no_per_sample_conv(*args):
    raise AssertionError("bucketed execution must not run per-sample convolutions")

  monkeypatch.setattr(b.puppeteer, "call", spy)
  monkeypatch.setattr(backend_ops, "per_sample_conv2d", no_per_sample_conv)
  bins = b(images, return_details=True)["complexity_bin"].numpy()
  assert seen["states"] == len(set(bins.tolist())) < len(images)
  b(images, training=True)
  np.testing.assert_array_equal(np.sort(seen["weight"]),
                                np.sort(np.bincount(bins)[np.bincount(bins) > 0]))


def _eager_step(images, labels):
  """`model -> (loss, gradients)` of one eager training call on `images`."""
  def step(model):
    with tf.GradientTape() as tape:
      loss = _loss()(labels, model(images, training=True))
    return float(loss), [tf.convert_to_tensor(g).numpy()
                         for g in tape.gradient(loss, model.trainable_weights)]
  return step


def _gathered_pair(bins=16, **kw):
  """A per_sample and a gathered model with identical weights and sensible BN statistics."""
  a = PuppetClassifier(**TINY, complexity_bins=bins, **kw)
  b = PuppetClassifier(**TINY, complexity_bins=bins, execution="gathered", **kw)
  a(_images(8, seed=1), training=True)
  b(_images(3)[:1])
  b.set_weights(a.get_weights())
  return a, b


@pytest.mark.parametrize("puppet,rank,bins,gather", [
    ("vgg", 0, 16, "per_layer"), ("resnet", 0, 16, "per_layer"), ("vgg", 3, 16, "per_layer"),
    ("vgg", 0, 3, "per_layer"), ("resnet", 0, 3, "upfront")])
def test_gathered_matches_per_sample(puppet, rank, bins, gather):
  """execution='gathered' (one state per bin, kernels gathered per sample, layer by layer or
  upfront) against the per-sample model with the same bins: predictions eagerly and
  XLA-compiled, and one training step's loss, gradients and moving statistics (16 bins for 8
  images: most bins empty, their states weighing 0 in G's batch statistics; 3 bins: several
  images per bin)."""
  a, b = _gathered_pair(bins, puppet=puppet, generator_rank=rank, gathered_kernels=gather)
  images, labels = _images(8, seed=3), np.arange(8) % 5
  images[:3] = _images(3)
  want = a(images, training=False)
  _close(b(images, training=False), want)
  _close(tf.function(lambda x: b(x, training=False), jit_compile=True)(tf.constant(images)),
         want)

  _assert_same_training_step(a, b, _eager_step(images, labels))


@pytest.mark.parametrize("execution,norm", [
    ("bucketed", "state"), ("gathered", "state"), ("bucketed", "batch_per_step"),
    ("gathered", "batch_per_step")])
def test_generator_norms_match_per_sample(execution, norm):
  """generator_norm='state' (each state normalized by itself) and 'batch_per_step' (moving
  statistics per step): one state per bin (bucketed, gathered) against one per image
  (per_sample) with the same bins, in inference (and from the kernel cache) and in one
  training step (where the batch norms need the states weighted by their bins' counts)."""
  a, b = (_pair if execution == "bucketed" else _gathered_pair)(generator_norm=norm)
  if norm == "batch_per_step":  # distinct rows, so that a step reading another's shows
    shape = tuple(a.puppeteer.moving_mean.shape)
    means = np.random.default_rng(5).normal(scale=0.2, size=shape).astype(np.float32)
    for model in (a, b):
      model.puppeteer.moving_mean.assign(means)
  images, labels = _images(8, seed=3), np.arange(8) % 5
  images[:3] = _images(3)
  want = a(images, training=False)
  _close(b(images, training=False), want)
  if execution == "bucketed":
    b.cache_kernels()
    _close(b(images, training=False), want)
    b.clear_kernel_cache()

  _assert_same_training_step(a, b, _eager_step(images, labels))


def test_gathered_runs_one_state_per_bin(monkeypatch):
  """G runs on every bin (a static count), weighted in training by each bin's sample count."""
  _, b = _gathered_pair(bins=5)
  images = _images()
  seen = {}
  original = b.puppeteer.call

  def spy(h, step, depth, training=None, state_weight=None, **kwargs):
    seen["states"] = int(h.shape[0])
    seen["weight"] = None if state_weight is None else np.asarray(state_weight)
    return original(h, step, depth, training=training, state_weight=state_weight, **kwargs)

  monkeypatch.setattr(b.puppeteer, "call", spy)
  bins = b(images, return_details=True)["complexity_bin"].numpy()
  assert seen["states"] == 5 and seen["weight"] is None
  b(images, training=True)
  np.testing.assert_array_equal(seen["weight"], np.bincount(bins, minlength=5))
  with pytest.raises(ValueError, match="execution='gathered' needs complexity_bins >= 1"):
    PuppetCNNConfig(execution="gathered")
  with pytest.raises(ValueError, match="gathered_kernels must be one of"):
    PuppetCNNConfig(complexity_bins=4, execution="gathered", gathered_kernels="lazy")
  b.set_binning(0)
  assert b.config.execution == "per_sample"


def test_bucketed_refuses_xla_and_compiles_without_it():
  _, b = _pair(bins=8)
  with pytest.raises(ValueError, match="jit_compile"):
    b.compile(optimizer="sgd", loss=_loss(), jit_compile=True)
  with pytest.raises(ValueError, match="cannot be XLA-compiled"):
    tf.function(lambda x: b(x, training=False), jit_compile=True)(tf.constant(_images()))
  b.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss())
  assert b.jit_compile is False
  images, labels = _images(), np.arange(8) % 5
  before = b.evaluate(images, labels, verbose=0, batch_size=8)
  b.fit(images, labels, epochs=3, batch_size=8, verbose=0)
  assert b.evaluate(images, labels, verbose=0, batch_size=8) < before


@pytest.mark.parametrize("training", [False, True])
def test_puppeteer_depth_sorted_equals_masking(training):
  kw = dict(stage_channels=(4, 6), input_channels=3, max_depth=4, init_rank=2,
            integrator="midpoint")
  masked, sliced = PuppeteerODE(**kw), PuppeteerODE(**kw)
  masked.build(None)
  sliced.build(None)
  sliced.set_weights(masked.get_weights())
  h = np.array([0.0, 1.5, 2.5, 3.0, 6.0], np.float32)
  step = cx.step_size(h)
  depth = np.array([1, 1, 2, 3, 4], np.int32)
  weight = np.array([2, 1, 3, 1, 5], np.float32)
  want = masked(h, step, depth, training=training, state_weight=weight)
  got = sliced(h, step, depth, training=training, state_weight=weight, depth_sorted=True)
  for (t0, r0), (t1, r1) in zip(want, got):
    np.testing.assert_allclose(t1, t0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-6)
  for w0, w1 in zip(masked.weights, sliced.weights):
    np.testing.assert_allclose(w1.numpy(), w0.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- kernel cache
@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_kernel_cache_gives_the_same_predictions_without_the_puppeteer(monkeypatch, layout):
  a, b = _pair(layout=layout)
  images = _images()
  want = a(images, training=False)
  assert b.cache_kernels() == tuple(range(16))
  info = b.kernel_cache_info()
  assert info["valid"] and info["params"] > 0
  calls = []
  original = b.puppeteer.call
  monkeypatch.setattr(b.puppeteer, "call", lambda *a, **k: calls.append(1) or original(*a, **k))
  _close(b(images, training=False), want)
  assert not calls  # eager: the cached kernels were used, nothing was generated
  _close(tf.function(lambda x: b(x, training=False))(tf.constant(images)), want)
  _close(b.predict(images, verbose=0, batch_size=4), want)


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_residual_puppet_cache_matches_per_sample(layout):
  # Residual units: two folded kernels per unit, the skip added after the second bias.
  a, b = _pair(block_type="residual", layout=layout)
  images = _images()
  want = a(images, training=False)
  _close(b(images, training=False), want)  # generated and folded per call
  b.cache_kernels()
  _close(b(images, training=False), want)


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_stale_kernel_cache_is_never_used(layout):
  a, b = _pair(bins=8, layout=layout)
  images = _images()
  b.cache_kernels()
  graph = tf.function(lambda x: b(x, training=False))
  graph(tf.constant(images))  # traced with the cache
  b.compile(optimizer=keras.optimizers.SGD(0.5), loss=_loss())
  b.fit(images, np.arange(8) % 5, epochs=1, batch_size=8, verbose=0)  # weights change
  assert not b.kernel_cache_info()["valid"]
  fresh = PuppetClassifier(**TINY, complexity_bins=8)
  fresh(images[:1])
  fresh.set_weights(b.get_weights())
  want = fresh(images, training=False)
  assert np.abs(np.asarray(want) - np.asarray(a(images, training=False))).max() > 1e-3
  _close(b(images, training=False), want)           # eager
  _close(graph(tf.constant(images)), want)          # a function traced before the change
  _close(b.predict(images, verbose=0), want)
  b.cache_kernels()
  assert b.kernel_cache_info()["valid"]
  _close(b(images, training=False), want)
  b.integrator = "midpoint"  # a different integrator drops the cache
  assert b.kernel_cache_info()["bins"] == ()


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_cache_is_stale_when_only_the_puppets_batch_norm_changes(layout):
  # Cached kernels carry the puppet's inference batch-norm scales: changing one moving
  # variance (no puppeteer weight) must make the cache stale, and inference must follow the
  # per-sample model with the same change.
  a, b = _pair(layout=layout)
  images = _images()
  b.cache_kernels()
  graph = tf.function(lambda x: b(x, training=False))
  before = graph(tf.constant(images))
  for model in (a, b):
    w = [v for v in model.puppet.weights if "stage1_repeated_moving_variance" in v.path][0]
    w.assign(w.numpy() * 4.0)
  assert not b.kernel_cache_info()["valid"]
  want = a(images, training=False)
  assert np.abs(np.asarray(want) - np.asarray(before)).max() > 1e-3
  _close(b(images, training=False), want)
  _close(graph(tf.constant(images)), want)
  b.cache_kernels()
  _close(graph(tf.constant(images)), want)


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_16_bit_cache_is_the_float32_cache_rounded(dtype, tol, layout):
  a, b = _pair(layout=layout)
  images = _images()
  b.cache_kernels(dtype="float32")
  full = {k: [(t.numpy(), [r.numpy() for r in rs]) for t, rs in v]
          for k, v in b._kernel_cache.kernels.items()}  # pylint: disable=protected-access
  bins = b.cache_kernels(dtype=dtype)
  info = b.kernel_cache_info()
  assert info["dtype"] == dtype and info["bytes"] * 2 == info["bytes_float32"] and info["valid"]
  for k in bins:  # each stored kernel is the float32 cache's kernel rounded to 16 bits
    for (t, rs), (t32, rs32) in zip(b._kernel_cache.kernels[k], full[k]):  # pylint: disable=protected-access
      assert keras.backend.standardize_dtype(t.dtype) == dtype
      np.testing.assert_array_equal(ops_cast(t), ops_cast(tf.cast(t32, dtype)))
      for r, r32 in zip(rs, rs32):
        np.testing.assert_array_equal(ops_cast(r), ops_cast(tf.cast(r32, dtype)))
  want = np.asarray(a(images, training=False))
  got = np.asarray(b(images, training=False))
  error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
  assert 0 < error <= tol, error  # rounded, so not exact, but close to the per-sample model
  with pytest.raises(ValueError, match="dtype must be one of"):
    b.cache_kernels(dtype="int4")


@pytest.mark.parametrize("dtype,fallback", [("bfloat16", True), ("int8", "nearest"),
                                            ("float32", False)])
def test_bfloat16_compute_cache_runs_its_convolutions_in_bfloat16(dtype, fallback, monkeypatch):
  """cache_kernels(compute_dtype='bfloat16'): every convolution of the loop gets bfloat16
  features and kernels (cached, dequantized or generated), and the logits stay within
  bfloat16's precision of the float32 cache's."""
  a, b = _pair()
  images = _images()
  b.cache_kernels(dtype=dtype, fallback=fallback, bins=None if fallback is not True else [0, 5])
  want = np.asarray(b(images, training=False))
  b.cache_kernels(dtype=dtype, fallback=fallback, compute_dtype="bfloat16",
                  bins=None if fallback is not True else [0, 5])
  assert b.kernel_cache_info()["compute_dtype"] == "bfloat16"
  seen = []
  conv = backend_ops.group_conv2d

  def spy(x, kernel, *args, **kwargs):
    seen.append((keras.backend.standardize_dtype(x.dtype),
                 keras.backend.standardize_dtype(kernel.dtype)))
    return conv(x, kernel, *args, **kwargs)

  monkeypatch.setattr(backend_ops, "group_conv2d", spy)
  got = np.asarray(b(images, training=False))
  assert seen and set(seen) == {("bfloat16", "bfloat16")}
  error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
  assert 0 < error < 3e-2, error
  assert got.dtype == np.float32
  del a


def test_compute_dtype_errors():
  _, b = _pair(layout="per_bin")
  with pytest.raises(ValueError, match="bucketed_inference='loop'"):
    b.cache_kernels(compute_dtype="bfloat16")
  _, b = _pair()
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    b.cache_kernels(compute_dtype="int8")


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_int8_cache_is_the_float32_cache_quantized_per_output_channel(layout):
  a, b = _pair(layout=layout)
  images = _images()
  b.cache_kernels(dtype="float32")
  full = {k: [(t.numpy(), r.numpy()) for t, r in v]
          for k, v in b._kernel_cache.kernels.items()}  # pylint: disable=protected-access
  bins = b.cache_kernels(dtype="int8")
  cache = b._kernel_cache  # pylint: disable=protected-access
  info = b.kernel_cache_info()
  assert info["dtype"] == "int8" and info["valid"]
  # 1 byte per kernel entry plus a float32 scale per (kernel, output channel).
  channels = sum(t.shape[-1] + r.shape[0] * r.shape[-1]
                 for v in full.values() for t, r in v)
  assert info["bytes"] == info["params"] + 4 * channels
  for k in bins:  # independent float64 quantization of each float32 kernel, channel by channel
    for (t, r), (t_scale, r_scale), (t32, r32) in zip(cache.kernels[k], cache.scales[k],
                                                      full[k]):
      for q, scale, kernel in [(t, t_scale, t32)] + [
          (r[j], r_scale[j], r32[j]) for j in range(r32.shape[0])]:
        q, scale = np.asarray(q), np.asarray(scale)
        assert q.dtype == np.int8
        for o in range(kernel.shape[-1]):
          w = kernel[..., o].astype(np.float64)
          peak = np.abs(w).max()
          want_scale = peak / 127 if peak > 0 else 1.0
          assert abs(scale[o] - want_scale) <= 1e-6 * want_scale
          assert np.abs(q[..., o] - np.rint(w / want_scale)).max() <= 1
  want = np.asarray(a(images, training=False))
  got = np.asarray(b(images, training=False))
  error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
  # Lossy (4 to 8 inputs per output channel in this tiny model: a coarse grid), but close.
  assert 0 < error <= 3e-2, error
  graph = tf.function(lambda x: b(x, training=False))
  _close(graph(tf.constant(images.astype(np.float32))), got, 1e-5)
  # Exactly what a float32 cache of the kernels dequantized in NumPy (q * scale, each
  # layer with its own scales) computes: the scales are used with the right layers.
  dequantized = {
      k: [(np.asarray(t, np.float32) * np.asarray(t_scale),
           np.asarray(r, np.float32) * np.asarray(r_scale)[:, None, None, None, :])
          for (t, r), (t_scale, r_scale) in zip(cache.kernels[k], cache.scales[k])]
      for k in bins}
  b._kernel_cache = type(cache)(  # pylint: disable=protected-access
      cache.n_bins, cache.integrator,
      {k: [(tf.constant(t), tf.constant(r)) for t, r in v] for k, v in dequantized.items()},
      cache.snapshot, cache.depth_scale)
  _close(b(images, training=False), got, 1e-5)


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_cache_without_fallback_has_no_generating_path(layout, monkeypatch):
  a, b = _pair(layout=layout)
  images = _images()
  want = np.asarray(a(images, training=False))
  signature = tf.TensorSpec((None, 16, 16, 3), tf.float32)

  def nodes(model):
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        signature).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)

  b.cache_kernels()
  with_fallback = nodes(b)
  assert b.cache_kernels(fallback=False) == tuple(range(16))
  assert b.kernel_cache_info()["fallback"] is False
  assert nodes(b) < 0.7 * with_fallback
  calls = []
  monkeypatch.setattr(PuppeteerODE, "call", lambda *args, **kw: calls.append(1))
  graph = tf.function(lambda x: b(x, training=False))
  _close(graph(tf.constant(images.astype(np.float32))), want)
  _close(b(images, training=False), want)
  assert not calls  # traced and run without the puppeteer
  monkeypatch.undo()
  # A bin it does not hold, or changed weights: an error, eagerly and in a graph.
  message = "kernel cache was built with fallback=False"
  deep = int(np.asarray(b(images[2:3], training=False, return_details=True)["depth"])[0])
  assert deep == 3
  b.cache_kernels(bins=[0], fallback=False)   # image 0 (H = 0) is in bin 0, image 2 is not
  graph = tf.function(lambda x: b(x, training=False))
  _close(graph(tf.constant(images[:1].astype(np.float32))), want[:1])
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    graph(tf.constant(images[:3].astype(np.float32)))
  with pytest.raises(ValueError, match=message):
    b(images[:3], training=False)
  b.cache_kernels(fallback=False)
  beta = [w for w in b.puppet.weights if w.path.endswith("beta")][0]
  beta.assign(beta.numpy() + 0.5)
  with pytest.raises(ValueError, match=message):
    b(images, training=False)


def _nearest_reference(cached, k):
  """The cached bin nearest to bin k, the higher one on a tie (a plain loop)."""
  best = None
  for c in sorted(cached):
    if best is None or abs(c - k) <= abs(best - k):
      best = c
  return best


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_nearest_fallback_runs_uncached_bins_as_the_nearest_cached_bin(layout, monkeypatch):
  a, b = _pair(layout=layout)
  images = _images()
  own = b(images, return_details=True)["complexity_bin"].numpy()   # bins 0, 1, 8, 13
  cached = (1, 5)  # bin 3 lies midway; images in bins 8 and 13 drop from depth 3 to 2
  assert b.cache_kernels(bins=cached, dtype="float32", fallback="nearest") == cached
  assert b.kernel_cache_info()["fallback"] == "nearest"
  table = b._kernel_cache.nearest_bins()  # pylint: disable=protected-access
  np.testing.assert_array_equal(table, [_nearest_reference(cached, k) for k in range(16)])
  assert table[3] == 5 and table[0] == 1 and table[15] == 5
  served = np.array([_nearest_reference(cached, int(k)) for k in own])
  centres, _, depths = b.bin_table()
  assert set(own) - set(cached) and (depths[served] != depths[own]).any()
  # Reference: the generating per-sample model, each image given its served bin's centre
  # as its complexity (so its kernels and depth are those of that bin).
  monkeypatch.setattr(a.complexity_layer, "call",
                      lambda x, *args, **kwargs: tf.gather(centres.astype(np.float32), served))
  want = np.asarray(a(images, training=False))
  monkeypatch.undo()
  calls = []
  monkeypatch.setattr(PuppeteerODE, "call", lambda *args, **kw: calls.append(1))
  _close(b(images, training=False), want)
  _close(tf.function(lambda x: b(x, training=False))(tf.constant(images.astype(np.float32))),
         want)
  assert not calls  # nothing generated
  monkeypatch.undo()
  details = b(images, training=False, return_details=True)
  np.testing.assert_array_equal(details["complexity_bin"].numpy(), served)
  np.testing.assert_array_equal(details["depth"].numpy(), depths[served])
  # Training is not served from the cache: every image keeps its own bin.
  np.testing.assert_array_equal(
      b(images, training=True, return_details=True)["complexity_bin"].numpy(), own)
  # A stale cache raises, as without a fallback.
  beta = [w for w in b.puppet.weights if w.path.endswith("beta")][0]
  beta.assign(beta.numpy() + 0.5)
  with pytest.raises(ValueError, match="built with fallback='nearest'"):
    b(images, training=False)
  with pytest.raises(ValueError, match="fallback must be one of"):
    b.cache_kernels(fallback="closest")
  with pytest.raises(ValueError, match="needs at least one bin"):
    b.cache_kernels(bins=[], fallback="nearest")


def test_loop_graph_has_no_function_per_cached_bin():
  # The loop picks a bin's cached kernels with one selector per stage, not with a branch
  # per bin: each branch would be a function of its own, instantiated when the graph first
  # runs (with 16 bins, ~100 MB for the full puppet; docs/memory_profile.md). The graph's
  # functions are the same with 2 and 16 cached bins.
  signature = tf.TensorSpec((None, 16, 16, 3), tf.float32)
  libraries = []
  for bins in (2, 16):
    _, b = _pair(bins=bins)
    assert len(b.cache_kernels(dtype="int8", fallback=False)) == bins
    graph = tf.function(lambda x, b=b: b(x, training=False)).get_concrete_function(
        signature).graph.as_graph_def()
    libraries.append(len(graph.library.function))
  assert libraries[0] == libraries[1], libraries


def ops_cast(x):
  return tf.cast(x, tf.float32).numpy()


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_partial_cache_from_images_and_errors(layout):
  a, b = _pair(layout=layout)
  images = _images()
  want_bins = b(images[:2], return_details=True)["complexity_bin"].numpy()
  bins = b.cache_kernels(images=images[:2])
  assert bins == tuple(sorted(set(want_bins.tolist()))) and len(bins) == 2
  _close(b(images, training=False), a(images, training=False))  # other bins generated
  # A cached bin with repeated layers (image 2: depth 3) beside generated ones of depth > 1.
  details = b(images, return_details=True)
  deep = int(details["complexity_bin"].numpy()[2])
  assert int(details["depth"].numpy()[2]) == 3
  others = [d for k, d in zip(details["complexity_bin"].numpy(), details["depth"].numpy())
            if k != deep]
  assert max(others) > 1
  assert b.cache_kernels(bins=[deep]) == (deep,)
  _close(b(images, training=False), a(images, training=False))
  _close(tf.function(lambda x: b(x, training=False))(tf.constant(images)),
         a(images, training=False))
  with pytest.raises(ValueError, match="execution='bucketed'"):
    a.cache_kernels()
  with pytest.raises(ValueError, match="bins must be in"):
    b.cache_kernels(bins=[16])


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
def test_partial_int8_cache_generates_the_other_bins_exactly(layout):
  """An int8 cache of some bins (dequantized before each convolution) beside bins generated
  in the same call: the generated bins' images get exactly the uncached model's logits, the
  cached ones the quantized kernels'."""
  a, b = _pair(layout=layout)
  images = _images()
  bins = b(images, return_details=True)["complexity_bin"].numpy()
  deep = int(bins[2])  # image 2: depth 3, repeated layers
  assert b.cache_kernels(bins=[deep], dtype="int8") == (deep,)
  want = np.asarray(a(images, training=False))
  for fn in (lambda x: b(x, training=False),
             tf.function(lambda x: b(x, training=False))):
    got = np.asarray(fn(tf.constant(images)))
    generated = bins != deep
    _close(got[generated], want[generated], 1e-5)
    error = np.abs(got[~generated] - want[~generated]).max() / max(1.0, np.abs(want).max())
    assert 0 < error <= 3e-2, error  # quantized, but close


# Three bin states (H, step, sample-count weight) for the puppeteer gradient tests.
_STATES = (np.array([1.5, 2.5, 3.0], np.float32),
           cx.step_size(np.array([1.5, 2.5, 3.0], np.float32)),
           np.array([2, 1, 3], np.float32))


def _puppeteer_pair():
  """Two PuppeteerODEs (max_depth 5) with identical weights."""
  kw = dict(stage_channels=(4, 6), input_channels=3, max_depth=5, init_rank=2)
  a, b = PuppeteerODE(**kw), PuppeteerODE(**kw)
  a.build(None)
  b.build(None)
  b.set_weights(a.get_weights())
  return a, b


def test_depth_sorted_gradients_when_every_state_stops_before_max_depth():
  # All depths < max_depth: the last steps have no state left to integrate. (TensorFlow's
  # depthwise-conv filter gradient of an empty batch is uninitialized memory; this turned
  # bucketed training into NaN.) The gradients must equal those of the masked form.
  masked, sliced = _puppeteer_pair()
  h, step, weight = _STATES
  depth = np.array([1, 2, 2], np.int32)

  def grads(layer, **kwargs):
    with tf.GradientTape() as tape:
      out = layer(h, step, depth, training=True, state_weight=weight, **kwargs)
      loss = sum(tf.reduce_sum(tf.square(t)) + tf.reduce_sum(tf.square(r[:, :1]))
                 for t, r in [(t, tf.stack(r, 1) if isinstance(r, list) else r) for t, r in out])
    return [g.numpy() for g in tape.gradient(loss, layer.trainable_weights)]

  want = grads(masked)
  for _ in range(3):  # the garbage showed up on repeated calls
    got = grads(sliced, depth_sorted=True)
    for w, g0, g1 in zip(masked.trainable_weights, want, got):
      assert np.isfinite(g1).all(), w.path
      np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6, err_msg=w.path)


def test_active_rows_only_gradients_match_masking_when_no_state_reaches_the_last_units():
  # Bucketed training pools each repeated kernel only for the states deeper than its unit;
  # with every depth below max_depth the last units have no rows at all. The loss over the
  # used kernels must have the masked form's gradients (finite, same values).
  masked, rows = _puppeteer_pair()
  h, step, weight = _STATES
  depth = np.array([1, 2, 3], np.int32)

  def grads(layer, **kwargs):
    with tf.GradientTape() as tape:
      out = layer(h, step, depth, training=True, state_weight=weight, stack_repeated=False,
                  **kwargs)
      loss = 0.0
      for t, repeated in out:
        loss += tf.reduce_sum(tf.square(t))
        for j, k in enumerate(repeated):
          used = depth > j + 1
          if not kwargs:  # the masked form has every row: keep the used ones
            k = tf.boolean_mask(k, used)
          loss += tf.reduce_sum(tf.square(k)) * (j + 1)
    return [g.numpy() for g in tape.gradient(loss, layer.trainable_weights)]

  want = grads(masked)
  for _ in range(2):
    got = grads(rows, depth_sorted=True, active_rows_only=True)
    for w, g0, g1 in zip(masked.trainable_weights, want, got):
      assert np.isfinite(g1).all(), w.path
      np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6, err_msg=w.path)


def _puppeteer_counter(monkeypatch, model):
  calls = []
  original = model.puppeteer.call
  monkeypatch.setattr(model.puppeteer, "call",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  return calls


def test_gathered_kernel_table_serves_without_the_puppeteer(monkeypatch):
  """cache_kernels() on a gathered model: inference gathers each sample's kernels from a
  table of every bin's, runs no puppeteer eagerly, and gives the generating per-sample
  model's logits eagerly, XLA-compiled and through predict."""
  a, b = _gathered_pair()
  images = _images()
  want = a(images, training=False)
  assert b.cache_kernels() == tuple(range(16))
  info = b.kernel_cache_info()
  assert info["valid"] and info["dtype"] == "float32" and info["fallback"] is True
  # The table: per stage, a transition and L = max_depth - 1 repeated kernels per bin.
  c_in, params = 3, 0
  for c in TINY["stage_channels"]:
    params += 16 * (9 * c_in * c + (TINY["max_depth"] - 1) * 9 * c * c)
    c_in = c
  assert info["params"] == params and info["bytes"] == 4 * params
  calls = _puppeteer_counter(monkeypatch, b)
  _close(b(images, training=False), want)
  assert not calls  # eager: the table served the batch, nothing was generated
  _close(tf.function(lambda x: b(x, training=False), jit_compile=True)(tf.constant(images)),
         want)
  _close(b.predict(images, verbose=0, batch_size=4), want)


def test_stale_or_incomplete_gathered_table_generates():
  """A table made stale by a weight change, or one without a batch's bin (fallback=True),
  is not used: the logits are those of the generating per-sample model, eagerly and under
  XLA (a conditional; XLA has no run-time errors)."""
  a, b = _gathered_pair(bins=8)
  images = _images()
  bins = b(images, return_details=True)["complexity_bin"].numpy()
  b.cache_kernels(bins=sorted(set(bins.tolist()))[:-1])  # one occupied bin left out
  assert not set(bins.tolist()) <= set(b.kernel_cache_info()["bins"])
  xla = tf.function(lambda x: b(x, training=False), jit_compile=True)
  _close(b(images, training=False), a(images, training=False))
  _close(xla(tf.constant(images)), a(images, training=False))
  b.cache_kernels()
  kernel = [w for w in b.puppeteer.trainable_weights][0]
  before = a(images, training=False)
  for m in (a, b):
    w = [v for v in m.puppeteer.trainable_weights if v.path == kernel.path][0]
    w.assign(w.numpy() * 1.2)
  want = a(images, training=False)
  assert np.abs(np.asarray(want) - np.asarray(before)).max() > 1e-3
  assert not b.kernel_cache_info()["valid"]
  _close(b(images, training=False), want)
  _close(tf.function(lambda x: b(x, training=False), jit_compile=True)(tf.constant(images)),
         want)


def test_gathered_table_nearest_and_16_bit(monkeypatch):
  """fallback='nearest': each image runs as the nearest cached bin (reference: the
  per-sample model given that bin's centre); a 16-bit table is the float32 one rounded."""
  a, b = _gathered_pair()
  images = _images()
  own = b(images, return_details=True)["complexity_bin"].numpy()
  cached = (1, 5)
  assert b.cache_kernels(bins=cached, fallback="nearest") == cached
  served = np.array([_nearest_reference(cached, int(k)) for k in own])
  assert set(own) - set(cached)
  centres, _, depths = b.bin_table()
  monkeypatch.setattr(a.complexity_layer, "call",
                      lambda x, *args, **kwargs: tf.gather(centres.astype(np.float32), served))
  want = np.asarray(a(images, training=False))
  monkeypatch.undo()
  calls = _puppeteer_counter(monkeypatch, b)
  _close(b(images, training=False), want)
  assert not calls
  _close(tf.function(lambda x: b(x, training=False), jit_compile=True)(tf.constant(images)),
         want)
  np.testing.assert_array_equal(
      b(images, training=False, return_details=True)["depth"].numpy(), depths[served])
  b.cache_kernels(dtype="bfloat16")
  info = b.kernel_cache_info()
  assert info["dtype"] == "bfloat16" and info["bytes"] == 2 * info["params"]
  table16 = [k for pair in b._kernel_cache.table for k in pair]  # pylint: disable=protected-access
  full = b.cache_kernels()
  table32 = [k.numpy() for pair in b._kernel_cache.table for k in pair]  # pylint: disable=protected-access
  assert full == tuple(range(16))
  for got, ref in zip(table16, table32):
    np.testing.assert_array_equal(tf.cast(got, tf.float32).numpy(),
                                  tf.cast(tf.cast(ref, tf.bfloat16), tf.float32).numpy())
  for kwargs, match in [(dict(dtype="int8"), "dtype float32, float16 or bfloat16"),
                        (dict(fallback=False), "fallback=True or 'nearest'"),
                        (dict(bins=[]), "needs at least one bin")]:
    with pytest.raises(ValueError, match=match):
      b.cache_kernels(**kwargs)


def test_bfloat16_products_bucketed_matches_per_sample():
  """generator_matmul_dtype='bfloat16': bucketed inference and training against the
  per-sample model with the same option (both round the same products), and against float32
  (the option changes the kernels, by bfloat16's precision)."""
  a, b = _pair(generator_matmul_dtype="bfloat16")
  assert b.puppeteer.matmul_dtype == "bfloat16"
  assert PuppetClassifier.from_config(b.get_config()).config.generator_matmul_dtype == "bfloat16"
  images = _images()
  want = a(images, training=False)
  # The same rows of the same products; 1e-3 leaves room for a backend whose 16-bit matmul
  # accumulates in another order for another number of rows (measured here: exact).
  _close(b(images, training=False), want, tol=1e-3)
  full = PuppetClassifier(**TINY, complexity_bins=16)
  full(_images(3)[:1])
  full.set_weights(a.get_weights())
  moved = np.abs(np.asarray(full(images, training=False)) - np.asarray(want)).max()
  assert 1e-6 < moved < 5e-2 * max(1.0, float(np.abs(want).max()))
  images, labels = _images(8, seed=3), np.arange(8) % 5
  images[:3] = _images(3)
  # G's weight gradients sum the products over a bin's rows (bucketed) or over each
  # sample's (per-sample), each sum rounded to bfloat16: they agree to its precision
  # (measured: 1.4e-3 of the pointwise kernel's largest gradient; the rest to 1e-3).
  _assert_same_training_step(a, b, _tape_step(images, labels), grad_tol=1e-2)
