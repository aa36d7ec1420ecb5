"""End-to-end test of tools/export_saved_model.py (run as a user would, in a new process)."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.serving import tiny_models

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tools", "export_saved_model.py")


def _run(args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.run([sys.executable, TOOL] + args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_exports_a_checkpoint_folder_and_refuses_to_overwrite(tmp_path):
  model = tiny_models.tiny_puppet()
  (tmp_path / "run").mkdir()
  model.save(tmp_path / "run" / "model.keras")
  args = [f"--model_path={tmp_path / 'run'}", f"--export_dir={tmp_path / 'serving'}",
          "--model_name=puppet", "--top_k=2", "--class_names=a,b,c,d,e", "--version=4"]
  proc = _run(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  version_dir = tmp_path / "serving" / "puppet" / "4"
  assert proc.stdout.strip().splitlines()[-1] == str(version_dir)
  info = json.loads((version_dir / "assets.extra" / "model_info.json").read_text())
  assert info["class_names"] == ["a", "b", "c", "d", "e"] and info["top_k"] == 2
  fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
  x = tiny_models.images()
  out = fn(images=tf.constant(x))
  np.testing.assert_allclose(out["probabilities"],
                             tiny_models.softmax(model(x, training=False)), atol=1e-5)
  assert out["top_k_classes"].shape == (4, 2)

  again = _run(args, tmp_path)
  assert again.returncode != 0
  assert "version 4 of model 'puppet' already exists" in again.stderr
  assert "Traceback" not in again.stderr


def test_kernel_cache_flags(tmp_path):
  # --kernel_cache with --kernel_cache_bins (the bins of the test images, so no image is
  # moved to another bin); every bin without it: tests/serving/export_test.py.
  model = tiny_models.tiny_puppet(complexity_bins=16, execution="bucketed")
  model.save(tmp_path / "model.keras")
  x = tiny_models.images()
  bins = sorted(set(model(x, return_details=True)["complexity_bin"].numpy().tolist()))
  proc = _run([f"--model_path={tmp_path / 'model.keras'}", f"--export_dir={tmp_path / 's'}",
               "--model_name=puppet", "--kernel_cache=int8",
               f"--kernel_cache_bins={','.join(map(str, bins))}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  version_dir = tmp_path / "s" / "puppet" / "1"
  info = json.loads((version_dir / "assets.extra" / "model_info.json").read_text())
  assert info["kernel_cache"]["dtype"] == "int8" and info["kernel_cache"]["bins"] == bins
  assert info["kernel_cache"]["fallback"] == "nearest" and len(bins) < 16
  model.cache_kernels(dtype="int8")  # what the served model must compute
  fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
  np.testing.assert_allclose(fn(images=tf.constant(x))["probabilities"],
                             tiny_models.softmax(model(x, training=False)), atol=1e-5)
  # (A per-sample model's ValueError: tests/serving/export_test.py; the tool turns such
  # errors into a message without a traceback, as the overwrite test above shows.)
