r"""Where a model's inference memory goes: resident memory after each phase of serving it.

  python tools/memory_profile.py --data_dir=../shared/data
  python tools/memory_profile.py --models=static_twin,puppet_cached --output=/tmp/memory.md

tools/benchmark.py gives one number per model (the peak resident size while it serves batches
of 1 and 64, as growth over the process after imports); this tool splits that number. For each
model (the models of tools/benchmark.py, built the same way), a fresh Python subprocess loads
the benchmark images, records its resident size (VmRSS), resets the peak (VmHWM, Linux
`clear_refs`), and then reads both after each phase:

  build        the model is built (for puppet_cached*, its kernel cache is filled)
  trace        the inference `tf.function` is traced once, batch dimension None
  first call   its first call (batch 1): TensorFlow optimizes and instantiates the graph
  batch 1      a second batch-1 call
  batch 64     two calls at batch 64
  batch 256    two calls at batch 256

The `saved_*` models measure what a server holds: the model (`saved_static_twin`: the twin;
`saved_frozen8`: `puppet_frozen8`, every bin cached in int8 without the generating path;
`saved_nearest8`: `puppet_nearest8`, the calibration images' bins in int8, the others served
by the nearest cached bin) is
first exported by `official.puppet_cnn.serving.export_saved_model` in a separate process, and
the measuring process only loads the SavedModel (`tf.saved_model.load`, phase "build") and
calls its `serving_default` signature on uint8 pixels ("trace" fetches the signature, which
is already traced). No weights are generated in that process, so nothing of the build stays.

The table gives each phase's resident size and peak as growth over the post-import baseline,
in MB, and the step from the previous phase. Writes `--output` (docs/memory_profile.md),
keeping its hand-written notes block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

PHASES = ("build", "trace", "first call", "batch 1", "batch 64", "batch 256")
SAVED_MODELS = {"saved_static_twin": "static_twin", "saved_frozen8": "puppet_frozen8",
                "saved_nearest8": "puppet_nearest8"}
MODELS = ("static_twin", "puppet_cached", "puppet_cached_per_bin", "puppet_cached16",
          "puppet_cached8", "puppet_frozen8", "puppet_nearest8", "puppet_bucketed",
          "puppet_light") + tuple(
              SAVED_MODELS)


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  global _MODELS, _STAGE_CHANNELS, _MAX_DEPTH, _TWIN_DEPTH, _BINS, _DATA_DIR, _OUTPUT, _WORKER
  global _ROUNDS, _NEAREST_BINS
  _MODELS = flags.DEFINE_list("models", ["static_twin", "puppet_cached", "puppet_cached16"],
                              f"Models, each in its own process: {MODELS}.")
  _STAGE_CHANNELS = flags.DEFINE_list("stage_channels", ["64", "128", "256", "512"],
                                      "The puppet's stage channels (default: the full puppet).")
  _MAX_DEPTH = flags.DEFINE_integer("max_depth", 8, "Puppet max_depth.")
  _TWIN_DEPTH = flags.DEFINE_integer("twin_depth", 6, "The static twin's depth per stage "
                                     "(6: the full puppet's mean depth on CIFAR-10, "
                                     "docs/benchmarks_cached.md).")
  _BINS = flags.DEFINE_integer("bins", 16, "complexity_bins of the puppet models.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 directory (default: "
                                  "$PUPPET_CNN_DATA_DIR); random images when it does not load.")
  _OUTPUT = flags.DEFINE_string("output", "docs/memory_profile.md", "Markdown report.")
  _NEAREST_BINS = flags.DEFINE_list("nearest_bins", None, "The bins that puppet_nearest8 and "
                                    "saved_nearest8 cache (default: those of the calibration "
                                    "images, tools/benchmark.py).")
  _ROUNDS = flags.DEFINE_integer("rounds", 1, "Fresh processes per model, in rounds that "
                                 "visit every model once (in a rotated order); the table "
                                 "gives the median of each number over the rounds.", lower_bound=1)
  _WORKER = flags.DEFINE_string("worker", None, "Internal: run one model from this JSON spec.")


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Builds and serves one model; resident size and peak (kB) after each phase."""
  import gc
  import numpy as np
  import tensorflow as tf
  import benchmark
  images, _, source, calibration = benchmark._load_images(spec["data_dir"])  # pylint: disable=protected-access
  gc.collect()
  kb = benchmark._proc_status_kb  # pylint: disable=protected-access
  out = {"base_kb": kb("VmRSS"), "images": source, "phases": []}
  out["peak_reset"] = benchmark._reset_peak_rss()  # pylint: disable=protected-access

  def mark(phase):
    out["phases"].append({"phase": phase, "rss_kb": kb("VmRSS"), "hwm_kb": kb("VmHWM")})

  if spec.get("saved_model"):
    loaded = tf.saved_model.load(spec["saved_model"])
    out["notes"] = spec.get("export_notes", {})
    mark("build")
    signature = loaded.signatures["serving_default"]
    fn = lambda x: signature(images=x)["probabilities"]  # pylint: disable=unnecessary-lambda-assignment
    mark("trace")
    dtype = np.uint8
  else:
    model, notes = benchmark._build(spec, calibration)  # pylint: disable=protected-access
    out["notes"] = notes
    mark("build")
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec((None,) + images.shape[1:], tf.float32)])
    fn.get_concrete_function()
    mark("trace")
    dtype = np.float32
  batch = {b: tf.constant(images[:b].astype(dtype)) for b in (1, 64, 256)}
  fn(batch[1]).numpy()
  mark("first call")
  fn(batch[1]).numpy()
  mark("batch 1")
  for b in (64, 256):
    for _ in range(2):
      fn(batch[b]).numpy()
    mark(f"batch {b}")
  return out


def export_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Builds the model of spec['model'] (as tools/benchmark.py does) and exports it to
  spec['export_dir'] for TF Serving; returns the version folder and the build notes."""
  import benchmark
  from official.puppet_cnn.serving.export import export_saved_model
  from official.puppet_cnn.serving.model_size import directory_bytes
  _, _, _, calibration = benchmark._load_images(spec["data_dir"])  # pylint: disable=protected-access
  model, notes = benchmark._build(spec, calibration)  # pylint: disable=protected-access
  path = export_saved_model(model, spec["export_dir"], spec["model"], version=1)
  notes["saved_model_mb"] = directory_bytes(path) / 1e6
  return {"saved_model": path, "export_notes": notes}


def _run(spec: Dict[str, Any]) -> Dict[str, Any]:
  """Measures one model in a fresh process (a `saved_*` model: exported in another one
  first)."""
  if spec["model"] in SAVED_MODELS:
    with tempfile.TemporaryDirectory() as export_dir:
      exported = _subprocess(dict(spec, model=SAVED_MODELS[spec["model"]], export=True,
                                  export_dir=export_dir))
      if exported.get("error"):
        return {"error": "export: " + exported["error"]}
      return _subprocess(dict(spec, **exported))
  return _subprocess(spec)


def _subprocess(spec: Dict[str, Any]) -> Dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "spec.json")
    with open(path, "w") as f:
      json.dump(spec, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={path}"],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    result_path = path + ".out"
    if proc.returncode != 0 or not os.path.exists(result_path):
      return {"error": f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-500:]}
    with open(result_path) as f:
      return json.load(f)


def median_result(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
  """One model's runs folded into one: the median of each phase's resident size and peak,
  both as growth over each run's own baseline (base_kb 0), and the spread of the batch-64
  peak ("spread_kb": min, max). A failed run makes the result an error."""
  failed = [r for r in runs if r.get("error")]
  if failed:
    return failed[0]
  out = dict(runs[-1], base_kb=0, phases=[])
  for i, phase in enumerate(PHASES):
    out["phases"].append({"phase": phase, **{
        key: float(np.median([r["phases"][i][key] - r["base_kb"] for r in runs]))
        for key in ("rss_kb", "hwm_kb")}})
  b64 = [r["phases"][PHASES.index("batch 64")]["hwm_kb"] - r["base_kb"] for r in runs]
  out["spread_kb"] = (min(b64), max(b64))
  out["runs"] = len(runs)
  return out


def ratio_lines(results: Dict[str, Dict[str, Any]]) -> List[str]:
  """Each model's peak at batch 64 (growth) against its twin's: `static_twin` for models
  built in the process, `saved_static_twin` for the `saved_*` ones; with the spread over
  the rounds."""
  b64 = PHASES.index("batch 64")

  def peak(r):
    return (r["phases"][b64]["hwm_kb"] - r["base_kb"]) / 1e3

  lines = []
  for m, r in results.items():
    twin = "saved_static_twin" if m in SAVED_MODELS else "static_twin"
    if m == twin or r.get("error") or twin not in results or results[twin].get("error"):
      continue
    spread = ", ".join(f"{name} {x['spread_kb'][0] / 1e3:.0f}-{x['spread_kb'][1] / 1e3:.0f} MB"
                       for name, x in ((m, r), (twin, results[twin])) if x.get("spread_kb"))
    lines.append(f"- {m}: peak at batch 64 {peak(r):.0f} MB, {peak(r) / peak(results[twin]):.2f}x "
                 f"{twin}'s {peak(results[twin]):.0f} MB"
                 + (f" (over the rounds: {spread})" if spread else ""))
  return lines + ([""] if lines else [])


def report_lines(header: Dict[str, Any], results: Dict[str, Dict[str, Any]]) -> List[str]:
  lines = ["# Memory: where a model's inference memory goes", "",
           "Written by `tools/memory_profile.py`.", "",
           f"- Command: `{header['command']}`",
           f"- Date: {header['machine']}",
           f"- Puppet: stage channels {tuple(header['stage_channels'])}, max depth "
           f"{header['max_depth']}, {header['bins']} complexity bins; static twin: depth "
           f"{header['twin_depth']} per stage",
           "- Each model in a fresh process; MB (10^6 bytes) of growth over the process's "
           "resident size after imports and data loading: resident now / peak so far "
           "(+ step of the peak from the previous phase)" + (
               f"; each number the median of {header['rounds']} processes per model (rounds "
               "that visit every model once, in a rotated order)"
               if header.get("rounds", 1) > 1 else ""), ""]
  models = list(results)
  lines += ["| phase | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  for i, phase in enumerate(PHASES):
    cells = []
    for m in models:
      r = results[m]
      if r.get("error"):
        cells.append("error" if i == 0 else "")
        continue
      p = r["phases"][i]
      prev = r["phases"][i - 1]["hwm_kb"] if i else r["base_kb"]
      cells.append(f"{(p['rss_kb'] - r['base_kb']) / 1e3:.0f} / "
                   f"{(p['hwm_kb'] - r['base_kb']) / 1e3:.0f} "
                   f"(+{(p['hwm_kb'] - prev) / 1e3:.0f})")
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  lines.append("")
  for m in models:
    r = results[m]
    if r.get("error"):
      lines.append(f"- {m}: {r['error']}")
    elif r.get("notes", {}).get("cache_mb") is not None:
      n = r["notes"]
      lines.append(f"- {m}: kernel cache of bins {n['cached_bins']}, {n['cache_mb']:.0f} MB "
                   f"({n.get('cache_dtype', 'float32')}), built in {n['cache_s']:.1f} s")
    if r.get("notes", {}).get("saved_model_mb") is not None:
      lines.append(f"- {m}: served from a SavedModel of {r['notes']['saved_model_mb']:.1f} MB "
                   "(loaded in the measuring process; exported in another)")
  first = next((r for r in results.values() if not r.get("error")), {})
  lines += [f"- Images: {first.get('images', '-')}", ""]
  lines += ratio_lines(results)
  return lines


def main(argv):
  del argv
  if _WORKER.value:
    with open(_WORKER.value) as f:
      spec = json.load(f)
    result = export_worker(spec) if spec.get("export") else run_worker(spec)
    with open(_WORKER.value + ".out", "w") as f:
      json.dump(result, f)
    return
  from official.puppet_cnn import reports
  unknown = [m for m in _MODELS.value if m not in MODELS]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; choose from {MODELS}")
  channels = [int(c) for c in _STAGE_CHANNELS.value]
  spec = dict(stage_channels=channels, max_depth=_MAX_DEPTH.value, bins=_BINS.value,
              twin_depth=_TWIN_DEPTH.value, data_dir=_DATA_DIR.value,
              light_state=min(256, max(channels)), light_rank=min(32, min(256, max(channels)) - 1))
  if _NEAREST_BINS.value is not None:
    try:
      spec["nearest_bins"] = [int(b) for b in _NEAREST_BINS.value]
    except ValueError:
      raise app.UsageError(f"--nearest_bins takes integers, got {_NEAREST_BINS.value}") from None
  runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in _MODELS.value}
  models = list(_MODELS.value)
  for r in range(_ROUNDS.value):
    for model in models[r % len(models):] + models[:r % len(models)]:
      print(f"round {r + 1}/{_ROUNDS.value}: {model} ...", flush=True)
      runs[model].append(_run(dict(spec, model=model)))
  results = {m: median_result(runs[m]) for m in models}
  spec["rounds"] = _ROUNDS.value
  header = dict(command=reports.command_line(), machine=reports.machine_line(), **spec)
  reports.write(_OUTPUT.value, "\n".join(report_lines(header, results)))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
