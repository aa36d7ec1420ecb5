"""Deterministic, class-balanced subsets and stratified splits.

All functions work on integer label arrays and return *indices* into them, so
the same indices can be applied to the images. Every result is sorted
ascending and depends only on the labels and the seed: randomness comes from
`np.random.default_rng(seed)` (PCG64) and only its raw uniform doubles are used
(`rng.random`, then a stable argsort), so the selection is the same on every
machine and numpy version that keeps the PCG64 stream.

The paper's protocols (arXiv 2411.12876), built from these pieces by
`datasets.build_datasets`:

  * CIFAR-10: `class_balanced_subset(y_train, 10000, seed)` (1,000 per class),
    then `train_val_split(..., val_fraction=0.2)` -> 8,000 train / 2,000 val
    (stratified, 800 / 200 per class); test on all 10,000 test images.
  * CIFAR-100: `train_val_split(y_train, 0.2, seed)` -> 40,000 / 10,000
    (stratified); test on the 10,000 test images.
  * mini-ImageNet (an image folder): `train_val_test_split(labels, 0.1, 0.1,
    seed)` -> 8:1:1, stratified.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from official.puppet_cnn.data.errors import DataError


def _as_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
  return labels.astype(np.int64)


def _pool(labels: np.ndarray, indices) -> np.ndarray:
  if indices is None:
    return np.arange(labels.shape[0], dtype=np.int64)
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= labels.shape[0]):
    raise ValueError(
        f"indices must lie in [0, {labels.shape[0]}), got "
        f"[{indices.min()}, {indices.max()}].")
  if np.unique(indices).size != indices.size:
    raise ValueError("indices must not contain duplicates.")
  return indices


def _shuffled(rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
  """A seeded permutation of `values` that uses only `rng.random`."""
  return values[np.argsort(rng.random(values.shape[0]), kind="stable")]


def _largest_remainder(counts: np.ndarray, fraction: float) -> np.ndarray:
  """Per-class shares of `fraction`, summing to round(fraction * total).

  Each class gets floor(count * fraction); the leftover units go to the
  classes with the largest fractional parts (ties: lowest class first).
  """
  exact = counts * fraction
  share = np.floor(exact + 1e-9).astype(np.int64)
  target = int(np.floor(counts.sum() * fraction + 0.5 + 1e-9))
  leftover = target - int(share.sum())
  if leftover > 0:
    order = np.argsort(-(exact - share), kind="stable")
    share[order[:leftover]] += 1
  return np.minimum(share, counts)


def class_balanced_subset(labels: Sequence[int],
                          num_samples: int,
                          seed: int,
                          num_classes: Optional[int] = None) -> np.ndarray:
  """Draws `num_samples` indices with (near-)equal counts per class.

  Each class gets `num_samples // num_classes` examples, chosen uniformly at
  random without replacement; when `num_samples` is not divisible, the
  remaining `num_samples % num_classes` examples go one each to the classes
  with the lowest label values.

  Args:
    labels: 1-D integer labels of the whole pool.
    num_samples: total number of indices to draw.
    seed: seed for `np.random.default_rng`.
    num_classes: if given, classes are 0..num_classes-1 and every one must be
      present; otherwise the classes are the distinct values in `labels`.

  Returns:
    Sorted int64 indices into `labels`, without duplicates.

  Raises:
    ValueError: `num_samples` is not positive.
    DataError: the labels are empty or a class has too few examples.
  """
  labels = _as_labels(labels)
  if int(num_samples) != num_samples or num_samples <= 0:
    raise ValueError(f"num_samples must be a positive int, got {num_samples}.")
  if labels.size == 0:
    raise DataError("cannot draw a class-balanced subset from empty labels.")
  if num_classes is None:
    classes = np.unique(labels)
  else:
    classes = np.arange(num_classes)
  per_class = np.full(classes.shape, num_samples // classes.size, np.int64)
  per_class[:num_samples % classes.size] += 1
  rng = np.random.default_rng(seed)
  chosen = []
  for cls, k in zip(classes, per_class):
    members = np.flatnonzero(labels == cls)
    if members.size < k:
      raise DataError(
          f"class {cls} has {members.size} examples; a class-balanced subset "
          f"of {num_samples} over {classes.size} classes needs {k}.")
    chosen.append(_shuffled(rng, members)[:k])
  return np.sort(np.concatenate(chosen))


def _split(labels, indices, fractions: Sequence[float], seed: int,
           stratified: bool) -> List[np.ndarray]:
  """Splits a pool into len(fractions) held-out parts plus the remainder.

  Returns [remainder, part_0, part_1, ...], each sorted.
  """
  labels = _as_labels(labels)
  pool = _pool(labels, indices)
  for f in fractions:
    if not 0.0 <= f < 1.0:
      raise ValueError(f"split fractions must lie in [0, 1), got {f}.")
  if sum(fractions) >= 1.0:
    raise ValueError(f"split fractions {tuple(fractions)} leave nothing for "
                     "training (they must sum to less than 1).")
  if pool.size == 0:
    raise DataError("cannot split an empty set of examples.")
  rng = np.random.default_rng(seed)
  if stratified:
    pool_labels = labels[pool]
    classes = np.unique(pool_labels)
    groups = [pool[pool_labels == c] for c in classes]
  else:
    groups = [pool]
  counts = np.array([g.size for g in groups], np.int64)
  shares = [_largest_remainder(counts, f) for f in fractions]
  parts = [[] for _ in range(len(fractions) + 1)]
  for i, group in enumerate(groups):
    perm = _shuffled(rng, group)
    start = 0
    for j, share in enumerate(shares):
      parts[j + 1].append(perm[start:start + share[i]])
      start += share[i]
    parts[0].append(perm[start:])
  return [np.sort(np.concatenate(p)) for p in parts]


def train_val_split(labels: Sequence[int],
                    val_fraction: float,
                    seed: int,
                    stratified: bool = True,
                    indices: Optional[Sequence[int]] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Splits a pool of examples into train and validation indices.

  With `stratified=True` every class contributes the same fraction (exact when
  `count * val_fraction` is an integer, otherwise largest-remainder rounding
  so that the total validation size is `round(val_fraction * pool_size)`).

  Args:
    labels: 1-D integer labels of the whole dataset.
    val_fraction: fraction in [0, 1) of the pool held out for validation.
    seed: seed for `np.random.default_rng`.
    stratified: keep the class proportions in both parts.
    indices: the pool to split, as indices into `labels` (for example a
      `class_balanced_subset`); default: all of `labels`.

  Returns:
    `(train_indices, val_indices)`: sorted, disjoint int64 indices into
    `labels` whose union is the pool.
  """
  train, val = _split(labels, indices, [val_fraction], seed, stratified)
  return train, val


def train_val_test_split(labels: Sequence[int],
                         val_fraction: float,
                         test_fraction: float,
                         seed: int,
                         stratified: bool = True,
                         indices: Optional[Sequence[int]] = None
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Three-way version of `train_val_split` (e.g. 8:1:1 with 0.1, 0.1).

  Returns:
    `(train_indices, val_indices, test_indices)`: sorted, disjoint int64
    indices into `labels` whose union is the pool.
  """
  train, val, test = _split(labels, indices, [val_fraction, test_fraction],
                            seed, stratified)
  return train, val, test
