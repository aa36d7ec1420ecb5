"""sweeps: a trained run evaluated at other depths, integrators and widths."""
import numpy as np
import pytest

from official.puppet_cnn import sweeps
from tests import tiny_run

pytestmark = pytest.mark.skipif(tiny_run.DATA_DIR is None, reason="real CIFAR-10 not found")


@pytest.fixture
def run_dir(tiny_run_dir):
  return tiny_run_dir  # trained once per session (tests/conftest.py); only read here


def _accuracy(model, splits):
  """Top-1 from predict() and the labels, independently of evaluation.py."""
  correct = total = 0
  for images, labels in splits.test:
    logits = model.predict(np.asarray(images), verbose=0)
    correct += int((logits.argmax(axis=1) == np.asarray(labels)).sum())
    total += len(labels)
  return correct / total


def test_depth_sweep_rows_and_model_restored(run_dir, monkeypatch):
  logged = []  # absl's logger level depends on what ran before: record the calls instead
  monkeypatch.setattr(sweeps.logging, "info", lambda fmt, *args: logged.append(fmt % args))
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  x = np.asarray(next(iter(splits.test))[0])
  before = model.predict(x, verbose=0)
  rows = sweeps.depth_sweep(model, splits.test, splits.num_test, [0.5, 1.0],
                            ["euler", "rk4"], calibration=sweeps.calibration_images(splits, 32))
  assert [(r["integrator"], r["depth_scale"]) for r in rows] == [
      ("euler", 0.5), ("euler", 1.0), ("rk4", 0.5), ("rk4", 1.0)]
  assert rows[1]["top1"] == pytest.approx(_accuracy(model, splits))
  # Scale 0.5 of max_depth 3: at most round(1.5) = 2 layers per stage.
  assert rows[0]["mean_depth"] <= 2 < rows[1]["mean_depth"] + 1
  assert all(0 <= r["recalibrated_top1"] <= 1 for r in rows)
  assert model.integrator == "euler" and model.depth_scale == 1.0
  np.testing.assert_array_equal(model.predict(x, verbose=0), before)
  # One progress line per evaluation (4 settings, each as is and recalibrated), in order.
  progress = [m for m in logged if m.startswith("[depth sweep")]
  assert len(progress) == 8 and progress[0].startswith("[depth sweep 1/8] euler, depth scale 0.5")
  assert progress[-1].startswith("[depth sweep 8/8] rk4, depth scale 1, BN recalibrated")
  text = sweeps.depth_markdown(rows)
  assert f"| euler | 1x | {rows[1]['mean_depth']:.2f} | {100 * rows[1]['top1']:.2f}% |" in text


def test_width_sweep_rows_by_hand(run_dir):
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  rows = sweeps.width_sweep(model, splits.test, splits.num_test, [0.5, 1.0])
  assert rows[0]["stage_channels"] == [2, 4] and rows[1]["stage_channels"] == [4, 8]
  # Width 0.5 stores: G on the unchanged 8-channel state (8^2 + 15 * 8 = 184, + 2 x 8 x 5 =
  # 80 for its moving statistics per step: 6 rows instead of 1), the rank-16 initial state
  # (16 * (8 + 9 + 8) = 400), the puppet's BN (4 vectors x (2 + 2 rows x 2) + 4 x (4 + 2 x 4)
  # = 72) and the head (4 x 10 + 10 = 50).
  assert rows[0]["stored_params"] == 184 + 80 + 400 + 72 + 50
  assert rows[1]["top1"] == pytest.approx(_accuracy(model, splits))
  assert rows[0]["macs"] < rows[1]["macs"]
  assert "| 0.5x | 2-4 | 786 |" in sweeps.width_markdown(rows)


def test_load_run_errors(tmp_path, run_dir):
  with pytest.raises(FileNotFoundError, match="config.json"):
    sweeps.load_run(str(tmp_path))


def test_binning_sweep_depths_by_hand_and_exact_row(run_dir):
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  rows = sweeps.binning_sweep(model, splits.test, splits.num_test, [0, 2, 8])
  assert [(r["bins"], r["execution"]) for r in rows] == [
      (0, "per_sample"), (2, "bucketed"), (8, "bucketed")]
  assert rows[0]["agreement"] == 1.0
  assert rows[0]["top1"] == pytest.approx(_accuracy(model, splits))
  # Mean depth from each test image's H by eq. 10 on its bin centre, in float64.
  h = np.concatenate([model.predict_details(np.asarray(x))["complexity"]
                      for x, _ in splits.test]).astype(np.float64)
  for row in rows[1:]:
    n = row["bins"]
    centre = (np.clip(np.floor(h * n / 8), 0, n - 1) + 0.5) * 8 / n
    depth = np.clip(np.floor(1 / np.tanh(1 / centre)), 1, 3)
    assert row["mean_depth"] == pytest.approx(depth.mean())
    assert 0 <= row["agreement"] <= 1
  # The model is back at its trained binning (exact H), unchanged.
  assert model.complexity_bins == 0 and model.config.execution == "per_sample"
  assert "| exact H | per_sample |" in sweeps.binning_markdown(rows)


def test_binning_sweep_rows_per_cache_dtype(run_dir):
  # A float16 kernel cache gets its own row, at the same depth as the float32 cache's row,
  # with a prediction agreement between the two rows' that a rounding-only change allows.
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  rows = sweeps.binning_sweep(model, splits.test, splits.num_test, [0, 16],
                              cache_dtypes=["float32", "float16"])
  assert [(r["bins"], r["cache_dtype"]) for r in rows] == [
      (0, None), (16, "float32"), (16, "float16")]
  assert rows[2]["mean_depth"] == rows[1]["mean_depth"]
  assert abs(rows[2]["agreement"] - rows[1]["agreement"]) <= 0.1
  assert abs(rows[2]["top1"] - rows[1]["top1"]) <= 0.1
  assert "| 16 | bucketed, float16 kernel cache |" in sweeps.binning_markdown(rows)


def test_binning_sweep_nearest_rows_run_every_image_as_a_cached_bin(run_dir):
  # Only one bin cached (the most common among the test images): every image runs at that
  # bin's depth, and `moved` counts the images of the other bins; bins from H by hand.
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  h = np.concatenate([model.predict_details(np.asarray(x))["complexity"]
                      for x, _ in splits.test]).astype(np.float64)
  own = np.clip(np.floor(h * 8 / 8), 0, 7).astype(int)
  keep = int(np.bincount(own).argmax())
  rows = sweeps.binning_sweep(model, splits.test, splits.num_test, [8],
                              nearest_bins=lambda: (keep,))
  assert [(r["bins"], r.get("cache_bins")) for r in rows] == [(8, None), (8, "nearest")]
  row = rows[1]
  assert row["cached_bins"] == [keep]
  assert row["moved"] == pytest.approx(np.mean(own != keep)) and 0 < row["moved"] < 1
  centre = (keep + 0.5) * 8 / 8
  assert row["mean_depth"] == pytest.approx(np.clip(np.floor(1 / np.tanh(1 / centre)), 1, 3))
  assert (f"| 8 | bucketed, only bins {keep} cached, the nearest for the rest "
          f"({100 * row['moved']:.2f}% of the images) |") in sweeps.binning_markdown(rows)
  assert sweeps._bin_ranges([7, 8, 9, 12, 14, 15]) == "7-9, 12, 14-15"  # pylint: disable=protected-access
  assert model.complexity_bins == 0 and model._kernel_cache is None  # pylint: disable=protected-access


def test_generator_norm_sweep_rows_against_independent_accuracy(run_dir):
  """Three rows: as trained (the default 'batch_per_step' run), one set and per-step
  statistics re-estimated; each row's top-1 against predict() and the labels, each model
  rebuilt independently."""
  model, splits = sweeps.load_run(run_dir, tiny_run.DATA_DIR)
  images = sweeps.calibration_images(splits, 32)
  before = [w.numpy().copy() for w in model.weights]
  rows, per_step = sweeps.generator_norm_sweep(model, splits.test, splits.num_test, images, 16)
  assert [(r["generator_norm"], r["statistics"][:12]) for r in rows] == [
      ("batch_per_step", "as trained"), ("batch", "re-estimated"),
      ("batch_per_step", "re-estimated")]
  for w, old in zip(model.weights, before):  # the model itself is not changed
    np.testing.assert_array_equal(w.numpy(), old)
  assert rows[0]["top1"] == pytest.approx(_accuracy(model, splits))
  one_set = model.with_generator_norm("batch", images, 16)
  assert rows[1]["top1"] == pytest.approx(_accuracy(one_set, splits))
  assert per_step.config.generator_norm == "batch_per_step"
  assert rows[2]["top1"] == pytest.approx(_accuracy(per_step, splits))
  g = per_step.puppeteer
  assert tuple(g.moving_mean.shape) == (g.statistics_rows, g.state_channels)
  text = sweeps.generator_norm_markdown(rows)
  assert text.count("\n") == 5 and "| +0.00 pt |" in text.splitlines()[2]
  with pytest.raises(ValueError, match="needs calibration images"):
    sweeps.generator_norm_sweep(model, splits.test, splits.num_test, images[:0])
  state = model.with_generator_norm("batch_per_step")
  state.config = state.config.replace(generator_norm="state")
  with pytest.raises(ValueError, match="keeps no moving statistics"):
    sweeps.generator_norm_sweep(state, splits.test, splits.num_test, images)
