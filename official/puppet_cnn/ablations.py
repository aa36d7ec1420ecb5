"""The ablation study of `tools/ablations.py`: named variants of one training protocol.

Each variant is the base flagfile plus a few flags of the training binary, so every run is an
ordinary `python -m official.puppet_cnn.train` run in its own model_dir (resumable, and
re-evaluated rather than retrained when it is already finished). The table collects each run's
results.json and training_state.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study: a name, what it tests, and the flags that differ from the base."""
  name: str
  question: str
  flags: Tuple[str, ...] = ()


VARIANTS: Tuple[Variant, ...] = (
    Variant("baseline", "Base protocol: learned initial state (base x fill), depth and "
            "parameter adaptation, VGG-style puppet, Euler, G's moving statistics as one set "
            "(the paper's)"),
    Variant("paper_init", "The paper's constant initial state exp(1 - H^-2) (eq. 11)",
            ("--init=paper",)),
    Variant("learned_additive", "Learned base + constant fill (instead of base x fill)",
            ("--init=learned_additive",)),
    Variant("no_parameter_adaptation", "Kernels from one reference H for every image "
            "(paper Table 3)", ("--noparameter_adaptation",)),
    Variant("no_depth_adaptation", "Depth 6 for every image (about the adaptive mean; paper "
            "Table 4)", ("--nodepth_adaptation", "--fixed_depth=6")),
    Variant("puppet_resnet", "Same puppeteer driving a ResNet-style puppet (2 kernels per "
            "unit)", ("--model=puppet_resnet",)),
    Variant("puppet_alexnet", "Same puppeteer driving an AlexNet-style puppet (1/8 of "
            "64-192-384-256-256)", ("--model=puppet_alexnet", "--stage_channels=8,24,48,32,32")),
    Variant("midpoint", "Midpoint integrator in training (2 G evaluations per step)",
            ("--integrator=midpoint",)),
    Variant("incremental_depth", "Incremental in depth: depth_scale 0.25, 0.5, then 1 "
            "(epochs 1, 2, 3-4)", ("--depth_refinements=2", "--refine_every_epochs=1")),
    Variant("width_sampled", "Widths 0.25, 0.5, 0.75 trained beside 1.0 (in-place "
            "distillation)", ("--train_widths=0.25,0.5,0.75,1.0",)),
    Variant("generator_rank", "G's 32 x 32 pointwise matrix factorized at rank 4 (C/8, as "
            "rank 64 at C = 512; not in the paper, a speed option)", ("--generator_rank=4",)),
    Variant("light_generator", "Half-width state (16 for the 32-wide last stage, as 256 for "
            "512) and G at rank 2 (C/8): benchmark.py's puppet_light setting, scaled down",
            ("--state_channels=16", "--generator_rank=2")),
    Variant("generator_bf16", "G's pointwise products in bfloat16, state and batch norm in "
            "float32 (not in the paper, a speed option for CPUs with AMX / AVX512-BF16 and "
            "GPUs)", ("--generator_matmul_dtype=bfloat16",)),
    Variant("mixed_bf16", "Keras's mixed_bfloat16 policy: the puppet's convolutions in "
            "bfloat16; H, G, batch norm and the head in float32 (not in the paper, a speed "
            "option)", ("--dtype_policy=mixed_bfloat16",)),
    Variant("grouped_batches", "Training batches of one complexity bin each, so bucketed "
            "training runs the puppeteer once per step (not in the paper, a speed option)",
            ("--batch_grouping=complexity_bin",)),
    Variant("state_norm", "G normalizes each state by its own statistics, in training and "
            "inference (not in the paper; what grouped batches need)",
            ("--generator_norm=state",)),
    Variant("step_norm", "G's batch norm (the paper's in training) with moving statistics "
            "kept per Euler step for inference, instead of one set for every step (the "
            "library default)", ("--generator_norm=batch_per_step",)),
    Variant("step_norm_precise_bn", "Per-step moving statistics in G, and every batch norm's "
            "statistics re-estimated on 2,048 training images before each validation "
            "(precise batch norm; not in the paper)",
            ("--generator_norm=batch_per_step", "--precise_bn_images=2048")),
    Variant("grouped_state_norm", "Grouped batches with G's per-state normalization: "
            "training generates the kernels inference generates",
            ("--batch_grouping=complexity_bin", "--generator_norm=state")),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def select(names: Optional[Sequence[str]]) -> List[Variant]:
  """The variants named (all for None or ['all']), in the study's order."""
  if not names or list(names) == ["all"]:
    return list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANT_NAMES))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANT_NAMES)}")
  return [v for v in VARIANTS if v.name in set(names)]


def train_argv(variant: Variant, base_flagfile: str, model_dir: str,
               extra_flags: Sequence[str] = ()) -> List[str]:
  """The training binary's arguments for a variant (later flags override earlier ones)."""
  return ([f"--flagfile={base_flagfile}"] + list(variant.flags) + list(extra_flags)
          + [f"--model_dir={model_dir}"])


def _read(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def collect(variant: Variant, model_dir: str) -> Dict[str, Any]:
  """A table row from a finished run's files (None values where the run has no results)."""
  results = _read(os.path.join(model_dir, "results.json")) or {}
  state = _read(os.path.join(model_dir, "training_state.json")) or {}
  breakdown = results.get("parameter_breakdown") or {}
  return {
      "name": variant.name, "question": variant.question, "flags": " ".join(variant.flags),
      "top1": results.get("top1"), "top5": results.get("top5"),
      "num_test_images": results.get("num_test_images"),
      "mean_depth": results.get("mean_depth"),
      "stored_params": breakdown.get("total_stored", results.get("stored_params")),
      "train_seconds": state.get("train_seconds"), "epochs": state.get("epochs_done"),
      "macs": results.get("macs_at_mean_depth"),
  }


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def markdown(rows: Sequence[Dict[str, Any]], header: str) -> str:
  """The study as Markdown: one row per variant, with its difference to the baseline."""
  base = next((r["top1"] for r in rows if r["name"] == "baseline"), None)
  lines = [header, "",
           "| variant | what it tests | flags | top-1 | top-5 | vs baseline | mean depth | "
           "stored params | train time | MMACs/image |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    delta = ("-" if base is None or r["top1"] is None or r["name"] == "baseline"
             else f"{100 * (r['top1'] - base):+.2f} pt")
    depth = "-" if r["mean_depth"] is None else f"{r['mean_depth']:.2f}"
    params = "-" if r["stored_params"] is None else f"{r['stored_params']:,}"
    secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"
    macs = "-" if r["macs"] is None else f"{r['macs'] / 1e6:.2f}"
    flags = f"`{r['flags']}`" if r["flags"] else "(base)"
    lines.append(f"| {r['name']} | {r['question']} | {flags} | {_pct(r['top1'])} | "
                 f"{_pct(r['top5'])} | {delta} | {depth} | {params} | {secs} | {macs} |")
  return "\n".join(lines) + "\n"
