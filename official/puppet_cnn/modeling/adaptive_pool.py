"""Adaptive average pooling of the puppeteer state to a layer's kernel shape.

The paper (section 3.3) takes each layer's kernel (C_out, C_in, K, K) from the state
(C_out_max, C_in_max, K*K) "by average pooling and resizing". We use adaptive average
pooling (as PyTorch's AdaptiveAvgPool): output index i averages the input indices
[floor(i * N / n), ceil((i + 1) * N / n)). It is exact block averaging when n divides N, works
for any n <= N (3 input channels out of 512, or a 0.75x width), and is a fixed linear map.
For n > N (a puppet wider than the state, `PuppetClassifier.at_width(1.25)`) the same formula
resizes up: each output averages a window of 1 or 2 neighbouring inputs.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def windows(n_out: int, n_in: int):
  """int32 arrays (starts, stops): output i averages inputs [starts[i], stops[i])."""
  if n_out < 1 or n_in < 1:
    raise ValueError(f"adaptive pooling needs n_out >= 1 and n_in >= 1, got {n_out} from {n_in}")
  starts = np.array([(i * n_in) // n_out for i in range(n_out)], np.int32)
  stops = np.array([math.ceil((i + 1) * n_in / n_out) for i in range(n_out)], np.int32)
  return starts, stops


@functools.lru_cache(maxsize=None)
def pooling_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix whose row i averages input window i."""
  starts, stops = windows(n_out, n_in)
  matrix = np.zeros((n_out, n_in), np.float32)
  for i, (start, stop) in enumerate(zip(starts, stops)):
    matrix[i, start:stop] = 1.0 / (stop - start)
  return matrix
