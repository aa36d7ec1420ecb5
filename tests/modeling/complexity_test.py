"""Input complexity (paper eq. 8-11) against answers worked out by hand."""
import math

import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.config_definitions import ComplexityConfig
from official.puppet_cnn.modeling import complexity as cx


def _planes(gray):
  return np.asarray(gray, np.float32)[:, None]  # (B, H, W) -> (B, 1, H, W)


def test_constant_image_has_zero_complexity_and_minimum_depth():
  images = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 77, 255)])
  h = cx.image_complexity(images).numpy()
  np.testing.assert_array_equal(h, [0.0, 0.0, 0.0])
  dl = cx.step_size(h).numpy()
  np.testing.assert_array_equal(dl, [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(cx.depth_from_step(dl, 2, 8).numpy(), [2, 2, 2])
  np.testing.assert_array_equal(cx.initial_fill(h).numpy(), [0.0, 0.0, 0.0])


def test_near_constant_image_is_finite_and_shallow():
  image = np.full((1, 32, 32, 3), 100, np.uint8)
  image[0, 5, 7] = 101  # one pixel one level brighter: pixel entropy ~0.0112 bits
  h = cx.image_complexity(image).numpy()
  assert np.all(np.isfinite(h)) and 0 <= h[0] < 0.1
  depth = cx.depth_from_step(cx.step_size(h), 1, 8).numpy()
  assert depth[0] == 1


def test_uniform_noise_pixel_entropy_is_eight_bits():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (1, 256, 256)).astype(np.float32)
  e = cx.pixel_entropy(_planes(noise), ComplexityConfig()).numpy()
  assert abs(e[0, 0] - 8.0) < 0.05


def test_two_equally_frequent_values_is_one_bit():
  image = np.zeros((1, 16, 16), np.float32)
  image[:, ::2] = 200.0
  e = cx.pixel_entropy(_planes(image), ComplexityConfig()).numpy()
  assert abs(e[0, 0] - 1.0) < 1e-6
  # The same in nats: ln 2.
  e_nats = cx.pixel_entropy(_planes(image), ComplexityConfig(log_base=math.e)).numpy()
  assert abs(e_nats[0, 0] - math.log(2)) < 1e-6


def test_four_values_in_ratio_gives_known_entropy():
  # p = (1/2, 1/4, 1/8, 1/8): H = 0.5*1 + 0.25*2 + 2 * 0.125*3 = 1.75 bits.
  values = np.array([10] * 32 + [20] * 16 + [30] * 8 + [40] * 8, np.float32).reshape(1, 8, 8)
  e = cx.pixel_entropy(_planes(values), ComplexityConfig()).numpy()
  assert abs(e[0, 0] - 1.75) < 1e-6


def test_spectrum_entropy_of_a_pure_cosine():
  # A cosine along x has exactly two non-DC frequency peaks (+f and -f); every other bin is 0.
  # With log-minmax scaling the histogram holds 2 values at the top level and N-3 at 0:
  # H = -(2/(N-1)) log2(2/(N-1)) - ((N-3)/(N-1)) log2((N-3)/(N-1)).
  n = 32
  x = np.arange(n)
  plane = 127.5 + 100 * np.cos(2 * np.pi * 4 * x / n)[None, :] * np.ones((n, 1))
  e = cx.spectrum_entropy(_planes(plane[None]), ComplexityConfig()).numpy()[0, 0]
  total = n * n - 1
  p = np.array([2 / total, (total - 2) / total])
  expected = -(p * np.log2(p)).sum()
  assert abs(e - expected) < 1e-4


def test_complexity_combines_the_two_entropies_with_weights():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
  config = ComplexityConfig(pixel_weight=0.25)
  planes = np.transpose(gray, (0, 3, 1, 2))
  e_pix = cx.pixel_entropy(planes, config).numpy()[:, 0]
  e_spec = cx.spectrum_entropy(planes, config).numpy()[:, 0]
  h = cx.image_complexity(gray, config).numpy()
  np.testing.assert_allclose(h, 0.25 * e_pix + 0.75 * e_spec, rtol=1e-6)


def test_luminance_uses_bt601_weights():
  image = np.zeros((1, 4, 4, 3), np.float32)
  image[..., 0] = 100.0  # luma = 29.9 everywhere on the left half, 0 on the right
  image[:, :, 2:, 0] = 0.0
  e = cx.image_complexity(image, ComplexityConfig(pixel_weight=1.0)).numpy()
  assert abs(e[0] - 1.0) < 1e-6  # two equally frequent luma values


@pytest.mark.parametrize("h, dl, depth", [
    (0.5, math.tanh(2.0), 1),      # 1/tanh(2)   = 1.037
    (1.0, math.tanh(1.0), 1),      # 1/tanh(1)   = 1.313
    (2.0, math.tanh(0.5), 2),      # 1/tanh(.5)  = 2.164
    (3.0, math.tanh(1 / 3), 3),    # 1/tanh(1/3) = 3.111
    (4.0, math.tanh(0.25), 4),     # 1/tanh(.25) = 4.083
    (6.5, math.tanh(1 / 6.5), 6),  # 6.551
    (8.0, math.tanh(0.125), 8),    # 8.042
])
def test_step_and_depth_formula(h, dl, depth):
  got_dl = cx.step_size(np.array([h], np.float32)).numpy()[0]
  assert abs(got_dl - dl) < 1e-6
  assert cx.depth_from_step(np.array([got_dl]), 1, 16).numpy()[0] == depth
  assert abs(cx.initial_fill(np.array([h], np.float32)).numpy()[0]
             - math.exp(1 - h ** -2)) < 1e-5


def test_depth_is_clamped():
  dl = cx.step_size(np.array([0.1, 8.0], np.float32))
  np.testing.assert_array_equal(cx.depth_from_step(dl, 3, 5).numpy(), [3, 5])


def test_complexity_compiles_with_xla_and_matches_eager():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
  eager = cx.image_complexity(images).numpy()
  compiled = tf.function(cx.image_complexity, jit_compile=True)(tf.constant(images)).numpy()
  np.testing.assert_allclose(compiled, eager, atol=1e-4)


def test_channel_mean_mode_and_bad_options():
  image = np.zeros((1, 8, 8, 2), np.float32)
  image[:, :, :4, 0] = 255.0  # channel 0: 1 bit; channel 1: constant, 0 bits
  config = ComplexityConfig(color_mode="channel_mean", pixel_weight=1.0)
  assert abs(cx.image_complexity(image, config).numpy()[0] - 0.5) < 1e-6
  with pytest.raises(ValueError, match="luminance"):
    cx.image_complexity(image)  # 2 channels cannot be turned into luma
  with pytest.raises(ValueError, match="color_mode"):
    ComplexityConfig(color_mode="hsv")
  with pytest.raises(ValueError, match="bins"):
    ComplexityConfig(bins=1)


def test_log_fixed_scaling_gives_zero_for_constant_and_positive_for_noise():
  config = ComplexityConfig(spectrum_scaling="log_fixed")
  const = np.full((1, 16, 16, 3), 50, np.float32)
  noise = np.random.default_rng(3).integers(0, 256, (1, 16, 16, 3)).astype(np.float32)
  assert cx.image_complexity(const, config).numpy()[0] == 0.0
  assert cx.image_complexity(noise, config).numpy()[0] > 3.0


def test_input_complexity_layer_round_trips_config():
  layer = cx.InputComplexity(ComplexityConfig(bins=64))
  clone = cx.InputComplexity.from_config(layer.get_config())
  assert clone.complexity_config.bins == 64
