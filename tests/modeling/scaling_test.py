"""Depth and width scaling rules against numbers worked out by hand."""
import numpy as np
import pytest

from official.puppet_cnn.modeling import scaling


def test_scale_one_changes_nothing():
  depth, step = np.array([1, 6, 8]), np.array([0.9, 0.16, 0.12], np.float32)
  d, s = scaling.scaled_depth_and_step(depth, step, 1.0, 8)
  assert d is depth and s is step
  assert scaling.scaled_max_depth(8, 1.0) == 8
  np.testing.assert_array_equal(scaling.unit_rows(1.0, 8), np.arange(7))


def test_scaled_depth_and_step_by_hand():
  depth = np.array([1, 3, 6, 8], np.int32)
  step = np.array([0.9, 0.3, 0.16, 0.12], np.float32)
  # s = 2: D' = 2D (bound round(16) = 16), dl' = dl / 2; D = 1 -> 2.
  d, s = scaling.scaled_depth_and_step(depth, step, 2.0, 8)
  np.testing.assert_array_equal(np.asarray(d), [2, 6, 12, 16])
  np.testing.assert_allclose(np.asarray(s), [0.45, 0.15, 0.08, 0.06], rtol=1e-6)
  # s = 0.5: round(0.5) = 1 (half up), 1.5 -> 2, 3, 4; dl' = dl * D / D'.
  d, s = scaling.scaled_depth_and_step(depth, step, 0.5, 8)
  np.testing.assert_array_equal(np.asarray(d), [1, 2, 3, 4])
  np.testing.assert_allclose(np.asarray(s), [0.9, 0.45, 0.32, 0.24], rtol=1e-6)
  # The horizon D' dl' equals D dl.
  np.testing.assert_allclose(np.asarray(d) * np.asarray(s), depth * step, rtol=1e-6)
  # The NumPy twin (bin tables) gives the same numbers.
  s2, d2 = scaling.scaled_bin_table(step, depth, 0.5, 8)
  np.testing.assert_array_equal(d2, [1, 2, 3, 4])
  np.testing.assert_allclose(s2, [0.9, 0.45, 0.32, 0.24], rtol=1e-6)


def test_unit_and_bn_rows_by_hand():
  # s = 0.5, max_depth 8: bound 4, 3 repeated units at times 2, 4, 6 of the trained 7.
  np.testing.assert_array_equal(scaling.unit_rows(0.5, 8), [1, 3, 5])
  # s = 2: 15 repeated units; unit j' sits at trained time (j'+1)/2 -> row round - 1.
  np.testing.assert_array_equal(scaling.unit_rows(2.0, 8),
                                [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6])
  # Residual blocks use two rows per unit.
  np.testing.assert_array_equal(scaling.bn_rows(0.5, 8, 2), [2, 3, 6, 7, 10, 11])
  assert scaling.scaled_max_depth(8, 0.25) == 2
  np.testing.assert_array_equal(scaling.unit_rows(0.25, 8), [3])


def test_refinement_sources_by_hand():
  # 0.25 -> 0.5 uses rows 1, 3, 5 after row 3: 1 and 5 start from 3.
  assert scaling.refinement_sources(0.25, 0.5, 8) == {1: 3, 5: 3}
  # 0.5 -> 1: rows 0, 2, 4, 6 are new; ties go to the earlier row.
  assert scaling.refinement_sources(0.5, 1.0, 8) == {0: 1, 2: 1, 4: 3, 6: 5}


def test_channels_and_resizing_by_hand():
  assert scaling.scaled_channels((64, 128, 256, 512), 0.25) == (16, 32, 64, 128)
  assert scaling.scaled_channels((8, 16, 32), 0.75) == (6, 12, 24)
  assert scaling.scaled_channels((2, 3), 0.1) == (1, 1)
  assert scaling.scaled_channels((8, 16), 1.25) == (10, 20)
  v = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
  np.testing.assert_allclose(np.asarray(scaling.resize_channels(v, 2)), [[0.5, 2.5]])
  np.testing.assert_allclose(np.asarray(scaling.resize_channels(v, 2, preserve_sum=True)),
                             [[1.0, 5.0]])
  # Along axis 0 (classifier kernel (C, classes)).
  w = np.arange(8, dtype=np.float32).reshape(4, 2)
  np.testing.assert_allclose(np.asarray(scaling.resize_channels(w, 2, axis=0,
                                                                preserve_sum=True)),
                             [[2, 4], [10, 12]])
  assert scaling.resize_channels(v, 4) is v


@pytest.mark.parametrize("scale", [0.3, 0.5, 1.0, 1.5, 3.0])
def test_rows_stay_in_range(scale):
  rows = scaling.bn_rows(scale, 5, 2)
  assert len(rows) == 2 * (scaling.scaled_max_depth(5, scale) - 1)
  assert rows.min(initial=0) >= 0 and rows.max(initial=0) < 2 * 4
