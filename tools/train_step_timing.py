r"""Times one training step and one prediction of a PuppetClassifier, XLA on and off.

  python tools/train_step_timing.py --stage_channels=16,32,64 --max_depth=4 --batch_size=64

Reports the first call (tracing and compilation) and the median of `--repeats` later calls,
for `jit_compile` True and False in the same process, plus their ratio. Random uint8 images;
the numbers depend only on shapes. Used for the XLA-on-CPU note in README.md / docs/results.md.
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


def measure(channels, max_depth, batch, jit, repeats):
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.uint8)
  y = rng.integers(0, 10, (batch,))
  model = PuppetClassifier(stage_channels=channels, max_depth=max_depth)
  model.compile(optimizer="adam", jit_compile=jit,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  train = _time(lambda: model.train_on_batch(x, y), repeats)
  predict = _time(lambda: model.predict_on_batch(x), repeats)
  return train, predict


def main(argv):
  del argv
  channels = tuple(int(c) for c in FLAGS.stage_channels)
  rows = {}
  for jit in (True, False):
    rows[jit] = measure(channels, FLAGS.max_depth, FLAGS.batch_size, jit, FLAGS.repeats)
    (t_first, t_med, t_spread), (p_first, p_med, p_spread) = rows[jit]
    print(f"jit_compile={jit}: train step first {t_first:.1f} s, median {t_med:.3f} s "
          f"(spread {t_spread:.3f}); predict first {p_first:.1f} s, median {p_med:.3f} s "
          f"(spread {p_spread:.3f})")
  print(f"XLA / no-XLA: train step {rows[True][0][1] / rows[False][0][1]:.2f}x, "
        f"predict {rows[True][1][1] / rows[False][1][1]:.2f}x "
        f"(channels {channels}, max_depth {FLAGS.max_depth}, batch {FLAGS.batch_size})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
