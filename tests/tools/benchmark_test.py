"""tools/benchmark.py: the static twin, the helpers, and one tiny end-to-end run."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchmark  # noqa: E402  pylint: disable=wrong-import-position

from official.puppet_cnn import PuppetClassifier  # noqa: E402
from official.puppet_cnn import PuppetCNNConfig  # noqa: E402


def test_static_twin_has_the_puppets_layer_shapes():
  config = PuppetCNNConfig(stage_channels=(4, 8, 16), max_depth=4)
  twin = benchmark.build_static_twin(config, depth=3)
  convs = [l for l in twin.layers if l.name.startswith("stage")]
  puppet = PuppetClassifier(config)
  want = []
  for shape, _ in puppet.puppet.kernel_shapes(3):
    want.append(shape)
    want += [(shape[0], shape[1], shape[3], shape[3])] * 2  # depth 3: two repeated units
  assert [tuple(c.kernel.shape) for c in convs] == want
  assert all(not c.use_bias for c in convs)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
  assert twin(images).shape == (2, 10)
  # Conv multiply-adds by hand: 32x32, 16x16, 8x8 positions, 3x3 kernels.
  macs = 1024 * 9 * (3 * 4 + 2 * 16) + 256 * 9 * (4 * 8 + 2 * 64) + 64 * 9 * (8 * 16 + 2 * 256)
  assert benchmark._conv_macs(config.channels, config.pools, 3) == macs  # pylint: disable=protected-access
  # Kernel parameters: the twin's stored kernels, and the puppet's for one bin of depth 3
  # (the report's kernel-memory line uses the latter for the former).
  params = sum(c.kernel.shape.num_elements() for c in convs)
  assert params == 9 * (3 * 4 + 2 * 16 + 4 * 8 + 2 * 64 + 8 * 16 + 2 * 256)
  assert puppet.puppet.generated_kernel_params(3, 3) == params


def test_floor_bins_are_the_bins_above_the_floor():
  # 8 bins of 1 bit on [0, 8]: 4 lie above 4 bits, 5 above 3; 16 bins of 0.5 bit: 8 above 4.
  assert benchmark.floor_bins(8, 4.0) == 4 and benchmark.floor_bins(8, 3.0) == 5
  assert benchmark.floor_bins(16, 4.0) == 8 and benchmark.floor_bins(16, 4.5) == 7
  for bins, floor in ((8, 4.5), (8, 8.0), (8, -1.0)):
    with pytest.raises(ValueError, match="--bin_floor"):
      benchmark.floor_bins(bins, floor)
  spec = dict(model="puppet_light_floor", stage_channels=[4, 8], max_depth=3, bins=8,
              light_rank=2, light_state=8)
  model, _ = benchmark._build(spec, None)  # pylint: disable=protected-access
  assert (model.config.complexity_bins, model.config.complexity_bin_floor) == (4, 4.0)
  model, _ = benchmark._build(dict(spec, bins=16, bin_floor=3.0), None)  # pylint: disable=protected-access
  assert (model.config.complexity_bins, model.config.complexity_bin_floor) == (10, 3.0)
  assert model.config.narrow_kernels
  model, _ = benchmark._build(dict(spec, model="puppet_light_wide"), None)  # pylint: disable=protected-access
  assert (model.config.complexity_bins, model.config.complexity_bin_floor) == (4, 4.0)
  assert not model.config.narrow_kernels
  assert model.config.generator_loop and model.config.generator_remat
  # The gathered models: execution='gathered' with --bins (light: puppet_light's puppeteer).
  model, _ = benchmark._build(dict(spec, model="puppet_gathered"), None)  # pylint: disable=protected-access
  assert (model.config.execution, model.config.complexity_bins) == ("gathered", 8)
  assert model.config.state_channels is None
  model, _ = benchmark._build(dict(spec, model="puppet_light_gathered"), None)  # pylint: disable=protected-access
  assert (model.config.execution, model.config.complexity_bins) == ("gathered", 8)
  assert (model.config.state_channels, model.config.generator_rank) == (8, 2)


def test_skip_rules():
  for gathered in ("puppet_gathered", "puppet_light_gathered"):  # XLA-compatible
    for xla in (False, True):
      assert benchmark._skip_reason(gathered, xla, "infer") is None  # pylint: disable=protected-access
      assert benchmark._skip_reason(gathered, xla, "train") is None  # pylint: disable=protected-access
  assert "XLA" in benchmark._skip_reason("puppet_light", True, "train")  # pylint: disable=protected-access
  assert "XLA" in benchmark._skip_reason("puppet_bucketed", True, "infer")  # pylint: disable=protected-access
  assert "same as puppet_bucketed" in benchmark._skip_reason("puppet_cached", False, "train")  # pylint: disable=protected-access
  assert "same as puppet_bucketed" in benchmark._skip_reason("puppet_cached_per_bin", False,  # pylint: disable=protected-access
                                                             "train")
  assert "XLA" in benchmark._skip_reason("puppet_cached_per_bin", True, "infer")  # pylint: disable=protected-access
  assert benchmark._skip_reason("puppet_exact", True, "train") is None  # pylint: disable=protected-access
  assert "inference is puppet_bucketed's" in benchmark._skip_reason("puppet_remat", False,  # pylint: disable=protected-access
                                                                    "infer")
  assert "inference is puppet_bucketed's" in benchmark._skip_reason("puppet_loop", False,  # pylint: disable=protected-access
                                                                    "infer")
  assert "inference is puppet_light's" in benchmark._skip_reason("puppet_light_loop", False,  # pylint: disable=protected-access
                                                                 "infer")
  assert "XLA" in benchmark._skip_reason("puppet_loop", True, "train")  # pylint: disable=protected-access
  assert benchmark._skip_reason("puppet_light_loop", False, "train") is None  # pylint: disable=protected-access
  assert "inference is puppet_light's" in benchmark._skip_reason("puppet_light_floor", False,  # pylint: disable=protected-access
                                                                 "infer")
  assert benchmark._skip_reason("puppet_light_floor", False, "train") is None  # pylint: disable=protected-access
  assert benchmark._skip_reason("puppet_light_twopass", False, "train") is None  # pylint: disable=protected-access
  assert "XLA" in benchmark._skip_reason("puppet_remat", True, "train")  # pylint: disable=protected-access
  assert benchmark._skip_reason("puppet_remat", False, "train") is None  # pylint: disable=protected-access
  assert "XLA" in benchmark._skip_reason("puppet_light", True, "train")  # pylint: disable=protected-access
  assert "same as puppet_bucketed" in benchmark._skip_reason("puppet_cached16", False, "train")  # pylint: disable=protected-access
  assert "XLA" in benchmark._skip_reason("puppet_mixed_bf16", True, "infer")  # pylint: disable=protected-access
  assert benchmark._skip_reason("puppet_mixed_bf16", False, "infer") is None  # pylint: disable=protected-access
  assert "inference is puppet_mixed_bf16's" in benchmark._skip_reason(  # pylint: disable=protected-access
      "puppet_grouped_mixed_all_bf16", False, "infer")


def test_one_bin_batch_takes_the_most_common_bin():
  class Model:  # the two methods one_bin_batch uses, with bins known in advance
    def image_bins(self, pool):
      return np.array([int(p[0, 0, 0]) for p in pool])

    def bin_table(self):
      return None, None, np.array([4, 5, 6, 7])

  keys = [2, 1, 2, 3, 2, 1]
  pool = np.zeros((6, 2, 2, 3), np.uint8)
  pool[:, 0, 0, 0] = keys
  pool[:, 1, 1, 1] = np.arange(6)  # which image
  notes = {}
  batch = benchmark.one_bin_batch(Model(), pool, 5, notes)
  assert batch.shape == (5, 2, 2, 3)
  assert set(batch[:, 0, 0, 0].tolist()) == {2}
  assert batch[:, 1, 1, 1].tolist() == [0, 2, 4, 0, 2]  # bin 2's three images, repeated
  assert notes == dict(grouped_bin=2, grouped_depth=6, grouped_distinct=3, grouped_pool=6)
  for model in benchmark.GROUPED_MODELS:
    assert "inference is" in benchmark._skip_reason(model, False, "infer")  # pylint: disable=protected-access
    assert benchmark._skip_reason(model, False, "train") is None  # pylint: disable=protected-access
    assert "XLA" in benchmark._skip_reason(model, True, "train")  # pylint: disable=protected-access


def test_nearest8_caches_the_calibration_bins_in_int8_with_the_nearest_fallback():
  from official.puppet_cnn.modeling import complexity as cx  # pylint: disable=import-outside-toplevel
  calibration = np.zeros((3, 32, 32, 3), np.uint8)
  calibration[1] = (np.arange(1024).reshape(32, 32) % 4 * 60)[..., None]
  calibration[2] = np.random.default_rng(0).integers(0, 256, (32, 32, 3))
  spec = dict(model="puppet_nearest8", stage_channels=[4, 8], max_depth=3, bins=4,
              light_rank=2, light_state=8)
  model, notes = benchmark._build(spec, calibration)  # pylint: disable=protected-access
  h = np.asarray(cx.image_complexity(calibration), np.float64)
  want = sorted(set(np.minimum(np.floor(h * 4 / 8), 3).astype(int).tolist()))
  assert notes["cached_bins"] == want and len(want) >= 2 and notes["cache_dtype"] == "int8"
  info = model.kernel_cache_info()
  assert info["fallback"] == "nearest" and info["dtype"] == "int8"
  assert "same as puppet_bucketed" in benchmark._skip_reason("puppet_nearest8", False, "train")  # pylint: disable=protected-access
  _, notes = benchmark._build(dict(spec, nearest_bins=[0, 2]), calibration)  # pylint: disable=protected-access
  assert notes["cached_bins"] == [0, 2]


def test_tiny_run_writes_the_report(tmp_path):
  output = os.path.join(tmp_path, "benchmarks.md")
  raw = os.path.join(tmp_path, "raw.json")
  cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--sizes=small",
         "--stage_channels=4,8", "--max_depth=3", "--models=puppet_cached,static_twin,puppet_cached8,puppet_light_loop",
         "--xla=off", "--repeats=2", "--warmup=0", "--bins=4",
         "--no_b256=puppet_cached,puppet_cached8", "--parallel_jobs=2",
         f"--data_dir={tmp_path}/no_such_dir", f"--output={output}", f"--json_output={raw}"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = open(output).read()
  for needle in ("## Setup", "--stage_channels=4,8", "uniform random images", "2 CPUs"
                 if os.cpu_count() == 2 else "CPUs", "| puppet_cached | off |",
                 "| static_twin | off |", "Ratios against the static twin",
                 "inference throughput >= 0.8x twin", "training regenerates kernels",
                 "batch 256 not measured for: puppet_cached",
                 # The light puppeteer at this size: a state of 8 (the widest stage), rank 7.
                 "puppet_light (state_channels=8, generator_rank=7; not the paper's)",
                 "| puppet_cached8 | off |", "int8 kernel cache (puppet_cached8",
                 "traced once with a None batch dimension",
                 "jobs ran 2 at a time (--parallel_jobs)", "| puppet_light_loop | off |",
                 "tensor peak MB infer / train",
                 "a training option: inference is puppet_light's"):
    assert needle in report, needle
  results = json.load(open(raw))
  rows = {r["model"]: r for r in results["sections"][0]["rows"]}
  twin = rows["static_twin"]
  assert len(twin["infer"]["batch_64"]["times"]) == 2 and "batch_256" in twin["infer"]
  assert "batch_256" not in rows["puppet_cached"]["infer"]
  assert twin["train"]["hwm_train_kb"] > 0 and twin["train"]["rss_base_kb"] > 0
  assert rows["puppet_cached"]["infer"]["notes"]["cached_bins"]
  assert rows["puppet_light_loop"]["train"]["train_64"]["times"]
  # The allocator's tensor peak (tracked by oneDNN's CPU allocator, TensorFlow's default on
  # x86) holds at least every weight of the twin, and in training each weight's gradient and
  # momentum as well: 4 bytes each, counted here from the model rebuilt by hand.
  if platform.machine() == "x86_64" and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
    section = results["sections"][0]
    config = PuppetCNNConfig(num_classes=10, stage_channels=(4, 8), max_depth=3)
    model = benchmark.build_static_twin(config, section["twin_depth"])
    weights = 4 * sum(int(np.prod(w.shape)) for w in model.weights)
    trainable = 4 * sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert 1024 * twin["infer"]["tensor_peak_b64_kb"] >= weights
    assert 1024 * twin["train"]["tensor_peak_train_kb"] >= weights + 2 * trainable
    # and less than the process's own growth, which includes it
    assert twin["train"]["tensor_peak_train_kb"] < (twin["train"]["hwm_train_kb"]
                                                   - twin["train"]["rss_base_kb"])
  # The int8 cache holds the same bins in a quarter of the bytes plus its float32 scales (a
  # few output channels per kernel in this tiny puppet), and its rounding is measured.
  small, full = rows["puppet_cached8"]["infer"]["notes"], rows["puppet_cached"]["infer"]["notes"]
  assert small["cached_bins"] == full["cached_bins"] and small["cache_dtype"] == "int8"
  assert full["cache_mb"] / 4 < small["cache_mb"] < full["cache_mb"] / 2
  assert 0 < small["lossy_max_logit_error"] < 5e-2 * max(1.0, small["lossy_logit_scale"])
  assert 0 <= small["lossy_same_class"] <= 1
  assert "train" not in rows["puppet_cached8"]


def test_write_block_keeps_the_other_blocks(tmp_path):
  path = os.path.join(tmp_path, "report.md")
  benchmark.write_block(path, "speed", ["speed v1"])
  benchmark.write_block(path, "binning", ["binning v1"])
  with open(path, "a") as f:
    f.write("<!-- discussion:begin -->\nby hand\n<!-- discussion:end -->\n")
  benchmark.write_block(path, "speed", ["speed v2"])
  text = open(path).read()
  assert text.startswith(benchmark.TITLE)
  assert "speed v2" in text and "speed v1" not in text
  assert "binning v1" in text and "by hand" in text
  assert text.index("speed v2") < text.index("binning v1") < text.index("by hand")


def test_a_failed_jobs_error_is_its_exception_not_the_abort_after_it():
  # The end of a real job's output (docs/runs/benchmarks_modes.json): TensorFlow aborted
  # after XLA's out-of-memory error, so the last line says nothing of the cause.
  log = (
      '  File "execute.py", line 53, in quick_execute\n'
      "    tensors = pywrap_tfe.TFE_Py_Execute(ctx._handle, device_name, op_name,\n"
      "tensorflow.python.framework.errors_impl.ResourceExhaustedError: Out of memory while "
      "trying to allocate 93.03GiB. [Op:__inference_one_step_on_data_48823]\n"
      "double free or corruption (!prev)\n"
      "Fatal Python error: Aborted\n\n"
      "Current thread 0x00007fde0bfd1b80 (most recent call first):\n"
      "  Garbage-collecting\n  <no Python frame>\n")
  assert benchmark.error_line(log) == (
      "tensorflow.python.framework.errors_impl.ResourceExhaustedError: Out of memory while "
      "trying to allocate 93.03GiB. [Op:__inference_one_step_on_data_48823]")
  assert benchmark.error_line("ValueError: bad shape\nexit\n") == "ValueError: bad shape"
  assert benchmark.error_line("segfault somewhere\n") == "segfault somewhere"
  assert benchmark.error_line("") == "(no output)"
