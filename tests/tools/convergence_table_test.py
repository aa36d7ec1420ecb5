"""tools/convergence_table.py's report on a tiny real training run."""
import os
import sys

import pytest

from tests import tiny_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import convergence_table  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")


def test_report_has_a_row_per_integrator_and_scale(tiny_run_dir):
  run = tiny_run_dir  # tests/tiny_run.py's default run, shared with tests/sweeps_test.py
  text = convergence_table.report([run], ["0.5", "1", "2"], ["euler", "midpoint"],
                                  tiny_run.DATA_DIR, None, 0, "cmd")
  rows = [line for line in text.splitlines() if line.startswith("| euler")
          or line.startswith("| midpoint")]
  assert [r.split("|")[1:3] for r in rows] == [
      [" euler ", " 0.5x "], [" euler ", " 1x "], [" euler ", " 2x "],
      [" midpoint ", " 0.5x "], [" midpoint ", " 1x "], [" midpoint ", " 2x "]]
  # Mean depth grows with the scale (max_depth 3: scale 2 allows up to 6 layers per stage).
  depths = [float(r.split("|")[3]) for r in rows[:3]]
  assert depths[0] < depths[1] < depths[2] <= 6
  assert "Command: `cmd`" in text and "64 test images" in text
