"""The size comparison behind `tools/compare_sizes.py`: Puppet-CNN against the baselines.

For every model it measures (see `model_size` and `macs` for the definitions):

* stored parameters and their float32 bytes, and the bytes as the paper counts them;
* the SavedModel that `export.export_saved_model` writes: bytes on disk and as a tar.gz;
* multiply-adds per image (Puppet-CNN: at the minimum, mean and maximum depth, the puppet's
  convolutions and the puppeteer's kernel generation separately);
* top-1 accuracy, when `results.json` files of training runs are given.

For each baseline it also measures what a user would do instead to shrink it: Keras's own
int8 quantization, and magnitude pruning to 50% and 90% sparsity (see `compression`).

`measure_all` returns one row (a flat dict, the CSV's columns) per model and variant;
`write_csv`, `write_markdown` and `write_chart` turn the rows into `docs/sizes.*`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from official.puppet_cnn.baselines import build_baseline
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.serving import compression
from official.puppet_cnn.serving import depth_sample
from official.puppet_cnn.serving import export
from official.puppet_cnn.serving import macs
from official.puppet_cnn.serving import model_size

DEFAULT_MEAN_DEPTH = 6.0
PRUNE_SPARSITIES = (0.5, 0.9)
BASELINE_NAMES = ("resnet", "vgg", "alexnet", "squeezenet", "mobilenet_v1", "mobilenet_v2",
                  "mobilenet_v3_small")
# results.json `model` values (official/puppet_cnn/models.py names) -> row keys.
RESULT_ALIASES = {"puppet_vgg": "puppet_cnn"}

COLUMNS = (
    "model", "variant", "description", "stored_params", "generated_kernel_params_min",
    "generated_kernel_params_max", "paper_param_bytes", "stored_bytes", "float32_bytes",
    "all_kernels_int8_bytes", "savedmodel_bytes", "savedmodel_gz_bytes", "depth_min",
    "depth_mean", "depth_max", "depth_mean_source", "macs_min", "macs_mean", "macs_max",
    "puppet_macs_min", "puppet_macs_mean", "puppet_macs_max", "puppeteer_macs_min",
    "puppeteer_macs_mean", "puppeteer_macs_max", "puppeteer_macs_executed", "top1",
    "top1_runs", "export_seconds", "note", "command", "machine")


@dataclasses.dataclass
class ModelSpec:
  """A model to measure: `build()` returns a fresh keras.Model."""
  key: str
  description: str
  build: Callable[[], keras.Model]
  compress: bool = False  # also measure int8 and pruned variants


def machine_description() -> str:
  """`uname -a`-like text plus the CPU count."""
  u = platform.uname()
  return f"{u.system} {u.node} {u.release} {u.version} {u.machine}; {os.cpu_count()} CPUs"


def default_specs(num_classes: int = 10, input_shape=(32, 32, 3),
                  max_depth: int = 8) -> List[ModelSpec]:
  """Puppet-CNN (VGG puppet, 64-128-256-512), its ResNet and AlexNet puppets, 7 baselines."""
  input_shape = tuple(input_shape)
  specs = []
  for key, puppet in (("puppet_cnn", "vgg"), ("puppet_resnet", "resnet"),
                      ("puppet_alexnet", "alexnet")):
    probe = PuppetClassifier(puppet=puppet, max_depth=max_depth)
    channels = "-".join(str(c) for c in probe.config.channels)
    specs.append(ModelSpec(
        key, f"Puppet-CNN, {puppet} puppet {channels} ({probe.config.block}), max depth "
        f"{max_depth}",
        lambda puppet=puppet: PuppetClassifier(puppet=puppet, max_depth=max_depth,
                                               num_classes=num_classes,
                                               input_shape=input_shape)))
  descriptions = {"resnet": "ResNet-18", "vgg": "VGG-11-BN", "alexnet": "AlexNet (CIFAR)",
                  "squeezenet": "SqueezeNet 1.1", "mobilenet_v1": "MobileNet v1",
                  "mobilenet_v2": "MobileNet v2", "mobilenet_v3_small": "MobileNet v3-small"}
  for name in BASELINE_NAMES:
    specs.append(ModelSpec(name, descriptions[name],
                           lambda name=name: build_baseline(name, num_classes, input_shape),
                           compress=True))
  return specs


def load_results(pattern: Optional[str]) -> Dict[str, Dict[str, Any]]:
  """{row key: {"top1": best top-1, "runs": n, "mean_depth": of the best run or None}}."""
  if not pattern:
    return {}
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise FileNotFoundError(f"--results_glob {pattern!r} matches no file")
  found: Dict[str, List[Dict[str, Any]]] = {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
    if "model" not in values or "top1" not in values:
      raise ValueError(f"{path} has no 'model' and 'top1' keys (got {sorted(values)})")
    key = RESULT_ALIASES.get(values["model"], values["model"])
    found.setdefault(key, []).append(values)
  summary = {}
  for key, runs in found.items():
    best = max(runs, key=lambda r: r["top1"])
    summary[key] = {"top1": float(best["top1"]), "runs": len(runs),
                    "mean_depth": best.get("mean_depth")}
  return summary


def _export(model, export_root: str, name: str) -> tuple:
  start = time.time()
  path = export.export_saved_model(model, export_root, name)
  seconds = round(time.time() - start, 2)
  return path, model_size.directory_bytes(path), model_size.gzipped_tar_bytes(path), seconds


def _puppet_columns(model, row: Dict[str, Any], mean_depth: float, depth_source: str) -> None:
  """Fills the depth, generated-parameter and MAC columns of a Puppet-CNN row."""
  c = model.config
  breakdown = model.parameter_breakdown()
  generated = breakdown["generated_kernel_params_by_depth"]
  row.update(generated_kernel_params_min=generated[c.min_depth],
             generated_kernel_params_max=generated[c.max_depth],
             depth_min=c.min_depth, depth_mean=mean_depth, depth_max=c.max_depth,
             depth_mean_source=depth_source)
  for label, depth in (("min", c.min_depth), ("mean", mean_depth), ("max", c.max_depth)):
    counts = macs.puppet_cnn_macs(model, depth)
    row[f"macs_{label}"] = counts["total"]
    row[f"puppet_macs_{label}"] = counts["puppet"] + counts["head"]
    row[f"puppeteer_macs_{label}"] = counts["puppeteer"]
    row["puppeteer_macs_executed"] = counts["puppeteer_executed"]


def measure_spec(spec: ModelSpec, export_root: str, mean_depth: float = DEFAULT_MEAN_DEPTH,
                 results: Optional[Dict[str, Dict[str, Any]]] = None, command: str = "",
                 machine: str = "", seed: int = 0,
                 log: Callable[[str], None] = print,
                 depth_images: Optional[np.ndarray] = None,
                 depth_images_name: str = "images") -> List[Dict[str, Any]]:
  """Measures one model (and its int8 / pruned variants if `spec.compress`).

  Puppet-CNN's mean depth comes from, in this order: the depths of `depth_images` under the
  model's config, the `mean_depth` of its results.json, or `mean_depth`.
  """
  results = results or {}
  common = {"model": spec.key, "command": command, "machine": machine}
  keras.utils.set_random_seed(seed)
  model = spec.build()
  is_puppet = export.is_puppet_cnn(model)
  if is_puppet:
    model.build()
  params = model_size.stored_parameters(model)
  row = dict(common, variant="float32", description=spec.description, stored_params=params,
             paper_param_bytes=model_size.paper_param_bytes(model),
             stored_bytes=model_size.stored_weight_bytes(model), float32_bytes=4 * params)
  result = results.get(spec.key)
  if result:
    row.update(top1=result["top1"], top1_runs=result["runs"])
  if is_puppet:
    depth, source = mean_depth, "`--mean_depth` (not measured)"
    if depth_images is not None:
      stats = depth_sample.depth_statistics(model, depth_images)
      histogram = ", ".join(f"{d}: {n}" for d, n in stats["depth_histogram"].items())
      depth = stats["mean_depth"]
      source = (f"{stats['count']:,} {depth_images_name} (mean complexity "
                f"{stats['mean_complexity']:.2f} bits; images per depth {{{histogram}}})")
    elif result and result.get("mean_depth") is not None:
      depth, source = float(result["mean_depth"]), "the `mean_depth` of results.json"
    _puppet_columns(model, row, depth, source)
  else:
    count = macs.keras_model_macs(model)
    row.update(macs_min=count, macs_mean=count, macs_max=count,
               all_kernels_int8_bytes=compression.ideal_int8_bytes(model))
  log(f"[{spec.key}] {params:,} stored params; exporting SavedModel ...")
  _, row["savedmodel_bytes"], row["savedmodel_gz_bytes"], row["export_seconds"] = _export(
      model, export_root, spec.key)
  log(f"[{spec.key}] SavedModel {row['savedmodel_bytes'] / 1e6:.2f} MB, tar.gz "
      f"{row['savedmodel_gz_bytes'] / 1e6:.2f} MB ({row['export_seconds']:.1f} s)")
  rows = [row]
  if not spec.compress:
    return rows
  same_macs = {k: row[k] for k in ("macs_min", "macs_mean", "macs_max")}
  for sparsity in PRUNE_SPARSITIES:
    stats = compression.magnitude_prune(model, sparsity)
    variant = f"pruned {int(round(sparsity * 100))}%"
    pruned = dict(common, variant=variant, description=spec.description,
                  stored_params=params, stored_bytes=model_size.stored_weight_bytes(model),
                  float32_bytes=4 * params, **same_macs,
                  note=f"{stats['zeroed']:,} of {stats['kernel_params']:,} kernel values zeroed "
                       "(per layer, smallest magnitudes), no fine-tuning")
    _, pruned["savedmodel_bytes"], pruned["savedmodel_gz_bytes"], pruned["export_seconds"] = (
        _export(model, export_root, f"{spec.key}_pruned{int(round(sparsity * 100))}"))
    log(f"[{spec.key}] {variant}: tar.gz {pruned['savedmodel_gz_bytes'] / 1e6:.2f} MB")
    rows.append(pruned)
  keras.utils.set_random_seed(seed)
  model = spec.build()
  quant = dict(common, variant="int8 (Keras quantize)", description=spec.description,
               float32_bytes=4 * params, **same_macs)
  try:
    int8_paths = compression.quantize_int8(model)
  except ValueError:
    quant.update(stored_params=params, stored_bytes=row["stored_bytes"],
                 note="unchanged: no Dense layer, and Keras 3.15 cannot quantize convolutions")
    log(f"[{spec.key}] int8: nothing Keras can quantize (no Dense layer)")
    rows.append(quant)
    return rows
  quant.update(stored_params=model_size.stored_parameters(model),
               stored_bytes=model_size.stored_weight_bytes(model),
               note=f"{len(int8_paths)} int8 kernels (Dense layers only; Keras 3.15 cannot "
                    "quantize convolutions)")
  try:
    _, quant["savedmodel_bytes"], quant["savedmodel_gz_bytes"], quant["export_seconds"] = (
        _export(model, export_root, f"{spec.key}_int8"))
  except Exception as e:  # pylint: disable=broad-except  # report, do not abort the table
    quant["note"] += f"; SavedModel export failed: {type(e).__name__}: {e}"
  log(f"[{spec.key}] int8: stored {quant['stored_bytes'] / 1e6:.2f} MB")
  rows.append(quant)
  return rows


def measure_all(specs: Sequence[ModelSpec], export_dir: Optional[str] = None,
                mean_depth: float = DEFAULT_MEAN_DEPTH, results_glob: Optional[str] = None,
                command: str = "", log: Callable[[str], None] = print,
                data_dir: Optional[str] = None,
                depth_sample_size: Optional[int] = None) -> List[Dict[str, Any]]:
  """Measures every spec; exports go to `export_dir` (kept) or a temporary folder (deleted).

  With `data_dir` (holding CIFAR-10), Puppet-CNN's mean depth is measured on the first
  `depth_sample_size` (default: all) CIFAR-10 test images.
  """
  results = load_results(results_glob)
  depth_images, depth_images_name = None, "images"
  if data_dir:
    depth_images = depth_sample.load_cifar10_test_images(data_dir, depth_sample_size)
    depth_images_name = "CIFAR-10 test images"
    log(f"measuring Puppet-CNN depths on {len(depth_images):,} {depth_images_name}")
  machine = machine_description()
  rows: List[Dict[str, Any]] = []
  temp = None
  if export_dir is None:
    temp = export_root = tempfile.mkdtemp(prefix="compare_sizes_")
  else:
    export_root = export_dir
  try:
    for i, spec in enumerate(specs, 1):
      log(f"({i}/{len(specs)}) {spec.key}: {spec.description}")
      rows.extend(measure_spec(spec, export_root, mean_depth, results, command, machine,
                               log=log, depth_images=depth_images,
                               depth_images_name=depth_images_name))
      if temp:  # keep the disk use of a full run small
        for name in os.listdir(export_root):
          shutil.rmtree(os.path.join(export_root, name), ignore_errors=True)
      keras.backend.clear_session()
  finally:
    if temp:
      shutil.rmtree(temp, ignore_errors=True)
  return rows


# ------------------------------------------------------------------------------ writing
def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})


def _csv_value(value):
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
    return str(int(value))
  return value


def _mb(value) -> str:
  return "–" if value in (None, "") else f"{value / 1e6:.2f}"


def _count(value) -> str:
  if value in (None, ""):
    return "–"
  value = float(value)
  if value >= 1e9:
    return f"{value / 1e9:.2f} G"
  if value >= 1e6:
    return f"{value / 1e6:.1f} M"
  if value >= 1e3:
    return f"{value / 1e3:.1f} k"
  return f"{value:.0f}"


def _macs_range(row) -> str:
  if row.get("macs_min") == row.get("macs_max"):
    return _count(row.get("macs_mean"))
  return " / ".join(_count(row.get(k)) for k in ("macs_min", "macs_mean", "macs_max"))


def write_markdown(rows: Sequence[Dict[str, Any]], path: str, command: str = "",
                   machine: str = "", csv_name: str = "sizes.csv",
                   png_name: Optional[str] = "sizes.png") -> None:
  """The human-readable report (`docs/sizes.md`)."""
  base = [r for r in rows if r["variant"] == "float32"]
  puppets = [r for r in base if r.get("puppeteer_macs_max") not in (None, "")]
  lines = [
      "# Model sizes: Puppet-CNN against the baselines",
      "",
      "Generated by `tools/compare_sizes.py`; do not edit by hand. Every row of the tables "
      f"below (and of [{csv_name}]({csv_name}), which also has the command and machine per "
      "row) was produced by:",
      "",
      f"- command: `{command}`",
      f"- machine: `{machine}`",
      f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, NumPy {np.__version__}",
      "",
      "All models: 32x32x3 inputs, 10 classes, untrained weights (sizes and MACs do not depend "
      "on the values, except the gzipped size, which does for trained weights too). "
      "MB = 10^6 bytes, as in the paper. MACs = multiply-adds per image of the conv and dense "
      "layers (FLOPs ~ 2x MACs).",
      "",
  ]
  if png_name:
    lines += [f"![sizes]({png_name})", ""]
  lines += [
      "## Sizes",
      "",
      "| Model | Stored params | Paper size (MB) | Stored float32 (MB) | SavedModel (MB) | "
      "SavedModel .tar.gz (MB) | MACs/image (min / mean / max depth) | Top-1 |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in base:
    top1 = "–" if r.get("top1") in (None, "") else f"{100 * float(r['top1']):.2f}%"
    lines.append(
        f"| `{r['model']}` {r['description']} | {int(r['stored_params']):,} | "
        f"{_mb(r['paper_param_bytes'])} | {_mb(r['float32_bytes'])} | "
        f"{_mb(r.get('savedmodel_bytes'))} | {_mb(r.get('savedmodel_gz_bytes'))} | "
        f"{_macs_range(r)} | {top1} |")
  lines += [
      "",
      "- **Stored params**: every value the model stores, trainable or not (batch-norm moving "
      "statistics included), as `model.count_params()` counts them.",
      "- **Paper size**: float32 bytes the way the paper counts them. Puppet-CNN: its Table 5 "
      "\"Param Size\", 4 bytes x the parameters of the puppeteer's G only (with the default "
      "`generator_norm='batch_per_step'` G keeps its batch norm's moving statistics per "
      "Euler step, 2 C values per step: 1.21 MB at C = 512 instead of the 1.08 MB of the "
      "paper's one set, which `generator_norm='batch'` reproduces). Baselines: 4 bytes x all "
      "stored params.",
      "- **Stored float32**: 4 bytes x stored params: what the weights honestly take. For "
      "Puppet-CNN this adds the learned initial state, the puppet's batch norms and the "
      "classifier to G.",
      "- **SavedModel**: the bytes on disk of the TF Serving export "
      "(`official/puppet_cnn/serving/export.py`: graph, variables, `model_info.json`; "
      "Puppet-CNN's graph holds the per-sample depth loop and the puppeteer's unrolled "
      "steps); **.tar.gz**: `tar czf` of that version folder (gzip level 6).",
      "- **Top-1**: best `top1` of the `results.json` files given with `--results_glob` "
      "(their `model` must be one of the row keys); – when none was given.",
      "",
  ]
  big_graphs = [r["model"] for r in puppets
                if r.get("savedmodel_bytes") and r["savedmodel_bytes"] > 5 * r["float32_bytes"]]
  if big_graphs:
    lines[-1:-1] = [
        f"- {', '.join(f'`{m}`' for m in big_graphs)}: the SavedModel is many times its "
        "weights because the graph stores, for every generated kernel whose width does not "
        "divide the puppeteer's state width, a constant adaptive-pooling matrix (built per "
        "kernel in `PuppeteerODE._pool_axis`); the constants are mostly zeros, so the "
        ".tar.gz is small. Sharing one constant per (width, state width) would remove this."]
  if puppets:
    lines += [
        "## Puppet-CNN: where the multiply-adds go",
        "",
        "| Model | Depth min / mean / max | Generated kernel params (min / max depth) | "
        "Puppet convs + head MACs (min / mean / max) | Puppeteer G MACs (min / mean / max) | "
        "Puppeteer MACs as executed | Total MACs (min / mean / max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in puppets:
      trio = lambda p: " / ".join(_count(r[f"{p}_{k}"]) for k in ("min", "mean", "max"))  # pylint: disable=cell-var-from-loop,unnecessary-lambda-assignment
      lines.append(
          f"| `{r['model']}` | {r['depth_min']} / {float(r['depth_mean']):g} / "
          f"{r['depth_max']} | {int(r['generated_kernel_params_min']):,} / "
          f"{int(r['generated_kernel_params_max']):,} | {trio('puppet_macs')} | "
          f"{trio('puppeteer_macs')} | {_count(r['puppeteer_macs_executed'])} | "
          f"{trio('macs')} |")
    sources = sorted({r["depth_mean_source"] for r in puppets})
    lines += [
        "",
        f"- **Mean depth** from {'; '.join(sources)}. A sample's depth "
        "D = floor(1 / tanh(1 / H)) depends only on its input complexity H and the config, "
        "not on the weights, so untrained models give the depths trained ones would. Min / "
        "max are the config's bounds (1 and max_depth), not the observed range. "
        "`--data_dir` measures it on CIFAR-10; otherwise a `results.json` `mean_depth` or "
        f"`--mean_depth` (default {DEFAULT_MEAN_DEPTH:g}) is used.",
        "- **Puppet convs**: the generated 3x3 convs at each stage's feature-map size, for a "
        "sample of that depth, plus the linear classifier.",
        "- **Puppeteer G**: each Euler step evaluates G (3x3 depthwise + C x C pointwise conv) "
        "on the state, C_in_max x K^2 positions of C_out_max channels: "
        "(C_in_max K^2) x C_out_max (9 + C_out_max) MACs per step (C = 512: 1.23 G), one step "
        "per generated kernel the sample uses. The initial state depends on the image's "
        "complexity, so this is paid per image.",
        "- **As executed**: this implementation integrates every step up to max depth for "
        "every sample (finished samples are masked, not skipped), so it always pays the "
        "max-depth puppeteer cost; the min / mean columns are what a per-sample schedule "
        "would need.",
        "- Not counted: the complexity measurement (FFT + histograms), pooling of kernels "
        "out of the state, batch norms, activations (all O(activations)).",
        "",
    ]
  variants = [r for r in rows if r["variant"] != "float32"]
  if variants:
    by_model: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
      by_model.setdefault(r["model"], {})[r["variant"]] = r
    lines += [
        "## What a user would do instead: shrink a baseline",
        "",
        "| Model | float32 stored (MB) | float32 .tar.gz (MB) | int8 Keras: stored (MB) | "
        "int8 Keras: SavedModel / .tar.gz (MB) | all kernels int8, bound (MB) | "
        "pruned 50%: .tar.gz (MB) | pruned 90%: .tar.gz (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, v in by_model.items():
      if len(v) == 1:
        continue
      f32 = v["float32"]
      q = v.get("int8 (Keras quantize)", {})
      p50, p90 = v.get("pruned 50%", {}), v.get("pruned 90%", {})
      lines.append(
          f"| `{key}` | {_mb(f32['stored_bytes'])} | {_mb(f32.get('savedmodel_gz_bytes'))} | "
          f"{_mb(q.get('stored_bytes'))} | {_mb(q.get('savedmodel_bytes'))} / "
          f"{_mb(q.get('savedmodel_gz_bytes'))} | {_mb(f32.get('all_kernels_int8_bytes'))} | "
          f"{_mb(p50.get('savedmodel_gz_bytes'))} | {_mb(p90.get('savedmodel_gz_bytes'))} |")
    lines += [
        "",
        "- **int8 Keras**: Keras 3's own post-training quantization, `model.quantize(\"int8\")` "
        "(int8 kernels + a float32 scale per output channel). In Keras 3.15 only Dense, "
        "EinsumDense and Embedding layers can be quantized; convolutions stay float32, so "
        "conv nets barely shrink; only models with large Dense layers (AlexNet's classifier) "
        "gain much. The SavedModel of a quantized model is exported the same way.",
        "- **all kernels int8, bound**: what weight-only int8 of every conv/dense kernel would "
        "store (1 byte per value + a float32 scale per output channel, everything else float32): "
        "the ~4x a full int8 toolchain (e.g. TFLite) would reach.",
        "- **tensorflow-model-optimization** (TFMOT: quantization-aware training, pruning, "
        "clustering) works only with tf_keras / Keras 2 models; these are Keras 3 models, so it "
        "is not used.",
        "- **pruned**: the smallest-magnitude 50% / 90% of each conv/dense kernel set to zero "
        "with NumPy (no fine-tuning, so accuracy would drop without it); the SavedModel keeps "
        "its dense size, the zeros compress away in the .tar.gz.",
        "",
    ]
  notes = [r for r in rows if r.get("note") and ("failed" in str(r["note"])
                                                 or "unchanged" in str(r["note"]))]
  for r in notes:
    lines.append(f"- `{r['model']}` {r['variant']}: {r['note']}")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip() + "\n")


def _log_floor(ax, values) -> None:
  """Starts a log axis below the smallest bar, so that every bar shows."""
  values = np.asarray(values, float)
  values = values[np.isfinite(values) & (values > 0)]
  if values.size:
    ax.set_xlim(left=10 ** np.floor(np.log10(values.min()) - 0.3))


def write_chart(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """A PNG: bytes per model (paper, float32, .tar.gz) and MACs per image (log scales)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the size chart needs matplotlib: `pip install matplotlib`, or skip the "
                      "chart (compare_sizes --nochart)") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  base = [r for r in rows if r["variant"] == "float32"]
  names = [r["model"] for r in base]
  y = np.arange(len(base))
  fig, (ax_size, ax_macs) = plt.subplots(1, 2, figsize=(13, 0.45 * len(base) + 2.4),
                                         sharey=True)
  series = (("paper_param_bytes", "paper size (float32)"),
            ("float32_bytes", "stored params (float32)"),
            ("savedmodel_bytes", "SavedModel on disk"),
            ("savedmodel_gz_bytes", "SavedModel .tar.gz"))
  height = 0.8 / len(series)
  for i, (key, label) in enumerate(series):
    values = [float(r.get(key) or np.nan) / 1e6 for r in base]
    ax_size.barh(y + (i - (len(series) - 1) / 2) * height, values, height, label=label)
  ax_size.set_xscale("log")
  _log_floor(ax_size, [float(r.get(k) or np.nan) / 1e6 for r in base for k, _ in series])
  ax_size.set_xlabel("MB (10^6 bytes), log scale")
  ax_size.set_yticks(y, names)
  ax_size.invert_yaxis()
  ax_size.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=8)
  ax_size.set_title("Size")
  puppet = np.array([float(r.get("puppet_macs_mean") or r.get("macs_mean") or np.nan)
                     for r in base]) / 1e6
  puppeteer = np.array([float(r.get("puppeteer_macs_mean") or 0.0) for r in base]) / 1e6
  ax_macs.barh(y, puppet, 0.6, label="convs + dense (baselines), puppet convs + head")
  ax_macs.barh(y, puppeteer, 0.6, left=puppet, label="puppeteer G (Puppet-CNN)")
  ax_macs.set_xscale("log")
  _log_floor(ax_macs, puppet)
  ax_macs.set_xlabel("million MACs per image at the mean depth, log scale")
  ax_macs.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=1, fontsize=8)
  ax_macs.set_title("Compute")
  fig.suptitle("Puppet-CNN vs baselines, 32x32x3, 10 classes")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(rows: Sequence[Dict[str, Any]], output_dir: str, command: str = "",
                 chart: bool = True) -> Dict[str, str]:
  """Writes sizes.csv, sizes.md and (if `chart`) sizes.png into `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {"csv": os.path.join(output_dir, "sizes.csv"),
           "md": os.path.join(output_dir, "sizes.md")}
  write_csv(rows, paths["csv"])
  if chart:
    paths["png"] = os.path.join(output_dir, "sizes.png")
    write_chart(rows, paths["png"])
  machine = rows[0]["machine"] if rows else machine_description()
  write_markdown(rows, paths["md"], command=command, machine=machine,
                 png_name="sizes.png" if chart else None)
  return paths
