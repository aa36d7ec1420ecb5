"""End-to-end test of tools/compare_sizes.py on one baseline (in a new process)."""

import csv
import json
import os
import subprocess
import sys

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tools", "compare_sizes.py")


def _run(args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.run([sys.executable, TOOL] + args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_squeezenet_report(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps({"model": "squeezenet",
                                                             "top1": 0.8125}))
  proc = _run(["--models=squeezenet", f"--output_dir={tmp_path / 'docs'}",
               f"--export_dir={tmp_path / 'exports'}",
               f"--results_glob={tmp_path / '*' / 'results.json'}", "--nochart"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(1/1) squeezenet" in proc.stdout and "wrote" in proc.stdout
  with open(tmp_path / "docs" / "sizes.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["float32", "pruned 50%", "pruned 90%",
                                          "int8 (Keras quantize)"]
  # official/puppet_cnn/baselines/squeezenet.py: 727,626 parameters for 10 classes.
  assert rows[0]["stored_params"] == "727626"
  assert rows[0]["paper_param_bytes"] == str(4 * 727626)
  assert rows[0]["top1"] == "0.8125"
  assert "compare_sizes.py --models=squeezenet" in rows[0]["command"]
  assert "CPUs" in rows[0]["machine"]
  md = (tmp_path / "docs" / "sizes.md").read_text()
  assert "81.25%" in md and not (tmp_path / "docs" / "sizes.png").exists()
  for name in ("squeezenet", "squeezenet_pruned50", "squeezenet_pruned90"):
    assert (tmp_path / "exports" / name / "1" / "saved_model.pb").is_file()


def test_unknown_model_is_a_usage_error(tmp_path):
  proc = _run(["--models=lenet", f"--output_dir={tmp_path}"], tmp_path)
  assert proc.returncode != 0
  assert "unknown --models ['lenet']" in proc.stderr
