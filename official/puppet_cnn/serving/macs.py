"""Multiply-adds (MACs) per image, computed analytically from layer shapes.

Counted: the multiply-adds of convolutions and dense layers (one MAC = one multiply and one
add; FLOPs are about 2x MACs). Not counted: biases, batch norm, activations, pooling, additions,
concatenations, the pixel normalization and, for Puppet-CNN, the input-complexity measurement
(an FFT and two histograms per image) and the adaptive pooling that cuts kernels out of the
puppeteer state (additions only). These are O(activations), small next to the convolutions.

Keras models (`keras_model_macs`): every Conv1D/2D/3D, DepthwiseConv, SeparableConv,
Conv2DTranspose and Dense layer, nested models included:

* conv (any, incl. depthwise): output positions x prod(kernel shape)
  (a Conv2D kernel is (kh, kw, C_in/groups, C_out); a depthwise one (kh, kw, C_in, multiplier))
* separable conv: output positions x (prod(depthwise kernel) + prod(pointwise kernel))
* transposed conv: input positions x prod(kernel shape)
* dense: positions it is applied at (prod of the input's middle dims) x C_in x C_out

Puppet-CNN (`puppet_cnn_macs`), for a sample of depth d (d may be fractional: a mean depth;
every count is linear in d):

* puppet: per stage at its feature-map size H_s x W_s ('same' 3x3 convs, a 2x2 'same' max
  pool after the stages that have one): the transition conv H_s W_s K^2 C_prev C_s plus
  (d - 1) x kernels_per_unit repeated convs H_s W_s K^2 C_s^2; then the head C_last x classes.
* puppeteer: each Euler step evaluates G once (midpoint 2x, RK4 4x). G is a g x g depthwise
  conv + a C x C pointwise conv (or (C x r)(r x C) with generator_rank r: 2 r instead of C
  below) on the state laid out as an image with C = C_max channels and
  C_in_max x K^2 positions: (C_in_max K^2) x C (g^2 + C) MACs. A sample of depth d needs
  n_stages x (1 + (d - 1) x kernels_per_unit) steps (one per kernel it uses). The state
  starts from the sample's complexity, so this is paid per image, not per batch.
  This implementation runs every step up to `max_depth` for every sample (finished samples
  are masked, not skipped): `puppeteer_executed` is that count.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import keras
import numpy as np

from official.puppet_cnn.config_definitions import EVALS_PER_STEP
from official.puppet_cnn.modeling import scaling



def _prod(values) -> int:
  return int(np.prod([int(v) for v in values], dtype=np.int64)) if len(values) else 1


def _leaf_layers(model) -> Iterator[keras.layers.Layer]:
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from _leaf_layers(layer)
    else:
      yield layer


def _shape(tensor, what: str) -> Tuple[int, ...]:
  shape = tuple(tensor.shape)[1:]
  if any(d is None for d in shape):
    raise ValueError(f"{what} has an unknown size {shape}; MACs need a fixed input size")
  return shape


def layer_macs(layer) -> int:
  """MACs per image of one layer of a built functional model (0 for layers without any)."""
  L = keras.layers  # pylint: disable=invalid-name
  if isinstance(layer, L.SeparableConv2D) or isinstance(layer, L.SeparableConv1D):
    out = _shape(layer.output, layer.name)
    return _prod(out[:-1]) * (_prod(layer.depthwise_kernel.shape)
                              + _prod(layer.pointwise_kernel.shape))
  if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
    inp = _shape(layer.input, layer.name)
    return _prod(inp[:-1]) * _prod(layer.kernel.shape)
  if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
    out = _shape(layer.output, layer.name)
    return _prod(out[:-1]) * _prod(layer.kernel.shape)
  if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
    out = _shape(layer.output, layer.name)
    return _prod(out[:-1]) * _prod(layer.kernel.shape)
  if isinstance(layer, L.Dense):
    inp = _shape(layer.input, layer.name)
    return _prod(inp[:-1]) * _prod(layer.kernel.shape)
  return 0


def keras_model_macs(model) -> int:
  """MACs per image of a functional/sequential Keras model (conv and dense layers)."""
  if not isinstance(model, keras.Model) or not hasattr(model, "layers"):
    raise TypeError(f"keras_model_macs needs a keras.Model, got {type(model).__name__}")
  return int(sum(layer_macs(layer) for layer in _leaf_layers(model)))


def _stage_sizes(height: int, width: int, pools) -> list:
  sizes = []
  for pool in pools:
    sizes.append((height, width))
    if pool:
      height, width = math.ceil(height / 2), math.ceil(width / 2)
  return sizes


def puppeteer_step_macs(state_channels: int, kernel_size: int = 3,
                        generator_kernel_size: int = 3, integrator: str = "euler",
                        generator_rank: int = 0) -> int:
  """MACs of one integration step of G on a (C, C, K^2) state.

  Per evaluation of G, at each of the C K^2 positions: the depthwise conv (G_k^2 C) and the
  pointwise conv (C^2, or 2 r C factorized with `generator_rank` r).
  """
  positions = state_channels * kernel_size ** 2
  pointwise = 2 * generator_rank if generator_rank else state_channels
  per_eval = positions * state_channels * (generator_kernel_size ** 2 + pointwise)
  return per_eval * EVALS_PER_STEP[integrator]


def puppet_cnn_macs(model, depth: float,
                    input_size: Optional[Tuple[int, int]] = None) -> Dict[str, float]:
  """MACs per image of a PuppetClassifier for a sample of the given depth.

  Args:
    model: a PuppetClassifier.
    depth: units per stage, in [1, max_depth] (or the scaled bound of the model's
      depth_scale); may be fractional (a mean).
    input_size: (H, W); default: the model's input shape.

  Returns:
    dict with `puppet` (generated convs), `head`, `puppeteer` (the G steps the sample's
    kernels need), `puppeteer_executed` (the steps this implementation runs: all of them up to
    max_depth) and `total` = puppet + head + puppeteer.
  """
  c = model.config
  # With scaled steps (config.depth_scale) a sample may run up to round(s * max_depth) units.
  bound = max(c.max_depth, scaling.scaled_max_depth(c.max_depth, c.depth_scale))
  if not 1 <= depth <= bound:
    raise ValueError(f"depth must be in [1, {bound}], got {depth}")
  height, width = input_size or c.input_shape[:2]
  if height is None or width is None:
    raise ValueError("the model takes any image size; pass input_size=(H, W)")
  stack, puppeteer = model.puppet, model.puppeteer
  kpu = stack.kernels_per_unit
  puppet = 0.0
  for ((k, _, c_in, c_out), _), (h, w), in zip(stack.kernel_shapes(c.input_shape[-1]),
                                               _stage_sizes(height, width, stack.pool_after)):
    puppet += h * w * k * k * c_in * c_out
    puppet += (depth - 1) * kpu * h * w * k * k * c_out * c_out
  head = stack.stage_channels[-1] * c.num_classes
  step = puppeteer_step_macs(puppeteer.state_channels, puppeteer.kernel_size,
                             puppeteer.generator_kernel_size, puppeteer.integrator,
                             puppeteer.generator_rank)
  n_stages = len(stack.stage_channels)
  needed = n_stages * (1 + (depth - 1) * kpu) * step
  executed = n_stages * (1 + (scaling.scaled_max_depth(c.max_depth, c.depth_scale) - 1)
                         * kpu) * step
  return {"puppet": puppet, "head": float(head), "puppeteer": float(needed),
          "puppeteer_executed": float(executed), "total": puppet + head + needed}
