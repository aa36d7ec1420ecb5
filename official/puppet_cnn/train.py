r"""Trains, evaluates and exports Puppet-CNN (and the baselines) from the command line.

  python -m official.puppet_cnn.train --flagfile=configs/cifar10.flags
  python -m official.puppet_cnn.train --flagfile=configs/cifar10_quick.flags \
      --model_dir=runs/quick --data_dir=../shared/data

Flags override the typed defaults of `ExperimentConfig` (flags left unset keep them); the
resolved config is saved as config.json in --model_dir. See train_lib.py for what --model_dir
holds and how runs resume.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags
from absl import logging

from official.puppet_cnn.config_definitions import COMPUTE_DTYPES
from official.puppet_cnn.config_definitions import DTYPE_POLICIES
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data.datasets import DataConfig
from official.puppet_cnn.experiment_config import MODES
from official.puppet_cnn.experiment_config import STRATEGIES
from official.puppet_cnn.experiment_config import ExperimentConfig
from official.puppet_cnn.experiment_config import TrainConfig

# Run.
_MODE = flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to do.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, logs and results.json.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "If set, export a TF Serving SavedModel to "
    "<export_dir>/<model>/<version>/ after training/evaluation.")
_EXPORT_KERNEL_CACHE = flags.DEFINE_enum(
    "export_kernel_cache", "none", ["none", "float32", "float16", "bfloat16", "int8"],
    "With --export_dir and --execution=bucketed or gathered: export every complexity bin's "
    "generated kernels in this dtype with the SavedModel, so that serving runs the stored "
    "kernels instead of the ODE (larger SavedModel; int8 is lossy, bucketed only). none: "
    "only the weights.")
_EXPORT_KERNEL_CACHE_BINS = flags.DEFINE_enum(
    "export_kernel_cache_bins", "all", ["all", "train"],
    "With --export_kernel_cache: all: cache every complexity bin; train: only the bins the "
    "training images fall into (a smaller SavedModel), an image in another bin being "
    "served by the nearest cached bin (its kernels and depth).")
_EXPORT_KERNEL_CACHE_COMPUTE_DTYPE = flags.DEFINE_enum(
    "export_kernel_cache_compute_dtype", None, list(COMPUTE_DTYPES),
    "With --export_kernel_cache and --execution=bucketed: the dtype the served convolutions "
    "run in. bfloat16: 16-bit features through the puppet (several times faster on CPUs "
    "with AMX or AVX512-BF16 and on GPUs; rounded). Default: the model's (--dtype_policy; "
    "float32 unless mixed).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete an existing run in --model_dir and start over.")
_LOGICAL_CPUS = flags.DEFINE_integer(
    "logical_cpus", None, "Split the CPU into this many logical devices (for testing "
    "--distribution_strategy=mirrored without GPUs).")
# Data.
_DATASET = flags.DEFINE_enum("dataset", None, ["cifar10", "cifar100", "image_folder"],
                             "Dataset.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "CIFAR archive or folder, or the image-folder root. Unset: "
    "$PUPPET_CNN_DATA_DIR, else TFDS/Keras download.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Image side fed to the model.")
_TRAIN_SUBSET = flags.DEFINE_integer(
    "train_subset", None, "Class-balanced training subset (paper CIFAR-10: 10000).")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", None, "Validation fraction.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", None, "Test fraction (image_folder).")
_AUGMENT = flags.DEFINE_bool("augment", None, "Random crop + flip (paper CIFAR: off).")
_LIMIT = flags.DEFINE_integer("limit", None, "Keep only the first N examples of each split.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Training batch size (paper: 64).")
_BATCH_GROUPING = flags.DEFINE_enum(
    "batch_grouping", None, ["none", "complexity_bin"],
    "none (default, the paper): uniformly shuffled training batches. complexity_bin: each "
    "training batch holds one complexity bin of the model, so bucketed training runs the "
    "puppeteer once per step (needs --complexity_bins > 0; docs/benchmarks_grouped.md).")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch size.")
# Training.
_MODEL = flags.DEFINE_string("model", None, "puppet_cnn, puppet_resnet, puppet_alexnet, or "
                             "a baseline: resnet, vgg, alexnet, squeezenet, mobilenet_v1, "
                             "mobilenet_v2, mobilenet_v3_small.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs (paper: 800).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Adam learning rate.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", None, "AdamW weight decay (0: Adam).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of weights, data subset and shuffling.")
_JIT_COMPILE = flags.DEFINE_bool(
    "jit_compile", None, "XLA-compile train/eval steps (default: on, except with "
    "--execution=bucketed, which XLA cannot compile).")
_DTYPE_POLICY = flags.DEFINE_enum(
    "dtype_policy", None, list(DTYPE_POLICIES), "Keras dtype policy (default float32). "
    "mixed_bfloat16 / mixed_float16: Puppet-CNN's convolutions in 16 bits, its complexity, "
    "puppeteer, batch norm and head in float32; baselines as any Keras model.")
_MIXED_PRECISION = flags.DEFINE_bool("mixed_precision", None,
                                     "The older spelling of --dtype_policy=mixed_float16.")
_STRATEGY = flags.DEFINE_enum("distribution_strategy", None, list(STRATEGIES),
                              "tf.distribute strategy.")
_VERBOSE = flags.DEFINE_integer("verbose", None, "1: progress bar, 2: a line per epoch.")
# Model (Puppet-CNN).
_STAGE_CHANNELS = flags.DEFINE_list("stage_channels", None,
                                    "Puppet stage widths (paper: 64,128,256,512).")
_MIN_DEPTH = flags.DEFINE_integer("min_depth", None, "Minimum depth per stage.")
_MAX_DEPTH = flags.DEFINE_integer("max_depth", None, "Maximum depth per stage (bound).")
_INIT = flags.DEFINE_enum("init", None, ["paper", "learned", "learned_additive"],
                          "Puppeteer initial state (paper: the constant fill).")
_INIT_RANK = flags.DEFINE_integer("init_rank", None, "Rank of the learned initial state.")
_INTEGRATOR = flags.DEFINE_enum("integrator", None, ["euler", "midpoint", "rk4"],
                                "Puppeteer ODE integrator.")
_DEPTH_ADAPTATION = flags.DEFINE_bool("depth_adaptation", None, "Per-sample depth.")
_FIXED_DEPTH = flags.DEFINE_integer("fixed_depth", None,
                                    "Depth when --nodepth_adaptation.")
_PARAMETER_ADAPTATION = flags.DEFINE_bool("parameter_adaptation", None,
                                          "Per-sample kernels (from each input's H).")
_COMPLEXITY_BINS = flags.DEFINE_integer(
    "complexity_bins", None, "0: exact H (paper); n: H quantized to n bins, samples of a bin "
    "share kernels and depth.")
_COMPLEXITY_BIN_FLOOR = flags.DEFINE_float(
    "complexity_bin_floor", None, "Lower edge (bits) of the binned H range: the "
    "--complexity_bins bins are equal bins on [floor, 8]; a lower H falls in the first bin "
    "(default 0).")
_EXECUTION = flags.DEFINE_enum("execution", None, ["per_sample", "gathered", "bucketed"],
                               "per_sample (XLA-compatible), gathered (kernels generated "
                               "once per bin and gathered per sample; needs "
                               "--complexity_bins; XLA-compatible) or bucketed (needs "
                               "--complexity_bins; no XLA).")
_BUCKETED_INFERENCE = flags.DEFINE_enum(
    "bucketed_inference", None, ["loop", "per_bin"],
    "Graph of bucketed inference (and of the exported SavedModel): loop (one subgraph for "
    "every bin) or per_bin (one unrolled branch per bin).")
_DEPTH_SCALE = flags.DEFINE_float(
    "depth_scale", None, "Steps per stage scaled by this (1: as the paper); see README "
    "'Depth and width at inference'.")
_TRAIN_WIDTHS = flags.DEFINE_list(
    "train_widths", None, "Width multipliers trained together (must include 1.0), e.g. "
    "0.25,0.5,1.0; narrower widths learn from the full width (in-place distillation).")
_GENERATOR_REMAT = flags.DEFINE_bool(
    "generator_remat", None, "Recompute the puppeteer's G activations in the backward pass "
    "(less training memory, one more forward of G; same results).")
_GENERATOR_LOOP = flags.DEFINE_bool(
    "generator_loop", None, "Run each stage's repeated puppeteer steps in one tf.while_loop "
    "instead of unrolled (a smaller training graph: less process memory with a lighter "
    "puppeteer, none with the paper's; same results).")
_FUSED_BATCH_NORM = flags.DEFINE_bool(
    "fused_batch_norm", None, "Bucketed training: the puppet's batch norm as one fused op "
    "(default; less memory) or, with --nofused_batch_norm, two-pass moments.")
_NARROW_KERNELS = flags.DEFINE_bool(
    "narrow_kernels", None, "Bucketed training: convolve with the narrow kernels of a "
    "puppeteer state narrower than the layer (default; less memory, same results) or, with "
    "--nonarrow_kernels, build the full kernels.")
_PER_SAMPLE_CONV = flags.DEFINE_enum(
    "per_sample_conv", None, ["grouped", "im2col"], "How per_sample and gathered execution "
    "convolve each image with its own kernel: grouped (default; one grouped conv) or im2col "
    "(patches and a batched matrix product; same results, K*K times the input's memory).")
_GATHERED_KERNELS = flags.DEFINE_enum(
    "gathered_kernels", None, ["per_layer", "upfront"], "Gathered execution: gather each "
    "image's kernels from its bin's per layer, inside the layer loop (per_layer, default; "
    "one layer's per-image kernels in memory at a time) or all layers' first (upfront). "
    "Same results.")
_GENERATOR_DEPTHWISE = flags.DEFINE_enum(
    "generator_depthwise", None, ["auto", "conv", "shifted"], "How G's depthwise conv is "
    "computed: auto (default; shifted copies under XLA, the backend's conv otherwise), conv "
    "or shifted. Same results.")
_GENERATOR_NORM = flags.DEFINE_enum(
    "generator_norm", None, ["batch", "state", "batch_per_step"], "G's normalization: "
    "batch_per_step (default: the paper's batch norm in training, statistics over the batch's "
    "states; moving averages kept per Euler step for inference), batch (the same training, "
    "one set of moving averages for every step: the paper's Table 5) or state (each state's "
    "own statistics, in training and inference alike; what --batch_grouping=complexity_bin "
    "needs to train the kernels inference generates).")
_GENERATOR_BACKWARD = flags.DEFINE_enum(
    "generator_backward", None, ["auto", "autodiff", "reversible"], "How training "
    "differentiates the puppeteer's steps: reversible (keeps one tensor per evaluation of G "
    "and undoes the steps in the backward pass: generator_remat's memory without recomputing "
    "G; any integrator, a batch-normalized G only), autodiff, or auto (default: reversible "
    "where it applies). Same results.")
_GENERATOR_MATMUL_DTYPE = flags.DEFINE_enum(
    "generator_matmul_dtype", None, list(COMPUTE_DTYPES), "The dtype of the "
    "puppeteer's pointwise matrix products (most of its multiply-adds): float32 (default, "
    "the paper's), or bfloat16 / float16 (16-bit operands and products, float32 state and "
    "batch norm; several times faster on CPUs with AMX or AVX512-BF16 and on GPUs).")
_STATE_CHANNELS = flags.DEFINE_integer(
    "state_channels", None, "Width C of the puppeteer's C x C x K^2 state (default: the widest "
    "stage, as the paper); a narrower state is resized up to wider stages.")
_GENERATOR_RANK = flags.DEFINE_integer(
    "generator_rank", None, "0: G's pointwise conv is a full C x C matrix (paper); r: factorized "
    "as (C x r)(r x C), about 2r/C of its multiply-adds (not in the paper; a speed option).")
_DEPTH_REFINEMENTS = flags.DEFINE_integer(
    "depth_refinements", None, "Incremental-in-depth training: start at depth_scale 2^-k and "
    "double it k times (0: off).")
_REFINE_EVERY_EPOCHS = flags.DEFINE_integer(
    "refine_every_epochs", None, "Epochs between depth refinements (0: spread evenly).")
_PRECISE_BN_IMAGES = flags.DEFINE_integer(
    "precise_bn_images", None, "Before each validation, re-estimate the puppet's and G's "
    "batch-norm moving statistics on this many training images (0: off, default; Puppet-CNN "
    "only).")

flags.mark_flag_as_required("model_dir")


def _set(target, **values):
  """dataclasses.replace with only the values that were given (not None)."""
  given = {k: v for k, v in values.items() if v is not None}
  return dataclasses.replace(target, **given) if given else target


def config_from_flags() -> ExperimentConfig:
  """The ExperimentConfig defaults, overridden by every flag that was set."""
  base = ExperimentConfig()
  data = _set(base.data if _DATASET.value is None else DataConfig(dataset=_DATASET.value),
              data_dir=_DATA_DIR.value, image_size=_IMAGE_SIZE.value,
              train_subset=_TRAIN_SUBSET.value, val_fraction=_VAL_FRACTION.value,
              test_fraction=_TEST_FRACTION.value, augment=_AUGMENT.value,
              limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
              eval_batch_size=_EVAL_BATCH_SIZE.value, seed=_SEED.value,
              batch_grouping=_BATCH_GROUPING.value)
  train = _set(base.train, model=_MODEL.value, epochs=_EPOCHS.value,
               learning_rate=_LEARNING_RATE.value, weight_decay=_WEIGHT_DECAY.value,
               seed=_SEED.value, jit_compile=_JIT_COMPILE.value,
               dtype_policy=_DTYPE_POLICY.value, mixed_precision=_MIXED_PRECISION.value,
               distribution_strategy=_STRATEGY.value, verbose=_VERBOSE.value,
               depth_refinements=_DEPTH_REFINEMENTS.value,
               refine_every_epochs=_REFINE_EVERY_EPOCHS.value,
               precise_bn_images=_PRECISE_BN_IMAGES.value)
  stage_channels = (tuple(int(c) for c in _STAGE_CHANNELS.value)
                    if _STAGE_CHANNELS.value else None)
  model = _set(PuppetCNNConfig(), stage_channels=stage_channels, min_depth=_MIN_DEPTH.value,
               max_depth=_MAX_DEPTH.value, init=_INIT.value, init_rank=_INIT_RANK.value,
               integrator=_INTEGRATOR.value, depth_adaptation=_DEPTH_ADAPTATION.value,
               fixed_depth=_FIXED_DEPTH.value,
               parameter_adaptation=_PARAMETER_ADAPTATION.value,
               complexity_bins=_COMPLEXITY_BINS.value,
               complexity_bin_floor=_COMPLEXITY_BIN_FLOOR.value, execution=_EXECUTION.value,
               bucketed_inference=_BUCKETED_INFERENCE.value,
               depth_scale=_DEPTH_SCALE.value,
               train_widths=(tuple(float(w) for w in _TRAIN_WIDTHS.value)
                             if _TRAIN_WIDTHS.value else None),
               generator_remat=_GENERATOR_REMAT.value, generator_rank=_GENERATOR_RANK.value,
               generator_loop=_GENERATOR_LOOP.value, fused_batch_norm=_FUSED_BATCH_NORM.value,
               narrow_kernels=_NARROW_KERNELS.value, per_sample_conv=_PER_SAMPLE_CONV.value,
               generator_depthwise=_GENERATOR_DEPTHWISE.value,
               gathered_kernels=_GATHERED_KERNELS.value,
               generator_norm=_GENERATOR_NORM.value,
               generator_backward=_GENERATOR_BACKWARD.value,
               generator_matmul_dtype=_GENERATOR_MATMUL_DTYPE.value,
               state_channels=_STATE_CHANNELS.value)
  if _JIT_COMPILE.value is None and model.execution == "bucketed":
    # XLA cannot compile bucketed execution (ExperimentConfig refuses it): off unless asked.
    train = dataclasses.replace(train, jit_compile=False)
  if data.dataset == "image_folder":
    model = dataclasses.replace(model, pixel_mean=(0.485, 0.456, 0.406),
                                pixel_std=(0.229, 0.224, 0.225))
  return ExperimentConfig(train=train, data=data, model=model)


def main(argv):
  del argv
  from official.puppet_cnn import train_lib  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn import distribute_utils  # pylint: disable=import-outside-toplevel
  kernel_cache = None if _EXPORT_KERNEL_CACHE.value == "none" else _EXPORT_KERNEL_CACHE.value
  if kernel_cache and not _EXPORT_DIR.value:
    raise app.UsageError("--export_kernel_cache needs --export_dir (it says what to export)")
  try:
    config = config_from_flags()
    train_lib.check_export_kernel_cache(config, kernel_cache,
                                        _EXPORT_KERNEL_CACHE_BINS.value,
                                        _EXPORT_KERNEL_CACHE_COMPUTE_DTYPE.value)
  except (TypeError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  if _LOGICAL_CPUS.value:
    distribute_utils.use_logical_cpus(_LOGICAL_CPUS.value)
  from official.puppet_cnn.data.errors import DataError  # pylint: disable=import-outside-toplevel
  from official.puppet_cnn.training_memory import TrainingOutOfMemoryError  # pylint: disable=import-outside-toplevel
  try:
    results = train_lib.run(config, _MODE.value, _MODEL_DIR.value,
                            export_dir=_EXPORT_DIR.value, overwrite=_OVERWRITE.value,
                            export_kernel_cache=kernel_cache,
                            export_kernel_cache_bins=_EXPORT_KERNEL_CACHE_BINS.value,
                            export_kernel_cache_compute_dtype=(
                                _EXPORT_KERNEL_CACHE_COMPUTE_DTYPE.value))
  except (DataError, train_lib.RunError, TrainingOutOfMemoryError) as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  if results:
    logging.info("results: top1=%.4f top5=%.4f loss=%.4f (%d test images)",
                 results["top1"], results["top5"], results["loss"],
                 results["num_test_images"])


if __name__ == "__main__":
  app.run(main)
