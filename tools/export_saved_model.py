r"""Exports a trained model (.keras) as a TF Serving SavedModel.

    python tools/export_saved_model.py --model_path=runs/puppet/checkpoints/best.keras \
        --export_dir=/models --model_name=puppet_cnn [--version=3] [--top_k=5]

writes /models/puppet_cnn/<version>/ (next free version unless --version is given; an existing
version is never overwritten) and prints its path. Serve it with

    tensorflow_model_server --rest_api_port=8501 --model_name=puppet_cnn \
        --model_base_path=/models/puppet_cnn

`--model_path` is a `.keras` file or a folder holding one (model.keras, else best.keras, else
latest.keras, also under checkpoints/). See official/puppet_cnn/serving/export.py for the
signatures.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from official.puppet_cnn.config_definitions import COMPUTE_DTYPES  # noqa: E402
from official.puppet_cnn.serving import export  # noqa: E402
from official.puppet_cnn.serving import model_loading  # noqa: E402

_MODEL_PATH = flags.DEFINE_string("model_path", None, "A .keras file, or a checkpoint folder "
                                  "holding model.keras (or best.keras / latest.keras).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "TF Serving model root; the model goes "
                                  "to <export_dir>/<model_name>/<version>/.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model name (folder and TF Serving "
                                  "--model_name).")
_VERSION = flags.DEFINE_integer("version", None, "Version folder; default: the next free one.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes in the top_k_* outputs.")
_CLASS_NAMES = flags.DEFINE_list("class_names", None, "Optional class names for "
                                 "assets.extra/model_info.json.")
_FLOAT_SIGNATURE = flags.DEFINE_bool("float_signature", False, "Also add the float_images "
                                     "signature (float32 pixels in [0, 255]; a second copy of "
                                     "the graph).")

_KERNEL_CACHE = flags.DEFINE_enum(
    "kernel_cache", "none", ["none"] + list(export.CACHE_DTYPES),
    "A bucketed or gathered Puppet-CNN only: export every complexity bin's kernels in this "
    "dtype with the model (serving runs them instead of the ODE; larger SavedModel; int8 is "
    "lossy, bucketed only).")
_KERNEL_CACHE_COMPUTE = flags.DEFINE_enum(
    "kernel_cache_compute_dtype", None, list(COMPUTE_DTYPES),
    "With --kernel_cache (bucketed, bucketed_inference='loop'): the dtype the served "
    "convolutions run in (bfloat16: faster on CPUs with AMX / AVX512-BF16 and on GPUs, "
    "rounded). Default: the model's (its dtype policy's; float32 unless mixed precision).")
_KERNEL_CACHE_BINS = flags.DEFINE_list(
    "kernel_cache_bins", None, "With --kernel_cache: cache only these complexity bins (e.g. "
    "those of the training images: PuppetClassifier.occupied_bins; train.py "
    "--export_kernel_cache_bins=train finds them itself), and serve an image of another bin "
    "with the nearest cached bin (its kernels and depth). Default: every bin.")

flags.mark_flags_as_required(["model_path", "export_dir", "model_name"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the progress
  bins = None
  if _KERNEL_CACHE_BINS.value is not None:
    try:
      bins = [int(b) for b in _KERNEL_CACHE_BINS.value]
    except ValueError:
      raise app.UsageError("--kernel_cache_bins takes integers, got "
                           f"{','.join(_KERNEL_CACHE_BINS.value)}") from None
  model = model_loading.load_keras_model(_MODEL_PATH.value)
  try:
    path = export.export_saved_model(model, _EXPORT_DIR.value, _MODEL_NAME.value,
                                     version=_VERSION.value, top_k=_TOP_K.value,
                                     class_names=_CLASS_NAMES.value,
                                     float_signature=_FLOAT_SIGNATURE.value,
                                     kernel_cache=(None if _KERNEL_CACHE.value == "none"
                                                   else _KERNEL_CACHE.value),
                                     kernel_cache_bins=bins,
                                     kernel_cache_compute_dtype=_KERNEL_CACHE_COMPUTE.value)
  except (ValueError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  print(path)


if __name__ == "__main__":
  app.run(main)
