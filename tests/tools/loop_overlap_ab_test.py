"""tools/loop_overlap_ab.py: a tiny run prints every variant, and they agree."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_run_times_every_variant(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "tools", "loop_overlap_ab.py"), "--dtype=int8",
         "--repeats=2", "--stage_channels=4,8", "--max_depth=3", "--bins=4",
         f"--data_dir={tmp_path}/none"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for batch in (64, 256):
    line = [l for l in proc.stdout.splitlines() if l.startswith(f"batch {batch}:")]
    assert len(line) == 1, proc.stdout
    ratios = re.findall(r"(shipped|all_serial|all_overlap) [\d.]+ s \(([\d.]+)x\)", line[0])
    assert [name for name, _ in ratios] == ["shipped", "all_serial", "all_overlap"]
    assert float(ratios[0][1]) == 1.0 and all(float(r) > 0 for _, r in ratios)
  # The variants really differ: layer loops at 1 and the bin loop (and the generating
  # fallback's loops) at TensorFlow's default 10 in the shipped graph.
  assert "loops of shipped: parallel_iterations [1, 10]" in proc.stdout
  assert "loops of all_serial: parallel_iterations [1]" in proc.stdout
  assert "loops of all_overlap: parallel_iterations [10]" in proc.stdout
  difference = float(re.search(r"between variants: (\S+)", proc.stdout).group(1))
  assert difference <= 1e-3
  assert "uniform random images" in proc.stdout
