"""Loads a trained model from a `.keras` file or a checkpoint folder, for export.

A folder is searched for, in this order: model.keras, best.keras, latest.keras, then the same
names under checkpoints/ (the layout `official/puppet_cnn/train_lib.py` writes).
"""

from __future__ import annotations

import os

import keras

# Importing the packages registers their custom layers and models for deserialization.
import official.puppet_cnn.baselines  # noqa: F401  pylint: disable=unused-import
import official.puppet_cnn.modeling.puppet_classifier  # noqa: F401  pylint: disable=unused-import

CANDIDATES = ("model.keras", "best.keras", "latest.keras", os.path.join("checkpoints",
              "model.keras"), os.path.join("checkpoints", "best.keras"),
              os.path.join("checkpoints", "latest.keras"))


def resolve_model_path(path: str) -> str:
  """The .keras file `path` names or holds (see module docstring)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in CANDIDATES:
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"{path} is a folder without a saved model; looked for "
                            f"{', '.join(CANDIDATES)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no model at {path}: pass a .keras file or a checkpoint folder")
  if not path.endswith(".keras"):
    raise ValueError(f"{path} is not a .keras file (Keras 3's saving format); save the model "
                     "with model.save('model.keras')")
  return path


def load_keras_model(path: str) -> keras.Model:
  """`keras.saving.load_model` of the resolved path, without the optimizer/compile state."""
  return keras.saving.load_model(resolve_model_path(path), compile=False)
