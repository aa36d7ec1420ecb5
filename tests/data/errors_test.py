"""Tests for official.puppet_cnn.data.errors."""

import pytest

from official.puppet_cnn.data.errors import DataError


def test_data_error_is_a_value_error():
  assert issubclass(DataError, ValueError)
  with pytest.raises(ValueError, match="/some/path"):
    raise DataError("no data under /some/path")
