"""Shared test setup: quiet TensorFlow logs, make the repo importable, fixed seeds."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
  keras.utils.set_random_seed(1234)
  yield


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
  """tests/tiny_run.py's default run, trained once for the tests that only read it."""
  from tests import tiny_run  # pylint: disable=import-outside-toplevel
  if tiny_run.DATA_DIR is None:
    pytest.skip("real CIFAR-10 not found")
  return tiny_run.train_tiny_run(str(tmp_path_factory.mktemp("tiny_run") / "run"))
