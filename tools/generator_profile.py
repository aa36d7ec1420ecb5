r"""Times the puppeteer's training pass (the ODE that generates every kernel) for config variants.

  python tools/generator_profile.py --data_dir=../shared/data
  python tools/generator_profile.py --variant=paper: \
      --variant=light:state_channels=256,generator_rank=32

What a bucketed training step spends on kernel generation: the puppeteer integrates one state
per occupied complexity bin (weighted by the bin's sample count, as `execution='bucketed'`
does), every generated kernel enters a loss (the sum of squares), and the gradient of that
loss is taken with respect to the puppeteer's weights. The puppet's convolutions are not run,
so the numbers isolate the generator. Each `--variant` (repeatable) is `name:field=value,...` of
`PuppetCNNConfig` fields over the base model (`--stage_channels`, `--max_depth`, `--bins`);
all variants run in one process, one after the other, and the table gives each one's median
[min, max] over `--repeats` timed calls after the first (tracing) call, and its ratio to the
first variant. The occupied bins are those of the first 64 CIFAR-10 test images (with
`--data_dir` or $PUPPET_CNN_DATA_DIR), else bins 9..14 with 64 samples spread over them.

Writes `--output` (docs/generator_profile.md), keeping its hand-written notes block.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

DEFAULT_VARIANTS = ("paper:", "rank64:generator_rank=64", "rank32:generator_rank=32",
                    "state256:state_channels=256",
                    "state256_rank32:state_channels=256,generator_rank=32")


def define_flags():
  """Defined only when run as a binary, so tests can import this module beside others."""
  global _VARIANTS, _STAGE_CHANNELS, _MAX_DEPTH, _BINS, _REPEATS, _DATA_DIR, _OUTPUT
  _VARIANTS = flags.DEFINE_multi_string(
      "variant", list(DEFAULT_VARIANTS), "name:field=value,... (PuppetCNNConfig fields); "
      "repeat the flag for several variants, the first is the reference.")
  _STAGE_CHANNELS = flags.DEFINE_list("stage_channels", ["64", "128", "256", "512"],
                                      "Puppet widths.")
  _MAX_DEPTH = flags.DEFINE_integer("max_depth", 8, "max_depth.")
  _BINS = flags.DEFINE_integer("bins", 16, "complexity_bins.")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the first.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 directory (default: "
                                  "$PUPPET_CNN_DATA_DIR); without it, fixed bins.")
  _OUTPUT = flags.DEFINE_string("output", "docs/generator_profile.md", "Markdown report.")


def parse_variant(text: str) -> Tuple[str, Dict[str, object]]:
  """'name:a=1,b=x' -> ('name', {'a': 1, 'b': 'x'}) (ints where the value is an int)."""
  name, _, rest = text.partition(":")
  if not name:
    raise ValueError(f"a variant needs a name before ':', got {text!r}")
  fields: Dict[str, object] = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"variant {name!r}: expected field=value, got {item!r}")
    fields[key] = int(value) if value.lstrip("-").isdigit() else value
  return name, fields


def occupied_bins(bins: int, data_dir) -> Tuple[List[int], List[int], str]:
  """(bin ids, sample counts, where they come from) of a batch of 64 images."""
  import numpy as np
  from official.puppet_cnn import PuppetCNNConfig
  from official.puppet_cnn.modeling import complexity as cx
  data_dir = data_dir or os.environ.get("PUPPET_CNN_DATA_DIR")
  if data_dir:
    from official.puppet_cnn.data.cifar import load_cifar
    _, _, x_test, _ = load_cifar("cifar10", data_dir)
    config = PuppetCNNConfig().complexity
    h = cx.image_complexity(np.array(x_test[:64]), config)
    ids = np.asarray(cx.complexity_bin(h, bins, config.max_complexity))
    values, counts = np.unique(ids, return_counts=True)
    return ([int(v) for v in values], [int(c) for c in counts],
            f"the bins of CIFAR-10 test images 0..63 ({data_dir})")
  values = [min(b, bins - 1) for b in range(9, 15)]
  values = sorted(set(values))
  counts = [64 // len(values)] * len(values)
  return values, counts, "bins 9..14 (no --data_dir), 64 samples spread evenly"


def time_generator(config, bin_ids, counts, repeats: int) -> Dict[str, object]:
  """First-call and timed seconds of one forward + backward pass of the puppeteer."""
  import numpy as np
  import tensorflow as tf
  from official.puppet_cnn import PuppetClassifier
  model = PuppetClassifier(config)
  model.build()
  centres, steps, depths = model.bin_table()
  h = tf.constant(centres[bin_ids], tf.float32)
  dl = tf.constant(steps[bin_ids], tf.float32)
  depth = tf.constant(depths[bin_ids], tf.int32)
  weight = tf.constant(counts, tf.float32)
  puppeteer = model.puppeteer
  units = model._puppeteer_scaling()["units"]  # pylint: disable=protected-access

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      kernels = puppeteer(h, dl, depth, training=True, state_weight=weight, depth_sorted=True,
                          stack_repeated=False, units=units)
      loss = tf.add_n([tf.reduce_sum(tf.square(t)) for t, _ in kernels]
                      + [tf.reduce_sum(tf.square(r)) for _, rep in kernels for r in rep])
    grads = tape.gradient(loss, puppeteer.trainable_weights)
    return loss, grads

  def call():
    loss, grads = step()
    for g in grads:
      if g is not None:
        g.numpy()
    return float(loss)

  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  params = sum(int(np.prod(w.shape)) for w in puppeteer.generator_weights())
  return {"first_s": first, "times": times, "median_s": float(np.median(times)),
          "generator_params": params, "state_channels": puppeteer.state_channels,
          "generator_rank": puppeteer.generator_rank,
          "depths": [int(depths[b]) for b in bin_ids]}


def report_lines(header: Dict[str, object], rows: List[Dict[str, object]]) -> List[str]:
  base = rows[0]["median_s"] if rows else None
  lines = ["# Benchmarks: kernel generation in training", "",
           "Written by `tools/generator_profile.py`.", "",
           f"- Command: `{header['command']}`",
           f"- Date: {header['machine']}",
           f"- Puppet: stage channels {header['stage_channels']}, max depth "
           f"{header['max_depth']}, {header['bins']} complexity bins",
           f"- Occupied bins: {header['bin_ids']} with {header['counts']} samples "
           f"({header['source']}); their depths {rows[0]['depths'] if rows else '-'}",
           "- Measured: one forward and backward pass of the puppeteer (every kernel of every "
           "occupied bin, gradient of the sum of their squares with respect to its weights), "
           f"as a `tf.function` without XLA; median [min, max] of {header['repeats']} calls "
           "after the first (tracing) call; all variants in one process, one after another", "",
           "| variant | fields | state | rank | G params | first call | fwd + bwd | vs first row |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fields = ", ".join(f"{k}={v}" for k, v in r["fields"].items()) or "(defaults)"
    lines.append(
        f"| {r['name']} | {fields} | {r['state_channels']} | {r['generator_rank'] or 'full'} | "
        f"{r['generator_params']:,} | {r['first_s']:.1f} s | {r['median_s']:.2f} s "
        f"[{min(r['times']):.2f}, {max(r['times']):.2f}] | {r['median_s'] / base:.2f}x |")
  return lines + [""]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  variants = [parse_variant(v) for v in _VARIANTS.value]
  if not variants:
    raise app.UsageError("no --variant given")
  from official.puppet_cnn import PuppetCNNConfig
  from official.puppet_cnn import reports
  channels = tuple(int(c) for c in _STAGE_CHANNELS.value)
  base = dict(stage_channels=channels, max_depth=_MAX_DEPTH.value,
              complexity_bins=_BINS.value, execution="bucketed")
  configs = [(name, fields, PuppetCNNConfig(**dict(base, **fields))) for name, fields in variants]
  bin_ids, counts, source = occupied_bins(_BINS.value, _DATA_DIR.value)
  rows = []
  for i, (name, fields, config) in enumerate(configs):
    print(f"[{i + 1}/{len(configs)}] {name} {fields} ...", flush=True)
    result = time_generator(config, bin_ids, counts, _REPEATS.value)
    print(f"    fwd+bwd median {result['median_s']:.2f} s (first call {result['first_s']:.1f} s)",
          flush=True)
    rows.append(dict(result, name=name, fields=fields))
  header = dict(command=reports.command_line(), machine=reports.machine_line(),
                stage_channels=channels, max_depth=_MAX_DEPTH.value, bins=_BINS.value,
                bin_ids=bin_ids, counts=counts, source=source, repeats=_REPEATS.value)
  reports.write(_OUTPUT.value, "\n".join(report_lines(header, rows)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
