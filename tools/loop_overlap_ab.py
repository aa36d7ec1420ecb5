r"""A/B of how much bucketed inference's loops overlap their iterations, in one process.

    python tools/loop_overlap_ab.py --data_dir=../shared/data --dtype=int8

Bucketed inference (`bucketed_inference='loop'`) is a `while_loop` over the occupied bins,
each running a `while_loop` over its layers. TensorFlow lets a loop run up to 10 iterations
at once. The model uses: bins concurrently, layers one at a time
(`backend_ops.sequential_while_loop`). This tool traces the same model and cache three ways
and times them interleaved (A, B, C, then C, B, A, ...), so that the machine's noise falls
on all of them alike:

  shipped      bins concurrent, layers sequential (what the model does)
  all_serial   bins and layers sequential
  all_overlap  bins and layers concurrent (TensorFlow's default for both loops)

It prints each variant's `parallel_iterations` values (of every loop in its graph, the
generating fallback's included), the median time per call at batches 64 and 256 and each
variant's ratio to `shipped`, and checks that all three give the same logits. Memory is not measured here (one
process holds all three): see tools/memory_profile.py.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from official.puppet_cnn.modeling.puppet_classifier import CACHE_DTYPES  # noqa: E402

_DTYPE = flags.DEFINE_enum("dtype", "float32", list(CACHE_DTYPES), "Kernel-cache dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timed calls per variant and batch.")
_STAGE_CHANNELS = flags.DEFINE_list("stage_channels", ["64", "128", "256", "512"],
                                    "Puppet stage channels (default: the full puppet).")
_MAX_DEPTH = flags.DEFINE_integer("max_depth", 8, "Puppet max_depth.")
_BINS = flags.DEFINE_integer("bins", 16, "complexity_bins.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 (default $PUPPET_CNN_DATA_DIR); "
                                "random images when it does not load.")

VARIANTS = ("shipped", "all_serial", "all_overlap")


def run(dtype, repeats, stage_channels, max_depth, bins, data_dir):
  """Returns ({batch: {variant: median seconds}}, the largest logit difference, the image
  source, {variant: sorted parallel_iterations of its loops})."""
  import numpy as np
  import tensorflow as tf
  import benchmark
  from official.puppet_cnn import PuppetClassifier
  from official.puppet_cnn.modeling import backend_ops
  images, _, source, calibration = benchmark._load_images(data_dir)  # pylint: disable=protected-access
  size = images.shape[1]
  model = PuppetClassifier(num_classes=10, stage_channels=tuple(stage_channels),
                           max_depth=max_depth, complexity_bins=bins, execution="bucketed",
                           input_shape=(size, size, 3))
  model.build()
  model.cache_kernels(images=calibration, dtype=dtype)
  shipped_loop, keras_loop = backend_ops.sequential_while_loop, tf.while_loop
  patches = {
      "shipped": (shipped_loop, keras_loop),
      "all_serial": (shipped_loop,
                     lambda *a, **k: keras_loop(*a, **dict(k, parallel_iterations=1))),
      "all_overlap": (lambda c, b, v, maximum_iterations=None: keras_loop(
          c, b, v, maximum_iterations=maximum_iterations), keras_loop),
  }
  signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
  functions, overlap = {}, {}
  for name in VARIANTS:
    layer_loop, bin_loop = patches[name]
    backend_ops.sequential_while_loop, tf.while_loop = layer_loop, bin_loop
    try:
      fn = tf.function(lambda x: model(x, training=False), input_signature=signature)
      graph = fn.get_concrete_function().graph.as_graph_def()
      functions[name] = fn
    finally:
      backend_ops.sequential_while_loop, tf.while_loop = shipped_loop, keras_loop
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    overlap[name] = sorted({n.attr["parallel_iterations"].i for n in nodes
                            if n.op in ("While", "StatelessWhile")})
  out, logits = {}, {}
  for batch in (64, 256):
    x = tf.constant(images[:batch].astype(np.float32))
    for name in VARIANTS:
      logits[name] = functions[name](x).numpy()
    times = {name: [] for name in VARIANTS}
    for i in range(repeats):
      order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
      for name in order:
        start = time.perf_counter()
        functions[name](x).numpy()
        times[name].append(time.perf_counter() - start)
    out[batch] = {name: float(np.median(t)) for name, t in times.items()}
  error = max(float(np.abs(logits[n] - logits["shipped"]).max()) for n in VARIANTS)
  return out, error, source, overlap


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  medians, error, source, overlap = run(_DTYPE.value, _REPEATS.value,
                               [int(c) for c in _STAGE_CHANNELS.value], _MAX_DEPTH.value,
                               _BINS.value, _DATA_DIR.value or os.environ.get(
                                   "PUPPET_CNN_DATA_DIR"))
  print(f"images: {source}; cache {_DTYPE.value}; {_REPEATS.value} interleaved calls each")
  for name in VARIANTS:
    print(f"loops of {name}: parallel_iterations {overlap[name]}")
  for batch, row in medians.items():
    cells = ", ".join(f"{n} {row[n]:.3f} s ({row[n] / row['shipped']:.2f}x)" for n in VARIANTS)
    print(f"batch {batch}: {cells}")
  print(f"largest logit difference between variants: {error:.3g}")
  if error > 1e-3:
    sys.exit("error: the variants disagree")


if __name__ == "__main__":
  app.run(main)
