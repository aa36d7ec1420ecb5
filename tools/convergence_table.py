r"""Evaluates one trained Puppet-CNN with its steps scaled and other integrators.

  python tools/convergence_table.py --model_dir=runs/ablations/baseline \
      --scales=0.5,1,2 --integrators=euler,midpoint,rk4 --output=docs/convergence.md

A depth scale s runs round(s * D) layers per stage with steps scaled to cover the same
stretch of the puppeteer's trajectory (README, "Depth and width at inference"). Each row gives
test accuracy, mean depth and multiply-adds per image. --calibration_images=N adds a column
evaluated after re-estimating the puppet's batch-norm statistics on N training images.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from official.puppet_cnn import reports  # noqa: E402  pylint: disable=wrong-import-position
from official.puppet_cnn import sweeps  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_multi_string("model_dir", None, "Training run(s) to evaluate (repeatable).")
  flags.DEFINE_list("scales", ["0.5", "1", "2"], "Depth scales.")
  flags.DEFINE_list("integrators", ["euler", "midpoint", "rk4"], "Integrators.")
  flags.DEFINE_string("data_dir", None, "Overrides the runs' data_dir.")
  flags.DEFINE_integer("limit", None, "Evaluate on the first N test images only.")
  flags.DEFINE_integer("calibration_images", 0, "Also evaluate after re-estimating batch-norm "
                       "statistics on this many training images (0: off).")
  flags.DEFINE_string("output", "docs/convergence.md", "Markdown file to write.")
  flags.mark_flag_as_required("model_dir")


def report(model_dirs, scales, integrators, data_dir, limit, calibration, command) -> str:
  """The Markdown report for each run."""
  parts = reports.header("Depth and integrator at inference (convergence table)",
                         "tools/convergence_table.py", command) + [
      "- Each model was trained once (Euler, depth scale 1 unless its run says "
      "otherwise) and is evaluated here without retraining.", ""]
  for model_dir in model_dirs:
    model, splits = sweeps.load_run(model_dir, data_dir, limit)
    images = sweeps.calibration_images(splits, calibration)
    rows = sweeps.depth_sweep(model, splits.test, splits.num_test, [float(s) for s in scales],
                              integrators, images)
    parts += [f"## `{model_dir}`", "",
              f"Trained with integrator `{model.integrator}`; {splits.num_test} test images"
              + (f"; recalibration on {calibration} training images" if calibration else "")
              + ".", "", sweeps.depth_markdown(rows)]
  return "\n".join(parts)


def main(argv):
  del argv
  command = reports.command_line()
  text = report(FLAGS.model_dir, FLAGS.scales, FLAGS.integrators, FLAGS.data_dir, FLAGS.limit,
                FLAGS.calibration_images, command)
  reports.write(FLAGS.output, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
