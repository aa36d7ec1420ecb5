"""tools/results_table.py on results.json files written by hand."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import results_table  # noqa: E402  pylint: disable=wrong-import-position


def test_table_rows_from_hand_written_results(tmp_path):
  run = tmp_path / "run_a"
  run.mkdir()
  (run / "results.json").write_text(json.dumps({
      "model": "puppet_cnn", "top1": 0.25, "top5": 0.75, "num_test_images": 10000,
      "stored_params": 250000, "epochs_trained": 4, "train_seconds": 90.0,
      "mean_depth": 3.5, "command": "train --flagfile=x", "machine": "m 2 CPUs"}))
  rows = results_table.load_results(str(tmp_path / "*" / "results.json"))
  text = results_table.markdown(rows, "T", "what ran")
  # 250,000 params x 4 bytes = 1.00 MB; 90 s = 1.5 min; the paper's Table 1 row.
  assert ("| `puppet_cnn` | 25.00% | 75.00% | 10,000 | 250,000 | 1.00 | 4 | 1.5 min | 3.50 | "
          "72.51% / 96.85% / 1.08 |") in text
  assert "`train --flagfile=x` on m 2 CPUs" in text


def test_no_results_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="no results.json"):
    results_table.load_results(str(tmp_path / "*.json"))
