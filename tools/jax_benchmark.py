r"""Speed and device memory of Puppet-CNN under JAX (GPU or CPU), against its static twin.

    KERAS_BACKEND=jax python tools/jax_benchmark.py                 # full puppet, every model
    KERAS_BACKEND=jax python tools/jax_benchmark.py --sizes=small --repeats=3 --batch_sizes=8

The GPU half of the speed benchmark (tools/benchmark.py is the TensorFlow one): it needs
JAX and Keras but no TensorFlow, so it runs on machines that have JAX with CUDA and nothing
else (requirements-jax.txt lists what it imports; on a GPU machine use a CUDA jaxlib).
Every model is a Keras model run through `model.stateless_call` under `jax.jit` (XLA):

  static_twin   the puppet's layer shapes with stored kernels, a fixed depth per stage equal
                to the puppet's mean depth on the benchmark images, rounded (the floor).
  puppet_exact  PuppetClassifier, execution='per_sample', exact H, the paper's puppeteer G:
                one trajectory of G per image, each image convolved with its own kernels
                (the only execution mode that compiles under XLA; every image of a batch
                runs to the batch's deepest depth, masked, as in the paper).
  puppet_remat  puppet_exact with generator_remat=True (G's activations recomputed in the
                backward pass: training memory).
  puppet_gathered  execution='gathered' with --bins complexity bins (default 16 on [0, 8]
                bits): G runs once per bin, for every bin, and each image's kernels are
                gathered from its bin's; the per-sample puppet then runs as in puppet_exact
                (the same predictions as the per-sample model with those bins; XLA-compatible,
                unlike tools/benchmark.py's bucketed modes).
  puppet_light  puppet_exact with the lighter puppeteer of tools/benchmark.py's
                puppet_light (state_channels=256, generator_rank=32; not the paper's).
  puppet_light_remat  puppet_light with generator_remat=True.
  puppet_light_gathered  puppet_gathered with the lighter puppeteer.
  puppet_gathered_im2col, puppet_light_gathered_im2col  the same with per_sample_conv='im2col'
                (each image's patches times its kernel, a batched matrix product, instead of
                one grouped convolution; the same values).
  puppet_gathered_cached, puppet_light_gathered_cached  the gathered models with a float32
                kernel table of every bin (`cache_kernels()`): inference gathers each image's
                kernels and runs no puppeteer. The table is an argument of the jitted function,
                like the weights (not constants inside it). Inference only: training
                generates the kernels, as the model without the table.
  puppet_gathered_cached_im2col  puppet_gathered_cached with per_sample_conv='im2col'.
  puppet_gathered_conv_dw  puppet_gathered with generator_depthwise='conv' (XLA's depthwise
                convolution in G instead of shifted copies: on XLA's CPU backend a
                2.4x smaller training plan, docs/benchmarks_gathered_per_layer.md).
  puppet_gathered_upfront, puppet_gathered_cached_upfront  puppet_gathered and
                puppet_gathered_cached with gathered_kernels='upfront': every layer's
                per-image kernels gathered before the puppet runs, (batch, layers, K, K, C, C)
                per stage, as before 2026-12-04 (the default gathers each layer's in the
                layer loop; the same values).
  puppet_gathered_bf16  puppet_gathered with generator_matmul_dtype='bfloat16': G's pointwise
                products in bfloat16 (tensor cores on a GPU; not the paper's float32).
  resnet, mobilenet_v2  the baselines of official/puppet_cnn/baselines.

Each (model, phase) job runs in its own subprocess (every model's inference first, then the
training steps), so that the device's peak memory (`memory_stats()['peak_bytes_in_use']`,
GPU only; JAX's CPU client keeps none) is the job's own, and one model running out of memory
does not end the run. Inference is the jitted
`stateless_call(..., training=False)` at each of --batch_sizes; training is one jitted SGD
step with momentum 0.9 (loss, gradients, the weights' and batch-norm statistics' update) at
--train_batch. Each function is compiled ahead of time (`lower().compile()`, timed as the
compile seconds, with XLA's memory plan read from the compiled program: a job that runs out
of memory still reports what XLA asked for); its first call is timed apart; then --warmup
untimed calls and --repeats timed ones, each ended by `jax.block_until_ready`; the inputs
are on the device before the clock starts. Reported: median [min, max], seconds per image (the unit of the
paper's Table 2: 0.0039 s/img for Puppet-CNN, 0.0019 for ResNet, 0.0032 for MobileNet-v2,
on an RTX 4090, batch size not stated), and ratios against the twin from the same run.

Writes block `gpu` of --output (default docs/benchmarks_gpu.md; other blocks are kept) and,
with --json_output, every raw time (rewritten after each job, so that a run stopped part-way
keeps what it measured). --report_from_json writes the block again from such a JSON,
measuring nothing (a run returned from another machine, or cut short before its report).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import benchmark  # noqa: E402  (tools/benchmark.py: the twin, the images, the report helpers)

MODELS = ("static_twin", "puppet_exact", "puppet_remat", "puppet_gathered",
          "puppet_gathered_im2col", "puppet_light", "puppet_light_remat", "puppet_light_gathered",
          "puppet_light_gathered_im2col", "puppet_gathered_cached",
          "puppet_light_gathered_cached", "puppet_gathered_cached_im2col",
          "puppet_gathered_conv_dw",
          "puppet_gathered_upfront",
          "puppet_gathered_cached_upfront", "puppet_gathered_bf16", "resnet", "mobilenet_v2")
LIGHT = {"state_channels": 256, "generator_rank": 32}
PUPPET_OVERRIDES = {
    "puppet_exact": {},
    "puppet_remat": {"generator_remat": True},
    "puppet_gathered": {"execution": "gathered"},  # complexity_bins: --bins
    "puppet_light": LIGHT,
    "puppet_light_remat": dict(LIGHT, generator_remat=True),
    "puppet_light_gathered": dict(LIGHT, execution="gathered"),
    "puppet_gathered_im2col": {"execution": "gathered", "per_sample_conv": "im2col"},
    "puppet_light_gathered_im2col": dict(LIGHT, execution="gathered", per_sample_conv="im2col"),
    "puppet_gathered_conv_dw": {"execution": "gathered", "generator_depthwise": "conv"},
    "puppet_gathered_upfront": {"execution": "gathered", "gathered_kernels": "upfront"},
    "puppet_gathered_bf16": {"execution": "gathered", "generator_matmul_dtype": "bfloat16"},
}
# Models built with a kernel table (`cache_kernels()`), and the model whose settings (and
# training) they share.
CACHED = {"puppet_gathered_cached": "puppet_gathered",
          "puppet_light_gathered_cached": "puppet_light_gathered",
          "puppet_gathered_cached_upfront": "puppet_gathered_upfront",
          "puppet_gathered_cached_im2col": "puppet_gathered_im2col"}
PUPPET_OVERRIDES.update({name: PUPPET_OVERRIDES[base] for name, base in CACHED.items()})
# The paper's Table 2 (s/img on an RTX 4090), for the rows that have a model here.
PAPER_S_PER_IMG = {"puppet_exact": 0.0039, "resnet": 0.0019, "mobilenet_v2": 0.0032}
BLOCK = "gpu"
TITLE = "# Benchmarks under JAX: Puppet-CNN on a GPU"
# Stage channels and max depth per --sizes: tools/benchmark.py's, and 'tiny' for the tool's
# own test (a check of the tool, not a measurement).
SIZES = dict(benchmark.SIZES, tiny=(4, 8))
MAX_DEPTH = {"full": 8, "small": 4, "tiny": 3}

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("models", list(MODELS), f"Models, from {MODELS}.")
  flags.DEFINE_enum("sizes", "full", list(SIZES),
                    "Puppet stage channels: full (64-128-256-512, depth <= 8), small "
                    "(16-32-64, depth <= 4) or tiny (4-8, depth <= 3); the last two are "
                    "checks, not measurements.")
  flags.DEFINE_integer("bins", 16, "complexity_bins of the gathered models (equal bins on "
                       "[0, 8] bits).", lower_bound=1)
  flags.DEFINE_list("batch_sizes", ["64", "256"], "Inference batch sizes.")
  flags.DEFINE_integer("train_batch", 64, "Training step batch size (0: no training).")
  flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after the first (compiling) one.")
  flags.DEFINE_string("data_dir", None, "CIFAR-10 folder (else $PUPPET_CNN_DATA_DIR).")
  flags.DEFINE_string("images_npz", None, "An .npz with 'images' (N, 32, 32, 3) uint8 and "
                      "'labels' (N,) instead of CIFAR-10 (write one with --save_images_npz).")
  flags.DEFINE_string("save_images_npz", None, "Write the benchmark images to this .npz and "
                      "stop (to carry them to a machine without the dataset).")
  flags.DEFINE_string("output", os.path.join(ROOT, "docs", "benchmarks_gpu.md"),
                      "Markdown report (block 'gpu').")
  flags.DEFINE_string("json_output", None, "Raw results as JSON.")
  flags.DEFINE_integer("job_timeout_s", 1200, "Limit of one job (model, phase).")
  flags.DEFINE_integer("time_budget_s", 0, "Start no job once the run has taken this long "
                       "(the rest are reported as skipped; 0: no budget). A job's limit is "
                       "also cut to what is left.")
  flags.DEFINE_string("report_from_json", None, "Measure nothing: write --output's block "
                      "from this --json_output of an earlier run (e.g. one returned from a "
                      "GPU machine).")
  flags.DEFINE_string("worker", None, "Internal: run one job from this JSON spec.")


# ------------------------------------------------------------------------------ images
def load_images(data_dir: Optional[str], images_npz: Optional[str], n: int = 256):
  """(images uint8 (n, 32, 32, 3), labels int64 (n,), description)."""
  import numpy as np
  if images_npz:
    if not os.path.exists(images_npz):
      raise FileNotFoundError(f"--images_npz={images_npz}: no such file")
    with np.load(images_npz) as d:
      if "images" not in d or "labels" not in d:
        raise ValueError(f"--images_npz={images_npz} needs arrays 'images' and 'labels', "
                         f"has {sorted(d.files)}")
      images, labels = d["images"], d["labels"]
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
      raise ValueError(f"--images_npz: 'images' must be uint8 (N, 32, 32, 3), got "
                       f"{images.dtype} {images.shape}")
    if len(labels) != len(images) or not len(images):
      raise ValueError(f"--images_npz: {len(images)} images and {len(labels)} labels")
    return images[:n], labels[:n].astype(np.int64), f"{len(images[:n])} images from {images_npz}"
  images, labels, source, _ = benchmark._load_images(data_dir, n)  # pylint: disable=protected-access
  return images, labels, source


def batch_of(images, size: int):
  """`size` images, cycling through `images`."""
  import numpy as np
  return np.resize(images, (size,) + images.shape[1:])


# ------------------------------------------------------------------------------ models
def puppet_config(sizes: str):
  from official.puppet_cnn import PuppetCNNConfig
  return PuppetCNNConfig(num_classes=10, stage_channels=SIZES[sizes],
                         max_depth=MAX_DEPTH[sizes])


def mean_depth(config, images) -> Dict[str, Any]:
  """The puppet's depth per stage on `images` with exact H (what the twin copies)."""
  import numpy as np
  from official.puppet_cnn.modeling import complexity as cx
  h = np.asarray(cx.image_complexity(images.astype(np.float32), config.complexity))
  depth = np.asarray(cx.depth_from_step(cx.step_size(h), config.min_depth, config.max_depth))
  return {"mean": float(depth.mean()), "max": int(depth.max()),
          "histogram": {int(d): int(c) for d, c in zip(*np.unique(depth, return_counts=True))},
          "h_mean": float(h.mean())}


def build_model(name: str, sizes: str, twin_depth: int, bins: int = 16):
  from official.puppet_cnn import PuppetClassifier
  from official.puppet_cnn.baselines import build_baseline
  config = puppet_config(sizes)
  if name == "static_twin":
    return benchmark.build_static_twin(config, twin_depth)
  if name in ("resnet", "mobilenet_v2"):
    return build_baseline(name, 10)
  if name not in PUPPET_OVERRIDES:
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
  overrides = dict(PUPPET_OVERRIDES[name])
  if overrides.get("execution") == "gathered":
    overrides["complexity_bins"] = bins
  model = PuppetClassifier(config.replace(**overrides))
  model.build()
  return model


# ------------------------------------------------------------------------------ one job
def _device_memory() -> Dict[str, Optional[int]]:
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (a client without statistics)
    stats = {}
  return {"peak_bytes": stats.get("peak_bytes_in_use"), "bytes": stats.get("bytes_in_use")}


def _compile(jitted, *args):
  """`jitted` compiled ahead of time for `args` (`jax.jit(...).lower(...).compile()`):
  returns (the compiled function, seconds it took, XLA's memory plan). The plan: bytes of
  the program's temporaries, arguments and outputs (`Compiled.memory_analysis()`, on any
  backend, JAX's CPU client too; None where the backend gives none). Known before the
  program runs, so a job that then runs out of memory still reports it."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without the analysis)
    analysis = None
  plan = None if analysis is None else {
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes)}
  return compiled, seconds, plan


def _error_line(e: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def _time(fn, repeats: int, warmup: int) -> Dict[str, Any]:
  """fn(i) -> a value to block on (an ahead-of-time compiled function: the first call is
  its first execution); the first call timed apart, then warmup untimed, repeats timed."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn(0))
  first = time.perf_counter() - start
  for i in range(warmup):
    jax.block_until_ready(fn(1 + i))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(1 + warmup + i))
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "times": times}


def run_job(spec: Dict[str, Any]) -> Dict[str, Any]:
  """One model and phase ('infer' or 'train') in this process; returns its measurements."""
  import jax
  import jax.numpy as jnp
  import keras
  import numpy as np
  if keras.backend.backend() != "jax":
    raise RuntimeError(f"tools/jax_benchmark.py needs KERAS_BACKEND=jax, got "
                       f"{keras.backend.backend()!r}")
  images, labels, _ = load_images(spec.get("data_dir"), spec.get("images_npz"))
  model = build_model(spec["model"], spec["sizes"], spec["twin_depth"], spec["bins"])
  cached = spec["model"] in CACHED
  if cached:
    start = time.perf_counter()
    model.cache_kernels()
    info = model.kernel_cache_info()
    cache_info = {"bins": len(info["bins"]), "bytes": info["bytes"],
                  "build_s": time.perf_counter() - start}
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  out: Dict[str, Any] = {"model": spec["model"], "phase": spec["phase"],
                         "params": int(sum(np.prod(v.shape) for v in model.weights)),
                         "after_build": _device_memory()}
  if cached:
    out["cache"] = cache_info
  repeats, warmup = spec["repeats"], spec["warmup"]
  if spec["phase"] == "infer":
    # The kernel table (if any) is passed in like the weights, so that XLA gets it as an
    # argument rather than as constants folded into the program.
    stored_as = model.kernel_cache_stored_as if cached else lambda _: contextlib.nullcontext([])
    with stored_as(lambda t: t) as tensors:
      cache = list(tensors)

    def forward(tv, ntv, cache_tensors, x):
      supply = iter(cache_tensors)
      with stored_as(lambda _: next(supply)):
        return model.stateless_call(tv, ntv, x, training=False)[0]

    infer, first = jax.jit(forward), None
    out["xla"], out["compile_s"] = {}, {}
    for b in spec["batch_sizes"]:
      key = f"infer_b{b}"
      x = jax.device_put(batch_of(images, b).astype(np.float32))
      compiled, out["compile_s"][key], out["xla"][key] = _compile(
          infer, trainable, non_trainable, cache, x)
      first = first or compiled
      try:
        out[key] = _time(lambda i, x=x, f=compiled: f(trainable, non_trainable, cache, x),
                         repeats, warmup)
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the plan)
        out["error"], out["end"] = f"{key}: {_error_line(e)}", _device_memory()
        return out
    # The timed function is the model: its logits at the first batch size (compiled above)
    # against an eager call of the model on the batch's first 8 images (in inference every
    # image's logits depend on that image alone).
    x = batch_of(images, spec["batch_sizes"][0]).astype(np.float32)
    got = np.asarray(first(trainable, non_trainable, cache, jnp.asarray(x)))[:8]
    want = np.asarray(model(x[:8], training=False))
    out["logit_check"] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
  else:
    b = spec["train_batch"]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_of(tv, ntv, x, y):
      logits, ntv = model.stateless_call(tv, ntv, x, training=True)
      return loss_fn(y, logits), ntv

    def step(tv, ntv, momentum, x, y, lr=0.01):
      (loss, ntv), grads = jax.value_and_grad(loss_of, has_aux=True)(tv, ntv, x, y)
      momentum = [0.9 * m + g for m, g in zip(momentum, grads)]
      tv = [t - lr * m for t, m in zip(tv, momentum)]
      return tv, ntv, momentum, loss

    x = jax.device_put(batch_of(images, b).astype(np.float32))
    y = jax.device_put(np.resize(labels, (b,)))
    state = {"tv": trainable, "ntv": non_trainable,
             "m": [jnp.zeros_like(t) for t in trainable]}
    key = f"train_b{b}"
    step, seconds, plan = _compile(jax.jit(step, donate_argnums=(0, 1, 2)), state["tv"],
                                   state["ntv"], state["m"], x, y)
    out["compile_s"], out["xla"] = {key: seconds}, {key: plan}
    losses = []

    def one(_):
      state["tv"], state["ntv"], state["m"], loss = step(state["tv"], state["ntv"],
                                                         state["m"], x, y)
      losses.append(loss)
      return loss

    try:
      out[key] = _time(one, repeats, warmup)
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the plan)
      out["error"], out["end"] = f"{key}: {_error_line(e)}", _device_memory()
      return out
    out["losses"] = [float(l) for l in losses]
  out["end"] = _device_memory()
  return out


# ------------------------------------------------------------------------------ the run
def _run_subprocess(spec, timeout_s: float, budget_cut: bool = False) -> Dict[str, Any]:
  """Runs one job in a subprocess; `budget_cut`: `timeout_s` is what --time_budget_s left
  (less than --job_timeout_s), which the error then says."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    if budget_cut:
      return {"error": f"stopped after {timeout_s:.0f} s, what --time_budget_s had left"}
    return {"error": f"timed out after {timeout_s:.0f} s (--job_timeout_s)"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    # The exception's own line (e.g. XLA's "RESOURCE_EXHAUSTED: Out of memory allocating
    # ... bytes"), not the traceback's source lines; else the output's last lines.
    text = (proc.stderr or proc.stdout).strip().splitlines()
    errors = [l.strip() for l in text if l[:1] not in (" ", "\t") and "Error" in l.split(":")[0]]
    tail = errors[-1:] or text[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-400:]}
  return json.loads(lines[-1][len("RESULT "):])


def _machine() -> Dict[str, Any]:
  import jax
  import keras
  device = jax.local_devices()[0]
  machine = benchmark._machine()  # pylint: disable=protected-access
  machine.update(platform=device.platform, device_kind=device.device_kind,
                 device_count=jax.local_device_count(), jax=jax.__version__,
                 keras=keras.__version__, backend=keras.backend.backend())
  return machine


def _median(entry) -> Optional[float]:
  return benchmark._stats(entry["times"])["median"] if entry else None  # pylint: disable=protected-access


def _fmt_s_per_img(entry, batch: int) -> str:
  if not entry:
    return "-"
  s = benchmark._stats(entry["times"])  # pylint: disable=protected-access
  return f"{s['median'] / batch:.5f} [{s['min'] / batch:.5f}, {s['max'] / batch:.5f}]"


def _fmt_compile(result: Dict[str, Any], key: str) -> str:
  """Compile seconds of measurement `key`: the ahead-of-time compilation, or in runs from
  before it (2026-12-04 16:35 and earlier) the first call, which compiled."""
  if key in (result.get("compile_s") or {}):
    return f"{result['compile_s'][key]:.1f}"
  return f"{result[key]['first_call_s']:.1f}" if key in result else "-"


def _xla_temp(result: Dict[str, Any], key: str) -> Optional[int]:
  """The temp bytes XLA planned for measurement `key` of a job's result (None if absent)."""
  return ((result.get("xla") or {}).get(key) or {}).get("temp_bytes")


def _fmt_mb(nbytes) -> str:
  return "-" if nbytes is None else f"{nbytes / 1e6:.0f}"


def report_lines(header: Dict[str, Any], results: Dict[str, Dict[str, Any]]) -> List[str]:
  m = header["machine"]
  where = (f"{m['device_kind']} ({m['platform']}, {m['device_count']} device(s))"
           if m["platform"] != "cpu" else f"CPU: {m['cpus']} cores ({m['cpu_model']})")
  batches, tb = header["batch_sizes"], header["train_batch"]
  depth = header["depth"]
  lines = [
      "## Speed under JAX", "",
      "Written by `tools/jax_benchmark.py` (block `gpu`); every number in this block comes "
      "from the run described here.", "",
      f"- Command: `{header['command']}`",
      f"- Date: {header['date']}; wall time of the run: {header['wall_s']:.0f} s",
      f"- Machine: {where}; host `{m['uname']}`, {m['cpus']} CPUs",
      f"- Backend: Keras {m['keras']} ({m['backend']}), JAX {m['jax']}, every function "
      f"`jax.jit`-compiled (XLA); Python {m['python']}",
      f"- Images: {header['images']}",
      f"- Puppet: stage channels {tuple(header['stage_channels'])}, depth <= "
      f"{header['max_depth']}; depth on the images with exact H: mean {depth['mean']:.2f}, "
      f"max {depth['max']} (histogram {depth['histogram']}); static twin: depth "
      f"{header['twin_depth']} per stage; gathered models: {header.get('bins', '-')} "
      "complexity bins on [0, 8] bits",
      f"- Protocol: each (model, phase) job in its own process; "
      + ("compiled ahead of time (`lower().compile()`), then the first call timed apart; "
         if header.get("compile") == "ahead_of_time" else
         "first call (compilation) timed apart; ")
      + f"{header['warmup']} warm-up call(s); {header['repeats']} timed calls ended by "
      f"`jax.block_until_ready`, inputs already on the device; **median [min, max]**",
      f"- Inference at batch {', '.join(str(b) for b in batches)}; training: "
      + (f"one SGD step (momentum 0.9) at batch {tb}" if tb else "not run (--train_batch=0)")
      + ". Device memory: the job's peak bytes in use "
      "(`memory_stats()`, '-' where the device keeps none, as JAX's CPU client). XLA temp: "
      "the compiled function's temporary buffers as XLA planned them "
      "(`memory_analysis().temp_size_in_bytes`; arguments such as the weights and a kernel "
      f"table not included), inference at batch {batches[-1]}", "",
  ]
  head = ["model", "compile s (infer / train)"]
  head += [f"s/img b{b}" for b in batches] + [f"images/s b{b}" for b in batches]
  train_label = f"train step b{tb}" if tb else "train step (not run)"
  head += [train_label, "peak device MB (infer / train)", "XLA temp MB (infer / train)",
           "notes"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in header["models"]:
    infer, train = results.get(name, {}).get("infer", {}), results.get(name, {}).get("train", {})
    compile_s = [_fmt_compile(r, k)
                 for r, k in ((infer, f"infer_b{batches[0]}"), (train, f"train_b{tb}"))]
    row = [name, " / ".join(compile_s)]
    row += [_fmt_s_per_img(infer.get(f"infer_b{b}"), b) for b in batches]
    row += [benchmark._fmt_throughput(infer.get(f"infer_b{b}"), b) for b in batches]  # pylint: disable=protected-access
    row += [benchmark._fmt_time(train.get(f"train_b{tb}"))]  # pylint: disable=protected-access
    row += [" / ".join(_fmt_mb((r.get("end") or {}).get("peak_bytes")) for r in (infer, train))]
    row += [" / ".join(_fmt_mb(_xla_temp(r, key)) for r, key in
                       ((infer, f"infer_b{batches[-1]}"), (train, f"train_b{tb}")))]
    notes = [f"{phase}: {r['error']}" for phase, r in (("infer", infer), ("train", train))
             if r.get("error")]
    if infer.get("cache"):
      notes.append(f"kernel table: {infer['cache']['bins']} bins, "
                   f"{infer['cache']['bytes'] / 1e6:.0f} MB float32, built in "
                   f"{infer['cache']['build_s']:.1f} s")
    if "logit_check" in infer:
      notes.append(f"jitted logits vs eager call: {infer['logit_check']:.1e} (relative)")
    if name in PAPER_S_PER_IMG:
      notes.append(f"paper (RTX 4090): {PAPER_S_PER_IMG[name]} s/img")
    row.append(("; ".join(notes) or "-").replace("|", "\\|"))  # a table cell
    lines.append("| " + " | ".join(row) + " |")
  twin = results.get("static_twin", {})
  lines += ["", "Against the static twin from the same run (inference time and training step: "
            "model / twin, lower is better; memory: model / twin):", ""]
  head = ["model"] + [f"time b{b}" for b in batches] + [train_label,
                                                          "peak memory infer / train",
                                                          "XLA temp infer / train"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in header["models"]:
    if name == "static_twin":
      continue
    r = results.get(name, {})
    row = [name]
    for b in batches:
      row.append(benchmark._ratio(_median(r.get("infer", {}).get(f"infer_b{b}")),  # pylint: disable=protected-access
                                  _median(twin.get("infer", {}).get(f"infer_b{b}"))))
    row.append(benchmark._ratio(_median(r.get("train", {}).get(f"train_b{tb}")),  # pylint: disable=protected-access
                                _median(twin.get("train", {}).get(f"train_b{tb}"))))
    row.append(" / ".join(benchmark._ratio(  # pylint: disable=protected-access
        (r.get(p, {}).get("end") or {}).get("peak_bytes"),
        (twin.get(p, {}).get("end") or {}).get("peak_bytes")) for p in ("infer", "train")))
    row.append(" / ".join(benchmark._ratio(  # pylint: disable=protected-access
        _xla_temp(r.get(p, {}), key), _xla_temp(twin.get(p, {}), key))
        for p, key in (("infer", f"infer_b{batches[-1]}"), ("train", f"train_b{tb}"))))
    lines.append("| " + " | ".join(row) + " |")
  return lines


def write_report(output: str, header: Dict[str, Any], results: Dict[str, Dict[str, Any]]):
  """Writes block `gpu` of `output` (created with the title if missing); returns its lines."""
  lines = report_lines(header, results)
  benchmark.write_block(output, BLOCK, lines, title=TITLE)
  return lines


def main(argv):
  del argv
  if FLAGS.worker:
    print("RESULT " + json.dumps(run_job(json.loads(FLAGS.worker))), flush=True)
    return
  if FLAGS.report_from_json:
    try:
      with open(FLAGS.report_from_json) as f:
        data = json.load(f)
      header, results = data["header"], data["results"]
    except (OSError, ValueError, KeyError) as e:
      raise app.UsageError(f"--report_from_json={FLAGS.report_from_json}: not a JSON written "
                           f"by --json_output ({type(e).__name__}: {e})") from e
    print("\n".join(write_report(FLAGS.output, header, results)))
    return
  import keras
  if keras.backend.backend() != "jax":
    raise app.UsageError(f"run with KERAS_BACKEND=jax (Keras is on {keras.backend.backend()!r})")
  unknown = sorted(set(FLAGS.models) - set(MODELS))
  if unknown or not FLAGS.models:
    raise app.UsageError(f"--models: unknown {unknown}; choose from {MODELS}")
  try:
    batches = [int(b) for b in FLAGS.batch_sizes]
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes must be integers: {e}") from e
  if not batches or min(batches) < 1 or FLAGS.train_batch < 0:
    raise app.UsageError("--batch_sizes must be >= 1 and --train_batch >= 0")
  if FLAGS.repeats < 1 or FLAGS.warmup < 0:
    raise app.UsageError("--repeats must be >= 1 and --warmup >= 0")
  images, labels, source = load_images(FLAGS.data_dir, FLAGS.images_npz)
  if FLAGS.save_images_npz:
    import numpy as np
    np.savez_compressed(FLAGS.save_images_npz, images=images, labels=labels)
    print(f"wrote {len(images)} images ({source}) to {FLAGS.save_images_npz}")
    return
  start = time.time()
  config = puppet_config(FLAGS.sizes)
  depth = mean_depth(config, images)
  twin_depth = max(1, int(round(depth["mean"])))
  base = {"sizes": FLAGS.sizes, "twin_depth": twin_depth, "bins": FLAGS.bins,
          "batch_sizes": batches,
          "train_batch": FLAGS.train_batch, "repeats": FLAGS.repeats, "warmup": FLAGS.warmup,
          "data_dir": FLAGS.data_dir, "images_npz": FLAGS.images_npz}
  phases = ["infer"] + (["train"] if FLAGS.train_batch else [])
  results: Dict[str, Dict[str, Any]] = {}
  header = {"command": "KERAS_BACKEND=jax python " + " ".join(
                shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
            "wall_s": 0.0, "machine": _machine(), "images": source,
            "stage_channels": list(config.stage_channels), "max_depth": config.max_depth,
            "depth": depth, "twin_depth": twin_depth, "bins": FLAGS.bins,
            "models": list(FLAGS.models),
            "batch_sizes": batches, "train_batch": FLAGS.train_batch,
            "repeats": FLAGS.repeats, "warmup": FLAGS.warmup, "compile": "ahead_of_time"}
  # Every model's inference first, then the training steps: a run cut short by
  # --time_budget_s keeps the seconds per image of every model.
  jobs = [(m, p) for p in phases for m in FLAGS.models]
  for i, (name, phase) in enumerate(jobs):
    t0 = time.time()
    print(f"[{i + 1}/{len(jobs)}] {name} {phase} ...", end=" ", flush=True)
    limit = FLAGS.job_timeout_s
    if FLAGS.time_budget_s:
      limit = min(limit, FLAGS.time_budget_s - (t0 - start))
    if phase == "train" and name in CACHED:
      results.setdefault(name, {})[phase] = {
          "error": f"skipped: training generates the kernels (as {CACHED[name]})"}
    elif limit <= 0:
      results.setdefault(name, {})[phase] = {
          "error": f"skipped: --time_budget_s={FLAGS.time_budget_s} spent"}
    else:
      results.setdefault(name, {})[phase] = _run_subprocess(
          dict(base, model=name, phase=phase), limit, budget_cut=limit < FLAGS.job_timeout_s)
    status = results[name][phase].get("error", "ok")
    print(f"{status} ({time.time() - t0:.0f} s)", flush=True)
    header["wall_s"] = time.time() - start
    if FLAGS.json_output:  # after every job: a run stopped part-way keeps what it measured
      with open(FLAGS.json_output, "w") as f:
        json.dump({"header": header, "results": results, "done": i + 1 == len(jobs)}, f,
                  indent=1)
  print("\n".join(write_report(FLAGS.output, header, results)))


if __name__ == "__main__":
  # Set before Keras is imported (it is, lazily, in main and in the jobs, which inherit them).
  os.environ.setdefault("KERAS_BACKEND", "jax")
  # Device memory on demand, so that the peak is what the job used, not a preallocated pool.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  define_flags()
  app.run(main)
