"""PuppetClassifier end to end: forward, training, serialization and input errors."""
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn import PuppetClassifier
from official.puppet_cnn import PuppetCNNConfig
from official.puppet_cnn.modeling import complexity as cx

TINY = dict(stage_channels=(4, 8), max_depth=3, num_classes=5, input_shape=(16, 16, 3))


def _images(n=6, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
  images[0] = 90  # constant: depth 1
  images[1, :, :8] = 10  # two-level image: low complexity
  images[1, :, 8:] = 200
  return images


def _loss():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_forward_shapes_and_details():
  model = PuppetClassifier(**TINY)
  images = _images()
  out = model(images, return_details=True)
  assert out["logits"].shape == (6, 5)
  h = cx.image_complexity(images).numpy()
  np.testing.assert_allclose(out["complexity"].numpy(), h, rtol=1e-6)
  want_depth = np.clip(np.floor(1 / np.tanh(1 / np.maximum(h, 1e-6))), 1, 3)
  np.testing.assert_array_equal(out["depth"].numpy(), want_depth)
  assert out["depth"].numpy()[0] == 1 and out["depth"].numpy()[-1] == 3


def test_inference_output_does_not_depend_on_batch_companions():
  model = PuppetClassifier(**TINY)
  images = _images(6)
  together = model(images, training=False).numpy()
  for i in range(6):
    alone = model(images[i:i + 1], training=False).numpy()[0]
    np.testing.assert_allclose(alone, together[i], rtol=1e-5, atol=1e-5)
  shuffled = model(images[::-1], training=False).numpy()[::-1]
  np.testing.assert_allclose(shuffled, together, rtol=1e-5, atol=1e-5)


def test_gradients_reach_puppeteer_and_puppet_stores_no_kernels():
  model = PuppetClassifier(**TINY)
  images, labels = _images(), np.arange(6) % 5
  with tf.GradientTape() as tape:
    loss = _loss()(labels, model(images, training=True))
  grads = dict(zip([w.path for w in model.trainable_weights],
                   tape.gradient(loss, model.trainable_weights)))
  for path, g in grads.items():
    if path.startswith("puppeteer/"):
      assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0, path
  kernel_like = [w.path for w in model.puppet.weights
                 if not any(t in w.path for t in ("gamma", "beta", "moving"))]
  assert kernel_like == []


def test_parameter_breakdown_by_hand():
  model = PuppetClassifier(**TINY, init_rank=2)
  b = model.parameter_breakdown()
  c = 8  # state width
  # C^2 + 15 C with one set of moving statistics (the paper's); the default keeps one per
  # step: 2 stages x (1 transition + 2 repeated) rows, 2 C values each instead of 2 C.
  assert b["puppeteer_generator"] == c * c + 15 * c + 2 * c * (2 * 3 - 1)
  paper = PuppetClassifier(**TINY, init_rank=2, generator_norm="batch").parameter_breakdown()
  assert paper["puppeteer_generator"] == c * c + 15 * c
  assert b["puppeteer_initial_state"] == 2 * (c + 9 + c)
  # BN: per stage (1 transition + 2 repeated) x 4 vectors x width.
  assert b["puppet_batch_norm"] == 3 * 4 * 4 + 3 * 4 * 8
  assert b["head"] == 8 * 5 + 5
  assert b["total_stored"] == model.count_params()
  # depth 3: 3*3*3*4 + 2*3*3*4*4 + 3*3*4*8 + 2*3*3*8*8
  assert b["generated_kernel_params_by_depth"][3] == 108 + 288 + 288 + 1152


def test_compiled_fit_step_lowers_loss():
  model = PuppetClassifier(**TINY)
  images, labels = _images(8), np.arange(8) % 5
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss(), jit_compile=True)
  # The loss measured eagerly in inference mode (what evaluate() reports), so that only the
  # train step is compiled with XLA (XLA inference: test_xla_and_plain_graph_agree).
  loss = lambda: float(_loss()(labels, model(images, training=False)))
  before = loss()
  model.fit(images, labels, epochs=3, batch_size=8, verbose=0)
  after = loss()
  assert after < before


def test_xla_and_plain_graph_agree():
  model = PuppetClassifier(**TINY)
  images = tf.constant(_images(4).astype(np.float32))
  plain = tf.function(lambda x: model(x, training=False))(images).numpy()
  xla = tf.function(lambda x: model(x, training=False), jit_compile=True)(images).numpy()
  np.testing.assert_allclose(xla, plain, rtol=1e-4, atol=1e-5)


def test_keras_save_and_reload_give_identical_outputs(tmp_path):
  model = PuppetClassifier(**TINY, puppet="resnet", integrator="midpoint")
  images = _images()
  model(images, training=True)  # move the BN moving statistics away from their init
  want = model(images, training=False).numpy()
  path = os.path.join(tmp_path, "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, PuppetClassifier)
  assert loaded.config == model.config
  np.testing.assert_array_equal(loaded(images, training=False).numpy(), want)


def test_saved_compiled_model_loads_compiled_without_warning(tmp_path):
  """A model saved after `compile` comes back compiled with the same optimizer, loss and
  metrics (Keras would skip that, with a warning, for an overridden `compile`)."""
  model = PuppetClassifier(**TINY)
  model.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
  images, labels = _images(8), np.arange(8) % 5
  model.fit(images, labels, epochs=1, batch_size=8, verbose=0)
  want = model.evaluate(images, labels, batch_size=8, verbose=0, return_dict=True)
  path = os.path.join(tmp_path, "compiled.keras")
  model.save(path)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    loaded = keras.models.load_model(path)
  assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)
  assert abs(float(loaded.optimizer.learning_rate) - 3e-3) < 1e-9
  got = loaded.evaluate(images, labels, batch_size=8, verbose=0, return_dict=True)
  assert set(got) == {"loss", "accuracy"}
  # Independent of Keras' metric code: the loss from the logits by hand.
  logits = loaded(images, training=False).numpy().astype(np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                                                            keepdims=True)) \
      - logits.max(1, keepdims=True)
  by_hand = -log_p[np.arange(8), labels].mean()
  assert abs(got["loss"] - by_hand) < 1e-4 and abs(got["loss"] - want["loss"]) < 1e-5


def test_config_round_trip():
  model = PuppetClassifier(**TINY, depth_adaptation=False, fixed_depth=2)
  clone = PuppetClassifier.from_config(model.get_config())
  assert clone.config == model.config and clone.config.depth_when_fixed == 2


@pytest.mark.parametrize("puppet", ["vgg", "resnet", "alexnet"])
def test_one_puppeteer_drives_every_puppet(puppet):
  model = PuppetClassifier(puppet=puppet, max_depth=2, num_classes=5,
                           input_shape=(16, 16, 3),
                           stage_channels=(4, 6, 8, 6, 6) if puppet == "alexnet" else (4, 8))
  images, labels = _images(4), np.arange(4) % 5
  with tf.GradientTape() as tape:
    loss = _loss()(labels, model(images, training=True))
  grads = tape.gradient(loss, model.puppeteer.trainable_weights)
  assert all(g is not None for g in grads) and np.isfinite(float(loss))
  assert model.puppet.block_type == ("residual" if puppet == "resnet" else "plain")


def test_adaptation_switches():
  images = _images()
  fixed = PuppetClassifier(**TINY, depth_adaptation=False, fixed_depth=2)
  assert set(fixed(images, return_details=True)["depth"].numpy()) == {2}
  shared = PuppetClassifier(**TINY, parameter_adaptation=False, depth_adaptation=False)
  kernels = {}
  original = shared.puppeteer.call

  def spy(h, step, depth, training=None, **kwargs):
    kernels["h"] = h
    return original(h, step, depth, training=training, **kwargs)

  shared.puppeteer.call = spy
  shared(images)
  np.testing.assert_array_equal(kernels["h"].numpy(), np.full(6, 6.0, np.float32))


def test_integrator_can_change_after_training():
  model = PuppetClassifier(**TINY)
  images = _images()
  euler = model(images).numpy()
  model.integrator = "rk4"
  assert model.puppeteer.integrator == "rk4" and model.config.integrator == "rk4"
  assert np.abs(model(images).numpy() - euler).max() > 0
  with pytest.raises(ValueError, match="integrator"):
    model.integrator = "leapfrog"


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((16, 16, 3), np.uint8), ValueError, "rank 3"),
    (np.zeros((2, 16, 16, 1), np.uint8), ValueError, "3 channels"),
    (np.zeros((2, 20, 16, 3), np.uint8), ValueError, "height 16"),
    (np.zeros((0, 16, 16, 3), np.uint8), ValueError, "empty batch"),
    (np.full((2, 16, 16, 3), np.nan, np.float32), ValueError, "NaN or infinite"),
    (np.full((2, 16, 16, 3), np.inf, np.float32), ValueError, "NaN or infinite"),
    (np.full((2, 16, 16, 3), -0.5, np.float32), ValueError, "raw pixels"),
    (np.zeros((2, 16, 16, 3), bool), TypeError, "numeric"),
])
def test_bad_input_gets_a_clear_error(images, error, match):
  model = PuppetClassifier(**TINY)
  with pytest.raises(error, match=match):
    model(images)


def test_impossible_configs_are_rejected():
  with pytest.raises(ValueError, match="min_depth"):
    PuppetCNNConfig(min_depth=5, max_depth=3)
  with pytest.raises(ValueError, match="puppet"):
    PuppetCNNConfig(puppet="transformer")
  with pytest.raises(ValueError, match="pool_after"):
    PuppetCNNConfig(stage_channels=(4, 8), pool_after=(True,))
  with pytest.raises(ValueError, match="num_classes"):
    PuppetClassifier(num_classes=1)
  with pytest.raises(ValueError, match="unknown PuppetCNNConfig fields"):
    PuppetCNNConfig.from_dict({"depth": 3})


# ------------------------------------------------------------- depth and width at inference
WIDE = dict(stage_channels=(4, 8), max_depth=8, num_classes=5, input_shape=(16, 16, 3))


def test_depth_scale_one_is_exact_and_other_scales_follow_the_rule():
  model = PuppetClassifier(**WIDE)
  images = _images()
  base = model(images, return_details=True)
  d, dl = base["depth"].numpy(), base["step"].numpy().astype(np.float64)
  for scale in (0.5, 2.0):
    model.depth_scale = scale
    out = model(images, return_details=True)
    want = np.clip(np.floor(scale * d + 0.5), 1, np.floor(scale * 8 + 0.5))
    np.testing.assert_array_equal(out["depth"].numpy(), want)
    np.testing.assert_allclose(out["step"].numpy(), dl * d / want, rtol=1e-6)
    assert np.abs(out["logits"].numpy() - base["logits"].numpy()).max() > 0
  model.depth_scale = 1.0
  np.testing.assert_array_equal(model(images).numpy(), base["logits"].numpy())
  with pytest.raises(ValueError, match="depth_scale"):
    model.depth_scale = 0.0
  with pytest.raises(ValueError, match="at most 64"):
    PuppetCNNConfig(max_depth=8, depth_scale=9.0)


@pytest.mark.parametrize("layout", ["loop", "per_bin"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_bucketed_matches_per_sample_at_scaled_depth(scale, layout):
  images = _images()
  per_sample = PuppetClassifier(**WIDE, complexity_bins=8, depth_scale=scale)
  bucketed = PuppetClassifier(**WIDE, complexity_bins=8, depth_scale=scale,
                              execution="bucketed", bucketed_inference=layout)
  per_sample.build((None, 16, 16, 3))
  bucketed.build((None, 16, 16, 3))
  bucketed.set_weights(per_sample.get_weights())
  want = per_sample(images, training=False).numpy()
  np.testing.assert_allclose(bucketed(images, training=False).numpy(), want, atol=1e-4,
                             rtol=1e-4)
  bucketed.cache_kernels()
  np.testing.assert_allclose(bucketed(images, training=False).numpy(), want, atol=1e-4,
                             rtol=1e-4)


def test_refine_depth_starts_new_rows_from_the_nearest_trained_row():
  model = PuppetClassifier(**WIDE, depth_scale=0.5)
  model.build((None, 16, 16, 3))
  gamma = model.puppet.bn_weights[0]["repeated"][0]
  gamma.assign(np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32))
  assert model.refine_depth(1.0) == {0: 1, 2: 1, 4: 3, 6: 5}
  np.testing.assert_array_equal(gamma.numpy()[:, 0], [1, 1, 1, 3, 3, 5, 5])
  assert model.depth_scale == 1.0 and model.config.depth_scale == 1.0


def test_per_step_generator_statistics_follow_the_puppets_rows_at_scaled_depth():
  """generator_norm='batch_per_step' at depth_scale 2 (max_depth 3: 5 repeated steps per
  stage, trained rows by hand: round((j + 1) / 2) - 1 clipped to the 2 trained steps) and
  refine_depth from 0.5 (one repeated step: round(1 / 0.5) - 1 = unit 1 trained) to 1 (unit 0
  starts from unit 1)."""
  model = PuppetClassifier(**TINY, depth_scale=2.0, generator_norm="batch_per_step")
  model.build((None, 16, 16, 3))
  g = model.puppeteer
  assert g.statistics_rows == 2 * 3  # 2 stages x (transition + 2 repeated steps)
  rows = model._puppeteer_scaling()["step_rows"]  # pylint: disable=protected-access
  assert tuple(rows) == (0, 0, 1, 1, 1)
  assert [g.statistics_row(1, j, rows) for j in range(5)] == [4, 4, 5, 5, 5]
  assert g.statistics_row(1) == 3
  # The model's inference reads them: moving row 2 (stage 0, trained step 1, read by scaled
  # steps 2-4) moves the logits.
  images = _images()
  base = model(images, training=False).numpy()
  g.moving_mean.assign(g.moving_mean.numpy() + 3.0 * (np.arange(6) == 2)[:, None])
  assert np.abs(model(images, training=False).numpy() - base).max() > 1e-4

  model = PuppetClassifier(**TINY, depth_scale=0.5, generator_norm="batch_per_step")
  model.build((None, 16, 16, 3))
  g = model.puppeteer
  g.moving_mean.assign(np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32))
  assert model.refine_depth(1.0) == {0: 1}
  # Per stage: transition row, unit 0's row (now unit 1's value), unit 1's row.
  np.testing.assert_array_equal(g.moving_mean.numpy()[:, 0], [0, 2, 2, 3, 5, 5])


def test_at_width_one_reproduces_the_model_and_other_widths_resize_by_hand():
  model = PuppetClassifier(**TINY)
  images = _images()
  model.build((None, 16, 16, 3))
  rng = np.random.default_rng(3)
  for w in model.puppet.weights + model.head.weights:
    w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
  np.testing.assert_array_equal(model.at_width(1.0)(images).numpy(), model(images).numpy())
  half = model.at_width(0.5)
  assert half.config.channels == (2, 4) and half.config.state_width == 8
  head = model.head.kernel.numpy()
  np.testing.assert_allclose(half.head.kernel.numpy(), head[0::2] + head[1::2], rtol=1e-6)
  gamma = model.puppet.bn_weights[1]["transition"][0].numpy()
  np.testing.assert_allclose(half.puppet.bn_weights[1]["transition"][0].numpy(),
                             (gamma[0::2] + gamma[1::2]) / 2, rtol=1e-6)
  for a, b in zip(half.puppeteer.weights, model.puppeteer.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  wide = model.at_width(1.5)
  assert wide.config.channels == (6, 12) and wide(images).shape == (6, 5)
  with pytest.raises(ValueError, match="width_multiplier"):
    model.at_width(0)


def test_recalibration_sets_moving_statistics_to_the_batch_statistics():
  model = PuppetClassifier(**TINY)
  images = _images(8, seed=4)
  model.build((None, 16, 16, 3))
  puppeteer_before = [w.numpy().copy() for w in model.puppeteer.weights]
  assert model.recalibrate_batch_norm(images, batch_size=8) == 1
  for w, old in zip(model.puppeteer.weights, puppeteer_before):
    np.testing.assert_array_equal(w.numpy(), old)
  # Stage 0's transition conv in float64: the normalized pixels convolved with the kernels the
  # puppeteer generates (in training mode, as during recalibration).
  c = model.config
  x = (images / 255.0 - np.asarray(c.pixel_mean)) / np.asarray(c.pixel_std)
  h = cx.image_complexity(images)
  kernels = model.puppeteer(h, cx.step_size(h), np.full(8, 3, np.int32), training=True)
  transition = kernels[0][0].numpy()
  from tests.modeling import reference  # pylint: disable=import-outside-toplevel
  y = np.stack([reference.conv2d_same(x[b], transition[b]) for b in range(8)])
  np.testing.assert_allclose(model.puppet.bn_weights[0]["transition"][2].numpy(),
                             y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.puppet.bn_weights[0]["transition"][3].numpy(),
                             y.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)


def test_generator_recalibration_averages_each_steps_batch_statistics():
  """recalibrate_batch_norm(generator=True, puppet=False) with 'batch_per_step': each row of
  G's moving statistics is the mean of the per-step batch statistics of the batches that
  reached that step (each batch's read from a copy updated with momentum 0); a row only the
  second batch reached is that batch's alone. Nothing else moves."""
  model = PuppetClassifier(**TINY, generator_norm="batch_per_step")
  rng = np.random.default_rng(6)
  flat = np.repeat(rng.integers(0, 256, (8, 1, 1, 3)), 16, axis=1).repeat(16, axis=2)
  noisy = rng.integers(0, 256, (8, 16, 16, 3))
  batches = [flat.astype(np.uint8), noisy.astype(np.uint8)]  # depth 1, then depth 3
  model.build((None, 16, 16, 3))
  others = [w.numpy().copy() for w in model.puppet.weights + model.head.weights]
  g = model.puppeteer
  g.moving_mean.assign(rng.normal(size=tuple(g.moving_mean.shape)).astype(np.float32))
  stats = []
  for batch in batches:
    ref = PuppetClassifier(**TINY, generator_norm="batch_per_step")
    ref.build((None, 16, 16, 3))
    ref.set_weights(model.get_weights())
    ref.puppeteer.momentum = 0.0
    ref(batch, training=True)
    changed = np.any(ref.puppeteer.moving_mean.numpy() != g.moving_mean.numpy(), axis=1)
    stats.append((ref.puppeteer.moving_mean.numpy(), ref.puppeteer.moving_variance.numpy(),
                  changed))
  assert stats[0][2].tolist() == [True, False, False, True, False, False]  # transitions only
  assert stats[1][2].all()
  assert model.recalibrate_batch_norm(np.concatenate(batches), batch_size=8, generator=True,
                                      puppet=False) == 2
  for got, i in ((g.moving_mean.numpy(), 0), (g.moving_variance.numpy(), 1)):
    for row in range(6):
      want = np.mean([st[i][row] for st in stats if st[2][row]], axis=0)
      np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)
  for w, old in zip(model.puppet.weights + model.head.weights, others):
    np.testing.assert_array_equal(w.numpy(), old)
  with pytest.raises(ValueError, match="nothing to do"):
    model.recalibrate_batch_norm(batches[0], generator=False, puppet=False)


def test_with_generator_norm_converts_between_the_batch_norms():
  model = PuppetClassifier(**TINY, generator_norm="batch")
  images = _images()
  model.build((None, 16, 16, 3))
  rng = np.random.default_rng(7)
  g = model.puppeteer
  g.moving_mean.assign(rng.normal(scale=0.2, size=8).astype(np.float32))
  per_step = model.with_generator_norm("batch_per_step")
  assert per_step.config.generator_norm == "batch_per_step"
  np.testing.assert_array_equal(per_step.puppeteer.moving_mean.numpy(),
                                np.tile(g.moving_mean.numpy(), (6, 1)))
  np.testing.assert_allclose(per_step(images).numpy(), model(images).numpy(), rtol=1e-6,
                             atol=1e-6)
  rows = rng.normal(size=(6, 8)).astype(np.float32)
  per_step.puppeteer.moving_mean.assign(rows)
  back = per_step.with_generator_norm("batch")
  np.testing.assert_allclose(back.puppeteer.moving_mean.numpy(), rows.mean(axis=0), rtol=1e-6)
  calibrated = model.with_generator_norm("batch_per_step", calibration_images=images)
  assert np.any(calibrated.puppeteer.moving_mean.numpy() != per_step.puppeteer.moving_mean.numpy())
  for a, b in zip(calibrated.puppet.weights, model.puppet.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  with pytest.raises(ValueError, match="'state' normalizes differently"):
    model.with_generator_norm("state")


def test_train_widths_adds_the_distillation_loss_and_fits_under_xla():
  model = PuppetClassifier(**TINY, train_widths=(0.5, 1.0))
  images, labels = _images(), np.arange(6) % 5
  model.build((None, 16, 16, 3))
  full = model(images, training=True).numpy().astype(np.float64)
  (loss,) = model.losses
  narrow = model.at_width(0.5)(images, training=True).numpy().astype(np.float64)
  p = np.exp(full - full.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  log_q = narrow - narrow.max(1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
  want = np.mean(np.sum(p * (np.log(p) - log_q), axis=1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-6)
  assert model(images, training=False) is not None and not model.losses
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss(), jit_compile=True)
  history = model.fit(images, labels, epochs=3, batch_size=6, verbose=0).history["loss"]
  assert history[-1] < history[0]
  with pytest.raises(ValueError, match="include 1.0"):
    PuppetCNNConfig(train_widths=(0.5, 0.75))


def test_set_binning_quantizes_h_by_hand_and_restores_exact():
  model = PuppetClassifier(**TINY)
  images = _images(8, seed=3)
  for i, levels in ((2, 10), (3, 14)):  # stripes: H about 1.87 and 2.12 bits, exact depth 2,
    images[i] = (np.arange(16) % levels * 255 // (levels - 1))[None, :, None]  # 4 bins: 1, 3
  exact = model(images, training=False).numpy()
  h = cx.image_complexity(images).numpy().astype(np.float64)
  assert list(model(images, return_details=True)["depth"].numpy()[2:4]) == [2, 2]
  for n, execution in ((4, "per_sample"), (4, "bucketed"), (16, "bucketed")):
    model.set_binning(n, execution)
    out = model(images, training=False, return_details=True)
    # Eq. 10 on each image's bin centre (n equal bins on [0, 8] bits), in float64.
    centre = (np.clip(np.floor(h * n / 8), 0, n - 1) + 0.5) * 8 / n
    want_depth = np.clip(np.floor(1 / np.tanh(1 / centre)), 1, 3)
    np.testing.assert_array_equal(out["depth"].numpy(), want_depth)
    assert model.complexity_bins == n and model.config.execution == execution
  # The weights never changed: back to exact H gives the original logits bit for bit.
  model.set_binning(0)
  assert model.config.execution == "per_sample"
  np.testing.assert_array_equal(model(images, training=False).numpy(), exact)
  with pytest.raises(ValueError, match="bucketed"):
    model.set_binning(0, "bucketed")


def test_generator_remat_trains_the_bucketed_model_identically():
  images, labels = _images(8, seed=5), np.arange(8) % 5
  results = []
  for remat in (False, True):
    model = PuppetClassifier(**TINY, complexity_bins=8, execution="bucketed",
                             generator_remat=remat)
    model.build((None, 16, 16, 3))
    if results:
      model.set_weights(results[0][0])
    start = model.get_weights()
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(_loss()(labels, model(images, training=True)))
    grads = tape.gradient(loss, model.trainable_weights)
    results.append((start, float(loss), [g.numpy() for g in grads]))
  assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
  for got, want in zip(results[1][2], results[0][2]):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  assert PuppetClassifier.from_config(model.get_config()).config.generator_remat


def _assert_same_compiled_step(reference, model, seed, logits=False):
  """Gives `model` the weights of `reference` and checks that one compiled (tf.function)
  training step, as model.fit runs it, has the same loss and gradients and leaves the same
  moving statistics (and, with `logits`, that inference afterwards gives the same logits)."""
  images, labels = _images(8, seed=seed), np.arange(8) % 5
  results = []
  for m in (reference, model):
    m.build((None, 16, 16, 3))
    if results:
      m.set_weights(results[0][0])
    start = m.get_weights()

    @tf.function
    def step(x, y, m=m):
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(_loss()(y, m(x, training=True)))
      return loss, tape.gradient(loss, m.trainable_weights)

    loss, grads = step(tf.constant(images), tf.constant(labels))
    results.append((start, float(loss), [g.numpy() for g in grads],
                    [w.numpy() for w in m.non_trainable_weights],
                    m(images, training=False).numpy() if logits else None))
  assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
  for got, want in zip(results[1][2] + results[1][3], results[0][2] + results[0][3]):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  if logits:
    np.testing.assert_allclose(results[1][4], results[0][4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remat", [False, True])
def test_generator_loop_trains_the_bucketed_model_identically(remat):
  # A compiled (graph) training step, as model.fit runs it: with generator_loop the
  # puppeteer's repeated steps run in a tf.while_loop; loss, gradients and the moving
  # statistics after the step must be those of the unrolled model.
  models = [PuppetClassifier(**TINY, complexity_bins=8, execution="bucketed",
                             generator_remat=remat, generator_loop=loop)
            for loop in (False, True)]
  _assert_same_compiled_step(*models, seed=6)
  assert PuppetClassifier.from_config(models[1].get_config()).config.generator_loop


@pytest.mark.parametrize("execution", ["per_sample", "gathered"])
def test_im2col_per_sample_conv_trains_identically(execution):
  # per_sample_conv='im2col' (patches and a batched matmul) against the grouped conv: the
  # same logits, loss, gradients and moving statistics after a compiled training step; the
  # option survives get_config and bad values are refused.
  models = [PuppetClassifier(**TINY, complexity_bins=4, execution=execution,
                             per_sample_conv=method)
            for method in ("grouped", "im2col")]
  _assert_same_compiled_step(*models, seed=7, logits=True)
  assert PuppetClassifier.from_config(models[1].get_config()).puppet.per_sample_conv == "im2col"
  with pytest.raises(ValueError, match="per_sample_conv must be one of"):
    PuppetClassifier(**TINY, per_sample_conv="winograd")


# ------------------------------------------------------------------------- mixed precision
@pytest.fixture(name="set_global_policy")
def _set_global_policy():
  """keras.mixed_precision.set_global_policy, restored after the test."""
  before = keras.config.dtype_policy()
  yield keras.mixed_precision.set_global_policy
  keras.mixed_precision.set_global_policy(before)


def _conv_spy(monkeypatch):
  """Records (input dtype, kernel dtype) of every puppet convolution."""
  from official.puppet_cnn.modeling import backend_ops  # pylint: disable=import-outside-toplevel
  seen = []
  for name in ("per_sample_conv2d", "group_conv2d"):
    def spy(x, kernel, *args, original=getattr(backend_ops, name), **kwargs):
      seen.append((x.dtype.name, kernel.dtype.name))
      return original(x, kernel, *args, **kwargs)
    monkeypatch.setattr(backend_ops, name, spy)
  return seen


@pytest.mark.parametrize("execution", ["per_sample", "bucketed"])
def test_mixed_bfloat16_policy_runs_only_the_puppets_convolutions_in_bfloat16(execution,
                                                                             monkeypatch):
  """dtype='mixed_bfloat16': every puppet convolution gets bfloat16 input and kernel; the
  complexity (from float pixels), the depths and the logits' dtype are the float32 model's;
  logits and every gradient are close to the float32 model's with the same weights (within
  what bfloat16's rounding explains), and the logits not equal to them."""
  kwargs = dict(TINY, execution=execution, complexity_bins=8 if execution == "bucketed" else 0)
  model32 = PuppetClassifier(**kwargs)
  model = PuppetClassifier(**kwargs, dtype="mixed_bfloat16")
  model32.build()
  model.build()
  model.set_weights(model32.get_weights())
  assert model.precision_policy == "mixed_bfloat16" and model.dtype_policy.name == "float32"
  assert model.puppet.conv_dtype == "bfloat16" and model32.puppet.conv_dtype == "float32"
  images = np.minimum(_images(6).astype(np.float32) + 0.25, 255)  # bfloat16 would round these
  labels = np.arange(6) % 5
  want = model32(images, training=False, return_details=True)
  seen = _conv_spy(monkeypatch)
  got = model(images, training=False, return_details=True)
  assert seen and set(seen) == {("bfloat16", "bfloat16")}
  np.testing.assert_array_equal(got["complexity"].numpy(), want["complexity"].numpy())
  np.testing.assert_array_equal(got["depth"].numpy(), want["depth"].numpy())
  assert got["logits"].dtype.name == "float32"
  error = np.abs(got["logits"].numpy() - want["logits"].numpy()).max()
  assert 1e-6 < error / np.abs(want["logits"].numpy()).max() < 5e-2

  def gradients(m):
    with tf.GradientTape() as tape:
      loss = _loss()(labels, m(images, training=True))
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, m.trainable_weights)]
  for w, g, g32 in zip(model.trainable_weights, gradients(model), gradients(model32)):
    # bfloat16 keeps 8 bits; through batch norm over 6 tiny images and ReLU kinks that
    # rounding moves the gradients of this random model by up to about 12% (float16: 3%).
    difference = np.linalg.norm(g - g32)
    assert difference <= 0.2 * np.linalg.norm(g32) + 1e-7, (w.path, difference)


def test_global_mixed_policy_trains_and_is_saved_with_the_model(set_global_policy, tmp_path):
  set_global_policy("mixed_bfloat16")
  model = PuppetClassifier(**TINY)
  assert model.puppet.conv_dtype == "bfloat16"
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss(), jit_compile=False)
  images, labels = _images(8), np.arange(8) % 5
  history = model.fit(images, labels, epochs=1, batch_size=8, verbose=0).history["loss"]
  assert np.all(np.isfinite(history))
  path = os.path.join(tmp_path, "mixed.keras")
  model.save(path)
  set_global_policy("float32")
  loaded = keras.models.load_model(path)
  assert loaded.precision_policy == "mixed_bfloat16" and loaded.puppet.conv_dtype == "bfloat16"
  assert loaded.at_width(0.5).puppet.conv_dtype == "bfloat16"  # derived models keep it
  np.testing.assert_array_equal(loaded(images, training=False).numpy(),
                                model(images, training=False).numpy())
  # A model of the default policy saved before the option existed loads as float32.
  config = model.get_config()
  del config["dtype"]
  assert PuppetClassifier.from_config(config).puppet.conv_dtype == "float32"


def test_mixed_float16_compiles_with_loss_scaling_and_other_policies_are_refused():
  model = PuppetClassifier(**TINY, dtype="mixed_float16")
  assert model.puppet.conv_dtype == "float16"
  model.compile(keras.optimizers.SGD(1e-2), _loss())
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  images, labels = _images(8), np.arange(8) % 5
  assert np.isfinite(model.fit(images, labels, batch_size=8, verbose=0).history["loss"][0])
  model32 = PuppetClassifier(**TINY)
  model32.compile("adam", _loss())
  assert not isinstance(model32.optimizer, keras.optimizers.LossScaleOptimizer)
  for policy in ("bfloat16", "float16", "int8"):
    with pytest.raises(ValueError, match="float32 variables"):
      PuppetClassifier(**TINY, dtype=policy)
