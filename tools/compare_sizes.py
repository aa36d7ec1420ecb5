r"""Compares the sizes of Puppet-CNN and the baselines; writes docs/sizes.{md,csv,png}.

    python tools/compare_sizes.py --data_dir=../shared/data   # all models, ~1.5 min, 2 CPUs
    python tools/compare_sizes.py --results_glob='runs/*/results.json' --mean_depth=6.4
    python tools/compare_sizes.py --models=puppet_cnn,resnet --output_dir=/tmp/sizes

Builds Puppet-CNN (VGG puppet 64-128-256-512, max depth 8), its ResNet and AlexNet puppets and
the 7 baselines (10 classes, 32x32x3), exports each as a SavedModel (into --export_dir, or a
temporary folder), and for the baselines also an int8 (Keras quantize) and a 50%/90%
magnitude-pruned variant. See official/puppet_cnn/serving/size_report.py for every column.
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from official.puppet_cnn.serving import size_report  # noqa: E402

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "docs", "Where sizes.md/.csv/.png go.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Keep the SavedModels here (default: a "
                                  "temporary folder, deleted afterwards).")
_MODELS = flags.DEFINE_list("models", None, "Only these row keys (default: all): puppet_cnn, "
                            "puppet_resnet, puppet_alexnet, " + ", ".join(
                                size_report.BASELINE_NAMES) + ".")
_MEAN_DEPTH = flags.DEFINE_float(
    "mean_depth", size_report.DEFAULT_MEAN_DEPTH, "Puppet-CNN depth for the 'mean' MAC "
    "columns when no results.json gives a measured mean_depth (CIFAR-10's input complexity "
    "gives a mean of 6.02 over its 10,000 test images).")
_RESULTS_GLOB = flags.DEFINE_string("results_glob", None, "Glob of training results.json "
                                    "files (keys model, top1[, mean_depth]).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder holding CIFAR-10 (cifar-10-python.tar.gz or "
    "cifar-10-batches-py/): measure Puppet-CNN's mean depth on its test images instead of "
    "using --mean_depth.")
_DEPTH_SAMPLE = flags.DEFINE_integer("depth_sample", 0, "Test images for the depth "
                                     "measurement (0: all 10,000).")
_MAX_DEPTH = flags.DEFINE_integer("max_depth", 8, "Puppet-CNN max depth.")
_CHART = flags.DEFINE_bool("chart", True, "Write sizes.png (needs matplotlib).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the progress
  specs = size_report.default_specs(num_classes=10, input_shape=(32, 32, 3),
                                    max_depth=_MAX_DEPTH.value)
  if _MODELS.value:
    known = {s.key for s in specs}
    unknown = sorted(set(_MODELS.value) - known)
    if unknown:
      raise app.UsageError(f"unknown --models {unknown}; choose from {sorted(known)}")
    specs = [s for s in specs if s.key in _MODELS.value]
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  rows = size_report.measure_all(specs, export_dir=_EXPORT_DIR.value,
                                 mean_depth=_MEAN_DEPTH.value,
                                 results_glob=_RESULTS_GLOB.value, command=command,
                                 log=lambda line: print(line, flush=True),
                                 data_dir=_DATA_DIR.value,
                                 depth_sample_size=_DEPTH_SAMPLE.value or None)
  paths = size_report.write_report(rows, _OUTPUT_DIR.value, command=command,
                                   chart=_CHART.value)
  for path in paths.values():
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
