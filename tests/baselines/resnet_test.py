"""Tests for official.puppet_cnn.baselines.resnet."""

import keras
import numpy as np
import pytest

from official.puppet_cnn.baselines import resnet


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_tiny_resnet_parameter_count_by_hand():
  model = resnet.build_resnet(10, (16, 16, 3), widths=(4, 8),
                              blocks_per_stage=(1, 1))
  # Convs have no bias; BN has 2 trainable (gamma, beta) and 2 non-trainable
  # (moving mean, variance) values per channel.
  stem = 3 * 3 * 3 * 4 + 2 * 4                      # conv 3->4, BN(4)
  stage1 = (3 * 3 * 4 * 4 + 2 * 4) * 2              # 2x (conv 4->4, BN(4))
  stage2 = ((3 * 3 * 4 * 8 + 2 * 8)                 # conv 4->8 /2, BN(8)
            + (3 * 3 * 8 * 8 + 2 * 8)               # conv 8->8, BN(8)
            + (1 * 1 * 4 * 8 + 2 * 8))              # 1x1 projection, BN(8)
  head = 8 * 10 + 10                                # Dense 8->10
  assert _count(model.trainable_weights) == stem + stage1 + stage2 + head
  assert _count(model.trainable_weights) == 1454
  bn_channels = 4 + (4 + 4) + (8 + 8 + 8)
  assert _count(model.non_trainable_weights) == 2 * bn_channels
  assert model.name == "resnet6_cifar"


def test_resnet18_parameter_count():
  model = resnet.build_resnet(10)
  assert model.name == "resnet18_cifar"
  trainable = _count(model.trainable_weights)
  assert abs(trainable - 11_173_962) <= 0.01 * 11_173_962
  # Stem + 4 stages x 2 BasicBlocks, projection in the first block of
  # stages 2-4, no bias in convs, BN gamma/beta, Dense 512->10.
  w = (64, 128, 256, 512)
  by_hand = 3 * 3 * 3 * 64 + 2 * 64
  c_in = 64
  for c in w:
    for block in range(2):
      by_hand += 3 * 3 * c_in * c + 2 * c + 3 * 3 * c * c + 2 * c
      if c_in != c:
        by_hand += c_in * c + 2 * c
      c_in = c
  by_hand += 512 * 10 + 10
  assert trainable == by_hand


def test_tiny_resnet_forward_and_train_step():
  keras.utils.set_random_seed(0)
  model = resnet.build_resnet(3, (8, 8, 3), widths=(4, 8),
                              blocks_per_stage=(1, 1))
  x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  y = np.array([0, 1, 2, 0, 1, 2])
  out = keras.ops.convert_to_numpy(model(x, training=False))
  assert out.shape == (6, 3) and np.all(np.isfinite(out))
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  losses = [float(model.train_on_batch(x, y)) for _ in range(15)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]


def test_spatial_resolution_kept_by_stem():
  model = resnet.build_resnet(10, (32, 32, 3), widths=(4, 8, 8),
                              blocks_per_stage=(1, 1, 1))
  # No stride-2 stem and no max-pool: stage 1 runs at 32x32.
  assert model.get_layer("stage1_block1_out").output.shape[1:3] == (32, 32)
  assert model.get_layer("stage3_block1_out").output.shape[1:3] == (8, 8)


def test_bad_widths_raise():
  with pytest.raises(ValueError, match="equal"):
    resnet.build_resnet(10, widths=(4, 8), blocks_per_stage=(1,))
  with pytest.raises(ValueError, match=">= 1"):
    resnet.build_resnet(10, widths=(4, 0), blocks_per_stage=(1, 1))


def test_keras_save_reload_identical(tmp_path):
  model = resnet.build_resnet(10, (16, 16, 3), widths=(4, 8),
                              blocks_per_stage=(1, 1))
  x = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3),
                                        dtype=np.uint8)
  path = str(tmp_path / "resnet_tiny.keras")
  model.save(path)
  restored = keras.saving.load_model(path)
  assert restored.name == model.name
  np.testing.assert_array_equal(
      keras.ops.convert_to_numpy(restored(x, training=False)),
      keras.ops.convert_to_numpy(model(x, training=False)))
