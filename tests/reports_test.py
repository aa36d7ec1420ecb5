"""reports: the header every docs/ report starts with, and writing it."""
import os
import platform

from official.puppet_cnn import reports


def test_command_line_is_relative_and_keeps_the_flags():
  argv = [os.path.join(reports.REPO, "tools", "x.py"), "--a=1", "--b"]
  assert reports.command_line(argv) == "python tools/x.py --a=1 --b"
  assert reports.command_line(["/elsewhere/y.py"]) == "python /elsewhere/y.py"


def test_header_names_tool_command_and_machine():
  lines = reports.header("Title", "tools/x.py", "python tools/x.py --a=1")
  assert lines[:5] == ["# Title", "", "Written by `tools/x.py`.", "",
                       "- Command: `python tools/x.py --a=1`"]
  assert platform.node() in lines[5] and f"{os.cpu_count()} CPUs" in lines[5]
  assert "TensorFlow 2." in lines[5] and "(tensorflow backend)" in lines[5]


def test_write_creates_the_folder(tmp_path, capsys):
  path = tmp_path / "docs" / "r.md"
  reports.write(str(path), "# R\n")
  assert path.read_text() == "# R\n" and "# R" in capsys.readouterr().out


def test_rewriting_a_report_keeps_its_notes_block(tmp_path, capsys):
  path = tmp_path / "r.md"
  notes = f"{reports.NOTES_BEGIN}\n## Reading\n\nBins cost little.\n{reports.NOTES_END}"
  path.write_text(f"# Old\n\n| a |\n\n{notes}\n")
  reports.write(str(path), "# New\n\n| b |\n")
  assert path.read_text() == f"# New\n\n| b |\n\n{notes}\n"
  reports.write(str(path), "# Newer\n")  # kept again, once
  assert path.read_text() == f"# Newer\n\n{notes}\n"
  path.write_text("# No notes\n")
  reports.write(str(path), "# Plain\n")
  assert path.read_text() == "# Plain\n"
  capsys.readouterr()
