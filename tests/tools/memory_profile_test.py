"""tools/memory_profile.py: one tiny run of every phase, and its report."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import memory_profile  # noqa: E402  pylint: disable=wrong-import-position


def test_tiny_run_writes_the_report(tmp_path):
  output = os.path.join(tmp_path, "memory.md")
  cmd = [sys.executable, os.path.join(ROOT, "tools", "memory_profile.py"),
         "--models=static_twin,puppet_cached,saved_frozen8", "--stage_channels=4,8",
         "--max_depth=3", "--twin_depth=2", "--bins=4", f"--data_dir={tmp_path}/none",
         f"--output={output}"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = open(output).read()
  assert "| phase | static_twin | puppet_cached | saved_frozen8 |" in report
  assert "uniform random images" in report and "--stage_channels=4,8" in report
  for phase in memory_profile.PHASES:
    row = [line for line in report.splitlines() if line.startswith(f"| {phase} |")]
    assert len(row) == 1, phase
    cells = re.findall(r"(-?\d+) / (-?\d+) \(\+(-?\d+)\)", row[0])
    assert len(cells) == 3, row  # a resident / peak (+step) cell for every model
    for rss, peak, step in cells:
      assert int(peak) >= int(rss) - 1 and int(step) >= 0  # a peak never falls
  # puppet_cached holds the bins of the images; the exported model every bin, in int8
  # (sizes round to 0 MB at this size), and it was served from its SavedModel.
  sizes = re.findall(r"(puppet_cached|saved_frozen8): kernel cache of bins (\[[\d, ]+\]), "
                     r"(\d+) MB \((\w+)\)", report)
  assert [(s[0], s[3]) for s in sizes] == [("puppet_cached", "float32"),
                                           ("saved_frozen8", "int8")], sizes
  assert sizes[1][1] == "[0, 1, 2, 3]"
  assert re.search(r"saved_frozen8: served from a SavedModel of [\d.]+ MB", report)


def test_unknown_model_is_refused(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "tools", "memory_profile.py"), "--models=vgg",
         f"--output={tmp_path}/m.md"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), text=True,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode != 0 and "unknown ['vgg']" in proc.stderr
