"""BUILD matches the layout: every test file has its py_test (regenerate with the tool)."""
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_file_is_up_to_date():
  proc = subprocess.run([sys.executable, "tools/update_build.py", "--check"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_every_test_file_has_a_target():
  build = open(os.path.join(REPO, "BUILD")).read()
  for path in glob.glob(os.path.join(REPO, "tests", "**", "*_test.py"), recursive=True):
    assert f'srcs = ["{os.path.relpath(path, REPO)}"]' in build
