"""tools/train_step_memory.py: a tiny run under TensorFlow and under JAX (XLA's plan), the
report's numbers from the raw results, and a failed job's error line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import train_step_memory  # noqa: E402  pylint: disable=wrong-import-position

from tests.modeling.jax_backend_test import _jax_python  # noqa: E402  pylint: disable=wrong-import-position


def _run(python, tmp_path, *argv, backend="tensorflow", sizes="tiny"):
  output, raw = tmp_path / "memory.md", tmp_path / "raw.json"
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=ROOT)
  proc = subprocess.run([python, os.path.join(ROOT, "tools", "train_step_memory.py"),
                         f"--sizes={sizes}", f"--output={output}", f"--json_output={raw}", *argv],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return output.read_text(), json.loads(raw.read_text())


def _rows(text):
  return [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines()
          if l.startswith("| exact |") or l.startswith("| bucketed16 |")]


def test_tiny_run_under_tensorflow(tmp_path):
  text, results = _run(sys.executable, tmp_path, "--configs=exact,bucketed16",
                       "--batch_sizes=4", "--xla=off,on",
                       '--model_overrides={"generator_backward": "autodiff"}')
  # bucketed16 has no XLA job (XLA cannot compile it): exact off and on, bucketed16 off.
  assert [(r["config"], r["xla"]) for r in results] == [
      ("exact", False), ("exact", True), ("bucketed16", False)]
  for r in results:
    assert "error" not in r, r
    assert r["step_s"] > 0 and r["first_s"] > 0 and r["peak_growth_mb"] > 0
  rows = _rows(text)
  assert len(rows) == 3
  for row, r in zip(rows, results):
    assert row[2] == ("on" if r["xla"] else "off")
    assert row[3] == f"{r['peak_growth_mb']:.0f}"
    assert row[4] == f"{r['peak_growth_mb'] / 4:.0f}"  # per image: peak / batch
    # The step's live tensors are resident memory the process grew by (oneDNN's allocator,
    # TensorFlow's default on x86, counts them; '-' elsewhere).
    if r["tensor_peak_mb"] is not None:
      assert 0 < r["tensor_peak_mb"] <= r["peak_growth_mb"] + 1
      assert row[5] == f"{r['tensor_peak_mb']:.0f}"
    else:
      assert row[5] == "-"
    assert row[8] == f"{r['loss']:.6f}"
  assert text.startswith(train_step_memory.TITLE) and "<!-- train_step:begin -->" in text
  assert all(r["overrides"] == {"generator_backward": "autodiff"} for r in results)
  assert "every config with {'generator_backward': 'autodiff'}" in text


def test_bad_overrides_are_a_usage_error(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_step_memory.py"),
                         "--model_overrides=[1, 2]", f"--output={tmp_path}/m.md"],
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "--model_overrides must be a JSON object" in proc.stderr
  assert not os.path.exists(tmp_path / "m.md")


def test_xla_plan_under_jax_grows_with_the_trajectories(tmp_path):
  python, tried = _jax_python()
  if python is None:
    pytest.skip(f"no JAX interpreter (tried {tried})")
  text, results = _run(python, tmp_path, "--configs=exact,gathered16", "--batch_sizes=2,8",
                       "--block=xla_plan", backend="jax", sizes="small")
  plan = {(r["config"], r["batch"]): r["plan_temp_bytes"] for r in results}
  assert all(v > 0 for v in plan.values()), results
  # exact H integrates one puppeteer trajectory per image, gathered one per bin (16, whatever
  # the batch): from batch 2 to 8 exact gains 6 trajectories and gathered none. With the
  # 16-32-64 puppet a trajectory (12 states of 64 x 9 x 64) outweighs an image's activations.
  assert plan["exact", 8] - plan["exact", 2] > plan["gathered16", 8] - plan["gathered16", 2]
  assert "<!-- xla_plan:begin -->" in text and "plan temporaries GB" in text


def test_a_failed_job_reports_its_error():
  result = train_step_memory._run_subprocess(  # pylint: disable=protected-access
      {"config": "no_such_config", "batch": 2, "xla": False, "sizes": "tiny",
       "data_dir": None}, 300)
  assert result["error"].startswith("exit 1") and "KeyError" in result["error"]


def test_a_job_past_the_memory_limit_is_killed():
  result = train_step_memory._run_subprocess(  # pylint: disable=protected-access
      {"config": "exact", "batch": 2, "xla": False, "sizes": "tiny", "data_dir": None}, 300,
      max_rss_mb=50)  # less than the interpreter needs to import TensorFlow
  assert result["killed"] and result["error"].startswith("killed at ")
  assert "(--max_rss_mb=50)" in result["error"]
