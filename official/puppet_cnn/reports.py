"""The shared parts of the Markdown reports that tools/ write into docs/.

Every report says which tool wrote it, the exact command, the date and the machine, so that a
number in docs/ can be traced and reproduced (README, "Results so far").
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import List, Optional, Sequence


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command_line(argv: Optional[Sequence[str]] = None) -> str:
  """`python tools/<tool>.py <flags>` as the tool was run (argv defaults to sys.argv).

  A script inside this repository is named relative to its root, wherever it was run from.
  """
  argv = list(sys.argv if argv is None else argv) or [""]
  script = os.path.abspath(argv[0])
  if script.startswith(REPO + os.sep):
    script = os.path.relpath(script, REPO)
  else:
    script = argv[0]
  return " ".join(["python", script] + argv[1:])


def machine_line() -> str:
  """Date, host, CPUs, accelerators and backend versions, as one line."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  gpus = tf.config.list_physical_devices("GPU")
  return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
          f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{f'{len(gpus)} GPU(s)' if gpus else 'no GPU'}; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__} ({keras.backend.backend()} backend)")


def header(title: str, tool: str, command: str) -> List[str]:
  """The opening lines of a report: title, tool, command and machine."""
  return [f"# {title}", "", f"Written by `{tool}`.", "", f"- Command: `{command}`",
          f"- Date: {machine_line()}"]


NOTES_BEGIN = "<!-- notes:begin (kept when the tool rewrites this file) -->"
NOTES_END = "<!-- notes:end -->"


def kept_notes(path: str) -> str:
  """The hand-written notes block of the report at `path` (markers included), or ''."""
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    old = f.read()
  start, end = old.find(NOTES_BEGIN), old.find(NOTES_END)
  if start < 0 or end < start:
    return ""
  return old[start:end + len(NOTES_END)]


def write(path: str, text: str) -> None:
  """Writes `text` to `path` (creating its folder) and prints it.

  A notes block already in the file (between NOTES_BEGIN and NOTES_END: a reading of the
  numbers written by hand) is appended to the new text, so rerunning a tool keeps it.
  """
  notes = kept_notes(path)
  if notes and NOTES_BEGIN not in text:
    text = text.rstrip("\n") + "\n\n" + notes + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(text)
