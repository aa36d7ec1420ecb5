r"""What quantizing the complexity H costs: one trained run evaluated with exact H and n bins.

  python tools/binning_sweep.py --model_dir=runs/ablations/baseline --bins=0,64,32,16,8,4 \
      --output=docs/binning.md

With `complexity_bins = n` every image uses the centre of its H bin (n equal bins on [0, 8]
bits), so the images of a bin share kernels and depth and bucketed execution can run the
puppeteer once per bin and cache its kernels (README, "Options"; docs/benchmarks.md for the
speed). The weights do not depend on the binning, so the same trained model is evaluated at
each setting; rows give mean depth, test accuracy and the fraction of test images whose
predicted class is the one exact H gives (`PuppetClassifier.set_binning`).
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
from official.puppet_cnn import train_lib  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_multi_string("model_dir", None, "Training run(s) to evaluate (repeatable).")
  flags.DEFINE_list("bins", ["0", "64", "32", "16", "8", "4"],
                    "Numbers of complexity bins (0: exact H).")
  flags.DEFINE_enum("execution", "bucketed", ["bucketed", "per_sample"],
                    "Execution of the binned rows (bucketed: cached kernels, the fast path).")
  flags.DEFINE_list("cache_dtypes", ["float32"], "Kernel-cache storage dtypes of the bucketed "
                    "rows (float32, float16, bfloat16, int8): one row each; 16-bit caches "
                    "round the kernels, int8 quantizes them per output channel "
                    "(PuppetClassifier.cache_kernels).")
  flags.DEFINE_bool("nearest_rows", False, "Also each bucketed row with only the bins of one "
                    "epoch of training images cached, the other bins served by the nearest "
                    "cached bin (cache_kernels(fallback='nearest'), what "
                    "--export_kernel_cache_bins=train exports).")
  flags.DEFINE_string("data_dir", None, "Overrides the runs' data_dir.")
  flags.DEFINE_integer("limit", None, "Evaluate on the first N test images only.")
  flags.DEFINE_string("output", "docs/binning.md", "Markdown file to write.")
  flags.mark_flag_as_required("model_dir")


def parse_bins(values) -> list:
  bins = []
  for value in values:
    try:
      n = int(value)
    except ValueError:
      raise ValueError(f"--bins takes integers >= 0, got {value!r}") from None
    if n < 0:
      raise ValueError(f"--bins takes integers >= 0, got {n}")
    bins.append(n)
  return bins


def report(model_dirs, bins, execution, data_dir, limit, command,
           cache_dtypes=("float32",), nearest_rows: bool = False) -> str:
  """The Markdown report for each run."""
  parts = reports.header("Complexity binning", "tools/binning_sweep.py", command) + [""]
  for model_dir in model_dirs:
    model, splits = sweeps.load_run(model_dir, data_dir, limit)
    trained = model.config.complexity_bins
    nearest = ((lambda model=model, splits=splits: train_lib.training_bins(model, splits))
               if nearest_rows else None)
    rows = sweeps.binning_sweep(model, splits.test, splits.num_test, parse_bins(bins),
                                execution, cache_dtypes, nearest_bins=nearest)
    parts += [f"## `{model_dir}`", "",
              f"Trained with {f'{trained} complexity bins' if trained else 'exact H'}; "
              f"{splits.num_test} test images.", "", sweeps.binning_markdown(rows)]
  return "\n".join(parts)


def main(argv):
  del argv
  command = reports.command_line()
  text = report(FLAGS.model_dir, FLAGS.bins, FLAGS.execution, FLAGS.data_dir, FLAGS.limit,
                command, FLAGS.cache_dtypes, FLAGS.nearest_rows)
  reports.write(FLAGS.output, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
