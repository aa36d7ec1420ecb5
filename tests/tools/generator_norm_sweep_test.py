"""tools/generator_norm_sweep.py's report and saved per-step model on a tiny real run."""
import json
import os
import sys

import keras
import numpy as np
import pytest

from tests import tiny_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import generator_norm_sweep  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")


def test_report_and_saved_model(tiny_run_dir, tmp_path):
  out = str(tmp_path / "per_step.keras")
  text = generator_norm_sweep.report([tiny_run_dir], tiny_run.DATA_DIR, None, 32, "cmd", out)
  assert "Trained with `generator_norm='batch_per_step'`; 64 test images; statistics re-estimated on " \
         "32 training images in batches of 32." in text
  rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # after the head
  assert len(rows) == 3 and "`batch_per_step`" in rows[2]
  # The as-trained row is the training run's own evaluation (train_lib, results.json).
  with open(os.path.join(tiny_run_dir, "results.json")) as f:
    top1 = json.load(f)["top1"]
  assert rows[0].split("|")[3].strip() == f"{100 * top1:.2f}%"
  loaded = keras.models.load_model(out)
  assert loaded.config.generator_norm == "batch_per_step"
  assert np.asarray(loaded.puppeteer.moving_mean).ndim == 2
  with pytest.raises(ValueError, match=r"\.keras file"):
    generator_norm_sweep.report([tiny_run_dir], tiny_run.DATA_DIR, None, 32, "cmd", "x.h5")
