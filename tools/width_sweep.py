r"""Generates narrower and wider puppets from one trained puppeteer and evaluates them.

  python tools/width_sweep.py --model_dir=runs/ablations/baseline \
      --model_dir=runs/ablations/width_sampled --widths=0.25,0.5,0.75,1,1.25 \
      --calibration_images=512 --output=docs/widths.md

Each width w is `PuppetClassifier.at_width(w)`: stage widths round(w * C), kernels pooled out
of the same puppeteer state, batch-norm and classifier weights resized (README, "Depth and
width at inference"). Rows give stored parameters, multiply-adds per image at the mean depth,
and test accuracy as generated and after re-estimating batch-norm statistics on
--calibration_images training images.
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
  flags.DEFINE_list("widths", ["0.25", "0.5", "0.75", "1", "1.25"], "Width multipliers.")
  flags.DEFINE_string("data_dir", None, "Overrides the runs' data_dir.")
  flags.DEFINE_integer("limit", None, "Evaluate on the first N test images only.")
  flags.DEFINE_integer("calibration_images", 512, "Training images for the batch-norm "
                       "recalibration column (0: leave it out).")
  flags.DEFINE_string("output", "docs/widths.md", "Markdown file to write.")
  flags.mark_flag_as_required("model_dir")


def report(model_dirs, widths, data_dir, limit, calibration, command) -> str:
  """The Markdown report for each run."""
  parts = reports.header("Width at inference", "tools/width_sweep.py", command) + [""]
  for model_dir in model_dirs:
    model, splits = sweeps.load_run(model_dir, data_dir, limit)
    images = sweeps.calibration_images(splits, calibration)
    rows = sweeps.width_sweep(model, splits.test, splits.num_test, [float(w) for w in widths],
                              images)
    trained = model.config.train_widths or (1.0,)
    parts += [f"## `{model_dir}`", "",
              f"Trained at widths {', '.join(f'{w:g}' for w in trained)}; "
              f"{splits.num_test} test images"
              + (f"; recalibration on {calibration} training images" if calibration else "")
              + ".", "", sweeps.width_markdown(rows)]
  return "\n".join(parts)


def main(argv):
  del argv
  command = reports.command_line()
  text = report(FLAGS.model_dir, FLAGS.widths, FLAGS.data_dir, FLAGS.limit,
                FLAGS.calibration_images, command)
  reports.write(FLAGS.output, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
