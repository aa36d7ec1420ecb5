"""Model factory: `--model` names to Keras models, Puppet-CNN puppets and baselines alike.

Every model takes raw uint8-range pixels and returns logits, so all of them train through the
same pipeline and compare like for like.
"""

from __future__ import annotations

from typing import Tuple

import keras

from official.puppet_cnn.baselines import BASELINES
from official.puppet_cnn.baselines import build_baseline
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier

PUPPET_MODELS = {"puppet_cnn": "vgg", "puppet_vgg": "vgg", "puppet_resnet": "resnet",
                 "puppet_alexnet": "alexnet"}
MODEL_NAMES = tuple(PUPPET_MODELS) + tuple(BASELINES)


def is_puppet(name: str) -> bool:
  return name in PUPPET_MODELS


def build_model(name: str, num_classes: int, image_shape: Tuple[int, int, int],
                puppet_config: PuppetCNNConfig | None = None) -> keras.Model:
  """Builds model `name` for `num_classes` classes and images of `image_shape`.

  For the puppet_* models `puppet_config` supplies everything but the puppet preset,
  num_classes and input_shape, which come from `name` and the data.
  """
  if name in PUPPET_MODELS:
    config = (puppet_config or PuppetCNNConfig()).replace(
        puppet=PUPPET_MODELS[name], num_classes=int(num_classes),
        input_shape=tuple(image_shape))
    model = PuppetClassifier(config, name=name)
    model.build((None,) + tuple(image_shape))
    return model
  if name in BASELINES:
    return build_baseline(name, int(num_classes), tuple(image_shape))
  raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
