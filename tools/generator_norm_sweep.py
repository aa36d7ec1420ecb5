r"""Re-estimates the moving statistics of a trained puppeteer's G, one set or one per step.

  python tools/generator_norm_sweep.py --model_dir=runs/ablations_e12/baseline \
      --calibration_images=2048 --output=docs/generator_norm_sweep.md \
      --output_model=runs/ablations_e12/baseline_per_step.keras

In training G's batch norm normalizes each Euler step by that step's batch statistics; the
paper's model (`generator_norm='batch'`) then normalizes every step at inference by one set
of moving averages. For each run this evaluates the test split with G's statistics as
trained, re-estimated as one set, and re-estimated per step (`PuppetClassifier.
with_generator_norm('batch_per_step', calibration_images)`): no weight is trained. With
--output_model the per-step model of the (last) run is saved in the Keras format, to export
or evaluate like any other (README, "Normalizing G at inference").
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from official.puppet_cnn import reports  # noqa: E402  pylint: disable=wrong-import-position
from official.puppet_cnn import sweeps  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_multi_string("model_dir", None, "Training run(s) to evaluate (repeatable).")
  flags.DEFINE_string("data_dir", None, "Overrides the runs' data_dir.")
  flags.DEFINE_integer("limit", None, "Evaluate on the first N test images only.")
  flags.DEFINE_integer("calibration_images", 2048, "Training images the statistics are "
                       "re-estimated on (in batches of the run's training batch size).",
                       lower_bound=1)
  flags.DEFINE_string("output", "docs/generator_norm_sweep.md", "Markdown file to write.")
  flags.DEFINE_string("output_model", None, "Where to save the last run's per-step model "
                      "(a .keras file); default: not saved.")
  flags.mark_flag_as_required("model_dir")


def report(model_dirs, data_dir, limit, calibration, command, output_model=None) -> str:
  """The Markdown report for each run; saves the last run's per-step model to
  `output_model` when given."""
  if output_model and not output_model.endswith(".keras"):
    raise ValueError(f"--output_model must name a .keras file, got {output_model!r}")
  parts = reports.header("G's moving statistics at inference", "tools/generator_norm_sweep.py",
                         command) + [""]
  per_step = None
  for model_dir in model_dirs:
    model, splits = sweeps.load_run(model_dir, data_dir, limit)
    images = sweeps.calibration_images(splits, calibration)
    rows, per_step = sweeps.generator_norm_sweep(model, splits.test, splits.num_test, images,
                                                 splits.batch_size)
    parts += [f"## `{model_dir}`", "",
              f"Trained with `generator_norm='{model.config.generator_norm}'`; "
              f"{splits.num_test} test images; statistics re-estimated on {len(images)} "
              f"training images in batches of {splits.batch_size}.", "",
              sweeps.generator_norm_markdown(rows)]
  if output_model and per_step is not None:
    os.makedirs(os.path.dirname(os.path.abspath(output_model)), exist_ok=True)
    per_step.save(output_model)
    logging.info("Saved the per-step model to %s", output_model)
  return "\n".join(parts)


def main(argv):
  del argv
  command = reports.command_line()
  text = report(FLAGS.model_dir, FLAGS.data_dir, FLAGS.limit, FLAGS.calibration_images,
                command, FLAGS.output_model)
  reports.write(FLAGS.output, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
