"""Tests for official/puppet_cnn/serving/model_size.py: sizes worked out by hand."""

import gzip
import io
import os
import tarfile

import keras
import numpy as np
import pytest

from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import model_size
from tests.serving import tiny_models


def _dense_model():
  inputs = keras.Input((4,))
  return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def test_dense_by_hand():
  model = _dense_model()
  assert model_size.stored_parameters(model) == 4 * 3 + 3
  assert model_size.stored_weight_bytes(model) == 60
  assert model_size.paper_param_bytes(model) == 60


def test_conv_bn_counts_moving_statistics_not_seeds():
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3)(inputs)                   # 3*3*3*4 + 4 = 112
  x = keras.layers.BatchNormalization()(x)                # 4 * 4 = 16 (2 trainable, 2 not)
  x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))  # a seed state, not a weight
  model = keras.Model(inputs, x)
  assert model_size.stored_parameters(model) == 128
  assert model_size.stored_weight_bytes(model) == 512


def test_puppet_cnn_paper_size_is_g_only():
  model = PuppetClassifier(**tiny_models.TINY_PUPPET)
  # By hand (see export_test): G = 184 + 80 per-step moving statistics, initial state 400,
  # puppet BN 144, head 45.
  assert model_size.stored_parameters(model) == 853
  assert model_size.stored_weight_bytes(model) == 4 * 853
  assert model_size.paper_param_bytes(model) == 4 * 264
  paper = PuppetClassifier(**tiny_models.TINY_PUPPET, generator_norm="batch")
  assert model_size.paper_param_bytes(paper) == 4 * 184


def test_paper_size_of_the_full_puppet_cnn_is_table_5():
  # Paper Table 5: "Param Size" 1.08 MB at C = 512 (C^2 + 15 C = 269,824 params), with the
  # one set of G's moving statistics the paper counts; per step (the default) 2 C x 31 more.
  model = PuppetClassifier(generator_norm="batch")
  assert model_size.paper_param_bytes(model) == 4 * 269_824
  assert model_size.paper_param_bytes(PuppetClassifier()) == 4 * (269_824 + 2 * 512 * 31)


def test_directory_and_gzip_bytes(tmp_path):
  folder = tmp_path / "1"
  (folder / "variables").mkdir(parents=True)
  (folder / "saved_model.pb").write_bytes(b"x" * 1000)
  (folder / "variables" / "data").write_bytes(bytes(24))
  assert model_size.directory_bytes(str(folder)) == 1024
  # The tar.gz holds exactly those files, under the version folder's name.
  with tarfile.open(fileobj=io.BytesIO(model_size.tar_gz_bytes(str(folder)))) as tar:
    files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  assert files == {"1/saved_model.pb": b"x" * 1000, "1/variables/data": bytes(24)}
  # Reproducible (no times or owners inside).
  assert model_size.tar_gz_bytes(str(folder)) == model_size.tar_gz_bytes(str(folder))


def test_gzip_sees_zeros_but_not_noise(tmp_path):
  rng = np.random.default_rng(0)
  for name, data in (("zeros", bytes(1 << 20)), ("noise", rng.bytes(1 << 20))):
    (tmp_path / name).mkdir()
    (tmp_path / name / "w").write_bytes(data)
  assert model_size.gzipped_tar_bytes(str(tmp_path / "zeros")) < 10_000
  assert model_size.gzipped_tar_bytes(str(tmp_path / "noise")) > 1 << 20
  # Independent check with the gzip module: same order of magnitude as gzipping the file.
  assert model_size.gzipped_tar_bytes(str(tmp_path / "zeros")) < 4 * len(
      gzip.compress(bytes(1 << 20), 6)) + 1024


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    model_size.directory_bytes(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError):
    model_size.gzipped_tar_bytes(os.path.join(str(tmp_path), "nope"))
