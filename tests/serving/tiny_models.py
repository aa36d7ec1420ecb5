"""Tiny models and images shared by the serving tests (not a test module)."""

import keras
import numpy as np

from official.puppet_cnn.baselines import build_baseline
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier

SHAPE = (16, 16, 3)
NUM_CLASSES = 5
MAX_DEPTH = 3
TINY_PUPPET = dict(stage_channels=(4, 8), max_depth=MAX_DEPTH, num_classes=NUM_CLASSES,
                   input_shape=SHAPE)


def tiny_puppet(seed: int = 0, **overrides) -> PuppetClassifier:
  """The tiny Puppet-CNN with informative outputs.

  Untrained, its ReLUs are dead at inference (moving statistics at their initial values), so
  every image would get the same uniform probabilities. One training-mode call with batch-norm
  momentum 0 sets the moving statistics to that batch's, and positive BN offsets keep the
  ReLUs alive: the probabilities then depend on each image's kernels and depth.
  """
  keras.utils.set_random_seed(seed)
  model = PuppetClassifier(bn_momentum=0.0, **TINY_PUPPET, **overrides)
  rng = np.random.default_rng(seed)
  model(rng.integers(0, 256, (8,) + SHAPE).astype(np.uint8), training=True)
  for w in model.puppet.weights:
    if w.path.endswith("beta"):
      w.assign(rng.uniform(0.2, 1.0, w.shape).astype("float32"))
  model.head.bias.assign(rng.normal(0.0, 0.5, (NUM_CLASSES,)).astype("float32"))
  return model


def tiny_resnet(seed: int = 0) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return build_baseline("resnet", NUM_CLASSES, SHAPE, widths=(4, 8), blocks_per_stage=(1, 1))


def images(seed: int = 0) -> np.ndarray:
  """uint8 (4, 16, 16, 3): a constant image, white noise, a smooth gradient, white noise.

  By the paper's eq. 10 (D = floor(1 / tanh(1 / H))): the constant image has complexity
  H = 0, so D = 1 (the minimum); the noise has H of about 6.7 bits, D = 6, clipped to the
  tiny model's max depth 3.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:16, 0:16]
  smooth = np.stack([(xx * 16 + 10) % 256, (yy * 16) % 256, ((xx + yy) * 8) % 256], -1)
  return np.stack([np.full(SHAPE, 128), rng.integers(0, 256, SHAPE), smooth,
                   rng.integers(0, 256, SHAPE)]).astype(np.uint8)


EXPECTED_DEPTH = {0: 1, 1: MAX_DEPTH, 3: MAX_DEPTH}  # image index -> depth, worked out above


def softmax(logits) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)
