"""Typed configuration of a training/evaluation experiment: model + data + training.

The training binary (`official/puppet_cnn/train.py`) builds an `ExperimentConfig` from its
flags and saves the resolved config as `config.json` in `--model_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Tuple

from official.puppet_cnn.config_definitions import DTYPE_POLICIES
from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.data.datasets import DataConfig

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored")
MODES = ("train", "eval", "train_and_eval")


@dataclasses.dataclass
class TrainConfig:
  """How to train and evaluate.

  Attributes:
    model: 'puppet_cnn' (the paper's VGG-style puppet), 'puppet_resnet', 'puppet_alexnet', or
      a baseline name from `official.puppet_cnn.baselines.BASELINES`.
    epochs: training epochs (paper: 800).
    learning_rate: Adam learning rate (paper: Adam; the rate is not given; 1e-3 default).
    weight_decay: AdamW decoupled weight decay (0: plain Adam, the paper).
    seed: seed of weights, data subset, shuffling and dropout.
    jit_compile: XLA-compile the train/eval steps (True on every device; Keras's 'auto'
      would turn XLA off on CPU). A Puppet-CNN with execution='bucketed' cannot be compiled
      (ExperimentConfig refuses the pair); the CLI turns it off for that execution unless
      --jit_compile is given.
    dtype_policy: the Keras dtype policy of the run: 'float32' (default), 'mixed_bfloat16'
      or 'mixed_float16' (Keras mixed precision: float32 variables, 16-bit computations;
      'mixed_float16' trains with loss scaling). Puppet-CNN runs its puppet's convolutions
      in the 16-bit dtype and keeps the complexity, the puppeteer, batch norm and the head
      in float32 (`PuppetClassifier`); the baselines follow the policy as any Keras model.
      The puppeteer's own 16-bit option is `PuppetCNNConfig.generator_matmul_dtype`.
    mixed_precision: the older spelling of dtype_policy='mixed_float16' (kept for configs
      and command lines that use it).
    distribution_strategy: 'one_device', 'mirrored' (all local devices) or
      'multi_worker_mirrored' (workers from TF_CONFIG).
    steps_per_execution: train steps per compiled call.
    verbose: Keras progress output (1: progress bar, 2: one line per epoch, 0: silent).
    entropy_bucket_edges: edges (bits) of the complexity buckets of the accuracy report.
    depth_refinements: incremental-in-depth training (Puppet-CNN only; 0: off, the paper).
      k > 0 starts at depth_scale 2^-k (fewer, coarser steps) and doubles it every
      `refine_every_epochs` epochs until it is 1; each refinement starts the newly used
      batch-norm rows from the nearest trained ones (`PuppetClassifier.refine_depth`). The
      best checkpoint is chosen among epochs at full depth only.
    refine_every_epochs: epochs between refinements; 0: epochs // (depth_refinements + 1).
    precise_bn_images: 0 (default): validation and checkpoints use the batch-norm moving
      averages as training left them. N > 0 (Puppet-CNN only, one device): before each
      validation, the puppet's and G's moving statistics are re-estimated on N training
      images (shuffled, in training batches; `recalibrate_batch_norm(generator=True)`), so
      that validation, best-checkpoint selection and the checkpoints use statistics of the
      current weights (docs/generator_norm.md: at the default momentum 0.9 the moving
      averages made validation accuracy swing between epochs). Costs a training-mode
      forward pass over N images per epoch. Not in the paper.
  """
  model: str = "puppet_cnn"
  epochs: int = 800
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  seed: int = 0
  jit_compile: bool = True
  dtype_policy: str = "float32"
  mixed_precision: bool = False
  distribution_strategy: str = "one_device"
  steps_per_execution: int = 1
  verbose: int = 1
  entropy_bucket_edges: Tuple[float, ...] = (0.0, 5.0, 6.0, 6.5, 7.0, 7.5, 8.0)
  depth_refinements: int = 0
  refine_every_epochs: int = 0
  precise_bn_images: int = 0

  def __post_init__(self):
    from official.puppet_cnn import models  # pylint: disable=import-outside-toplevel
    if self.model not in models.MODEL_NAMES:
      raise ValueError(f"--model must be one of {models.MODEL_NAMES}, got {self.model!r}")
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if not self.learning_rate > 0:
      raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
    if self.distribution_strategy not in STRATEGIES:
      raise ValueError(f"--distribution_strategy must be one of {STRATEGIES}, "
                       f"got {self.distribution_strategy!r}")
    if self.dtype_policy not in DTYPE_POLICIES:
      raise ValueError(f"--dtype_policy must be one of {DTYPE_POLICIES}, got "
                       f"{self.dtype_policy!r}")
    if self.mixed_precision:
      if self.dtype_policy not in ("float32", "mixed_float16"):
        raise ValueError(f"--mixed_precision means --dtype_policy=mixed_float16; it cannot "
                         f"be combined with --dtype_policy={self.dtype_policy}")
      self.dtype_policy = "mixed_float16"
    if self.steps_per_execution < 1:
      raise ValueError("steps_per_execution must be >= 1")
    if self.depth_refinements < 0 or self.refine_every_epochs < 0:
      raise ValueError("--depth_refinements and --refine_every_epochs must be >= 0, got "
                       f"{self.depth_refinements} and {self.refine_every_epochs}")
    if self.depth_refinements:
      if not models.is_puppet(self.model):
        raise ValueError(f"--depth_refinements needs a Puppet-CNN model, got {self.model!r}")
      if self.depth_refinements * self.refinement_interval >= self.epochs:
        raise ValueError(
            f"--depth_refinements={self.depth_refinements} with a refinement every "
            f"{self.refinement_interval} epoch(s) needs more than "
            f"{self.depth_refinements * self.refinement_interval} epochs to end at full "
            f"depth; got --epochs={self.epochs}")
    if self.precise_bn_images < 0:
      raise ValueError(f"--precise_bn_images must be >= 0, got {self.precise_bn_images}")
    if self.precise_bn_images and not models.is_puppet(self.model):
      raise ValueError(f"--precise_bn_images re-estimates a Puppet-CNN's batch norms; "
                       f"--model={self.model!r} is not one")
    if self.precise_bn_images and self.distribution_strategy != "one_device":
      raise ValueError("--precise_bn_images runs eagerly on one device; got "
                       f"--distribution_strategy={self.distribution_strategy}")
    self.entropy_bucket_edges = tuple(float(e) for e in self.entropy_bucket_edges)
    if list(self.entropy_bucket_edges) != sorted(self.entropy_bucket_edges) or len(
        self.entropy_bucket_edges) < 2:
      raise ValueError("entropy_bucket_edges must be >= 2 increasing values")

  @property
  def refinement_interval(self) -> int:
    """Epochs between depth refinements (refine_every_epochs, or spread evenly)."""
    return self.refine_every_epochs or max(1, self.epochs // (self.depth_refinements + 1))

  def depth_scale_at(self, epoch: int) -> float:
    """The depth_scale of 0-based `epoch` under incremental-in-depth training (1.0 without)."""
    done = min(self.depth_refinements, max(epoch, 0) // self.refinement_interval)
    return 2.0 ** -(self.depth_refinements - done)


@dataclasses.dataclass
class ExperimentConfig:
  """A whole experiment.

  Attributes:
    train: TrainConfig.
    data: DataConfig (official/puppet_cnn/data/datasets.py).
    model: PuppetCNNConfig (used by the puppet_* models; baselines take num_classes and the
      input shape from the data).
  """
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: PuppetCNNConfig = dataclasses.field(default_factory=PuppetCNNConfig)

  def __post_init__(self):
    from official.puppet_cnn import models  # pylint: disable=import-outside-toplevel
    if (models.is_puppet(self.train.model) and self.model.execution == "bucketed"
        and self.train.jit_compile):
      raise ValueError("--execution=bucketed cannot be XLA-compiled (its groups of samples "
                       "have data-dependent sizes): set --nojit_compile "
                       "(TrainConfig.jit_compile=False), or use --execution=gathered, which "
                       "XLA compiles, with the same loss and gradients")
    if self.data.batch_grouping == "complexity_bin":
      if not models.is_puppet(self.train.model):
        raise ValueError(f"--batch_grouping=complexity_bin groups by a Puppet-CNN's complexity "
                         f"bins; --model={self.train.model!r} has none")
      if not self.model.complexity_bins:
        raise ValueError("--batch_grouping=complexity_bin needs --complexity_bins > 0 (with 0 "
                         "every image has its own H, so there are no bins to group by)")

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: Dict[str, Any]) -> "ExperimentConfig":
    """From `to_dict`'s output (a run's config.json): a saved model config lacking a field
    added since reads as what it meant then (`PuppetCNNConfig.from_saved_dict`)."""
    model = values.get("model")
    return cls(train=TrainConfig(**values.get("train", {})),
               data=DataConfig(**values.get("data", {})),
               model=PuppetCNNConfig.from_saved_dict(model) if model else PuppetCNNConfig())


def identity(config: ExperimentConfig) -> Dict[str, Any]:
  """The parts of a config that must not change when a run is resumed in the same model_dir.

  Everything except the number of epochs and the progress output.
  """
  values = config.to_dict()
  values["train"] = {k: v for k, v in values["train"].items() if k not in ("epochs", "verbose")}
  values["data"] = {k: v for k, v in values["data"].items() if k not in ("data_dir",)}
  return json.loads(json.dumps(values))
