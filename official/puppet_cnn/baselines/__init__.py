"""Baseline CNNs that Puppet-CNN is compared against (paper Tables 1-3, 6).

All models map raw [0, 255] images to logits and normalize inside the graph
with `Rescaling(1/255)` + `PixelNormalization(mean, std)`.
"""

from official.puppet_cnn.baselines.pixel_normalization import PixelNormalization
from official.puppet_cnn.baselines.registry import BASELINES
from official.puppet_cnn.baselines.registry import build_baseline

__all__ = ["BASELINES", "PixelNormalization", "build_baseline"]
