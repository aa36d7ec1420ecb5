"""tools/ablations.py run as a user would: one tiny variant trained, the table written."""
import json
import os
import subprocess
import sys

import pytest

from tests import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "ablations.py")
pytestmark = pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")
# The base protocol's puppet, shrunk: 4 bins instead of 16 and max_depth 2 (still adaptive)
# make the training run's trace about a third shorter.
TINY = ["--extra_flag=--limit=32", "--extra_flag=--epochs=1", "--extra_flag=--max_depth=2",
        "--extra_flag=--stage_channels=4,8", "--extra_flag=--batch_size=16",
        "--extra_flag=--complexity_bins=4"]


def _run(args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.run([sys.executable, TOOL] + args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_trains_a_variant_and_writes_its_row(tmp_path):
  out = tmp_path / "ablations.md"
  proc = _run(["--variants=paper_init", f"--runs_dir={tmp_path / 'runs'}",
               f"--data_dir={tiny_run.DATA_DIR}", f"--output={out}"] + TINY, tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.load(open(tmp_path / "runs" / "paper_init" / "results.json"))
  config = json.load(open(tmp_path / "runs" / "paper_init" / "config.json"))
  assert config["model"]["init"] == "paper" and config["model"]["stage_channels"] == [4, 8]
  text = out.read_text()
  assert f"| `--init=paper` | {100 * results['top1']:.2f}% |" in text
  assert "python tools/ablations.py --variants=paper_init" in text
  # Run again: the finished run is re-evaluated, not retrained.
  state = json.load(open(tmp_path / "runs" / "paper_init" / "training_state.json"))
  proc = _run(["--variants=paper_init", f"--runs_dir={tmp_path / 'runs'}",
               f"--data_dir={tiny_run.DATA_DIR}", f"--output={out}"] + TINY, tmp_path)
  assert proc.returncode == 0
  assert json.load(open(tmp_path / "runs" / "paper_init" / "training_state.json")) == state


def test_a_failed_run_is_reported_and_fails_the_command(tmp_path):
  out = tmp_path / "ablations.md"
  proc = _run(["--variants=baseline", f"--runs_dir={tmp_path / 'runs'}",
               f"--data_dir={tmp_path / 'no_data_here'}", f"--output={out}"] + TINY, tmp_path)
  assert proc.returncode != 0 and "1 run(s) failed: baseline" in proc.stderr
  assert "Failed runs:" in out.read_text() and "baseline: exit" in out.read_text()
