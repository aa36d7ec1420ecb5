"""tools/jax_benchmark.py: the report from known times, the image file checks, and one tiny
run under KERAS_BACKEND=jax (in the JAX interpreter of tests/modeling/jax_backend_test.py)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import jax_benchmark  # noqa: E402  pylint: disable=wrong-import-position

from tests.modeling.jax_backend_test import _jax_python  # noqa: E402  pylint: disable=wrong-import-position


def _header(models, batches=(4, 8), train_batch=4):
  machine = {"platform": "gpu", "device_kind": "Test GPU", "device_count": 1, "cpus": 2,
             "cpu_model": "x", "uname": "u", "keras": "3", "backend": "jax", "jax": "0",
             "python": "3"}
  return {"command": "cmd", "date": "d", "wall_s": 1.0, "machine": machine, "images": "imgs",
          "stage_channels": [4, 8], "max_depth": 3,
          "depth": {"mean": 2.5, "max": 3, "histogram": {2: 1, 3: 1}}, "twin_depth": 2,
          "models": list(models), "batch_sizes": list(batches), "train_batch": train_batch,
          "repeats": 3, "warmup": 0}


def _rows(lines, first_cell):
  """The table rows that start with first_cell, as lists of cells (an escaped \\| is text)."""
  return [[c.strip().replace("\0", "|") for c in
           l.replace("\\|", "\0").strip("|").split("|")]
          for l in lines if l.startswith(f"| {first_cell} |")]


def test_report_gives_seconds_per_image_and_ratios_from_the_raw_times():
  twin_times, puppet_times = [0.2, 0.1, 0.4], [0.9, 1.3, 1.0]
  results = {
      "static_twin": {"infer": {"infer_b4": {"first_call_s": 2.0, "times": twin_times},
                                "infer_b8": {"first_call_s": 0.1, "times": twin_times},
                                "end": {"peak_bytes": 100e6}, "compile_s": {"infer_b4": 1.5},
                                "xla": {"infer_b4": {"temp_bytes": 1e6},
                                        "infer_b8": {"temp_bytes": 50e6}}},
                      "train": {"train_b4": {"first_call_s": 3.0, "times": [1.0, 2.0, 3.0]},
                                "end": {"peak_bytes": 400e6},
                                "xla": {"train_b4": {"temp_bytes": 200e6}}}},
      "puppet_exact": {"infer": {"infer_b4": {"first_call_s": 5.0, "times": puppet_times},
                                 "infer_b8": {"first_call_s": 0.1, "times": puppet_times},
                                 "logit_check": 3e-7, "end": {"peak_bytes": 250e6},
                                 "xla": {"infer_b8": {"temp_bytes": 150e6}}},
                       "train": {"error": "exit 1: out of memory"}},
  }
  lines = jax_benchmark.report_lines(_header(["static_twin", "puppet_exact"]), results)
  text = "\n".join(lines)
  assert "Test GPU (gpu, 1 device(s))" in text
  (twin,), (puppet,) = _rows(lines, "static_twin")[:1], _rows(lines, "puppet_exact")[:1]
  # s/img: median / batch, with [min / batch, max / batch].
  assert twin[2] == "0.05000 [0.02500, 0.10000]"  # median 0.2 s at batch 4
  assert twin[3] == "0.02500 [0.01250, 0.05000]"  # batch 8
  assert puppet[2] == "0.25000 [0.22500, 0.32500]"
  assert twin[4] == "20.0 [10.0, 40.0]"  # images/s at batch 4: 4 / 0.2
  # Compile seconds: the ahead-of-time compilation, or (runs before it) the first call.
  assert twin[1] == "1.5 / 3.0" and puppet[1] == "5.0 / -"
  assert twin[6] == "2000.0 [1000.0, 3000.0] ms"
  assert twin[7] == "100 / 400" and puppet[7] == "250 / -"
  # XLA's planned temporaries at the largest inference batch (8) and in training.
  assert twin[8] == "50 / 200" and puppet[8] == "150 / -"
  assert "train: exit 1: out of memory" in puppet[9] and "3.0e-07" in puppet[9]
  assert "paper (RTX 4090): 0.0039 s/img" in puppet[9]
  # Ratios: 1.0 / 0.2 = 5x at both batch sizes, no training, memory 2.5x, XLA temp 3x.
  ratio = _rows(lines, "puppet_exact")[1]
  assert ratio[1:] == ["5.00x", "5.00x", "-", "2.50x / -", "3.00x / -"]


def test_images_npz_is_checked(tmp_path):
  good = tmp_path / "good.npz"
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  np.savez(good, images=images, labels=np.arange(5))
  got, labels, source = jax_benchmark.load_images(None, str(good), n=4)
  np.testing.assert_array_equal(got, images[:4])
  assert labels.tolist() == [0, 1, 2, 3] and str(good) in source
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    jax_benchmark.load_images(None, str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=np.arange(5))
  with pytest.raises(ValueError, match="uint8"):
    jax_benchmark.load_images(None, str(tmp_path / "float.npz"))
  np.savez(tmp_path / "nolabels.npz", images=images)
  with pytest.raises(ValueError, match="'labels'"):
    jax_benchmark.load_images(None, str(tmp_path / "nolabels.npz"))
  np.savez(tmp_path / "short.npz", images=images, labels=np.arange(3))
  with pytest.raises(ValueError, match="5 images and 3 labels"):
    jax_benchmark.load_images(None, str(tmp_path / "short.npz"))


def _run_tool(python, tmp_path, timeout, *flags):
  """Runs tools/jax_benchmark.py (tiny sizes) in the JAX interpreter on
  tmp_path/images.npz, writing tmp_path/gpu.md and gpu.json; returns the JSON."""
  cmd = [python, os.path.join(ROOT, "tools", "jax_benchmark.py"), "--sizes=tiny", *flags,
         f"--images_npz={tmp_path / 'images.npz'}", f"--output={tmp_path / 'gpu.md'}",
         f"--json_output={tmp_path / 'gpu.json'}"]
  env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  # Faster XLA compiles (the same HLO; as in tests/modeling/jax_backend_test.py).
  env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads((tmp_path / "gpu.json").read_text())


def test_tiny_run_under_jax(tmp_path):
  """The tool end to end in the JAX interpreter: every job runs, the timed inference function
  gives the model's logits, the training steps lower the twin's loss on their fixed batch,
  and the report's numbers are those of the raw times."""
  python, tried = _jax_python()
  if python is None:
    pytest.skip(f"no JAX interpreter (tried {tried})")
  images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
  images[0] = 128  # a constant image: H = 0, the deepest puppet
  np.savez(tmp_path / "images.npz", images=images, labels=np.arange(6) % 10)
  output = tmp_path / "gpu.md"
  data = _run_tool(python, tmp_path, 900,
                   "--models=static_twin,puppet_gathered,puppet_gathered_cached",
                   "--bins=4", "--batch_sizes=4", "--train_batch=4", "--repeats=3",
                   "--warmup=0")
  header, results = data["header"], data["results"]
  assert header["machine"]["backend"] == "jax" and header["machine"]["platform"] == "cpu"
  assert sum(header["depth"]["histogram"].values()) == 6
  assert header["twin_depth"] == round(header["depth"]["mean"]) and header["bins"] == 4
  for name in ("static_twin", "puppet_gathered"):
    infer, train = results[name]["infer"], results[name]["train"]
    assert "error" not in infer and "error" not in train, (infer, train)
    assert infer["logit_check"] < 1e-4
    assert len(infer["infer_b4"]["times"]) == 3 and len(train["train_b4"]["times"]) == 3
    assert np.all(np.isfinite(train["losses"])) and len(train["losses"]) == 4
    # XLA's memory plan, which JAX's CPU client gives (its memory_stats() does not), read
    # from the program compiled ahead of time.
    assert infer["xla"]["infer_b4"]["temp_bytes"] > 0 < train["xla"]["train_b4"]["temp_bytes"]
    assert infer["compile_s"]["infer_b4"] > 0 < train["compile_s"]["train_b4"]
  assert header["compile"] == "ahead_of_time"
  # The kernel table (every bin, passed to the jitted function as an argument): the
  # model's logits, no training job.
  cached = results["puppet_gathered_cached"]
  assert cached["infer"]["logit_check"] < 1e-4 and cached["infer"]["cache"]["bins"] == 4
  assert cached["train"]["error"].startswith("skipped: training generates the kernels")
  twin_losses = results["static_twin"]["train"]["losses"]
  assert twin_losses[-1] < twin_losses[0], twin_losses
  text = output.read_text()
  assert text.startswith(jax_benchmark.TITLE) and "<!-- gpu:begin -->" in text
  row = next(l for l in text.splitlines() if l.startswith("| puppet_gathered |"))
  times = results["puppet_gathered"]["infer"]["infer_b4"]["times"]
  assert f"{np.median(times) / 4:.5f} [{min(times) / 4:.5f}, {max(times) / 4:.5f}]" in row
  ratio = [l for l in text.splitlines() if l.startswith("| puppet_gathered |")][1]
  twin_times = results["static_twin"]["infer"]["infer_b4"]["times"]
  assert re.search(rf"\| {np.median(times) / np.median(twin_times):.2f}x \|", ratio)


def test_time_budget_skips_what_it_cannot_start(tmp_path):
  """With --time_budget_s spent, no job runs to the end: each is reported (timed out at the
  budget, or skipped), the report and the JSON are still written."""
  python, tried = _jax_python()
  if python is None:
    pytest.skip(f"no JAX interpreter (tried {tried})")
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  np.savez(tmp_path / "images.npz", images=images, labels=np.arange(4))
  output = tmp_path / "gpu.md"
  data = _run_tool(python, tmp_path, 300, "--models=static_twin,resnet", "--batch_sizes=2",
                   "--train_batch=2", "--time_budget_s=1")
  assert data["done"]
  errors = [data["results"][m][p].get("error", "") for m in ("static_twin", "resnet")
            for p in ("infer", "train")]
  assert all(e.startswith(("skipped: --time_budget_s=1", "stopped after")) for e in errors), errors
  assert "skipped: --time_budget_s=1 spent" in output.read_text()


def test_a_failed_job_reports_the_exception_line(monkeypatch):
  """A job that dies reports its exception's line (an XLA out-of-memory), not the
  traceback's source lines around it."""
  stderr = ("Traceback (most recent call last):\n"
            '  File "x.py", line 3, in <module>\n'
            "    return x.block_until_ready()\n"
            "           ^^^^^^^^^^^^^^^^^^^^^\n"
            "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating "
            "31279000984 bytes.\n")
  monkeypatch.setattr(jax_benchmark.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
      a, 1, stdout="", stderr=stderr))
  assert jax_benchmark._run_subprocess({}, 10) == {  # pylint: disable=protected-access
      "error": "exit 1: jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory "
               "allocating 31279000984 bytes."}
  monkeypatch.setattr(jax_benchmark.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
      a, 2, stdout="", stderr="a\nb\nc\nd\n"))
  assert jax_benchmark._run_subprocess({}, 10) == {"error": "exit 2: b | c | d"}  # pylint: disable=protected-access

  def timeout(*args, **kwargs):
    raise subprocess.TimeoutExpired(args, kwargs["timeout"])

  # A job past its limit: --job_timeout_s, or what --time_budget_s had left.
  monkeypatch.setattr(jax_benchmark.subprocess, "run", timeout)
  assert jax_benchmark._run_subprocess({}, 30) == {  # pylint: disable=protected-access
      "error": "timed out after 30 s (--job_timeout_s)"}
  assert jax_benchmark._run_subprocess({}, 30, budget_cut=True) == {  # pylint: disable=protected-access
      "error": "stopped after 30 s, what --time_budget_s had left"}


def test_error_line_is_the_exceptions_first_line():
  e = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 99 bytes.\nmore detail")
  assert jax_benchmark._error_line(e) == (  # pylint: disable=protected-access
      "RuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 99 bytes.")


def test_report_from_saved_results_escapes_cells_and_keeps_other_blocks(tmp_path):
  """write_report (what --report_from_json runs) writes the block from saved results,
  keeps the rest of the file, and escapes a '|' inside a note so the table keeps its
  columns."""
  results = {"static_twin": {"infer": {"infer_b4": {"first_call_s": 1.0, "times": [0.4]}}},
             "puppet_exact": {"infer": {"error": "exit 1: a | b"}}}
  header = _header(["static_twin", "puppet_exact"], batches=(4,), train_batch=0)
  output = tmp_path / "gpu.md"
  output.write_text("# Title\n\nkept text\n")
  lines = jax_benchmark.write_report(str(output), json.loads(json.dumps(header)), results)
  text = output.read_text()
  assert text.startswith("# Title\n\nkept text\n") and "<!-- gpu:begin -->" in text
  assert "\n".join(lines) in text
  (twin,), (puppet,) = _rows(lines, "static_twin")[:1], _rows(lines, "puppet_exact")[:1]
  assert len(puppet) == len(twin) == 8
  assert "train step (not run)" in text and "training: not run (--train_batch=0)" in text
  assert twin[2] == "0.10000 [0.10000, 0.10000]"
  assert puppet[7].startswith("infer: exit 1: a | b;")
