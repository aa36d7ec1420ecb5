"""tools/width_sweep.py's report on a tiny real training run."""
import os
import sys

import pytest

from tests import tiny_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import width_sweep  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")


def test_report_for_a_width_sampled_run(tmp_path):
  run = tiny_run.train_tiny_run(str(tmp_path / "run"), train_widths=(0.5, 1.0))
  text = width_sweep.report([run], ["0.5", "1", "1.5"], tiny_run.DATA_DIR, None, 16, "cmd")
  assert "Trained at widths 0.5, 1; 64 test images; recalibration on 16 training images" in text
  assert "| 0.5x | 2-4 |" in text and "| 1x | 4-8 |" in text and "| 1.5x | 6-12 |" in text
  row = [line for line in text.splitlines() if line.startswith("| 1x")][0]
  assert len(row.split("|")) == 10  # width, channels, params, MACs, 2 + 2 accuracy columns
