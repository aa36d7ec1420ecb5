"""Tests for official/puppet_cnn/serving/model_loading.py."""

import numpy as np
import pytest

from official.puppet_cnn.serving import model_loading
from tests.serving import tiny_models


def test_loads_a_file_or_a_checkpoint_folder(tmp_path):
  model = tiny_models.tiny_puppet()
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  model.save(tmp_path / "run" / "checkpoints" / "best.keras")
  x = tiny_models.images()
  want = model(x, training=False).numpy()
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoints",
               tmp_path / "run" / "checkpoints" / "best.keras"):
    loaded = model_loading.load_keras_model(str(path))
    np.testing.assert_allclose(loaded(x, training=False).numpy(), want, atol=1e-5)
  model.save(tmp_path / "run" / "model.keras")  # model.keras wins over checkpoints/
  assert model_loading.resolve_model_path(str(tmp_path / "run")) == str(
      tmp_path / "run" / "model.keras")


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="without a saved model"):
    model_loading.resolve_model_path(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no model at"):
    model_loading.resolve_model_path(str(tmp_path / "x.keras"))
  (tmp_path / "weights.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="not a .keras file"):
    model_loading.resolve_model_path(str(tmp_path / "weights.h5"))
