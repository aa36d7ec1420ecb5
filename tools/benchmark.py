r"""Speed and memory of Puppet-CNN's execution modes against a static twin and baselines.

    python tools/benchmark.py                       # full puppet (64-128-256-512, depth <= 8)
    python tools/benchmark.py --small               # a 16-32-64 puppet, every mode
    python tools/benchmark.py --sizes=small,full --full_models=static_twin,puppet_cached
    python tools/benchmark.py --models=static_twin,puppet_cached --xla=off --repeats=7

One run measures, for every selected model and XLA setting: inference latency at batch 1,
throughput at batch 64 and 256, the time of one training step at batch 64, and peak memory.
Each (model, XLA, phase) job runs in a fresh Python subprocess, so that its peak resident
memory (VmHWM of /proc/self/status, Linux; reset with /proc/self/clear_refs after imports and
data loading) is its own; memory is reported as that peak and as its growth over the
process's resident size after imports and data loading, before the model is built. Next to
it, the peak of the bytes TensorFlow's CPU allocator had handed out to live tensors over the
same span (`tf.config.experimental.get_memory_info('CPU:0')`, reset with the resident peak;
oneDNN's allocator, the default on x86, tracks it; "-" where it does not): the model's
tensors (weights, kernel caches, activations, gradients) without what the process holds
around them (traced graphs and their instantiated functions, memory the allocators keep
after it was freed). Times are medians over --repeats timed calls (default 5) after the first call
(tracing) and --warmup untimed calls; spreads are [min, max]. Inference is a `tf.function`
(`jit_compile` per the XLA setting) of `model(x, training=False)`, traced once for any batch
size (`--infer_signature=dynamic`, as a SavedModel's serving signature is) or once per batch
size (`per_batch`); training is
`model.train_on_batch` (SGD) after `compile(jit_compile=...)`.

Models (`--models`):
  puppet_exact     PuppetClassifier, execution='per_sample', exact H (the paper).
  puppet_binned    execution='per_sample', complexity_bins=--bins.
  puppet_gathered  execution='gathered', complexity_bins=--bins: G once per bin, for every
                   bin, each image's kernels gathered from its bin's, then the per-sample
                   puppet (XLA-compatible; the same predictions as puppet_binned).
  puppet_bucketed  execution='bucketed', complexity_bins=--bins (kernels generated per call).
  puppet_cached    the same after cache_kernels() (inference only; its training is bucketed's).
  puppet_cached_per_bin  puppet_cached with bucketed_inference='per_bin' (one unrolled
                   branch per bin instead of one loop over the bins; same predictions).
  puppet_cached16  puppet_cached with cache_kernels(dtype='float16'): half the cache's memory, each
                   kernel rounded to 16 bits (lossy: not the exact path; the report gives its
                   targets apart and its largest logit deviation from puppet_cached).
  puppet_cached8   puppet_cached with cache_kernels(dtype='int8'): a quarter of the cache's
                   memory (weight-only int8, a float32 scale per layer and output channel),
                   dequantized before each convolution (lossy, reported like puppet_cached16).
  puppet_frozen8   puppet_cached8 with every bin cached and cache_kernels(fallback=False): the
                   inference graph has no generating path (what an export with
                   --kernel_cache=int8 serves).
  puppet_nearest8  puppet_frozen8 with only the bins of the calibration images cached (below),
                   cache_kernels(fallback='nearest'): an image in another bin runs as the
                   nearest cached bin (what an export with --export_kernel_cache_bins=train
                   serves); no generating path.
  puppet_remat     puppet_bucketed with generator_remat=True: G's activations are recomputed
                   in the backward pass (training only; its inference is bucketed's).
  puppet_light     puppet_bucketed with a lighter puppeteer: state_channels=
                   --light_state_channels (a narrower state, resized up to wider stages) and
                   generator_rank=--light_generator_rank (G's C x C pointwise matrix as
                   (C x r)(r x C)). Not the paper's puppeteer: the report gives its targets
                   apart from the paper-faithful modes'.
  puppet_light_remat  puppet_light with generator_remat=True (training only, like
                   puppet_remat; reported with puppet_light).
  puppet_loop      puppet_remat with generator_loop=True: each stage's repeated steps of G in
                   one tf.while_loop instead of unrolled (a smaller training graph; training
                   only).
  puppet_light_loop  puppet_light_remat with generator_loop=True (training only; reported
                   with puppet_light).
  puppet_light_twopass  puppet_light_loop with fused_batch_norm=False: the puppet's training
                   batch norm as two-pass moments and a scale and shift instead of one fused
                   op (the code before 2026-12-03; training only; reported with puppet_light).
  puppet_light_gathered  puppet_gathered with puppet_light's puppeteer (XLA-compatible).
  puppet_light_floor  puppet_light_loop with its bins on [--bin_floor, 8] bits
                   (complexity_bin_floor): the --bins bins on [0, 8] that lie above the floor,
                   the same edges, centres, depths and kernels (an image below the floor runs
                   in the first bin). For images above the floor it computes what
                   puppet_light_loop does, with a training graph of fewer bins (training only;
                   reported with puppet_light).
  puppet_light_wide  puppet_light_floor with narrow_kernels=False: the kernels of the
                   256-wide state at 512 channels built at full size instead of convolving
                   with the narrow ones (the code before 2026-12-04; training only; reported
                   with puppet_light). The other light modes use narrow kernels in training.
  puppet_grouped   puppet_bucketed trained on a batch of 64 images of one complexity bin
                   (the most common bin of the calibration images below): the batches that
                   --batch_grouping=complexity_bin feeds, where the puppeteer runs once per
                   step (training only; the note gives the bin and its depth).
  puppet_grouped_remat  puppet_grouped with generator_remat=True (training only).
  puppet_grouped_floor  puppet_grouped with its bins on [--bin_floor, 8] bits, as
                   puppet_light_floor (training only).
  puppet_grouped_lean  puppet_grouped_floor with generator_remat=True and generator_loop=True
                   (training only).
  puppet_reversible  puppet_bucketed with generator_backward='reversible': one custom gradient
                   for G's trajectory that keeps G's pre-normalization output per step and
                   undoes the Euler steps in the backward pass (training only). Since
                   2026-12-05 what the default ('auto') trains with, so puppet_bucketed's
                   training step is this one; puppet_remat, puppet_loop and the other remat
                   or loop modes train with autodiff.
  puppet_autodiff  puppet_bucketed with generator_backward='autodiff': the backend's
                   automatic differentiation of every step of G (the default before
                   2026-12-05; training only).
  puppet_grouped_reversible  puppet_grouped_floor with generator_backward='reversible'
                   (training only; the same as puppet_grouped_floor since 2026-12-05).
  puppet_grouped_autodiff  puppet_grouped_floor with generator_backward='autodiff' (training
                   only).
  puppet_bf16      puppet_bucketed with generator_matmul_dtype='bfloat16': G's pointwise
                   products in bfloat16 (float32 state, batch norm and puppet convolutions;
                   not the paper's float32, so its targets are reported apart).
  puppet_grouped_bf16  puppet_grouped_floor with generator_matmul_dtype='bfloat16' (training
                   only; reported with puppet_bf16).
  puppet_cached_bf16  puppet_cached with a bfloat16 cache whose convolutions run in bfloat16
                   (`cache_kernels(dtype='bfloat16', compute_dtype='bfloat16')`): bfloat16
                   features through the puppet, float32 from the pooled features on (inference
                   only; targets against static_twin_bf16).
  puppet_nearest8_bf16  puppet_nearest8 with its convolutions in bfloat16 (int8 storage,
                   `compute_dtype='bfloat16'`; inference only; targets against
                   static_twin_bf16).
  puppet_mixed_bf16  puppet_bucketed under Keras's 'mixed_bfloat16' dtype policy
                   (`PuppetClassifier(dtype=)`): the puppet's convolutions in bfloat16, in
                   training and in generating inference; G, batch norm and the head float32.
                   Targets against static_twin_bf16.
  puppet_grouped_mixed_bf16  puppet_grouped_floor under 'mixed_bfloat16' (training only;
                   reported with puppet_mixed_bf16).
  puppet_grouped_mixed_all_bf16  puppet_grouped_mixed_bf16 with G's pointwise products in
                   bfloat16 as well (generator_matmul_dtype='bfloat16'; training only).
  static_twin_bf16  static_twin under Keras's 'mixed_bfloat16' dtype policy (bfloat16
                   convolutions, float32 weights): what 16-bit arithmetic gives a plain CNN on
                   this machine. Reported as a row; the ratios stay against the float32 twin,
                   whose convolutions the puppet modes share.
  puppet_light_grouped  puppet_light trained the same way (training only; reported with
                   puppet_light).
  puppet_light_grouped_floor  puppet_light_floor trained the same way (training only;
                   reported with puppet_light).
  static_twin      a plain Keras CNN with the puppet's layer shapes and stored kernels, at a
                   fixed depth per stage = the puppet's mean depth on the benchmark images
                   (rounded to an int).
  resnet, mobilenet_v2   official.puppet_cnn.baselines.build_baseline(name, 10).

Images: the first 256 CIFAR-10 test images from --data_dir (default $PUPPET_CNN_DATA_DIR)
when they load, else uniform random images (the report says which); batch 1 cycles through
the first 64. Labels: CIFAR-10's (or random). The kernel cache holds the bins of the first
2048 CIFAR-10 training images (or of the benchmark images).

The tool writes --output (docs/benchmarks.md) with the machine, backend, the exact command,
medians and spreads, ratios against the static twin and what was skipped and why. Jobs stop
starting once --time_budget_s is spent; a job over --job_timeout_s or --max_rss_mb is killed.

--parallel_jobs=N (default 1) runs up to N speed jobs at a time, for smoke tests (tests/tools/
benchmark_test.py) on a machine with spare cores: each job's memory is still its own, but
concurrent jobs disturb each other's times, and the time budget is checked when a job is
queued (all at the start), not when it starts. The report says so.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

PAPER_G_MODELS = ("puppet_exact", "puppet_binned", "puppet_gathered", "puppet_bucketed",
                  "puppet_cached", "puppet_cached_per_bin", "puppet_remat", "puppet_loop",
                  "puppet_grouped", "puppet_grouped_remat", "puppet_grouped_floor",
                  "puppet_grouped_lean", "puppet_reversible", "puppet_grouped_reversible",
                  "puppet_autodiff", "puppet_grouped_autodiff")
# The lighter puppeteer (not the paper's).
LIGHT_MODELS = ("puppet_light", "puppet_light_remat", "puppet_light_loop",
                "puppet_light_twopass", "puppet_light_floor", "puppet_light_wide",
                "puppet_light_gathered", "puppet_light_grouped", "puppet_light_grouped_floor")
# The paper's G with its pointwise products in bfloat16 (generator_matmul_dtype).
BF16_MODELS = ("puppet_bf16", "puppet_grouped_bf16")
# Under the 'mixed_bfloat16' dtype policy: the puppet's convolutions in bfloat16.
MIXED_MODELS = ("puppet_mixed_bf16", "puppet_grouped_mixed_bf16",
                "puppet_grouped_mixed_all_bf16")
GATHERED_MODELS = ("puppet_gathered", "puppet_light_gathered")  # XLA-compatible
TRAIN_ONLY_MODELS = {"puppet_remat": "puppet_bucketed", "puppet_loop": "puppet_bucketed",
                     "puppet_light_remat": "puppet_light", "puppet_light_loop": "puppet_light",
                     "puppet_light_twopass": "puppet_light", "puppet_light_floor": "puppet_light",
                     "puppet_light_wide": "puppet_light", "puppet_grouped": "puppet_bucketed",
                     "puppet_grouped_remat": "puppet_bucketed",
                     "puppet_grouped_floor": "puppet_bucketed",
                     "puppet_grouped_lean": "puppet_bucketed",
                     "puppet_reversible": "puppet_bucketed",
                     "puppet_grouped_reversible": "puppet_bucketed",
                     "puppet_autodiff": "puppet_bucketed",
                     "puppet_grouped_autodiff": "puppet_bucketed",
                     "puppet_grouped_bf16": "puppet_bf16",
                     "puppet_grouped_mixed_bf16": "puppet_mixed_bf16",
                     "puppet_grouped_mixed_all_bf16": "puppet_mixed_bf16",
                     "puppet_light_grouped": "puppet_light",
                     "puppet_light_grouped_floor": "puppet_light"}
# Trained on a batch of one complexity bin (`--batch_grouping=complexity_bin`).
GROUPED_MODELS = ("puppet_grouped", "puppet_grouped_remat", "puppet_grouped_floor",
                  "puppet_grouped_lean", "puppet_grouped_reversible", "puppet_grouped_autodiff",
                  "puppet_grouped_bf16", "puppet_grouped_mixed_bf16",
                  "puppet_grouped_mixed_all_bf16", "puppet_light_grouped",
                  "puppet_light_grouped_floor")
# Bins on [--bin_floor, 8] (complexity_bin_floor).
FLOOR_MODELS = ("puppet_light_floor", "puppet_light_wide", "puppet_grouped_floor",
                "puppet_grouped_lean", "puppet_grouped_reversible", "puppet_grouped_autodiff",
                "puppet_grouped_bf16", "puppet_grouped_mixed_bf16",
                "puppet_grouped_mixed_all_bf16", "puppet_light_grouped_floor")
LOSSY_CACHE_DTYPES = {"puppet_cached16": "float16", "puppet_cached8": "int8",
                      "puppet_frozen8": "int8", "puppet_nearest8": "int8",
                      "puppet_cached_bf16": "bfloat16", "puppet_nearest8_bf16": "int8"}
# Caches whose convolutions run in bfloat16 (`cache_kernels(compute_dtype=)`); their targets
# are taken against static_twin_bf16.
BF16_COMPUTE_MODELS = ("puppet_cached_bf16", "puppet_nearest8_bf16")
NO_FALLBACK_MODELS = ("puppet_frozen8",)  # every bin cached, no generating path
NEAREST_MODELS = ("puppet_nearest8", "puppet_nearest8_bf16")  # the calibration bins cached,
                                                              # no generating path
CACHED_MODELS = ("puppet_cached", "puppet_cached_per_bin") + tuple(LOSSY_CACHE_DTYPES)
APPROXIMATE_MODELS = (LIGHT_MODELS + tuple(LOSSY_CACHE_DTYPES) + BF16_MODELS
                      + MIXED_MODELS)  # targets apart
PUPPET_MODELS = PAPER_G_MODELS + APPROXIMATE_MODELS
ALL_MODELS = PUPPET_MODELS + ("static_twin", "static_twin_bf16", "resnet", "mobilenet_v2")
FULL_DEFAULT_MODELS = ("static_twin", "puppet_cached", "puppet_bucketed", "puppet_light",
                       "resnet", "mobilenet_v2")
SIZES = {"full": (64, 128, 256, 512), "small": (16, 32, 64)}
PHASES = ("infer", "train")
INFER_BATCHES = (1, 64, 256)
TRAIN_BATCH = 64
DEFAULT_BIN_FLOOR = 4.0  # puppet_light_floor's complexity_bin_floor (--bin_floor)

def define_flags():
  """Defines the flags; called only when run as a binary, so tests can import this module
  beside other binaries (train.py also has --data_dir, --stage_channels, --max_depth)."""
  global _SMALL, _SIZES, _STAGE_CHANNELS, _MAX_DEPTH, _MODELS, _FULL_MODELS, _PHASES, _XLA
  global _BINS, _BIN_FLOOR, _LIGHT_RANK, _LIGHT_STATE, _REPEATS, _WARMUP, _DATA_DIR
  global _TIME_BUDGET, _JOB_TIMEOUT, _MAX_RSS_MB
  global _NO_B256, _STUDY, _BINNING_STEPS, _BINNING_TRAIN_BINS, _BINNING_BINS
  global _BINNING_EVAL, _OUTPUT, _JSON_OUTPUT, _WORKER, _INFER_SIGNATURE, _PARALLEL_JOBS
  _SMALL = flags.DEFINE_bool("small", False, "Benchmark the small puppet (same as --sizes=small).")
  _SIZES = flags.DEFINE_list("sizes", None, "Puppet sizes to run, in order: full "
                             "(64-128-256-512) and/or small (16-32-64). Default: full, "
                             "or small with --small.")
  _STAGE_CHANNELS = flags.DEFINE_list("stage_channels", None, "Overrides the puppet's stage "
                                      "channels (a custom size, e.g. for tests).")
  _MAX_DEPTH = flags.DEFINE_integer("max_depth", 8, "Puppet max_depth.")
  _MODELS = flags.DEFINE_list("models", list(ALL_MODELS), f"Models to run: {ALL_MODELS}.")
  _FULL_MODELS = flags.DEFINE_list(
      "full_models", list(FULL_DEFAULT_MODELS), "Models for the full size (per-sample "
      "execution of the full puppet needs minutes per batch and tens of GB for a training "
      "step on a CPU); intersected with --models.")
  _PHASES = flags.DEFINE_list("phases", list(PHASES), "infer and/or train.")
  _XLA = flags.DEFINE_list("xla", ["off", "on"], "XLA settings: off and/or on.")
  _BINS = flags.DEFINE_integer("bins", 16, "complexity_bins of the binned/bucketed modes.")
  _BIN_FLOOR = flags.DEFINE_float(
      "bin_floor", DEFAULT_BIN_FLOOR, "complexity_bin_floor of the *_floor models and "
      "puppet_light_wide (bits); "
      "--bins * (8 - floor) / 8 must be a whole number: its bins are those of --bins on "
      "[0, 8] above it.")
  _LIGHT_RANK = flags.DEFINE_integer("light_generator_rank", 32, "generator_rank of "
                                     "puppet_light (0: full; capped at its state width - 1).")
  _LIGHT_STATE = flags.DEFINE_integer("light_state_channels", 256, "state_channels of "
                                      "puppet_light (0: the widest stage, as the paper).")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (>= 5 reported "
                                  "as the protocol; fewer is allowed for smoke tests).")
  _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after the first (tracing) call.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 directory (default: "
                                  "$PUPPET_CNN_DATA_DIR); random images when it does not load.")
  _TIME_BUDGET = flags.DEFINE_float("time_budget_s", 900.0, "No new job starts after this.")
  _JOB_TIMEOUT = flags.DEFINE_float("job_timeout_s", 600.0, "Kill a job after this.")
  _MAX_RSS_MB = flags.DEFINE_float("max_rss_mb", 16000.0, "Kill a job whose resident memory "
                                   "exceeds this (MB).")
  _INFER_SIGNATURE = flags.DEFINE_enum(
      "infer_signature", "dynamic", ["dynamic", "per_batch"], "dynamic: the inference "
      "function is traced once with a None batch dimension (as a SavedModel serving "
      "signature); per_batch: traced once per batch size (1, 64, 256), each trace kept.")
  _NO_B256 = flags.DEFINE_list("no_b256", [], "Models whose batch-256 throughput is not "
                               "measured (to fit the time budget).")
  _STUDY = flags.DEFINE_list("study", ["speed"], "speed (latency, throughput, training step, "
                             "memory) and/or binning (accuracy cost of complexity_bins on a "
                             "briefly trained puppet). Each rewrites only its block of --output.")
  _BINNING_STEPS = flags.DEFINE_integer("binning_steps", 250, "Training steps of the binning "
                                        "study's puppet.")
  _BINNING_TRAIN_BINS = flags.DEFINE_integer("binning_train_bins", 64, "complexity_bins the "
                                             "binning study trains with (bucketed).")
  _BINNING_BINS = flags.DEFINE_list("binning_bins", ["8", "16", "32", "64"], "Bin counts the "
                                    "binning study evaluates against exact H.")
  _BINNING_EVAL = flags.DEFINE_integer("binning_eval_images", 1000, "Test images it evaluates.")
  _OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "Markdown report.")
  _JSON_OUTPUT = flags.DEFINE_string("json_output", None, "Also write the raw results here.")
  _WORKER = flags.DEFINE_string("worker", None, "Internal: run one job from this JSON spec file.")
  _PARALLEL_JOBS = flags.DEFINE_integer(
      "parallel_jobs", 1, "Speed jobs run at a time (smoke tests only: concurrent jobs "
      "disturb each other's times; see the module docstring).", lower_bound=1)


# =================================================================================== worker
def _proc_status_kb(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _load_images(data_dir: Optional[str], n: int = 256):
  """(images uint8 (n, 32, 32, 3), labels, source description, calibration images)."""
  import numpy as np
  data_dir = data_dir or os.environ.get("PUPPET_CNN_DATA_DIR")
  if data_dir:
    try:
      from official.puppet_cnn.data.cifar import load_cifar
      x_train, _, x_test, y_test = load_cifar("cifar10", data_dir)
      return (np.array(x_test[:n]), y_test[:n].astype(np.int64),
              f"CIFAR-10 test images 0..{n - 1} from {data_dir}", np.array(x_train[:2048]))
    except Exception as e:  # pylint: disable=broad-except
      reason = f"CIFAR-10 did not load from {data_dir} ({type(e).__name__}: {e})"
  else:
    reason = "no --data_dir / $PUPPET_CNN_DATA_DIR"
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  return (images, rng.integers(0, 10, n).astype(np.int64), f"uniform random images ({reason})",
          images)


def floor_bins(bins: int, floor: float, h_max: float = 8.0) -> int:
  """How many of `bins` equal bins on [0, h_max] lie above `floor`: the complexity_bins of
  puppet_light_floor, whose bins on [floor, h_max] then have the same edges."""
  above = bins * (h_max - floor) / h_max
  if not 0.0 <= floor < h_max or abs(above - round(above)) > 1e-9:
    raise ValueError(f"--bin_floor={floor} must be in [0, {h_max:g}) and a bin edge of "
                     f"--bins={bins} on [0, {h_max:g}] (a multiple of {h_max / bins:g})")
  return int(round(above))


def _puppet_config(spec: Dict[str, Any]):
  from official.puppet_cnn import PuppetCNNConfig
  return PuppetCNNConfig(num_classes=10, stage_channels=tuple(spec["stage_channels"]),
                         max_depth=spec["max_depth"])


def build_static_twin(config, depth: int):
  """A plain Keras CNN with the puppet's layer shapes, `depth` stored convs per stage.

  Same input normalization, conv (no bias) - BN - ReLU units, pools, global average pool and
  dense head as the puppet (VGG-style 'plain' units); only the kernels are stored instead of
  generated, and every image gets the same depth.
  """
  import keras
  import numpy as np
  inputs = keras.Input(tuple(config.input_shape))
  mean = np.asarray(config.pixel_mean, np.float32)
  std = np.asarray(config.pixel_std, np.float32)
  x = keras.layers.Rescaling(1.0 / config.complexity.pixel_max)(inputs)
  x = keras.layers.Normalization(mean=mean, variance=std ** 2)(x)
  for s, (channels, pool) in enumerate(zip(config.channels, config.pools)):
    for u in range(depth):
      x = keras.layers.Conv2D(channels, config.kernel_size, padding="same", use_bias=False,
                              name=f"stage{s}_conv{u}")(x)
      x = keras.layers.BatchNormalization(momentum=config.bn_momentum,
                                          epsilon=config.bn_epsilon)(x)
      x = keras.layers.ReLU()(x)
    if pool:
      x = keras.layers.MaxPooling2D(2, padding="same")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(config.num_classes)(x)
  return keras.Model(inputs, outputs, name=f"static_twin_depth{depth}")


def _build(spec, calibration):
  """The model of a job, plus notes."""
  from official.puppet_cnn import PuppetClassifier
  from official.puppet_cnn.baselines import build_baseline
  name, notes = spec["model"], {}
  config = _puppet_config(spec)
  if name == "static_twin":
    return build_static_twin(config, spec["twin_depth"]), notes
  if name == "static_twin_bf16":
    import keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # this job's subprocess only
    return build_static_twin(config, spec["twin_depth"]), notes
  if name in ("resnet", "mobilenet_v2"):
    return build_baseline(name, 10), notes
  bucketed = dict(complexity_bins=spec["bins"], execution="bucketed")
  remat = dict(bucketed, generator_remat=True)
  light = dict(bucketed, generator_rank=spec["light_rank"], state_channels=spec["light_state"])
  light_loop = dict(light, generator_remat=True, generator_loop=True)
  overrides = {
      "puppet_exact": {},
      "puppet_binned": dict(complexity_bins=spec["bins"]),
      "puppet_gathered": dict(complexity_bins=spec["bins"], execution="gathered"),
      "puppet_light_gathered": dict(light, execution="gathered"),
      "puppet_bucketed": bucketed,
      "puppet_cached": bucketed,
      "puppet_cached_per_bin": dict(bucketed, bucketed_inference="per_bin"),
      "puppet_cached16": bucketed,
      "puppet_cached8": bucketed,
      "puppet_frozen8": bucketed,
      "puppet_nearest8": bucketed,
      "puppet_cached_bf16": bucketed,
      "puppet_nearest8_bf16": bucketed,
      "puppet_remat": remat,
      "puppet_light": light,
      "puppet_light_remat": dict(light, generator_remat=True),
      "puppet_loop": dict(remat, generator_loop=True),
      "puppet_light_loop": light_loop,
      "puppet_light_twopass": dict(light_loop, fused_batch_norm=False),
      "puppet_light_floor": light_loop,  # its bins: below (they depend on --bin_floor)
      "puppet_light_wide": dict(light_loop, narrow_kernels=False),
      "puppet_grouped": bucketed,
      "puppet_grouped_remat": remat,
      "puppet_grouped_floor": bucketed,
      "puppet_grouped_lean": dict(remat, generator_loop=True),
      "puppet_reversible": dict(bucketed, generator_backward="reversible"),
      "puppet_grouped_reversible": dict(bucketed, generator_backward="reversible"),
      "puppet_autodiff": dict(bucketed, generator_backward="autodiff"),
      "puppet_grouped_autodiff": dict(bucketed, generator_backward="autodiff"),
      "puppet_bf16": dict(bucketed, generator_matmul_dtype="bfloat16"),
      "puppet_grouped_bf16": dict(bucketed, generator_matmul_dtype="bfloat16"),
      "puppet_mixed_bf16": bucketed,
      "puppet_grouped_mixed_bf16": bucketed,
      "puppet_grouped_mixed_all_bf16": dict(bucketed, generator_matmul_dtype="bfloat16"),
      "puppet_light_grouped": light,
      "puppet_light_grouped_floor": light_loop,
  }[name]
  if name in FLOOR_MODELS:
    floor = spec.get("bin_floor", DEFAULT_BIN_FLOOR)
    overrides = dict(overrides, complexity_bins=floor_bins(spec["bins"], floor),
                     complexity_bin_floor=floor)
  model = PuppetClassifier(config.replace(**overrides),
                           dtype="mixed_bfloat16" if name in MIXED_MODELS else "float32")
  model.build()
  if name in CACHED_MODELS:
    start = time.perf_counter()
    dtype = LOSSY_CACHE_DTYPES.get(name, "float32")
    compute = "bfloat16" if name in BF16_COMPUTE_MODELS else "float32"
    if name in NO_FALLBACK_MODELS:
      bins = model.cache_kernels(dtype=dtype, fallback=False, compute_dtype=compute)
    elif name in NEAREST_MODELS:
      # The bins of spec["nearest_bins"] (tools/memory_profile.py), else the calibration's.
      explicit = spec.get("nearest_bins")
      bins = model.cache_kernels(bins=explicit, images=None if explicit else calibration,
                                 dtype=dtype, fallback="nearest", compute_dtype=compute)
    else:
      bins = model.cache_kernels(images=calibration, dtype=dtype, compute_dtype=compute)
    info = model.kernel_cache_info()
    notes.update(cached_bins=list(bins), cache_mb=info["bytes"] / 1e6,
                 cache_s=time.perf_counter() - start, cache_dtype=dtype)
  return model, notes


def _time_calls(fn, repeats: int, warmup: int):
  first = time.perf_counter()
  fn(0)
  first = time.perf_counter() - first
  for i in range(warmup):
    fn(i + 1)
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    fn(warmup + 1 + i)
    times.append(time.perf_counter() - start)
  return {"times": times, "first_call_s": first}


def _reset_tensor_peak() -> bool:
  """Resets the peak of TensorFlow's CPU allocator statistics; False where it keeps none."""
  import tensorflow as tf
  try:
    tf.config.experimental.reset_memory_stats("CPU:0")
    return True
  except (ValueError, RuntimeError):
    return False


def _tensor_peak_kb() -> Optional[int]:
  """Peak kB in live tensors since `_reset_tensor_peak` (None where not tracked)."""
  import tensorflow as tf
  try:
    return int(tf.config.experimental.get_memory_info("CPU:0")["peak"] // 1024)
  except (ValueError, RuntimeError):
    return None


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current resident size (Linux >= 4.0: clear_refs 5)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Runs one (model, XLA, phase) job; returns its measurements."""
  import gc
  import numpy as np
  import tensorflow as tf
  import keras
  with np.load(spec["data_file"]) as data:
    images, labels = data["images"], data["labels"]
    calibration = data["calibration"]
  gc.collect()
  rss_base = _proc_status_kb("VmRSS")
  peak_reset = _reset_peak_rss()
  tracked = _reset_tensor_peak()
  model, notes = _build(spec, calibration)
  result: Dict[str, Any] = {"notes": notes, "rss_base_kb": rss_base, "peak_reset": peak_reset}
  xla = spec["xla"]
  repeats, warmup = spec["repeats"], spec["warmup"]
  if spec["phase"] == "infer":
    signature = None
    if spec.get("infer_signature", "dynamic") == "dynamic":
      signature = [tf.TensorSpec((None,) + images.shape[1:], tf.float32)]
    fn = tf.function(lambda x: model(x, training=False), jit_compile=xla,
                     input_signature=signature)
    batches = {b: tf.constant(images[:b].astype(np.float32)) for b in (64, 256)}
    singles = [tf.constant(images[i:i + 1].astype(np.float32)) for i in range(64)]
    result["latency_b1"] = _time_calls(lambda i: fn(singles[i % 64]).numpy(), repeats, warmup)
    result["batch_64"] = _time_calls(lambda i: fn(batches[64]).numpy(), repeats, warmup)
    result["hwm_b64_kb"] = _proc_status_kb("VmHWM")
    result["tensor_peak_b64_kb"] = _tensor_peak_kb() if tracked else None
    if 256 in spec["infer_batches"]:
      result["batch_256"] = _time_calls(lambda i: fn(batches[256]).numpy(), repeats, warmup)
      result["hwm_b256_kb"] = _proc_status_kb("VmHWM")
    if spec["model"] in LOSSY_CACHE_DTYPES:  # after every measurement: its cost of rounding
      approx = fn(batches[256][:64]).numpy()
      model.cache_kernels(images=calibration, dtype="float32")
      exact = tf.function(lambda x: model(x, training=False))(batches[256][:64]).numpy()
      result["notes"]["lossy_max_logit_error"] = float(np.abs(approx - exact).max())
      result["notes"]["lossy_logit_scale"] = float(np.abs(exact).max())
      result["notes"]["lossy_same_class"] = float(np.mean(approx.argmax(-1)
                                                          == exact.argmax(-1)))
  else:
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=xla)
    x, y = images[:TRAIN_BATCH].astype(np.float32), labels[:TRAIN_BATCH]
    if spec["model"] in GROUPED_MODELS:
      x = one_bin_batch(model, calibration, TRAIN_BATCH, result["notes"]).astype(np.float32)
    result["train_64"] = _time_calls(lambda i: model.train_on_batch(x, y), repeats, warmup)
    result["hwm_train_kb"] = _proc_status_kb("VmHWM")
    result["tensor_peak_train_kb"] = _tensor_peak_kb() if tracked else None
  return result


def one_bin_batch(model, pool, n: int, notes: Dict[str, Any]):
  """`n` images of `pool` from its most common complexity bin of `model` (repeated if that
  bin holds fewer), the batch `--batch_grouping=complexity_bin` feeds; notes the bin, its
  depth and how many distinct images it had."""
  import numpy as np
  bins = model.image_bins(pool)
  values, counts = np.unique(bins, return_counts=True)
  b = int(values[np.argmax(counts)])
  index = np.flatnonzero(bins == b)
  notes.update(grouped_bin=b, grouped_depth=int(model.bin_table()[2][b]),
               grouped_distinct=int(min(n, index.size)), grouped_pool=int(len(pool)))
  return np.asarray(pool)[np.resize(index, n)]


def run_binning_study(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Trains a puppet briefly, then compares predictions with exact and binned H.

  Training uses execution='bucketed' with spec['train_bins'] bins (the fast mode); the
  evaluation runs the trained weights with exact H (per_sample, the paper) and with each bin
  count of spec['bins_list'] (bucketed, which equals per_sample with the same bins, see
  tests/modeling/bucketed_test.py).
  """
  import numpy as np
  import keras
  from official.puppet_cnn import PuppetClassifier
  data_dir = spec.get("data_dir") or os.environ.get("PUPPET_CNN_DATA_DIR")
  try:
    from official.puppet_cnn.data.cifar import load_cifar
    x_train, y_train, x_test, y_test = load_cifar("cifar10", data_dir)
    source = (f"CIFAR-10 from {data_dir}: training images in a seeded random order, the "
              "first test images for evaluation")
  except Exception as e:  # pylint: disable=broad-except
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (4096, 32, 32, 3)).astype(np.uint8)
    y_train = rng.integers(0, 10, 4096)
    x_test, y_test = x_train[:1024], y_train[:1024]
    source = f"uniform random images and labels (CIFAR-10 did not load: {e})"
  config = _puppet_config(spec)
  model = PuppetClassifier(config.replace(complexity_bins=spec["train_bins"],
                                          execution="bucketed"))
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(1)
  order = rng.permutation(len(x_train))
  batch, start, losses = 64, time.perf_counter(), []
  for step in range(spec["steps"]):
    idx = order[(step * batch) % len(order):][:batch]
    losses.append(float(model.train_on_batch(x_train[idx], y_train[idx])))
  train_s = time.perf_counter() - start
  weights = model.get_weights()
  x_eval, y_eval = x_test[:spec["eval_images"]], y_test[:spec["eval_images"]]

  def evaluate(**overrides):
    m = PuppetClassifier(config.replace(**overrides))
    m.build()
    m.set_weights(weights)
    if overrides.get("execution") == "bucketed":
      m.cache_kernels(images=x_eval)
    out = m.predict_details(x_eval, batch_size=100)
    return out["logits"], out["depth"]

  exact_logits, exact_depth = evaluate()
  rows = [{"bins": 0, "top1": float(np.mean(exact_logits.argmax(1) == y_eval)),
           "agreement": 1.0, "max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0,
           "mean_depth": float(exact_depth.mean()), "depth_changed": 0.0}]
  for bins in spec["bins_list"]:
    logits, depth = evaluate(complexity_bins=bins, execution="bucketed")
    diff = np.abs(logits - exact_logits)
    rows.append({"bins": bins, "top1": float(np.mean(logits.argmax(1) == y_eval)),
                 "agreement": float(np.mean(logits.argmax(1) == exact_logits.argmax(1))),
                 "max_abs_logit_diff": float(diff.max()),
                 "mean_abs_logit_diff": float(diff.mean()),
                 "mean_depth": float(depth.mean()),
                 "depth_changed": float(np.mean(depth != exact_depth))})
  return {"source": source, "train_s": train_s, "losses": losses, "rows": rows,
          "first_loss": float(np.mean(losses[:10])) if losses else None,
          "last_loss": float(np.mean(losses[-10:])) if losses else None}


def binning_lines(header, spec, result) -> List[str]:
  lines = ["## Accuracy cost of complexity binning", "",
           "Written by `tools/benchmark.py --study=binning` (block `binning`).", ""]
  lines += _machine_lines(header)
  if result.get("error"):
    return lines + ["", f"The study failed: {result['error']}", ""]
  lines += [
      f"- Data: {result['source']}",
      f"- Model: PuppetClassifier, stage channels {tuple(spec['stage_channels'])}, max depth "
      f"{spec['max_depth']}, trained from scratch for {spec['steps']} steps of batch 64 "
      f"(Adam 1e-3, no augmentation; {result['train_s']:.0f} s) with execution='bucketed' "
      f"and {spec['train_bins']} bins; training loss {result['first_loss']:.3f} (first 10 "
      f"steps) -> {result['last_loss']:.3f} (last 10)",
      f"- Evaluation: the same weights on {spec['eval_images']} test images, with exact H "
      "(per_sample, the paper's rule) and with each bin count (bucketed with a kernel cache, "
      "which equals per_sample with the same bins within 1e-4). Agreement: fraction of "
      "images whose predicted class equals the exact-H prediction.", "",
      "| complexity_bins | top-1 | agreement with exact H | mean abs logit diff | "
      "max abs logit diff | mean depth | images whose depth changed |",
      "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['bins'] or 'exact (0)'} | {100 * r['top1']:.1f}% "
                 f"| {100 * r['agreement']:.1f}% | {r['mean_abs_logit_diff']:.4f} "
                 f"| {r['max_abs_logit_diff']:.4f} | {r['mean_depth']:.2f} "
                 f"| {100 * r['depth_changed']:.1f}% |")
  return lines + [""]


# =================================================================================== parent
def _skip_reason(model: str, xla: bool, phase: str) -> Optional[str]:
  bucketed = (("puppet_bucketed",) + tuple(TRAIN_ONLY_MODELS) + LIGHT_MODELS + CACHED_MODELS
              + BF16_MODELS + MIXED_MODELS)
  if model in bucketed and model not in GATHERED_MODELS and xla:
    return "not XLA-compatible (data-dependent group sizes)"
  if model in TRAIN_ONLY_MODELS and phase == "infer":
    return f"a training option: inference is {TRAIN_ONLY_MODELS[model]}'s"
  if model in CACHED_MODELS and phase == "train":
    return "training regenerates kernels: same as puppet_bucketed"
  return None


def _mean_depths(spec_base, images) -> Dict[str, float]:
  """Mean puppet depth on the benchmark images, exact H and binned."""
  import numpy as np
  from official.puppet_cnn.modeling import complexity as cx
  config = _puppet_config(spec_base)
  h = cx.image_complexity(images, config.complexity).numpy()
  exact = cx.depth_from_step(cx.step_size(h), config.min_depth, config.max_depth).numpy()
  bins = cx.complexity_bin(h, spec_base["bins"], config.complexity.max_complexity).numpy()
  _, _, depths = cx.bin_table(spec_base["bins"], config.complexity.max_complexity,
                              config.min_depth, config.max_depth)
  return {"exact": float(exact.mean()), "binned": float(depths[bins].mean()),
          "h_mean": float(h.mean()), "h_min": float(h.min()), "h_max": float(h.max()),
          "depth_histogram": {int(d): int(c) for d, c in zip(*np.unique(exact,
                                                                        return_counts=True))},
          "occupied_bins_b64": int(len(np.unique(bins[:64]))),
          "occupied_bins_b256": int(len(np.unique(bins)))}


def _conv_macs(channels, pools, depth_per_image, in_channels=3, size=32, k=3) -> float:
  """Multiply-adds of the conv layers of one image of the given depth per stage."""
  total, c_prev, hw = 0.0, in_channels, size * size
  for c, pool in zip(channels, pools):
    total += hw * k * k * (c_prev * c + (depth_per_image - 1) * c * c)
    c_prev = c
    if pool:
      hw = ((int(hw ** 0.5) + 1) // 2) ** 2
  return total


def _run_job(spec, timeout_s: float, max_rss_mb: float) -> Dict[str, Any]:
  """Runs one job in a fresh interpreter, watching its time and resident memory."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path = os.path.join(tmp, "spec.json")
    out_path = os.path.join(tmp, "out.json")
    spec = dict(spec, output=out_path)
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={spec_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    killed: Dict[str, str] = {}
    log: List[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
      time.sleep(0.5)
      if time.perf_counter() - start > timeout_s:
        killed["reason"] = f"killed after {timeout_s:.0f} s (job time limit)"
      rss = _child_rss_mb(proc.pid)
      if rss is not None and rss > max_rss_mb:
        killed["reason"] = f"killed at {rss:.0f} MB resident (limit {max_rss_mb:.0f} MB)"
      if killed:
        proc.kill()
        proc.wait()
        break
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    if killed:
      return {"error": killed["reason"], "wall_s": wall}
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = "".join(log)[-1500:]
      return {"error": f"exit code {proc.returncode}: {error_line(''.join(log))}",
              "log_tail": tail, "wall_s": wall}
    with open(out_path) as f:
      result = json.load(f)
    result["wall_s"] = wall
    result["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    return result


def _child_rss_mb(pid: int) -> Optional[float]:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


# ================================================================================== report
def _stats(times: List[float]) -> Dict[str, float]:
  import numpy as np
  return {"median": float(np.median(times)), "min": float(np.min(times)),
          "max": float(np.max(times))}


def _fmt_time(entry, scale=1000.0, unit="ms") -> str:
  if not entry:
    return "-"
  s = _stats(entry["times"])
  return f"{s['median'] * scale:.1f} [{s['min'] * scale:.1f}, {s['max'] * scale:.1f}] {unit}"


def _fmt_throughput(entry, batch: int) -> str:
  if not entry:
    return "-"
  s = _stats(entry["times"])
  return f"{batch / s['median']:.1f} [{batch / s['max']:.1f}, {batch / s['min']:.1f}]"


def _fmt_kb(kb) -> str:
  return "-" if kb is None else f"{kb / 1024.0:.0f}"


def _fmt_mem(hwm_kb, base_kb) -> str:
  if hwm_kb is None:
    return "-"
  growth = (hwm_kb - base_kb) / 1024.0 if base_kb else float("nan")
  return f"{hwm_kb / 1024.0:.0f} (+{growth:.0f})"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  if a is None or b is None or b == 0:
    return "-"
  return f"{a / b:.2f}x"


def _median(result, key) -> Optional[float]:
  entry = (result or {}).get(key)
  return _stats(entry["times"])["median"] if entry else None


def _growth_mb(result, key) -> Optional[float]:
  if not result or result.get(key) is None or not result.get("rss_base_kb"):
    return None
  return (result[key] - result["rss_base_kb"]) / 1024.0


def _peak_mb(result, key) -> Optional[float]:
  if not result or result.get(key) is None:
    return None
  return result[key] / 1024.0


def _target(ok: Optional[bool]) -> str:
  return "n/a" if ok is None else ("met" if ok else "NOT met")


TITLE = "# Benchmarks: Puppet-CNN execution modes"


def error_line(log: str) -> str:
  """The line of a failed job's output that says why: the last Python exception line
  (`SomeError: message`), else the last line. A process that aborts after its exception
  (TensorFlow after XLA's out-of-memory error: 'Fatal Python error: Aborted') ends with
  lines that say nothing of the cause."""
  lines = [l.strip() for l in log.strip().splitlines() if l.strip()]
  for line in reversed(lines):
    if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line):
      return line[:300]
  return lines[-1][:300] if lines else "(no output)"


def write_block(path: str, name: str, lines: List[str], title: str = TITLE) -> None:
  """Writes `lines` as block `name` of the report, keeping its other blocks.

  Blocks sit between `<!-- name:begin -->` and `<!-- name:end -->`; a block the tool does not
  write (e.g. `discussion`, written by hand) is kept as it is. A new report starts with
  `title`.
  """
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = "\n".join([begin] + lines + [end])
  text = open(path).read() if os.path.exists(path) else title + "\n"
  if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _machine_lines(header) -> List[str]:
  return [f"- Command: `{header['command']}`",
          f"- Date: {header['date']}; wall time of the run: {header['wall_s']:.0f} s",
          f"- Machine: `{header['uname']}`; {header['cpus']} CPUs ({header['cpu_model']}); "
          f"{header['mem_gb']:.0f} GB RAM; no GPU used",
          f"- Backend: TensorFlow {header['tf']}, Keras {header['keras']} "
          f"({header['backend']}), Python {header['python']}"]


def write_report(path: str, header: Dict[str, Any], sections: List[Dict[str, Any]]) -> None:
  lines = ["## Speed and memory", "",
           "Written by `tools/benchmark.py` (block `speed`); every number in this block comes "
           "from the run described here.", "",
           "### Setup", ""] + _machine_lines(header) + [
           f"- Images: {header['images']}",
           f"- Batch sizes: latency at 1 (cycling through 64 images), throughput at 64 and "
           f"256, one training step (SGD, momentum 0.9) at {TRAIN_BATCH}",
           f"- Protocol: each (model, XLA, phase) job in a fresh subprocess; first call "
           f"(tracing) and {header['warmup']} warm-up call(s) excluded; {header['repeats']} "
           "timed calls; **median [min, max]**",
           "- Inference function: " + (
               "traced once with a None batch dimension for every batch size (as a "
               "SavedModel serving signature)" if header.get("infer_signature", "dynamic")
               == "dynamic" else "traced once per batch size (1, 64, 256), each trace kept "
               "(--infer_signature=per_batch)"),
           "- Memory: each job reads its resident size (VmRSS) after imports and data "
           "loading, resets the peak (`echo 5 > /proc/self/clear_refs`), builds the model and "
           "runs; the table gives the peak resident size (VmHWM, /proc/self/status) in MB and, "
           "in parentheses, its growth over that baseline (model, kernel cache, traced "
           "graphs, activations, gradients). Inference peak is read after the batch-1 and "
           "batch-64 measurements (before batch 256); training peak after the training steps. "
           "'Tensor peak': the most bytes TensorFlow's CPU allocator had in live tensors over "
           "the same span (`tf.config.experimental.get_memory_info('CPU:0')`, reset with the "
           "resident peak; '-' where the allocator keeps no statistics, e.g. oneDNN off): the "
           "model's tensors, without the traced graphs and the memory allocators keep after "
           "it is freed.",
           f"- Binned modes: complexity_bins = {header['bins']} (equal bins on [0, 8] bits)",
           f"- Time budget {header['time_budget_s']:.0f} s, job limit "
           f"{header['job_timeout_s']:.0f} s, RSS limit {header['max_rss_mb']:.0f} MB", ""]
  for section in sections:
    lines += _section_lines(section)
  loads = [v for section in sections for row in section["rows"] for part in ("infer", "train")
           for v in ((row.get(part) or {}).get("load_avg_1min") or [])]
  if loads:
    header["notes"].append(
        f"1-minute load average at the start and end of the jobs: {min(loads):.2f} to "
        f"{max(loads):.2f} on {header['cpus']} CPUs (the machine is shared; a load above "
        "about 1 while a job runs means another process competed for the CPUs)")
  if header.get("notes"):
    lines += ["### Notes", ""] + [f"- {n}" for n in header["notes"]] + [""]
  write_block(path, "speed", lines)


def _section_lines(section) -> List[str]:
  size, depths = section["size"], section["depths"]
  lines = [f"### {size} puppet: stage channels {tuple(section['stage_channels'])}, "
           f"max depth {section['max_depth']}", "",
           f"- Puppet depth on the benchmark images: mean {depths['exact']:.2f} with exact H "
           f"(histogram {depths['depth_histogram']}), {depths['binned']:.2f} with "
           f"{section['bins']} bins; H in [{depths['h_min']:.2f}, {depths['h_max']:.2f}] "
           f"bits, mean {depths['h_mean']:.2f}",
           f"- Occupied bins: {depths['occupied_bins_b64']} in the batch of 64, "
           f"{depths['occupied_bins_b256']} in the batch of 256",
           f"- Static twin: depth {section['twin_depth']} per stage "
           f"({section['twin_macs'] / 1e6:.0f} M conv multiply-adds per image; the puppet's "
           f"mean over the images is {section['puppet_macs'] / 1e6:.0f} M with exact depths, "
           "not counting the puppeteer)",
           f"- Puppeteer cost model: one Euler step of G on one state is "
           f"{section['g_step_macs'] / 1e6:.0f} M multiply-adds (9 C^3 + 81 C^2, C = "
           f"{section['state_width']}; puppet_light, C = {section['light_state']} and rank "
           f"{section['light_rank']}: {section['g_step_macs_light'] / 1e6:.0f} M); a bin of "
           "depth d needs "
           f"{len(section['stage_channels'])} d steps, i.e. "
           f"{len(section['stage_channels']) * section['twin_depth'] * section['g_step_macs'] / 1e9:.2f} G "
           f"for d = {section['twin_depth']}: the forward cost of "
           f"{len(section['stage_channels']) * section['twin_depth'] * section['g_step_macs'] / section['twin_macs']:.1f} "
           "twin images per occupied bin (training: about 3x both)"]
  if section.get("twin_kernel_params"):
    mb = 4 * section["twin_kernel_params"] / 1e6
    lines.append(
        f"- Kernel memory: the twin stores {mb:.0f} MB of float32 kernels; one bin's generated "
        f"kernels at the same depth are as large, so the {depths['occupied_bins_b64']} "
        f"occupied bins of a batch of 64 hold about {depths['occupied_bins_b64'] * mb:.0f} MB "
        "(a kernel cache: every cached bin), and training also keeps their gradients")
  lines.append("")
  lines += ["| model | XLA | latency b1 | images/s b64 | images/s b256 | train step b64 | "
            "peak MB infer (growth) | peak MB train (growth) | tensor peak MB infer / train "
            "| notes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for row in section["rows"]:
    inf, tr = row.get("infer") or {}, row.get("train") or {}
    notes = []
    for part, res in (("infer", row.get("infer")), ("train", row.get("train"))):
      if res and res.get("error"):
        notes.append(f"{part}: {res['error']}")
    for part in ("infer", "train"):
      if row.get(f"{part}_skipped"):
        notes.append(f"{part} skipped: {row[f'{part}_skipped']}")
    if row.get("shared"):
      notes.append("same measurement as in the first section (does not depend on the puppet)")
    for part, res in (("infer", row.get("infer")), ("train", row.get("train"))):
      if res and res.get("load_avg_1min"):
        notes.append(f"load {part} {res['load_avg_1min'][0]:.1f}->{res['load_avg_1min'][1]:.1f}")
    cache = (inf.get("notes") or {})
    if cache.get("lossy_max_logit_error") is not None:
      scale = cache.get("lossy_logit_scale") or 1.0
      notes.append(f"against the float32 cache on the batch of 64: largest logit difference "
                   f"{cache['lossy_max_logit_error']:.2g} ("
                   f"{cache['lossy_max_logit_error'] / scale:.1e} of the largest |logit|, "
                   f"{scale:.2g}), same class for {100 * cache['lossy_same_class']:.0f}% of "
                   "the images (untrained weights: a check of the rounding, not of accuracy)")
    grouped = (tr.get("notes") or {})
    if grouped.get("grouped_bin") is not None:
      notes.append(f"one-bin batch: bin {grouped['grouped_bin']} (depth "
                   f"{grouped['grouped_depth']}), the most common of {grouped['grouped_pool']} "
                   f"calibration images; {grouped['grouped_distinct']} distinct images")
    if cache.get("cached_bins") is not None:
      notes.append(f"cache: bins {cache['cached_bins']}, {cache['cache_mb']:.0f} MB "
                   f"{cache.get('cache_dtype', 'float32')}, built in {cache['cache_s']:.1f} s")
    lines.append(
        f"| {row['model']} | {'on' if row['xla'] else 'off'} | {_fmt_time(inf.get('latency_b1'))} "
        f"| {_fmt_throughput(inf.get('batch_64'), 64)} | {_fmt_throughput(inf.get('batch_256'), 256)} "
        f"| {_fmt_time(tr.get('train_64'), 1.0, 's')} "
        f"| {_fmt_mem(inf.get('hwm_b64_kb'), inf.get('rss_base_kb'))} "
        f"| {_fmt_mem(tr.get('hwm_train_kb'), tr.get('rss_base_kb'))} "
        f"| {_fmt_kb(inf.get('tensor_peak_b64_kb'))} / {_fmt_kb(tr.get('tensor_peak_train_kb'))} "
        f"| {'; '.join(notes)} |")
  lines += ["", "Ratios against the static twin with the same XLA setting (throughput: model / "
            "twin, higher is better; training time and memory: model / twin, lower is better; "
            "memory as growth over the post-import baseline, and as total peak):", "",
            "| model | XLA | throughput b64 | throughput b256 | latency b1 | train step b64 | "
            "memory infer growth (peak) | memory train growth (peak) | tensor peak infer / "
            "train |",
            "|---|---|---|---|---|---|---|---|---|"]
  twins = {r["xla"]: r for r in section["rows"] if r["model"] == "static_twin"}
  for row in section["rows"]:
    twin = twins.get(row["xla"])
    if row["model"] == "static_twin" or twin is None:
      continue
    inf, tr = row.get("infer"), row.get("train")
    tinf, ttr = twin.get("infer"), twin.get("train")
    mem = lambda r, t, k: (f"{_ratio(_growth_mb(r, k), _growth_mb(t, k))} "  # pylint: disable=unnecessary-lambda-assignment
                           f"({_ratio(_peak_mb(r, k), _peak_mb(t, k))})")
    tensors = lambda r, t, k: _ratio(_peak_mb(r, k), _peak_mb(t, k))  # pylint: disable=unnecessary-lambda-assignment
    lines.append(
        f"| {row['model']} | {'on' if row['xla'] else 'off'} "
        f"| {_ratio(_median(tinf, 'batch_64'), _median(inf, 'batch_64'))} "
        f"| {_ratio(_median(tinf, 'batch_256'), _median(inf, 'batch_256'))} "
        f"| {_ratio(_median(inf, 'latency_b1'), _median(tinf, 'latency_b1'))} "
        f"| {_ratio(_median(tr, 'train_64'), _median(ttr, 'train_64'))} "
        f"| {mem(inf, tinf, 'hwm_b64_kb')} | {mem(tr, ttr, 'hwm_train_kb')} "
        f"| {tensors(inf, tinf, 'tensor_peak_b64_kb')} "
        f"/ {tensors(tr, ttr, 'tensor_peak_train_kb')} |")
  lines += ["", "Targets (batch 64, against the twin at the puppet's mean depth; best puppet "
            "mode per target, XLA off), with the paper's G:", ""]
  for t in _targets(section, PAPER_G_MODELS):
    lines.append(f"- {t}")
  if any(r["model"] in LIGHT_MODELS for r in section["rows"]):
    lines += ["", f"With the lighter puppeteer of puppet_light (state_channels="
              f"{section['light_state']}, generator_rank={section['light_rank']}; not the "
              "paper's):", ""]
    for t in _targets(section, LIGHT_MODELS):
      lines.append(f"- {t}")
  int8 = [m for m in ("puppet_cached8", "puppet_frozen8")
          if any(r["model"] == m for r in section["rows"])]
  if int8:
    lines += ["", f"With the paper's G and an int8 kernel cache ({', '.join(int8)}; weight-only "
              "int8 kernels, a float32 scale per output channel, so not the exact path):", ""]
    for t in _targets(section, tuple(int8)):
      lines.append(f"- {t}")
  if any(r["model"] == "puppet_nearest8" for r in section["rows"]):
    lines += ["", "With the paper's G and an int8 kernel cache of the calibration images' bins "
              "only (puppet_nearest8; an image in another bin runs as the nearest cached "
              "bin):", ""]
    for t in _targets(section, ("puppet_nearest8",)):
      lines.append(f"- {t}")
  if any(r["model"] in BF16_MODELS for r in section["rows"]):
    lines += ["", "With the paper's G computing its pointwise products in bfloat16 "
              "(generator_matmul_dtype='bfloat16'; the puppet's convolutions float32, as the "
              "twin's; not the paper's float32):", ""]
    for t in _targets(section, BF16_MODELS):
      lines.append(f"- {t}")
  bf16_compute = [m for m in BF16_COMPUTE_MODELS + MIXED_MODELS
                  if any(r["model"] == m for r in section["rows"])]
  if bf16_compute and any(r["model"] == "static_twin_bf16" for r in section["rows"]):
    lines += ["", f"With bfloat16 convolutions ({', '.join(bf16_compute)}), against the twin "
              "in bfloat16 as well (static_twin_bf16, Keras's mixed_bfloat16 policy):", ""]
    for t in _targets(section, tuple(bf16_compute), twin_model="static_twin_bf16"):
      lines.append(f"- {t}")
  if any(r["model"] == "puppet_cached16" for r in section["rows"]):
    lines += ["", "With the paper's G and a float16 kernel cache (puppet_cached16; kernels "
              "rounded to 16 bits, so not the exact path):", ""]
    for t in _targets(section, ("puppet_cached16",)):
      lines.append(f"- {t}")
  lines.append("")
  return lines


def _targets(section, models=PAPER_G_MODELS, twin_model: str = "static_twin") -> List[str]:
  rows = {(r["model"], r["xla"]): r for r in section["rows"]}
  twin = rows.get((twin_model, False))
  out = []

  def best(key, part, fn, higher):
    values = []
    for model in models:
      r = rows.get((model, False))
      value = fn((r or {}).get(part), (twin or {}).get(part)) if r and twin else None
      if value is not None:
        values.append((value, model))
    if not values:
      return None
    return max(values) if higher else min(values)

  tp = best("batch_64", "infer",
            lambda r, t: (_median(t, "batch_64") / _median(r, "batch_64"))
            if _median(r, "batch_64") and _median(t, "batch_64") else None, True)
  tr = best("train_64", "train",
            lambda r, t: (_median(r, "train_64") / _median(t, "train_64"))
            if _median(r, "train_64") and _median(t, "train_64") else None, False)
  mem_inf = best("mem", "infer",
                 lambda r, t: (_growth_mb(r, "hwm_b64_kb") / _growth_mb(t, "hwm_b64_kb"))
                 if _growth_mb(r, "hwm_b64_kb") and _growth_mb(t, "hwm_b64_kb") else None,
                 False)
  mem_tr = best("mem", "train",
                lambda r, t: (_growth_mb(r, "hwm_train_kb") / _growth_mb(t, "hwm_train_kb"))
                if _growth_mb(r, "hwm_train_kb") and _growth_mb(t, "hwm_train_kb") else None,
                False)
  out.append(f"inference throughput >= 0.8x twin: "
             + (f"{tp[0]:.2f}x ({tp[1]}) - {_target(tp[0] >= 0.8)}" if tp else "not measured"))
  out.append(f"training step <= 2x twin: "
             + (f"{tr[0]:.2f}x ({tr[1]}) - {_target(tr[0] <= 2.0)}" if tr else "not measured"))
  out.append(f"peak memory <= 2x twin (growth over baseline), inference: "
             + (f"{mem_inf[0]:.2f}x ({mem_inf[1]}) - {_target(mem_inf[0] <= 2.0)}"
                if mem_inf else "not measured")
             + "; training: "
             + (f"{mem_tr[0]:.2f}x ({mem_tr[1]}) - {_target(mem_tr[0] <= 2.0)}"
                if mem_tr else "not measured"))
  return out


def _machine() -> Dict[str, Any]:
  cpu_model, mem_gb = platform.processor() or "unknown CPU", 0.0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu_model = line.split(":", 1)[1].strip()
          break
    with open("/proc/meminfo") as f:
      mem_gb = int(f.readline().split()[1]) / 1024 ** 2
  except OSError:
    pass
  return {"uname": " ".join(platform.uname()), "cpus": os.cpu_count(), "cpu_model": cpu_model,
          "mem_gb": mem_gb, "python": platform.python_version()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    with open(_WORKER.value) as f:
      spec = json.load(f)
    result = run_binning_study(spec) if spec["phase"] == "binning" else run_worker(spec)
    with open(spec["output"], "w") as f:
      json.dump(result, f)
    return
  unknown = sorted(set(_MODELS.value) - set(ALL_MODELS))
  if unknown:
    raise app.UsageError(f"unknown --models {unknown}; choose from {ALL_MODELS}")
  if set(_PHASES.value) - set(PHASES) or set(_XLA.value) - {"on", "off"}:
    raise app.UsageError("--phases takes infer,train and --xla takes off,on")
  if set(_NO_B256.value) - set(ALL_MODELS):
    raise app.UsageError(f"--no_b256 takes models from {ALL_MODELS}")
  sizes = _SIZES.value or (["small"] if _SMALL.value else ["full"])
  if set(sizes) - set(SIZES):
    raise app.UsageError(f"--sizes takes {sorted(SIZES)}")
  if set(FLOOR_MODELS) & set(_MODELS.value):
    try:
      floor_bins(_BINS.value, _BIN_FLOOR.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  start = time.perf_counter()
  import numpy as np
  import tensorflow as tf  # the parent only measures depths; jobs run in subprocesses
  import keras
  from official.puppet_cnn.serving.macs import puppeteer_step_macs
  from official.puppet_cnn import DynamicConvStack
  images, labels, source, calibration = _load_images(_DATA_DIR.value)
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  header = dict(_machine(), command=command, date=time.strftime("%Y-%m-%d %H:%M %Z"),
                tf=tf.__version__, keras=keras.__version__, backend=keras.backend.backend(),
                images=source, repeats=_REPEATS.value, warmup=_WARMUP.value, bins=_BINS.value,
                infer_signature=_INFER_SIGNATURE.value,
                time_budget_s=_TIME_BUDGET.value, job_timeout_s=_JOB_TIMEOUT.value,
                max_rss_mb=_MAX_RSS_MB.value, notes=[])
  if set(_STUDY.value) - {"speed", "binning"}:
    raise app.UsageError("--study takes speed and/or binning")
  sections = []
  pool = (concurrent.futures.ThreadPoolExecutor(_PARALLEL_JOBS.value)
          if _PARALLEL_JOBS.value > 1 and "speed" in _STUDY.value else None)
  baseline_rows: Dict[tuple, Dict[str, Any]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    data_file = os.path.join(tmp, "images.npz")
    np.savez(data_file, images=images, labels=labels, calibration=calibration)
    for size in (sizes if "speed" in _STUDY.value else []):
      channels = ([int(c) for c in _STAGE_CHANNELS.value] if _STAGE_CHANNELS.value
                  else list(SIZES[size]))
      base = dict(stage_channels=channels, max_depth=_MAX_DEPTH.value, bins=_BINS.value,
                  bin_floor=_BIN_FLOOR.value,
                  repeats=_REPEATS.value, warmup=_WARMUP.value, data_file=data_file,
                  light_state=min(_LIGHT_STATE.value or max(channels), max(channels)))
      base["light_rank"] = min(_LIGHT_RANK.value, base["light_state"] - 1)
      depths = _mean_depths(base, images)
      twin_depth = max(1, int(round(depths["exact"])))
      config = _puppet_config(base)
      models = [m for m in _MODELS.value if size != "full" or m in _FULL_MODELS.value
                or m in ("resnet", "mobilenet_v2")]
      # The reference first, so that a time budget never leaves a section without its twin.
      models = sorted(models, key=lambda m: (m != "static_twin", ALL_MODELS.index(m)))
      section = dict(size=size, stage_channels=channels, max_depth=_MAX_DEPTH.value,
                     bins=_BINS.value, depths=depths, twin_depth=twin_depth,
                     twin_macs=_conv_macs(config.channels, config.pools, twin_depth),
                     # The twin's stored kernels: what the puppeteer generates for one bin
                     # of the twin's depth (the same shapes; the twin is plain conv units).
                     twin_kernel_params=DynamicConvStack(
                         config.channels, "plain", config.max_depth).generated_kernel_params(
                             config.input_shape[-1], twin_depth),
                     puppet_macs=_mean_macs(config, images),
                     state_width=config.state_width, light_state=base["light_state"],
                     light_rank=base["light_rank"],
                     g_step_macs=puppeteer_step_macs(config.state_width),
                     g_step_macs_light=puppeteer_step_macs(
                         base["light_state"], generator_rank=base["light_rank"]),
                     rows=[])
      not_run = [m for m in _MODELS.value if m not in models]
      if not_run:
        header["notes"].append(f"{size} puppet: not run: {', '.join(not_run)} (not in "
                               "--full_models)")
      for xla in [x == "on" for x in _XLA.value]:
        for model in models:
          if model in ("resnet", "mobilenet_v2") and (model, xla) in baseline_rows:
            # The baselines do not depend on the puppet's size: measured once per run.
            section["rows"].append(dict(baseline_rows[(model, xla)], shared=True))
            continue
          row = {"model": model, "xla": xla}
          for phase in PHASES:
            if phase not in _PHASES.value:
              continue
            reason = _skip_reason(model, xla, phase)
            elapsed = time.perf_counter() - start
            if reason is None and elapsed > _TIME_BUDGET.value:
              reason = f"time budget ({_TIME_BUDGET.value:.0f} s) spent"
            if reason:
              row[f"{phase}_skipped"] = reason
              continue
            spec = dict(base, model=model, xla=xla, phase=phase, twin_depth=twin_depth,
                        infer_signature=_INFER_SIGNATURE.value,
                        infer_batches=[1, 64] if model in _NO_B256.value else [1, 64, 256])
            print(f"[{elapsed:6.0f} s] {size} {model} xla={'on' if xla else 'off'} {phase} ...",
                  flush=True)
            if pool is not None:  # collected below, after every job is queued
              row[phase] = pool.submit(_run_job, spec, _JOB_TIMEOUT.value, _MAX_RSS_MB.value)
              continue
            result = _run_job(spec, _JOB_TIMEOUT.value, _MAX_RSS_MB.value)
            row[phase] = result
            print(f"          done in {result['wall_s']:.0f} s"
                  + (f": {result['error']}" if result.get("error") else ""), flush=True)
          if model in ("resnet", "mobilenet_v2"):
            baseline_rows[(model, xla)] = row
          section["rows"].append(row)
      sections.append(section)
    if pool is not None:  # before the data file goes
      pool.shutdown(wait=True)
      for section in sections:
        for row in section["rows"]:  # shared baseline rows hold the same futures
          for phase in PHASES:
            if isinstance(row.get(phase), concurrent.futures.Future):
              row[phase] = row[phase].result()
              print(f"{section['size']} {row['model']} xla={'on' if row['xla'] else 'off'} "
                    f"{phase}: done in {row[phase]['wall_s']:.0f} s"
                    + (f": {row[phase]['error']}" if row[phase].get("error") else ""),
                    flush=True)
      header["notes"].append(f"jobs ran {_PARALLEL_JOBS.value} at a time (--parallel_jobs): "
                             "their times disturb each other (a smoke test, not a measurement)")
  if _NO_B256.value:
    header["notes"].append(f"batch 256 not measured for: {', '.join(_NO_B256.value)} "
                           "(--no_b256)")
  raw = {"header": header, "sections": sections}
  if "speed" in _STUDY.value:
    header["wall_s"] = time.perf_counter() - start
    write_report(_OUTPUT.value, header, sections)
  if "binning" in _STUDY.value:
    study_start = time.perf_counter()
    channels = ([int(c) for c in _STAGE_CHANNELS.value] if _STAGE_CHANNELS.value
                else list(SIZES["small"]))
    spec = dict(phase="binning", stage_channels=channels, max_depth=_MAX_DEPTH.value,
                steps=_BINNING_STEPS.value, train_bins=_BINNING_TRAIN_BINS.value,
                bins_list=[int(b) for b in _BINNING_BINS.value],
                eval_images=_BINNING_EVAL.value, data_dir=_DATA_DIR.value)
    print(f"binning study: {spec}", flush=True)
    result = _run_job(spec, _JOB_TIMEOUT.value, _MAX_RSS_MB.value)
    header["wall_s"] = time.perf_counter() - study_start
    write_block(_OUTPUT.value, "binning", binning_lines(header, spec, result))
    raw["binning"] = {"spec": spec, "result": result}
  if _JSON_OUTPUT.value:
    with open(_JSON_OUTPUT.value, "w") as f:
      json.dump(raw, f, indent=1)
  print(f"wrote {_OUTPUT.value}")


def _mean_macs(config, images) -> float:
  import numpy as np
  from official.puppet_cnn.modeling import complexity as cx
  h = cx.image_complexity(images, config.complexity).numpy()
  depth = cx.depth_from_step(cx.step_size(h), config.min_depth, config.max_depth).numpy()
  return float(np.mean([_conv_macs(config.channels, config.pools, int(d)) for d in depth]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
