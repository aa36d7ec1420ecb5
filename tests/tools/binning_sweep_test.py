"""tools/binning_sweep.py's report on a tiny real training run, and its flag parsing."""
import os
import sys

import pytest

from tests import tiny_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import binning_sweep  # noqa: E402  pylint: disable=wrong-import-position


def test_parse_bins_rejects_bad_values():
  assert binning_sweep.parse_bins(["0", "16"]) == [0, 16]
  with pytest.raises(ValueError, match="integers >= 0"):
    binning_sweep.parse_bins(["-1"])
  with pytest.raises(ValueError, match="'x'"):
    binning_sweep.parse_bins(["x"])


@pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")
def test_report_for_a_binned_run(tmp_path):
  run = tiny_run.train_tiny_run(str(tmp_path / "run"), complexity_bins=4, execution="bucketed")
  text = binning_sweep.report([run], ["0", "4"], "bucketed", tiny_run.DATA_DIR, None, "cmd")
  assert "Trained with 4 complexity bins; 64 test images." in text
  rows = [line for line in text.splitlines() if line.startswith("| exact H")
          or line.startswith("| 4 |")]
  assert [r.split("|")[2].strip() for r in rows] == ["per_sample", "bucketed"]
  assert "Command: `cmd`" in text
