"""PuppetClassifier: image -> complexity -> puppeteer -> puppet -> pooling -> logits.

The model takes raw pixels in [0, pixel_max] (uint8 or float; 255 for 8-bit images) and does
everything else itself, so the same model serves raw images in a SavedModel:

1. H = InputComplexity(images)                  (paper eq. 8-9; no gradient)
2. dl = tanh(1/H), depth = clip(floor(1/dl))    (eq. 10; or a fixed depth)
3. kernels = PuppeteerODE(H, dl, depth)         (eq. 11-12; or one reference H for all)
4. features = DynamicConvStack((x/255 - mean)/std, kernels, depth)
5. logits = Dense(GlobalAveragePooling(features))

`model(images)` returns logits, so `compile`/`fit` work as for any classifier;
`model(images, return_details=True)` returns a dict with the logits, each sample's complexity,
step and depth. `parameter_breakdown()` splits what is stored from what is generated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import keras
import numpy as np
from keras import ops

from official.puppet_cnn.config_definitions import PuppetCNNConfig
from official.puppet_cnn.modeling import backend_ops
from official.puppet_cnn.modeling import complexity as complexity_lib
from official.puppet_cnn.modeling.dynamic_conv_stack import DynamicConvStack
from official.puppet_cnn.modeling.dynamic_conv_stack import KERNELS_PER_UNIT
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(PuppetCNNConfig)}


@keras.saving.register_keras_serializable(package="puppet_cnn")
class PuppetClassifier(keras.Model):
  """Puppet-CNN image classifier (arXiv 2411.12876).

  Args:
    config: a `PuppetCNNConfig` (or its dict form); None: the defaults.
    **kwargs: `PuppetCNNConfig` fields override the config (e.g. `num_classes=100`,
      `stage_channels=(16, 32)`); other keyword arguments go to `keras.Model` (e.g. `name`).
  """

  def __init__(self, config: PuppetCNNConfig | Dict[str, Any] | None = None, **kwargs):
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    if isinstance(config, dict):
      config = PuppetCNNConfig.from_dict(config)
    config = config or PuppetCNNConfig()
    if overrides:
      config = config.replace(**overrides)
    kwargs.setdefault("name", "puppet_cnn")
    super().__init__(**kwargs)
    self.config = config
    c = config
    self.complexity_layer = complexity_lib.InputComplexity(c.complexity, name="complexity")
    self.puppeteer = PuppeteerODE(
        stage_channels=c.channels, input_channels=c.input_shape[-1], max_depth=c.max_depth,
        kernels_per_unit=KERNELS_PER_UNIT[c.block], kernel_size=c.kernel_size,
        state_channels=c.state_width, init=c.init, init_rank=c.init_rank,
        integrator=c.integrator, kernel_scaling=c.kernel_scaling, momentum=c.bn_momentum,
        epsilon=c.bn_epsilon, name="puppeteer")
    self.puppet = DynamicConvStack(
        stage_channels=c.channels, block_type=c.block, max_depth=c.max_depth,
        pool_after=c.pools, kernel_size=c.kernel_size, momentum=c.bn_momentum,
        epsilon=c.bn_epsilon, name="puppet")
    self.head_dropout = keras.layers.Dropout(c.head_dropout, name="head_dropout")
    self.head = keras.layers.Dense(c.num_classes, name="head")

  # --------------------------------------------------------------------------- building
  def build(self, input_shape=None):
    c = self.config
    if input_shape is None:
      input_shape = (None,) + tuple(c.input_shape)
    self.puppeteer.build(None)
    self.puppet.build(input_shape)
    self.head.build((None, c.channels[-1]))
    self.built = True

  # --------------------------------------------------------------------------- forward
  def _validate(self, images):
    c = self.config
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(
          f"PuppetClassifier expects a batch of images (batch, height, width, "
          f"{c.input_shape[-1]}), got a tensor of rank {len(shape)} with shape {shape}")
    if shape[-1] != c.input_shape[-1]:
      raise ValueError(f"PuppetClassifier was configured for {c.input_shape[-1]} channels, "
                       f"got images with {shape[-1]} channels (shape {shape})")
    for axis, name in ((1, "height"), (2, "width")):
      want = c.input_shape[axis - 1]
      if want is not None and shape[axis] is not None and shape[axis] != want:
        raise ValueError(f"PuppetClassifier was configured for images of {name} {want}, got "
                         f"{shape[axis]} (shape {shape}); set input_shape with None to accept "
                         "any size")
    if shape[0] == 0:
      raise ValueError("PuppetClassifier got an empty batch (0 images)")
    dtype = keras.backend.standardize_dtype(images.dtype)
    if not (dtype.startswith("float") or dtype.startswith("int") or dtype.startswith("uint")
            or dtype.startswith("bfloat")):
      raise TypeError(f"PuppetClassifier expects numeric pixels (uint8 or float), got dtype "
                      f"{dtype}")
    return backend_ops.check_images(images, c.complexity.pixel_max)

  def call(self, images, training=None, return_details: bool = False):
    c = self.config
    images = self._validate(images)
    x = ops.cast(images, "float32")
    h = self.complexity_layer(x)
    dl = complexity_lib.step_size(h)
    if c.depth_adaptation:
      depth = complexity_lib.depth_from_step(dl, c.min_depth, c.max_depth)
    else:
      depth = ops.full(ops.shape(h), c.depth_when_fixed, "int32")
    if c.parameter_adaptation:
      h_kernels, dl_kernels = h, dl
    else:
      h_kernels = ops.full(ops.shape(h), c.reference_complexity, "float32")
      dl_kernels = complexity_lib.step_size(h_kernels)
    kernels = self.puppeteer(h_kernels, dl_kernels, depth, training=training)
    mean = ops.convert_to_tensor(np.asarray(c.pixel_mean, np.float32))
    std = ops.convert_to_tensor(np.asarray(c.pixel_std, np.float32))
    features = (x / c.complexity.pixel_max - mean) / std
    features = self.puppet(features, kernels, depth, training=training)
    pooled = ops.mean(features, axis=(1, 2))
    logits = self.head(self.head_dropout(pooled, training=training))
    if return_details:
      return {"logits": logits, "complexity": h, "step": dl, "depth": depth}
    return logits

  def predict_details(self, images, batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Eager inference in batches; numpy dict with logits, complexity, step and depth."""
    images = np.asarray(images)
    outputs = []
    for start in range(0, len(images), batch_size):
      result = self(images[start:start + batch_size], training=False, return_details=True)
      outputs.append({k: ops.convert_to_numpy(v) for k, v in result.items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  # --------------------------------------------------------------------------- reporting
  def parameter_breakdown(self) -> Dict[str, Any]:
    """Stored parameters by part, against the kernel parameters the puppeteer generates.

    Counts include batch-norm moving statistics (they are stored). `paper_param_size_mb` is
    G alone in float32 MB (10^6 bytes), the quantity of the paper's Table 5 "Param Size".
    """
    if not self.built:
      self.build()
    size = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # pylint: disable=unnecessary-lambda-assignment
    generator = size(self.puppeteer.generator_weights())
    initial_state = size(self.puppeteer.init_factors)
    puppet_bn = size(self.puppet.weights)
    head = size(self.head.weights)
    stored = generator + initial_state + puppet_bn + head
    c = self.config
    generated = {d: self.puppet.generated_kernel_params(c.input_shape[-1], d)
                 for d in range(c.min_depth, c.max_depth + 1)}
    return {
        "puppeteer_generator": generator,
        "puppeteer_initial_state": initial_state,
        "puppet_batch_norm": puppet_bn,
        "head": head,
        "total_stored": stored,
        "stored_bytes_float32": 4 * stored,
        "paper_param_size_mb": 4 * generator / 1e6,
        "generated_kernel_params_by_depth": generated,
    }

  @property
  def integrator(self) -> str:
    return self.puppeteer.integrator

  @integrator.setter
  def integrator(self, name: str) -> None:
    """Switches the puppeteer's integrator (no retraining needed; recompile `predict`)."""
    self.config = self.config.replace(integrator=name)
    self.puppeteer.integrator = self.config.integrator

  # --------------------------------------------------------------------------- config
  def get_config(self):
    return {"config": self.config.to_dict(), "name": self.name}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    return cls(config=PuppetCNNConfig.from_dict(config.pop("config")), **config)
