"""Independent float64 NumPy references for the tests (loops, no TensorFlow)."""
import numpy as np


def conv2d_same(x, kernel):
  """x (H, W, Ci), kernel (K, K, Ci, Co) -> (H, W, Co), stride 1, zero 'same' padding."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[:2]
  out = np.zeros((h, w, kernel.shape[3]))
  for i in range(k):
    for j in range(k):
      out += xp[i:i + h, j:j + w] @ kernel[i, j].astype(np.float64)
  return out


def depthwise_same(x, kernel):
  """x (H, W, C), kernel (K, K, C, 1) -> (H, W, C)."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[:2]
  out = np.zeros(x.shape)
  for i in range(k):
    for j in range(k):
      out += xp[i:i + h, j:j + w] * kernel[i, j, :, 0]
  return out


def adaptive_avg_pool_1d(values, n_out):
  """Averages axis 0 of `values` into n_out windows [floor(iN/n), ceil((i+1)N/n))."""
  n_in = values.shape[0]
  out = []
  for i in range(n_out):
    start = (i * n_in) // n_out
    stop = -((-(i + 1) * n_in) // n_out)
    out.append(values[start:stop].mean(axis=0))
  return np.stack(out)


def max_pool_2x2_same(x):
  h, w, c = x.shape
  hp, wp = -(-h // 2), -(-w // 2)
  xp = np.full((hp * 2, wp * 2, c), -np.inf)
  xp[:h, :w] = x
  return xp.reshape(hp, 2, wp, 2, c).max(axis=(1, 3))
