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
  assert re.search(r"- puppet_cached: peak at batch 64 \d+ MB, [\d.]+x static_twin's", report)


def _run(base, values):
  """A fake worker result: base_kb, and (rss_kb, hwm_kb) per phase."""
  return {"base_kb": base, "phases": [{"phase": p, "rss_kb": base + r, "hwm_kb": base + h}
                                      for p, (r, h) in zip(memory_profile.PHASES, values)]}


def test_rounds_are_folded_into_medians_and_ratios_by_hand():
  phases = len(memory_profile.PHASES)
  # Three runs with different baselines: medians of the growth, not of the raw sizes.
  runs = [_run(1000, [(10, 20)] * phases), _run(5000, [(30, 40)] * phases),
          _run(200, [(20, 90)] * phases)]
  folded = memory_profile.median_result(runs)
  assert folded["base_kb"] == 0 and folded["runs"] == 3
  assert all(p["rss_kb"] == 20 and p["hwm_kb"] == 40 for p in folded["phases"])
  assert folded["spread_kb"] == (20, 90)
  assert memory_profile.median_result(runs + [{"error": "boom"}]) == {"error": "boom"}
  twin = memory_profile.median_result([_run(0, [(0, 50_000)] * phases)])
  saved_twin = memory_profile.median_result([_run(0, [(0, 100_000)] * phases)])
  puppet = memory_profile.median_result([_run(0, [(0, 90_000)] * phases),
                                         _run(0, [(0, 110_000)] * phases)])
  lines = memory_profile.ratio_lines({"static_twin": twin, "puppet_cached": puppet,
                                      "saved_static_twin": saved_twin, "saved_frozen8": puppet})
  # 100 MB against 50 MB and against 100 MB; each model against its own kind of twin.
  assert lines[0].startswith("- puppet_cached: peak at batch 64 100 MB, 2.00x static_twin's 50 MB")
  assert "puppet_cached 90-110 MB, static_twin 50-50 MB" in lines[0]
  assert lines[1].startswith("- saved_frozen8: peak at batch 64 100 MB, 1.00x "
                             "saved_static_twin's 100 MB")
  assert memory_profile.ratio_lines({"puppet_cached": puppet}) == []  # no twin, no ratio


def test_unknown_model_is_refused(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "tools", "memory_profile.py"), "--models=vgg",
         f"--output={tmp_path}/m.md"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), text=True,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode != 0 and "unknown ['vgg']" in proc.stderr
