"""Name -> builder registry for the baselines compared against Puppet-CNN.

    model = build_baseline("resnet", num_classes=10)
    model = build_baseline("resnet", 10, widths=(4, 8), blocks_per_stage=(1, 1))

Every builder has the signature `builder(num_classes, input_shape, **kw)` and
returns a `keras.Model` mapping raw [0, 255] images of shape `input_shape` to
`num_classes` logits.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict

import keras

from official.puppet_cnn.baselines import alexnet
from official.puppet_cnn.baselines import mobilenet
from official.puppet_cnn.baselines import resnet
from official.puppet_cnn.baselines import squeezenet
from official.puppet_cnn.baselines import validation
from official.puppet_cnn.baselines import vgg

BASELINES: Dict[str, Callable[..., keras.Model]] = {
    "resnet": resnet.build_resnet,
    "vgg": vgg.build_vgg,
    "alexnet": alexnet.build_alexnet,
    "squeezenet": squeezenet.build_squeezenet,
    "mobilenet_v1": mobilenet.build_mobilenet_v1,
    "mobilenet_v2": mobilenet.build_mobilenet_v2,
    "mobilenet_v3_small": mobilenet.build_mobilenet_v3_small,
}


def build_baseline(name: str,
                   num_classes: int,
                   input_shape=(32, 32, 3),
                   **overrides) -> keras.Model:
  """Builds baseline `name` (a key of `BASELINES`).

  Args:
    name: one of `sorted(BASELINES)`.
    num_classes: number of output logits, an integer >= 2.
    input_shape: (height, width, channels) of the raw images.
    **overrides: extra keyword arguments for the builder, e.g. `widths` and
      `blocks_per_stage` for "resnet", `config`/`cfg` for "vgg", `alpha` for
      the MobileNets, `mean`/`std` for any model. Since `name` selects the
      baseline, the model's own name is overridden with `model_name=`.

  Raises:
    ValueError: unknown `name`, `num_classes` < 2 or a bad `input_shape`.
    TypeError: an override the builder does not accept.
  """
  valid = ", ".join(sorted(BASELINES))
  if not isinstance(name, str) or name not in BASELINES:
    raise ValueError(f"Unknown baseline {name!r}. Valid names: {valid}.")
  validation.check_num_classes(num_classes)
  validation.check_input_shape(input_shape, 1, name)
  builder = BASELINES[name]
  if "model_name" in overrides:
    overrides["name"] = overrides.pop("model_name")
  accepted = [p for p in inspect.signature(builder).parameters
              if p not in ("num_classes", "input_shape")]
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    accepted = ["model_name" if p == "name" else p for p in accepted]
    raise TypeError(
        f"Baseline {name!r} does not accept override(s) {unknown}; accepted: "
        f"{accepted}.")
  return builder(num_classes, input_shape=tuple(input_shape), **overrides)
