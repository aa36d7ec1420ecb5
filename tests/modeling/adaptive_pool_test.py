"""Adaptive average pooling matrices against a windowed-mean loop."""
import numpy as np
import pytest

from official.puppet_cnn.modeling import adaptive_pool
from tests.modeling import reference


@pytest.mark.parametrize("n_out, n_in", [(1, 1), (1, 5), (3, 3), (2, 8), (3, 16), (5, 7),
                                         (6, 8)])
def test_pooling_matrix_matches_window_means(n_out, n_in):
  values = np.random.default_rng(0).normal(size=(n_in, 2))
  got = adaptive_pool.pooling_matrix(n_out, n_in) @ values
  np.testing.assert_allclose(got, reference.adaptive_avg_pool_1d(values, n_out), rtol=1e-6)


def test_exact_blocks_and_row_sums():
  m = adaptive_pool.pooling_matrix(2, 4)
  np.testing.assert_array_equal(m, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(adaptive_pool.pooling_matrix(3, 512).sum(axis=1), 1.0, rtol=1e-6)


def test_bad_sizes():
  with pytest.raises(ValueError, match="n_out >= 1"):
    adaptive_pool.pooling_matrix(0, 3)


def test_upsampling_windows_are_neighbours():
  # 5 outputs from 3 inputs (a puppet wider than the state): PyTorch's AdaptiveAvgPool1d
  # windows, worked out by hand: [0,1) [0,2) [1,2) [1,3) [2,3).
  starts, stops = adaptive_pool.windows(5, 3)
  np.testing.assert_array_equal(starts, [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(stops, [1, 2, 2, 3, 3])
  m = adaptive_pool.pooling_matrix(5, 3)
  np.testing.assert_allclose(m @ np.array([1.0, 3.0, 5.0]), [1, 2, 3, 4, 5])
