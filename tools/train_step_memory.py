r"""Memory and time of one Puppet-CNN training step, per execution and batch size.

  python tools/train_step_memory.py --data_dir=../shared/data
  python tools/train_step_memory.py --configs=exact,bucketed16 --batch_sizes=2,4,8,64 \
      --xla=off --output=docs/paper_protocol_memory.md
  KERAS_BACKEND=jax python tools/train_step_memory.py --configs=exact,gathered16 \
      --batch_sizes=1,8,64 --block=xla_plan      # XLA's plan, nothing run

Answers "does this training configuration fit on this machine?", which configs/*.flags must
answer for the paper's 64-128-256-512 puppet (official/puppet_cnn/training_memory.py).
Each job, one (config, batch size, XLA setting), runs in a fresh subprocess:

- TensorFlow backend (the training CLI's): the process loads the images and imports, records
  its resident size, resets its peak (Linux `clear_refs`), builds `PuppetClassifier` with the
  config, compiles it as `train_lib` does (Adam, sparse cross-entropy from logits, XLA per
  --xla) and runs `train_on_batch` twice on real CIFAR-10 test images. It reports the peak
  resident size (VmHWM) as growth over the baseline, the second step's tensor peak (the most
  bytes TensorFlow's CPU allocator had in live tensors during that step, weights and
  optimizer slots included: what the step itself needs, without the allocator's cache and
  the traced graphs), the first step (tracing, compiling) and the second step's time, or
  the error that stopped it (e.g. XLA's "Out of memory while trying to allocate N GiB").
- JAX backend: the training step (`jax.value_and_grad` of the model's stateless call, an
  SGD update) is compiled ahead of time and XLA's memory plan is read
  (`Compiled.memory_analysis()`: temporaries and arguments); nothing runs, so plans far
  beyond the machine's memory can be read.

Configs: exact (per-sample execution, exact H: the paper's literal model), per_sample16,
bucketed16 (configs/cifar10.flags), gathered16 (16 equal bins on [0, 8] bits each).
Writes block --block of --output, keeping its other blocks (hand-written notes).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import benchmark  # noqa: E402  (tools/benchmark.py: images, machine, report blocks)

CONFIGS = {
    "exact": {},
    "per_sample16": {"complexity_bins": 16},
    "bucketed16": {"complexity_bins": 16, "execution": "bucketed"},
    "gathered16": {"complexity_bins": 16, "execution": "gathered"},
}
SIZES = dict(benchmark.SIZES, tiny=(4, 8))
MAX_DEPTH = {"full": 8, "small": 4, "tiny": 3}
TITLE = "# Training memory of the paper's protocol"

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_list("configs", list(CONFIGS), f"Configs, from {list(CONFIGS)}.")
  flags.DEFINE_list("batch_sizes", ["2", "4", "8"], "Training batch sizes.")
  flags.DEFINE_enum("sizes", "full", list(SIZES), "Puppet stage channels: full = 64-128-256-"
                    "512 (max depth 8), small = 16-32-64 (4), tiny = 4-8 (3; the tool's test).")
  flags.DEFINE_list("xla", ["off"], "TensorFlow: jit_compile settings, from off, on (bucketed "
                    "runs only with off). Ignored under JAX (always XLA).")
  flags.DEFINE_string("data_dir", None, "CIFAR-10 folder (else $PUPPET_CNN_DATA_DIR; random "
                      "images if neither loads).")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(TOOLS), "docs",
                                             "paper_protocol_memory.md"), "Report file.")
  flags.DEFINE_string("block", "train_step", "Block of --output this run writes.")
  flags.DEFINE_string("json_output", None, "Raw results as JSON.")
  flags.DEFINE_integer("job_timeout_s", 1200, "Limit of one job.")
  flags.DEFINE_float("max_rss_mb", 16000, "Kill a job whose resident size passes this (MB); "
                     "the config's larger batch sizes are then skipped.")
  flags.DEFINE_string("model_overrides", None, "A JSON object of PuppetClassifier arguments "
                      "applied to every config (e.g. '{\"generator_backward\": "
                      "\"autodiff\"}').")
  flags.DEFINE_string("worker", None, "Internal: run one job from this JSON spec.")


def run_job(spec: Dict[str, Any]) -> Dict[str, Any]:
  """One (config, batch, XLA) job in this process."""
  import keras
  import numpy as np
  from official.puppet_cnn import PuppetClassifier
  images, labels, source, _ = benchmark._load_images(spec["data_dir"], 256)  # pylint: disable=protected-access
  b = spec["batch"]
  x, y = np.resize(images, (b,) + images.shape[1:]), np.resize(labels, (b,))
  keras.utils.set_random_seed(0)
  out: Dict[str, Any] = {"images": source}
  base_kb = benchmark._proc_status_kb("VmRSS")  # pylint: disable=protected-access
  benchmark._reset_peak_rss()  # pylint: disable=protected-access
  model = PuppetClassifier(stage_channels=SIZES[spec["sizes"]],
                           max_depth=MAX_DEPTH[spec["sizes"]],
                           **dict(CONFIGS[spec["config"]], **spec.get("overrides", {})))
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if keras.backend.backend() == "jax":
    import jax
    model.build()
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def step(tv, ntv, x, y):
      def loss_of(tv, ntv):
        logits, ntv = model.stateless_call(tv, ntv, x, training=True)
        return loss(y, logits), ntv
      (value, ntv), grads = jax.value_and_grad(loss_of, has_aux=True)(tv, ntv)
      return [t - 0.01 * g for t, g in zip(tv, grads)], ntv, value

    start = time.perf_counter()
    compiled = jax.jit(step).lower(tv, ntv, x.astype(np.float32), y).compile()
    analysis = compiled.memory_analysis()
    out.update(compile_s=time.perf_counter() - start,
               plan_temp_bytes=int(analysis.temp_size_in_bytes),
               plan_argument_bytes=int(analysis.argument_size_in_bytes))
    return out
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=spec["xla"])
  try:
    start = time.perf_counter()
    model.train_on_batch(x, y)
    out["first_s"] = time.perf_counter() - start
    tracked = benchmark._reset_tensor_peak()  # pylint: disable=protected-access
    start = time.perf_counter()
    out["loss"] = float(np.asarray(model.train_on_batch(x, y)))
    out["step_s"] = time.perf_counter() - start
    peak_kb = benchmark._tensor_peak_kb() if tracked else None  # pylint: disable=protected-access
    # None where the allocator counted nothing (oneDNN off; a tiny XLA-compiled step was
    # also seen to count nothing).
    out["tensor_peak_mb"] = peak_kb / 1024 if peak_kb else None
  except Exception as e:  # pylint: disable=broad-except  (out of memory: report it)
    out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
  out["peak_growth_mb"] = (benchmark._proc_status_kb("VmHWM") - base_kb) / 1024  # pylint: disable=protected-access
  return out


def _run_subprocess(spec: Dict[str, Any], timeout_s: float,
                    max_rss_mb: float = float("inf")) -> Dict[str, Any]:
  """Runs one job in a fresh interpreter, killing it past `timeout_s` or `max_rss_mb`
  resident (a step far larger than the machine must not push it into swap)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  with tempfile.TemporaryFile("w+") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    start, killed, peak = time.perf_counter(), None, 0.0
    while proc.poll() is None:
      time.sleep(0.2)
      peak = max(peak, benchmark._child_rss_mb(proc.pid) or 0.0)  # pylint: disable=protected-access
      if peak > max_rss_mb:
        killed = f"killed at {peak:.0f} MB resident (--max_rss_mb={max_rss_mb:.0f})"
      elif time.perf_counter() - start > timeout_s:
        killed = f"killed after {timeout_s:.0f} s (--job_timeout_s)"
      if killed:
        proc.kill()
        proc.wait()
        return {"error": killed, "killed": True}
    out.seek(0)
    text = out.read()
  lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
  if not lines:
    tail = [l for l in text.strip().splitlines() if l.strip()][-2:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-300:]}
  result = json.loads(lines[-1][len("RESULT "):])
  if proc.returncode:  # after its result: TF 2.21 can abort at exit after an out-of-memory
    result["exit_code"] = proc.returncode
  return result


def _fmt(value: Optional[float], spec: str) -> str:
  return "-" if value is None else format(value, spec)


def report_lines(header: Dict[str, Any], results: List[Dict[str, Any]]) -> List[str]:
  """The block: setup, then one row per job."""
  jax_plan = header["backend"] == "jax"
  lines = [f"Written by `tools/train_step_memory.py` (block `{header['block']}`).", "",
           f"- Command: `{header['command']}`",
           f"- Date: {header['date']}; machine: `{header['uname']}`, {header['cpus']} CPUs "
           f"({header['cpu_model']}), {header['mem_gb']:.0f} GB RAM, no GPU used",
           f"- Backend: Keras {header['keras']} ({header['backend']}); puppet "
           f"{list(SIZES[header['sizes']])}, max depth {MAX_DEPTH[header['sizes']]}"
           + (f"; every config with {header['overrides']}" if header["overrides"] else ""),
           f"- Images: {header['images']}", ""]
  if jax_plan:
    lines += ["XLA's plan for one SGD training step, compiled ahead of time and not run "
              "(`memory_analysis()`: temporaries; the weights are the arguments).", "",
              "| config | batch | plan temporaries GB | per image GB | compile s | error |",
              "|---|---|---|---|---|---|"]
    for r in results:
      temp = r.get("plan_temp_bytes")
      lines.append(f"| {r['config']} | {r['batch']} | {_fmt(temp and temp / 1e9, '.2f')} | "
                   f"{_fmt(temp and temp / 1e9 / r['batch'], '.3f')} | "
                   f"{_fmt(r.get('compile_s'), '.1f')} | {r.get('error', '')} |")
  else:
    lines += ["One Adam training step (`train_on_batch`, as `train_lib` compiles it): peak "
              "resident size as growth over the process after imports and data, the second "
              "call's tensor peak (bytes in live tensors; '-' where the allocator counts none), "
              "the first call (tracing, compiling) and the second call, and "
              "the second call's loss (the same weights and images in every job of a batch "
              "size, so executions that compute the same loss show the same value).", "",
              "| config | batch | XLA | peak growth MB | per image MB | tensor peak MB | "
              "first step s | step s | loss of step 2 | error |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
      peak = r.get("peak_growth_mb")
      per_image = None if peak is None or r.get("error") else peak / r["batch"]
      lines.append(f"| {r['config']} | {r['batch']} | {'on' if r['xla'] else 'off'} | "
                   f"{_fmt(peak, '.0f')} | {_fmt(per_image, '.0f')} | "
                   f"{_fmt(r.get('tensor_peak_mb'), '.0f')} | "
                   f"{_fmt(r.get('first_s'), '.1f')} | {_fmt(r.get('step_s'), '.2f')} | "
                   f"{_fmt(r.get('loss'), '.6f')} | {r.get('error', '')} |")
  return lines


def main(argv):
  del argv
  if FLAGS.worker:
    print("RESULT " + json.dumps(run_job(json.loads(FLAGS.worker))), flush=True)
    return
  import keras
  unknown = sorted(set(FLAGS.configs) - set(CONFIGS))
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
  if set(FLAGS.xla) - {"on", "off"}:
    raise app.UsageError(f"--xla takes on and/or off, got {FLAGS.xla}")
  try:
    overrides = json.loads(FLAGS.model_overrides or "{}")
  except ValueError as e:
    raise app.UsageError(f"--model_overrides is not JSON: {e}") from e
  if not isinstance(overrides, dict):
    raise app.UsageError(f"--model_overrides must be a JSON object, got {overrides!r}")
  backend = keras.backend.backend()
  xla_settings = [True] if backend == "jax" else [x == "on" for x in FLAGS.xla]
  start = time.time()
  results = []
  for config in FLAGS.configs:
    for xla in xla_settings:
      if backend != "jax" and xla and CONFIGS[config].get("execution") == "bucketed":
        continue  # XLA cannot compile bucketed execution
      too_large = None
      for batch in sorted(int(b) for b in FLAGS.batch_sizes):
        spec = {"config": config, "batch": batch, "xla": xla, "sizes": FLAGS.sizes,
                "data_dir": FLAGS.data_dir, "overrides": overrides}
        if too_large:
          result = dict(spec, error=f"skipped: batch {too_large}")
        else:
          result = dict(spec, **_run_subprocess(spec, FLAGS.job_timeout_s, FLAGS.max_rss_mb))
          if result.pop("killed", False):  # a larger batch would not fit or finish either
            too_large = f"{batch} was {result['error']}"
        results.append(result)
        print(json.dumps(result), flush=True)
        if FLAGS.json_output:
          with open(FLAGS.json_output, "w") as f:
            json.dump(results, f, indent=1)
  # The images each job loaded (CIFAR-10's test images, or random ones where none loaded).
  sources = sorted({r["images"] for r in results if "images" in r}) or ["no job loaded images"]
  header = dict(benchmark._machine(), command="python " + " ".join(  # pylint: disable=protected-access
      [os.path.relpath(sys.argv[0], os.path.dirname(TOOLS))] +
      [shlex.quote(a) for a in sys.argv[1:]]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                keras=keras.__version__, backend=backend, sizes=FLAGS.sizes,
                block=FLAGS.block, overrides=overrides,
                images="; ".join(sources) + ", cycled to each batch size")
  benchmark.write_block(FLAGS.output, FLAGS.block, report_lines(header, results), title=TITLE)
  print(f"wrote {FLAGS.output} (block {FLAGS.block})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
