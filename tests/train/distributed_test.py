"""The training binary under tf.distribute: 'mirrored' on two logical CPUs, and
'multi_worker_mirrored' with two local worker processes and a TF_CONFIG on loopback."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.data import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_DIR = fake_data.real_cifar10_folder()
pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="real CIFAR-10 not found: set "
                                "PUPPET_CNN_DATA_DIR or put it in <repo>/../shared/data")


def _flags(model_dir, strategy, mode="train_and_eval"):
  return [sys.executable, "-m", "official.puppet_cnn.train", f"--data_dir={DATA_DIR}",
          f"--model_dir={model_dir}", "--dataset=cifar10", "--train_subset=1000", "--limit=64",
          "--stage_channels=4,8", "--max_depth=2", "--epochs=2", "--batch_size=32",
          "--verbose=2", "--nojit_compile", f"--distribution_strategy={strategy}",
          f"--mode={mode}"]


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **extra)
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


def _log_rows(model_dir):
  with open(os.path.join(model_dir, "training_log.csv")) as f:
    return [line.strip().split(",") for line in f][1:]


def test_mirrored_on_two_logical_cpus(tmp_path):
  model_dir = str(tmp_path / "mirrored")
  proc = subprocess.run(_flags(model_dir, "mirrored") + ["--logical_cpus=2"], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "num_replicas_in_sync" in proc.stderr or "CPU:1" in proc.stderr
  results = json.load(open(os.path.join(model_dir, "results.json")))
  assert results["num_test_images"] == 64
  assert len(_log_rows(model_dir)) == 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_multi_worker_mirrored_with_two_local_workers(tmp_path):
  model_dir = str(tmp_path / "multi_worker")
  cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
  procs = []
  for index in range(2):
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    procs.append(subprocess.Popen(_flags(model_dir, "multi_worker_mirrored"), cwd=REPO,
                                  env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "num_workers = 2" in outputs[0][1]
  # The chief (worker 0) owns model_dir; worker 1 wrote to its own scratch folder.
  state = json.load(open(os.path.join(model_dir, "training_state.json")))
  assert state["epochs_done"] == 2 and state["finished"]
  assert os.path.isdir(os.path.join(model_dir, "worker_tmp", "1"))
  results = json.load(open(os.path.join(model_dir, "results.json")))
  assert results["num_test_images"] == 64
  # Both workers saw the same synchronized metrics.
  worker1 = _log_rows(os.path.join(model_dir, "worker_tmp", "1"))
  assert worker1 == _log_rows(model_dir)


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path):
  proc = subprocess.run(_flags(str(tmp_path / "x"), "multi_worker_mirrored"), cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "TF_CONFIG" in proc.stderr
