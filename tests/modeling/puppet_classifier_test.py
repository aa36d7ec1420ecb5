"""PuppetClassifier end to end: forward, training, serialization and input errors."""
import os

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
  assert b["puppeteer_generator"] == c * c + 15 * c
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
  before = model.evaluate(images, labels, verbose=0, batch_size=8)
  model.fit(images, labels, epochs=3, batch_size=8, verbose=0)
  after = model.evaluate(images, labels, verbose=0, batch_size=8)
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

  def spy(h, step, depth, training=None):
    kernels["h"] = h
    return original(h, step, depth, training=training)

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
