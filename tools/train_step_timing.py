r"""Times one training step and one prediction of a PuppetClassifier, XLA on and off.

  python tools/train_step_timing.py --stage_channels=16,32,64 --max_depth=4 --batch_size=64
  python tools/train_step_timing.py --dtype_policies=float32,mixed_bfloat16

Reports the first call (tracing and compilation) and the median of `--repeats` later calls,
for `jit_compile` True and False in the same process, plus their ratio, for each Keras dtype
policy of `--dtype_policies` (`PuppetClassifier(dtype=)`; per-sample execution, the CLI's
default) and each policy's ratio to the first. Random uint8 images; the numbers depend only
on shapes. Used for the XLA-on-CPU note in README.md / docs/results.md.
"""

import time

import keras
import numpy as np
from absl import app
from absl import flags

from official.puppet_cnn import PuppetClassifier

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  flags.DEFINE_list("stage_channels", ["16", "32", "64"], "Puppet widths.")
  flags.DEFINE_integer("max_depth", 4, "Maximum depth per stage.")
  flags.DEFINE_integer("batch_size", 64, "Batch size.")
  flags.DEFINE_integer("repeats", 5, "Timed calls after the first.")
  flags.DEFINE_list("dtype_policies", ["float32"], "Keras dtype policies to time, each with "
                    "XLA on and off (float32, mixed_bfloat16, mixed_float16).")


def _time(fn, repeats):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, float(np.median(times)), float(np.max(times) - np.min(times))


def measure(channels, max_depth, batch, jit, repeats, dtype_policy="float32"):
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.uint8)
  y = rng.integers(0, 10, (batch,))
  model = PuppetClassifier(stage_channels=channels, max_depth=max_depth, dtype=dtype_policy)
  model.compile(optimizer="adam", jit_compile=jit,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  train = _time(lambda: model.train_on_batch(x, y), repeats)
  predict = _time(lambda: model.predict_on_batch(x), repeats)
  return train, predict


def main(argv):
  del argv
  channels = tuple(int(c) for c in FLAGS.stage_channels)
  rows = {}
  for policy in FLAGS.dtype_policies:
    for jit in (True, False):
      rows[policy, jit] = measure(channels, FLAGS.max_depth, FLAGS.batch_size, jit,
                                  FLAGS.repeats, policy)
      (t_first, t_med, t_spread), (p_first, p_med, p_spread) = rows[policy, jit]
      print(f"{policy}, jit_compile={jit}: train step first {t_first:.1f} s, median "
            f"{t_med:.3f} s (spread {t_spread:.3f}); predict first {p_first:.1f} s, median "
            f"{p_med:.3f} s (spread {p_spread:.3f})")
    print(f"{policy}: XLA / no-XLA: train step "
          f"{rows[policy, True][0][1] / rows[policy, False][0][1]:.2f}x, predict "
          f"{rows[policy, True][1][1] / rows[policy, False][1][1]:.2f}x "
          f"(channels {channels}, max_depth {FLAGS.max_depth}, batch {FLAGS.batch_size})")
  first = FLAGS.dtype_policies[0]
  for policy in FLAGS.dtype_policies[1:]:
    for jit in (True, False):
      print(f"{policy} / {first}, jit_compile={jit}: train step "
            f"{rows[policy, jit][0][1] / rows[first, jit][0][1]:.2f}x, predict "
            f"{rows[policy, jit][1][1] / rows[first, jit][1][1]:.2f}x")


if __name__ == "__main__":
  define_flags()
  app.run(main)
