r"""Collects training results (results.json) into docs/results.md, next to the paper's numbers.

  python tools/results_table.py --results_glob='runs/*/results.json' --output=docs/results.md \
      --title="Quick protocol (4 epochs)" --note="..."

Each row gives the model, test top-1/top-5 on all test images, stored parameters and their
float32 bytes, epochs, training wall time, mean depth (Puppet-CNN), and the machine and
command that produced it (both read from results.json).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Dict, List

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from official.puppet_cnn import reports  # noqa: E402  pylint: disable=wrong-import-position

# Paper (arXiv 2411.12876) Tables 1-3, CIFAR-10: top-1, top-5, param size (MB).
PAPER_CIFAR10 = {
    "puppet_cnn": (72.51, 96.85, 1.08),
    "resnet": (68.94, 95.17, 44.84),
    "vgg": (67.84, 91.98, 39.01),
    "alexnet": (65.86, 92.05, 11.65),
    "mobilenet_v2": (66.73, 93.33, 8.90),
    "mobilenet_v1": (58.58, 91.17, 7.52),
    "squeezenet": (63.31, 94.34, 3.96),
    "puppet_alexnet": (69.33, 94.05, 1.08),
    "puppet_vgg": (67.78, 93.02, 1.08),
    "puppet_resnet": (66.69, 95.46, 1.08),
}

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_string("results_glob", "runs/*/results.json", "results.json files.")
  flags.DEFINE_string("output", "docs/results.md", "Markdown file to write.")
  flags.DEFINE_string("title", "CIFAR-10 results", "Heading of the table.")
  flags.DEFINE_string("note", "", "Paragraph under the heading (what was run).")


def load_results(pattern: str) -> List[Dict]:
  rows = []
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      result = json.load(f)
    result["_path"] = path
    rows.append(result)
  if not rows:
    raise ValueError(f"no results.json matched {pattern!r}")
  return rows


def _fmt(value, spec):
  return "–" if value is None else format(value, spec)


def markdown(rows: List[Dict], title: str, note: str) -> str:
  lines = [f"## {title}", ""]
  if note:
    lines += [note, ""]
  lines += ["| model | top-1 | top-5 | test images | stored params | stored MB (fp32) | "
            "epochs | train time | mean depth | paper top-1 / top-5 / MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    paper = PAPER_CIFAR10.get(r.get("model"))
    paper_text = f"{paper[0]:.2f}% / {paper[1]:.2f}% / {paper[2]:.2f}" if paper else "–"
    train_min = r.get("train_seconds")
    lines.append(
        f"| `{r.get('model')}` | {100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | "
        f"{r['num_test_images']:,} | {r.get('stored_params', 0):,} | "
        f"{4 * r.get('stored_params', 0) / 1e6:.2f} | {r.get('epochs_trained')} | "
        f"{_fmt(None if train_min is None else train_min / 60, '.1f')} min | "
        f"{_fmt(r.get('mean_depth'), '.2f')} | {paper_text} |")
  lines += ["", "Where each row came from:", ""]
  for r in rows:
    lines.append(f"- `{r.get('model')}` ({r['_path']}): `{r.get('command')}` on "
                 f"{r.get('machine')}")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  text = markdown(load_results(FLAGS.results_glob), FLAGS.title, FLAGS.note)
  reports.write(FLAGS.output, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
