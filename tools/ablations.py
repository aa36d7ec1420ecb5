r"""Runs the ablation study and writes docs/ablations.md.

  python tools/ablations.py --data_dir=../shared/data            # every variant
  python tools/ablations.py --variants=baseline,paper_init --runs_dir=runs/ablations

Each variant (official/puppet_cnn/ablations.py) is one run of the training binary with the
base flagfile (default configs/cifar10_ablation.flags) plus the variant's flags, in
<runs_dir>/<variant>; its output goes to <runs_dir>/<variant>.log. Runs resume after an
interruption and finished runs are only re-evaluated, so the command can be repeated until
every row is filled. A failed run is reported in the table and the others still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from official.puppet_cnn import ablations  # noqa: E402  pylint: disable=wrong-import-position
from official.puppet_cnn import reports  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_list("variants", ["all"], f"Variants to run: all, or some of "
                    f"{', '.join(ablations.VARIANT_NAMES)}.")
  flags.DEFINE_string("base_flagfile", os.path.join(REPO, "configs", "cifar10_ablation.flags"),
                      "Training flagfile every variant starts from.")
  flags.DEFINE_string("runs_dir", "runs/ablations", "One model_dir per variant in here.")
  flags.DEFINE_string("data_dir", None, "Passed to the training binary (else its default).")
  flags.DEFINE_multi_string("extra_flag", [], "Training flag added to every variant "
                            "(repeatable), e.g. --extra_flag=--epochs=1.")
  flags.DEFINE_string("output", "docs/ablations.md", "Markdown file to write.")
  flags.DEFINE_bool("train", True, "Run missing/unfinished runs (False: only collect).")


def run_variant(variant, base_flagfile, runs_dir, data_dir, extra_flags) -> str:
  """Runs the training binary for one variant; returns '' or a one-line error."""
  model_dir = os.path.join(runs_dir, variant.name)
  extra = list(extra_flags) + ([f"--data_dir={data_dir}"] if data_dir else [])
  argv = ablations.train_argv(variant, base_flagfile, model_dir, extra)
  os.makedirs(runs_dir, exist_ok=True)
  log_path = os.path.join(runs_dir, f"{variant.name}.log")
  print(f"[ablations] {variant.name}: python -m official.puppet_cnn.train {' '.join(argv)}",
        flush=True)
  start = time.time()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with open(log_path, "a") as log:
    proc = subprocess.run([sys.executable, "-m", "official.puppet_cnn.train"] + argv,
                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  print(f"[ablations] {variant.name}: exit {proc.returncode} after {time.time() - start:.0f} s "
        f"(log: {log_path})", flush=True)
  if proc.returncode:
    with open(log_path) as f:
      tail = [line.strip() for line in f.readlines() if line.strip()][-1:]
    return f"exit {proc.returncode}: {tail[0] if tail else 'no output'}"
  return ""


def main(argv):
  del argv
  variants = ablations.select(FLAGS.variants)
  runs_dir = os.path.abspath(FLAGS.runs_dir)
  errors = {}
  start = time.time()
  for variant in variants:
    if FLAGS.train:
      error = run_variant(variant, os.path.abspath(FLAGS.base_flagfile), runs_dir,
                          FLAGS.data_dir, FLAGS.extra_flag)
      if error:
        errors[variant.name] = error
  rows = [ablations.collect(v, os.path.join(runs_dir, v.name)) for v in variants]
  command = reports.command_line()
  header = "\n".join([
      "# Ablations", "",
      "Written by `tools/ablations.py`; the variants are defined in "
      "`official/puppet_cnn/ablations.py`.", "",
      f"- Command: `{command}`",
      f"- Base protocol: `{os.path.relpath(FLAGS.base_flagfile, REPO)}`"
      + (f" plus `{' '.join(FLAGS.extra_flag)}`" if FLAGS.extra_flag else ""),
      f"- Date: {reports.machine_line()}",
      f"- Wall time of this command: {time.time() - start:.0f} s (runs finished earlier are "
      "only re-evaluated)",
      "- Accuracy: the best-validation checkpoint on every test image; mean depth: layers per "
      "stage over the test images; MMACs: multiply-adds per image at that mean depth "
      "(serving/macs.py: puppet + head + the puppeteer steps the image needs); train time: "
      "wall time of `fit` on this machine (shared: compare within one table only).",
  ])
  text = ablations.markdown(rows, header)
  if errors:
    text += "\nFailed runs:\n\n" + "".join(f"- {k}: {v}\n" for k, v in errors.items())
  reports.write(FLAGS.output, text)
  if errors:
    sys.exit(f"{len(errors)} run(s) failed: {', '.join(errors)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
