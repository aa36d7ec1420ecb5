"""Input complexity H and the step, depth and initial value derived from it.

Paper (arXiv 2411.12876) eq. 8-11:
  H(X) = 0.5 * E(X) + 0.5 * E(Y(X))        E: Shannon entropy of a value histogram,
                                            Y: the Fourier magnitude map of X.
  dl = tanh(1 / H),  D = floor(1 / dl),     D clamped to [min_depth, max_depth].
  P0 = exp(1 - H^-2)                        the constant fill of the puppeteer's initial state.

H = 0 (a constant image) is the limit of these formulas, not an error: tanh(1/H) -> 1, so
dl = 1 and D = 1 (then clamped to min_depth), and P0 -> exp(-inf) = 0. The functions below
evaluate that limit without dividing by zero, so no NaN or exception can come out of them.

Everything here is written with `keras.ops` and runs on any Keras backend. H does not depend
on trainable weights and no gradient flows through it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import ComplexityConfig
from official.puppet_cnn.modeling import backend_ops

# ITU-R BT.601 luma weights.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# H below this is treated as 0 in 1/H and H^-2 (tanh(1/_H_EPS) == 1 exactly in float32).
_H_EPS = 1e-6


def _planes(images, config: ComplexityConfig):
  """(B, H, W, C) float images -> (B, P, H, W) planes whose entropies are averaged."""
  channels = images.shape[-1]
  if config.color_mode == "luminance" and channels == 3:
    luma = ops.tensordot(images, ops.convert_to_tensor(LUMA_WEIGHTS, images.dtype), axes=1)
    return luma[:, None, :, :]
  if config.color_mode == "luminance" and channels != 1:
    raise ValueError(
        f"color_mode='luminance' needs 1 or 3 channels, got {channels}; "
        "use color_mode='channel_mean' for other channel counts")
  return ops.transpose(images, (0, 3, 1, 2))


def histogram_entropy(levels, bins: int, log_base: float, exclude=None):
  """Entropy of the histogram of integer `levels` along the last axis.

  Args:
    levels: int32 tensor (..., N) of values in [0, bins).
    bins: number of histogram bins.
    log_base: logarithm base of the result.
    exclude: optional int32 tensor (...) of one level per row whose count is reduced by one
      (used to leave the Fourier DC term out of the histogram).
  Returns:
    float32 tensor (...) of entropies; 0 for a row whose values are all equal.
  """
  lead_shape = ops.shape(levels)[:-1]
  flat = ops.reshape(levels, (-1, ops.shape(levels)[-1]))
  counts = backend_ops.batched_histogram(flat, bins)
  if exclude is not None:
    counts = counts - ops.one_hot(ops.reshape(exclude, (-1,)), bins, dtype="float32")
  total = ops.maximum(ops.sum(counts, axis=-1, keepdims=True), 1.0)
  p = counts / total
  safe_p = ops.where(p > 0, p, ops.ones_like(p))
  entropy = -ops.sum(p * ops.log(safe_p), axis=-1) / ops.log(float(log_base))
  return ops.reshape(ops.maximum(entropy, 0.0), lead_shape)


def _quantize(values, bins: int, value_max: float):
  """Values in [0, value_max] -> int32 levels in [0, bins), uniform bins."""
  q = ops.floor(values * (bins / value_max))
  return ops.cast(ops.clip(q, 0, bins - 1), "int32")


def pixel_entropy(planes, config: ComplexityConfig):
  """Entropy of the pixel-value histogram of each (B, P, H, W) plane -> (B, P)."""
  b, p = ops.shape(planes)[0], ops.shape(planes)[1]
  levels = _quantize(planes, config.bins, config.pixel_max)
  return histogram_entropy(ops.reshape(levels, (b, p, -1)), config.bins, config.log_base)


def spectrum_entropy(planes, config: ComplexityConfig):
  """Entropy of the binned Fourier magnitude of each (B, P, H, W) plane -> (B, P).

  The DC term is left out of the histogram; the magnitude is divided by the pixel count so it
  is in pixel units, then log(1 + .) compressed and binned (`config.spectrum_scaling`).
  """
  b, p = ops.shape(planes)[0], ops.shape(planes)[1]
  height, width = planes.shape[-2], planes.shape[-1]
  real, imag = ops.fft2((planes, ops.zeros_like(planes)))
  n_pixels = ops.cast(ops.shape(planes)[-1] * ops.shape(planes)[-2], "float32")
  magnitude = ops.sqrt(real * real + imag * imag) / n_pixels
  logmag = ops.reshape(ops.log1p(magnitude), (b, p, -1))
  if (height or 0) * (width or 0) == 1:
    return ops.zeros((b, p), "float32")
  # Replace the DC entry (index 0) by its neighbour, so that min/max ignore it, then remove
  # one count of the neighbour's level from the histogram.
  logmag = ops.concatenate([logmag[..., 1:2], logmag[..., 1:]], axis=-1)
  if config.spectrum_scaling == "log_minmax":
    lo = ops.min(logmag, axis=-1, keepdims=True)
    hi = ops.max(logmag, axis=-1, keepdims=True)
    span = hi - lo
    flat = span <= config.spectrum_floor
    scaled = ops.where(flat, ops.zeros_like(logmag),
                       (logmag - lo) / ops.where(flat, ops.ones_like(span), span))
    levels = _quantize(scaled, config.bins, 1.0)
  else:  # log_fixed
    top = float(ops.convert_to_numpy(ops.log1p(ops.convert_to_tensor(config.pixel_max))))
    levels = _quantize(logmag, config.bins, top)
  return histogram_entropy(levels, config.bins, config.log_base, exclude=levels[..., 0])


def image_complexity(images, config: ComplexityConfig | None = None):
  """Per-sample complexity H (paper eq. 9) of raw images in [0, config.pixel_max].

  Args:
    images: (B, H, W, C) tensor, any real dtype, pixel values in [0, pixel_max].
    config: a ComplexityConfig (defaults: luminance, 256 bins, bits, log-minmax spectrum).
  Returns:
    float32 (B,) tensor, in [0, log_base(bins)].
  """
  config = config or ComplexityConfig()
  images = ops.cast(images, "float32")
  planes = _planes(images, config)
  e_pix = pixel_entropy(planes, config)
  e_spec = spectrum_entropy(planes, config)
  h = config.pixel_weight * e_pix + (1.0 - config.pixel_weight) * e_spec
  return ops.stop_gradient(ops.mean(h, axis=-1))


def step_size(h):
  """dl = tanh(1 / H) (paper eq. 10); H = 0 gives the limit dl = 1."""
  h = ops.cast(h, "float32")
  return ops.tanh(1.0 / ops.maximum(h, _H_EPS))


def depth_from_step(dl, min_depth: int, max_depth: int):
  """D = floor(1 / dl) (paper eq. 10), clamped to [min_depth, max_depth], as int32."""
  depth = ops.floor(1.0 / ops.maximum(dl, 1e-6))
  return ops.cast(ops.clip(depth, min_depth, max_depth), "int32")


def initial_fill(h):
  """P0 = exp(1 - H^-2) (paper eq. 11); H = 0 gives the limit 0."""
  h = ops.maximum(ops.cast(h, "float32"), _H_EPS)
  return ops.exp(1.0 - 1.0 / (h * h))


# ------------------------------------------------------------------------- binned complexity
# With `complexity_bins = n > 0` H is quantized to n equal bins on [h_min, h_max] (h_min:
# `PuppetCNNConfig.complexity_bin_floor`, 0 by default) and a sample uses its bin centre's H.
# The centre, step and depth of every bin are tabulated once in NumPy float32 (`bin_table`),
# and both execution modes look them up by bin index, so 'per_sample' and 'bucketed' use
# bit-identical values (the bucketed puppet needs each bin's depth as a Python int).


def _check_range(n_bins: int, h_max: float, h_min: float):
  if not 0.0 <= float(h_min) < float(h_max) or int(n_bins) < 1:
    raise ValueError(f"complexity bins need n_bins >= 1 and 0 <= h_min < h_max, got "
                     f"n_bins={n_bins}, h_min={h_min}, h_max={h_max}")


def complexity_bin(h, n_bins: int, h_max: float, h_min: float = 0.0):
  """Bin index in [0, n_bins) of H: floor((H - h_min) * n_bins / (h_max - h_min)), clamped
  (int32): an H below h_min falls in the first bin, one above h_max in the last."""
  _check_range(n_bins, h_max, h_min)
  h = ops.cast(h, "float32")
  if h_min:
    h = h - float(h_min)
  index = ops.floor(h * (float(n_bins) / (float(h_max) - float(h_min))))
  return ops.cast(ops.clip(index, 0, n_bins - 1), "int32")


def config_complexity_bin(h, config):
  """`complexity_bin` of H as a `PuppetCNNConfig` bins it: its `complexity_bins` on
  [complexity_bin_floor, complexity.max_complexity] (what `PuppetClassifier` and the
  grouped training batches of `data/complexity_batching.py` both use)."""
  return complexity_bin(h, config.complexity_bins, config.complexity.max_complexity,
                        h_min=config.complexity_bin_floor)


def bin_centres(n_bins: int, h_max: float, h_min: float = 0.0) -> np.ndarray:
  """(n_bins,) float32 bin centres h_min + (i + 0.5) * (h_max - h_min) / n_bins."""
  _check_range(n_bins, h_max, h_min)
  width = (float(h_max) - float(h_min)) / n_bins
  return (float(h_min) + (np.arange(n_bins, dtype=np.float64) + 0.5) * width).astype(np.float32)


def bin_table(n_bins: int, h_max: float, min_depth: int, max_depth: int, h_min: float = 0.0):
  """NumPy float32 (centre, step, depth) of each bin on [h_min, h_max], by eq. 10.

  Returns:
    centres (n_bins,) float32, steps (n_bins,) float32 = tanh(1 / centre), depths (n_bins,)
    int32 = clip(floor(1 / step), min_depth, max_depth).
  """
  centres = bin_centres(n_bins, h_max, h_min)
  with np.errstate(over="ignore", divide="ignore"):
    steps = np.tanh(np.float32(1.0) / np.maximum(centres, np.float32(_H_EPS))).astype(np.float32)
    depths = np.floor(np.float32(1.0) / np.maximum(steps, np.float32(1e-6)))
  depths = np.clip(depths, min_depth, max_depth).astype(np.int32)
  return centres, steps, depths


@keras.saving.register_keras_serializable(package="puppet_cnn")
class InputComplexity(keras.layers.Layer):
  """Keras layer form of `image_complexity`: images (B, H, W, C) -> H (B,)."""

  def __init__(self, config: ComplexityConfig | dict | None = None, **kwargs):
    super().__init__(**kwargs)
    if isinstance(config, dict):
      config = ComplexityConfig(**config)
    self.complexity_config = config or ComplexityConfig()

  def call(self, images):
    return image_complexity(images, self.complexity_config)

  def compute_output_shape(self, input_shape):
    return (input_shape[0],)

  def get_config(self):
    import dataclasses
    config = super().get_config()
    config["config"] = dataclasses.asdict(self.complexity_config)
    return config
