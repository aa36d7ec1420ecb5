"""Tests for official/puppet_cnn/serving/size_report.py: rows worked out by hand, files."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import size_report
from tests.serving import tiny_models


def _small_net():
  inputs = keras.Input((8, 8, 3), name="images")
  x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)  # 432 + 16
  x = keras.layers.Flatten()(x)                                         # 1024
  x = keras.layers.Dense(64, name="fc")(x)                              # 65536 + 64
  return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))   # 320 + 5


def _walk_bytes(path):
  return sum(os.stat(os.path.join(root, f)).st_size
             for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  spec = size_report.ModelSpec("small", "a small conv net", _small_net, compress=True)
  rows = size_report.measure_spec(spec, str(root), command="cmd", machine="box",
                                  log=lambda _: None)
  return root, {r["variant"]: r for r in rows}


def test_baseline_row_by_hand(small_rows):
  root, rows = small_rows
  assert list(rows) == ["float32", "pruned 50%", "pruned 90%", "int8 (Keras quantize)"]
  row = rows["float32"]
  params = 448 + 65600 + 325
  assert row["stored_params"] == params
  assert row["float32_bytes"] == row["stored_bytes"] == row["paper_param_bytes"] == 4 * params
  # 8x8 positions x 3x3x3x16 + 1024 x 64 + 64 x 5.
  assert row["macs_min"] == row["macs_mean"] == row["macs_max"] == 27648 + 65536 + 320
  # int8 bound: kernels 1 byte + 4 per output channel, biases float32.
  assert row["all_kernels_int8_bytes"] == (432 + 64) + (65536 + 256) + (320 + 20) + 4 * 85
  assert row["savedmodel_bytes"] == _walk_bytes(root / "small" / "1")
  assert row["command"] == "cmd" and row["machine"] == "box"
  assert os.path.isdir(root / "small_pruned50" / "1") and os.path.isdir(root / "small_int8" / "1")


def test_compressed_variants(small_rows):
  _, rows = small_rows
  gz = [rows[v]["savedmodel_gz_bytes"] for v in ("float32", "pruned 50%", "pruned 90%")]
  # 66k float32 weights dominate: zeroing half / 90% of them must show in the gzip size.
  assert gz[0] > gz[1] > gz[2]
  assert gz[0] - gz[2] > 0.7 * 4 * 65536
  assert rows["pruned 90%"]["savedmodel_bytes"] == pytest.approx(
      rows["float32"]["savedmodel_bytes"], rel=0.01)  # dense files keep their size
  q = rows["int8 (Keras quantize)"]
  # Dense layers int8 (+ float32 scales), the conv stays float32.
  assert q["stored_bytes"] == 448 * 4 + (65536 + 64 * 4 + 64 * 4) + (320 + 5 * 4 + 5 * 4)
  # 3 of the 4 bytes of each of the 65,536 fc weights go (the graph grows a little).
  assert q["savedmodel_bytes"] < rows["float32"]["savedmodel_bytes"] - 0.5 * 3 * 65536


def test_int8_savedmodel_serves(small_rows):
  root, _ = small_rows
  keras.utils.set_random_seed(0)  # measure_spec builds every model with seed 0
  model = _small_net()
  x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  want = tiny_models.softmax(model(x))
  fn = tf.saved_model.load(str(root / "small_int8" / "1")).signatures["serving_default"]
  got = fn(images=tf.constant(x))["probabilities"].numpy()
  np.testing.assert_allclose(got, want, atol=0.02)


def test_puppet_row_by_hand(tmp_path):
  spec = size_report.ModelSpec("tiny_puppet", "tiny",
                               lambda: PuppetClassifier(**tiny_models.TINY_PUPPET))
  results = {"tiny_puppet": {"top1": 0.5, "runs": 2, "mean_depth": 2.0}}
  (row,) = size_report.measure_spec(spec, str(tmp_path), results=results, log=lambda _: None)
  # 773 and G's 184 with one set of G's moving statistics; per step (the default) 80 more.
  assert row["stored_params"] == 853 and row["paper_param_bytes"] == 4 * 264
  assert row["top1"] == 0.5 and row["top1_runs"] == 2
  assert row["depth_mean"] == 2.0
  assert row["depth_mean_source"] == "the `mean_depth` of results.json"
  # See macs_test: puppet 27648 + 18432 + (d - 1) * 73728 + head 40; puppeteer 2 d x 9792.
  assert row["puppet_macs_min"] == 46120 and row["puppeteer_macs_min"] == 19584
  assert row["puppet_macs_mean"] == 46120 + 73728 and row["puppeteer_macs_mean"] == 39168
  assert row["macs_max"] == 46120 + 2 * 73728 + 58752
  assert row["puppeteer_macs_executed"] == 58752
  # Generated kernel params: 3*3*(3*4 + 4*8) = 396 at depth 1, + 2 x 9*(16 + 64) at depth 3.
  assert row["generated_kernel_params_min"] == 396
  assert row["generated_kernel_params_max"] == 396 + 2 * 720


def test_puppet_mean_depth_measured_on_images(tmp_path):
  spec = size_report.ModelSpec("tiny_puppet", "tiny",
                               lambda: PuppetClassifier(**tiny_models.TINY_PUPPET))
  images = tiny_models.images()[[0, 1, 0, 1, 3]]  # depths 1, 3, 1, 3, 3 (tiny_models)
  results = {"tiny_puppet": {"top1": 0.5, "runs": 1, "mean_depth": 2.0}}  # measured wins
  (row,) = size_report.measure_spec(spec, str(tmp_path), results=results, log=lambda _: None,
                                    depth_images=images, depth_images_name="test images")
  assert row["depth_mean"] == pytest.approx(11 / 5)
  assert row["depth_mean_source"].startswith("5 test images (mean complexity")
  assert "images per depth {1: 2, 3: 3}" in row["depth_mean_source"]
  assert row["puppet_macs_mean"] == pytest.approx(46120 + 1.2 * 73728)


def test_load_results(tmp_path):
  runs = [("a", {"model": "puppet_vgg", "top1": 0.8, "mean_depth": 6.5}),
          ("b", {"model": "puppet_cnn", "top1": 0.9, "mean_depth": 6.2}),
          ("c", {"model": "resnet", "top1": 0.93})]
  for folder, values in runs:
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "results.json").write_text(json.dumps(values))
  found = size_report.load_results(str(tmp_path / "*" / "results.json"))
  assert found == {"puppet_cnn": {"top1": 0.9, "runs": 2, "mean_depth": 6.2},
                   "resnet": {"top1": 0.93, "runs": 1, "mean_depth": None}}
  assert size_report.load_results(None) == {}
  with pytest.raises(FileNotFoundError, match="matches no file"):
    size_report.load_results(str(tmp_path / "none*.json"))
  (tmp_path / "bad.json").write_text(json.dumps({"accuracy": 1}))
  with pytest.raises(ValueError, match="no 'model' and 'top1'"):
    size_report.load_results(str(tmp_path / "bad.json"))


def test_default_specs_cover_every_model():
  keys = [s.key for s in size_report.default_specs()]
  assert keys == ["puppet_cnn", "puppet_resnet", "puppet_alexnet", "resnet", "vgg", "alexnet",
                  "squeezenet", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small"]
  assert [s.compress for s in size_report.default_specs()] == [False] * 3 + [True] * 7


def test_write_report(small_rows, tmp_path):
  pytest.importorskip("matplotlib")
  _, rows = small_rows
  rows = list(rows.values())
  paths = size_report.write_report(rows, str(tmp_path / "docs"), command="python x.py --y")
  with open(paths["csv"], newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == size_report.COLUMNS
    read = list(reader)
  assert [r["variant"] for r in read] == [r["variant"] for r in rows]
  assert read[0]["stored_params"] == "66373" and read[0]["machine"] == "box"
  text = open(paths["md"], encoding="utf-8").read()
  assert "`python x.py --y`" in text and "`box`" in text
  assert "| `small` a small conv net | 66,373 | 0.27 | 0.27 |" in text
  assert "## What a user would do instead" in text
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
