"""The paper's data protocols (arXiv 2411.12876) as `DataConfig` presets.

| dataset      | train pool                      | val                 | test                  |
|--------------|---------------------------------|---------------------|-----------------------|
| cifar10      | 10,000 drawn class-balanced     | 20% of them (2,000) | official 10,000       |
| cifar100     | all 50,000                      | 20% (10,000)        | official 10,000       |
| image_folder | all images (mini-ImageNet 60k)  | 10% (stratified)    | 10% (stratified)      |

`paper_data_config(name, **overrides)` returns the preset with any field
replaced, e.g. `paper_data_config('cifar10', data_dir='/data', seed=1)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from official.puppet_cnn.data.datasets import DataConfig

PAPER_PROTOCOLS: Dict[str, Dict[str, Any]] = {
    # 10,000 class-balanced training images, 8,000 train / 2,000 val.
    "cifar10": dict(dataset="cifar10", train_subset=10000, val_fraction=0.2),
    # 40,000 train / 10,000 val (stratified).
    "cifar100": dict(dataset="cifar100", train_subset=None, val_fraction=0.2),
    # mini-ImageNet at 64x64, 8:1:1 train/val/test (stratified).
    "image_folder": dict(dataset="image_folder", train_subset=None,
                         image_size=64, val_fraction=0.1, test_fraction=0.1),
}


def paper_data_config(name: str, **overrides: Any) -> DataConfig:
  """The `DataConfig` of the paper's protocol for `name`, with `overrides`."""
  if name not in PAPER_PROTOCOLS:
    raise ValueError(f"no paper protocol for {name!r}; expected one of "
                     f"{sorted(PAPER_PROTOCOLS)}.")
  fields = {f.name for f in dataclasses.fields(DataConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown DataConfig fields: {unknown}.")
  return DataConfig(**{**PAPER_PROTOCOLS[name], **overrides})
