"""What the puppeteer holds in a training step, and what to do when a step does not fit.

A Puppet-CNN's training step keeps the puppeteer G's trajectory for the backward pass: one
state of shape (C, K*K, C) (C = `PuppetCNNConfig.state_width`, 512 for the paper's puppet:
the 2.36 M values of the paper's Table 5, 9.4 MB in float32) per evaluation of G (one per
Euler step, the paper's; two per midpoint step, four per RK4 step), up to `max_depth` steps
per stage, for every trajectory the step integrates. How many trajectories
that is depends on the execution:

- 'per_sample' with exact H (`complexity_bins=0`, the paper's literal model): one per image,
  so G's memory grows with the batch. Measured for the full puppet on TensorFlow 2.21 (CPU,
  no XLA): about 1 GB per image; XLA asked for one 93 GiB buffer at batch 64 on a 24 GB CPU
  and 99 GiB on a 139 GB H200 (docs/paper_protocol_memory.md).
- 'per_sample' with bins: still one per image (samples of one bin repeat its trajectory).
- 'gathered': one per bin, `complexity_bins` of them whatever the batch.
- 'bucketed': one per bin that occurs in the batch, at most min(batch, complexity_bins).

`trajectory_bytes` counts those states at the most steps (images below the maximum depth
keep fewer; the puppet's activations and G's working memory come on top), and
`out_of_memory_message` turns an out-of-memory error of `model.fit` into one that says which
settings hold what and which flags fit (`train_lib.train` raises it as
`TrainingOutOfMemoryError`).
"""

from __future__ import annotations

from typing import List

from official.puppet_cnn import models
from official.puppet_cnn.config_definitions import EVALS_PER_STEP, PuppetCNNConfig

# Where the measured numbers quoted in the advice come from.
MEMORY_DOC = "docs/paper_protocol_memory.md"


class TrainingOutOfMemoryError(RuntimeError):
  """A training step that does not fit in the device's memory, with what to change."""


def is_out_of_memory(error: BaseException) -> bool:
  """True for TensorFlow's ResourceExhaustedError and XLA's RESOURCE_EXHAUSTED (JAX)."""
  if type(error).__name__ == "ResourceExhaustedError":
    return True
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory while trying to allocate" in text


def generator_trajectories(model: PuppetCNNConfig, batch_size: int) -> int:
  """The most puppeteer trajectories one training step of `batch_size` images integrates."""
  if model.execution == "gathered":
    return int(model.complexity_bins)
  if model.execution == "bucketed":
    return min(int(batch_size), int(model.complexity_bins))
  return int(batch_size)


def state_bytes(model: PuppetCNNConfig, bytes_per_value: int = 4) -> int:
  """Bytes of one puppeteer state, (C, K*K, C) values."""
  c = model.state_width
  return c * model.kernel_size ** 2 * c * bytes_per_value


def trajectory_steps(model: PuppetCNNConfig) -> int:
  """The most integration steps of one trajectory: max_depth in each stage."""
  return len(model.channels) * model.max_depth


def states_per_step(model: PuppetCNNConfig) -> int:
  """State-sized tensors kept per step for the backward pass: one per evaluation of G (the
  reversible backward's count, `modeling/reversible_trajectory.py`; autodiff keeps more)."""
  return EVALS_PER_STEP[model.integrator]


def trajectory_bytes(model: PuppetCNNConfig, batch_size: int) -> int:
  """Bytes of the puppeteer states one training step keeps at most: trajectories x stages x
  max_depth steps x evaluations of G per step. G's share of the step, not the step's whole
  memory."""
  return (generator_trajectories(model, batch_size) * trajectory_steps(model)
          * states_per_step(model) * state_bytes(model))


def describe(model: PuppetCNNConfig, batch_size: int) -> str:
  """One line: the puppeteer states a training step of `batch_size` images keeps."""
  n = generator_trajectories(model, batch_size)
  per_step = states_per_step(model)
  kept = "a" if per_step == 1 else str(per_step)
  return (f"integrates up to {n} puppeteer trajectories of {trajectory_steps(model)} steps "
          f"and keeps {kept} {state_bytes(model) / 1e6:.1f} MB state-sized tensor"
          f"{'' if per_step == 1 else 's'} per step for the backward pass: up to "
          f"{trajectory_bytes(model, batch_size) / 1e9:.1f} GB, besides the puppet's "
          "activations")


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  return (lines[0] if lines else type(error).__name__)[:300]


def out_of_memory_message(model_name: str, model: PuppetCNNConfig, batch_size: int,
                          jit_compile: bool, error: BaseException) -> str:
  """What ran out, why a Puppet-CNN's training step is that large, and flags that fit."""
  xla = "--jit_compile" if jit_compile else "--nojit_compile"
  lines: List[str] = [f"training ran out of memory ({_first_line(error)})."]
  if not models.is_puppet(model_name):
    lines.append(f"This run: --model={model_name}, --batch_size={batch_size}, {xla}. "
                 "Try a smaller --batch_size.")
    return "\n".join(lines)
  bins = (f"--complexity_bins={model.complexity_bins}" if model.complexity_bins
          else "exact H (--complexity_bins=0)")
  lines.append(f"This run: --model={model_name}, --execution={model.execution}, {bins}, "
               f"--batch_size={batch_size}, {xla}, stage channels {list(model.channels)}, "
               f"--max_depth={model.max_depth}.")
  lines.append(f"Its training step {describe(model, batch_size)}.")
  options: List[str] = []
  if model.execution == "per_sample":
    lines.append("Per-sample execution integrates one trajectory per image: for the paper's "
                 "64-128-256-512 puppet about 1 GB per image without XLA, and more with it "
                 f"({MEMORY_DOC}).")
    options.append("--complexity_bins=16 --execution=bucketed --nojit_compile: G once per "
                   "complexity bin present in the batch, the same loss and gradients as "
                   "per-sample execution with those bins (configs/cifar10.flags; the full "
                   "puppet trained at batch 64 in under 5 GB on a CPU)")
    options.append("--complexity_bins=16 --execution=gathered: the same under XLA, G on all "
                   "16 bins (30 GB at batch 64 on an H200)")
  elif model.execution == "gathered":
    options.append("--execution=bucketed --nojit_compile: G only on the bins present in the "
                   "batch, without XLA's buffers")
  if model.execution == "bucketed" or model.complexity_bins:
    options.append("--batch_grouping=complexity_bin: one bin per training batch, so one "
                   "trajectory per step (not the paper's batches: docs/benchmarks_grouped.md)")
  if states_per_step(model) > 1:
    options.append(f"--integrator=euler: one evaluation of G per step instead of "
                   f"{states_per_step(model)} (the paper's integrator; a different model)")
  options.append("a smaller --batch_size")
  lines.append("Settings that need less memory:")
  lines.extend(f"  {option}" for option in options)
  return "\n".join(lines)
