"""tools/train_step_timing.py: measures a first call and a positive median per mode."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))
import train_step_timing  # noqa: E402  pylint: disable=wrong-import-position


def test_measure_returns_first_median_and_spread():
  (t_first, t_med, t_spread), (p_first, p_med, _) = train_step_timing.measure(
      (4,), max_depth=2, batch=4, jit=False, repeats=2)
  assert t_first > 0 and t_med > 0 and t_spread >= 0 and p_first > 0 and p_med > 0
  assert t_first >= t_med * 0.5  # the first call includes tracing


def test_measure_takes_a_dtype_policy():
  (t_first, t_med, _), (_, p_med, _) = train_step_timing.measure(
      (4,), max_depth=2, batch=4, jit=False, repeats=1, dtype_policy="mixed_bfloat16")
  assert t_first > 0 and t_med > 0 and p_med > 0
