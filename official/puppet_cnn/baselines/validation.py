"""Argument checks shared by the baseline builders."""

from __future__ import annotations

import numbers
from typing import Sequence, Tuple


def check_num_classes(num_classes) -> int:
  """Returns `num_classes` as int; raises ValueError unless it is an int >= 2."""
  if (isinstance(num_classes, bool)
      or not isinstance(num_classes, numbers.Integral)):
    raise ValueError(
        f"`num_classes` must be an integer >= 2, got {num_classes!r} "
        f"({type(num_classes).__name__}).")
  if num_classes < 2:
    raise ValueError(
        f"`num_classes` must be an integer >= 2, got {num_classes}.")
  return int(num_classes)


def check_input_shape(input_shape: Sequence[int],
                      min_spatial: int = 1,
                      model_name: str = "baseline") -> Tuple[int, int, int]:
  """Validates an (H, W, C) image shape (channels last, no batch axis)."""
  try:
    shape = tuple(input_shape)
  except TypeError as e:
    raise ValueError(
        f"`input_shape` must be a (height, width, channels) tuple, got "
        f"{input_shape!r}.") from e
  if len(shape) != 3 or not all(
      isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0
      for d in shape):
    raise ValueError(
        "`input_shape` must be (height, width, channels) with three positive "
        f"integers (channels last, no batch axis), got {input_shape!r}.")
  h, w, c = (int(d) for d in shape)
  if h < min_spatial or w < min_spatial:
    raise ValueError(
        f"{model_name} needs images of at least {min_spatial}x{min_spatial} "
        f"pixels, got input_shape={shape}.")
  return h, w, c
