"""Tests for official.puppet_cnn.baselines.vgg."""

import numpy as np
import pytest

from official.puppet_cnn.baselines import vgg


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_tiny_vgg_parameter_count_by_hand():
  model = vgg.build_vgg(10, (8, 8, 3), cfg=(4, "M", 8, "M"))
  conv1 = 3 * 3 * 3 * 4 + 4          # 3x3 conv 3->4 with bias
  bn1 = 2 * 4                        # gamma, beta
  conv2 = 3 * 3 * 4 * 8 + 8          # 3x3 conv 4->8 with bias
  bn2 = 2 * 8
  head = 8 * 10 + 10                 # Dense 8->10
  assert _count(model.trainable_weights) == conv1 + bn1 + conv2 + bn2 + head
  assert _count(model.trainable_weights) == 522
  assert _count(model.non_trainable_weights) == 2 * (4 + 8)
  assert model.output.shape == (None, 10)


def test_tiny_vgg_with_hidden_classifier_and_no_conv_bias():
  model = vgg.build_vgg(10, (8, 8, 3), cfg=(4, "M", 8, "M"),
                        classifier_units=(6,), conv_bias=False)
  expected = ((3 * 3 * 3 * 4 + 2 * 4) + (3 * 3 * 4 * 8 + 2 * 8)
              + (8 * 6 + 6) + (6 * 10 + 10))
  assert _count(model.trainable_weights) == expected


def test_vgg11_parameter_count_by_hand():
  model = vgg.build_vgg(10)
  assert model.name == "vgg11_bn_cifar"
  convs = [(3, 64), (64, 128), (128, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512)]
  by_hand = sum(3 * 3 * i * o + o + 2 * o for i, o in convs) + 512 * 10 + 10
  assert by_hand == 9_231_114
  assert _count(model.trainable_weights) == by_hand


@pytest.mark.parametrize("config,depth,num_convs", [
    ("A", 11, 8), ("B", 13, 10), ("D", 16, 13), ("E", 19, 16),
    (16, 16, 13), ("e", 19, 16)])
def test_config_letters(config, depth, num_convs):
  model = vgg.build_vgg(10, config=config)
  assert model.name == f"vgg{depth}_bn_cifar"
  convs = [l for l in model.layers if l.__class__.__name__ == "Conv2D"]
  assert len(convs) == num_convs


def test_forward_tiny():
  model = vgg.build_vgg(4, (8, 8, 3), cfg=(4, "M", 8, "M", 8))
  x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  out = np.asarray(model(x, training=False))
  assert out.shape == (2, 4) and np.all(np.isfinite(out))


def test_bad_config_and_size_raise():
  with pytest.raises(ValueError, match="Unknown VGG config"):
    vgg.build_vgg(10, config="C")
  with pytest.raises(ValueError, match="cfg"):
    vgg.build_vgg(10, cfg=("M",))
  with pytest.raises(ValueError, match="at least 32x32"):
    vgg.build_vgg(10, (16, 16, 3))
