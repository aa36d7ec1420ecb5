"""Tests for official/puppet_cnn/serving/macs.py: MACs worked out by hand."""

import keras
import pytest

from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import macs
from tests.serving import tiny_models


def test_conv_and_dense_by_hand():
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, padding="same")(inputs)        # 8*8 * 3*3*3*4 = 6912
  x = keras.layers.Conv2D(6, 3, strides=2, padding="valid")(x)  # 3*3 * 3*3*4*6 = 1944
  x = keras.layers.Flatten()(x)                                 # 54 features
  x = keras.layers.Dense(7)(x)                                  # 54*7 = 378
  model = keras.Model(inputs, keras.layers.Dense(2)(x))         # 7*2 = 14
  assert macs.keras_model_macs(model) == 6912 + 1944 + 378 + 14


def test_depthwise_separable_grouped_and_nested_by_hand():
  inner_in = keras.Input((4, 4, 8))
  y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(inner_in)
  # 4*4 positions * 3*3 * 8 channels * 2 = 2304
  inner = keras.Model(inner_in, y)
  inputs = keras.Input((4, 4, 8))
  x = inner(inputs)                                                  # 16 channels
  x = keras.layers.SeparableConv2D(5, 3, padding="same")(x)          # 16*(9*16 + 16*5) = 3584
  x = keras.layers.Conv2D(10, 1, groups=5)(x)                        # 16 * (5/5)*10 = 160
  x = keras.layers.Dense(3)(x)                                       # per position: 16*10*3 = 480
  model = keras.Model(inputs, x)
  assert macs.keras_model_macs(model) == 2304 + 3584 + 160 + 480


def test_layers_without_macs_count_zero():
  inputs = keras.Input((4, 4, 2))
  x = keras.layers.BatchNormalization()(inputs)
  x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.ReLU()(x)
  assert macs.keras_model_macs(keras.Model(inputs, x)) == 0


def test_puppeteer_step_by_hand():
  # Paper width C = 512, K = 3: 512*9 positions x 512 channels x (9 + 512).
  assert macs.puppeteer_step_macs(512) == 4608 * 512 * 521 == 1_229_193_216
  assert macs.puppeteer_step_macs(8, integrator="rk4") == 4 * 72 * 8 * 17
  # generator_rank r: (C x r)(r x C) instead of C x C, i.e. 2 r instead of C per position.
  assert macs.puppeteer_step_macs(512, generator_rank=64) == 4608 * 512 * (9 + 128)


def test_tiny_puppet_by_hand():
  model = PuppetClassifier(**tiny_models.TINY_PUPPET)
  model.build()
  # Stage 0 at 16x16: transition 3->4: 16*16*9*3*4 = 27648; each repeated 4->4: 36864.
  # Stage 1 at 8x8 (after the 2x2 pool): transition 4->8: 18432; each repeated: 36864.
  # Head: 8 * 5 = 40. Puppeteer: C = 8 -> 72 * 8 * 17 = 9792 MACs per step; a depth-d sample
  # needs 2 stages x d steps.
  for depth in (1, 2, 3, 2.5):
    counts = macs.puppet_cnn_macs(model, depth)
    assert counts["puppet"] == pytest.approx(27648 + 18432 + (depth - 1) * (36864 + 36864))
    assert counts["head"] == 40
    assert counts["puppeteer"] == pytest.approx(2 * depth * 9792)
    assert counts["puppeteer_executed"] == 2 * 3 * 9792
    assert counts["total"] == pytest.approx(counts["puppet"] + 40 + counts["puppeteer"])
  with pytest.raises(ValueError, match="depth must be in"):
    macs.puppet_cnn_macs(model, 4)


def test_residual_puppet_by_hand():
  model = PuppetClassifier(stage_channels=(4,), max_depth=2, num_classes=3,
                           input_shape=(6, 6, 3), puppet="resnet")
  model.build()
  # One stage, no pool: transition 36*9*3*4 = 3888; a residual unit = 2 convs of 36*9*16.
  counts = macs.puppet_cnn_macs(model, 2)
  assert counts["puppet"] == 3888 + 2 * 5184
  # C = 4: 36 * 4 * 13 = 1872 per step; depth 2 needs 1 + 2 steps.
  assert counts["puppeteer"] == 3 * 1872
