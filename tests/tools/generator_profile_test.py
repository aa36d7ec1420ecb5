"""tools/generator_profile.py: variant parsing, and one tiny run against hand-counted facts."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import generator_profile  # noqa: E402  pylint: disable=wrong-import-position


def test_parse_variant():
  assert generator_profile.parse_variant("paper:") == ("paper", {})
  assert generator_profile.parse_variant("s:state_channels=256,integrator=rk4") == (
      "s", {"state_channels": 256, "integrator": "rk4"})
  with pytest.raises(ValueError, match="name"):
    generator_profile.parse_variant(":generator_rank=4")
  with pytest.raises(ValueError, match="field=value"):
    generator_profile.parse_variant("x:generator_rank")


def test_tiny_run_writes_the_report(tmp_path):
  output = os.path.join(tmp_path, "generator.md")
  with open(output, "w") as f:  # a hand-written notes block survives the rewrite
    f.write("old\n<!-- notes:begin (kept when the tool rewrites this file) -->\nmine\n"
            "<!-- notes:end -->\n")
  cmd = [sys.executable, os.path.join(ROOT, "tools", "generator_profile.py"),
         "--stage_channels=4,8", "--max_depth=3", "--bins=16", "--repeats=2",
         "--variant=paper:", "--variant=rank2:generator_rank=2,integrator=euler",
         f"--data_dir={tmp_path}/none",
         f"--output={output}"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("PUPPET_CNN_DATA_DIR", None)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  # A missing data directory is an error naming it, not a silent fallback to fixed bins.
  assert proc.returncode != 0 and f"{tmp_path}/none" in proc.stdout + proc.stderr
  cmd = [c for c in cmd if not c.startswith("--data_dir")]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = open(output).read()
  assert "old" not in report and "mine" in report
  assert "--variant=paper: --variant=rank2:generator_rank=2,integrator=euler" in report
  assert "bins 9..14 (no --data_dir)" in report
  # G's parameters by hand (state 8): C^2 + 15 C = 184; rank 2: 2 r C + 15 C = 152; each
  # + 2 C x 5 = 80 for the moving statistics kept per step (the default: 6 rows, not 1).
  assert "| paper | (defaults) | 8 | full | 264 |" in report
  assert "| rank2 | generator_rank=2, integrator=euler | 8 | 2 | 232 |" in report
  assert "| 1.00x |" in report
