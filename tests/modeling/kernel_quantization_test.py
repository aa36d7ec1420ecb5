"""Weight-only int8 kernels against a float64 loop over the output channels."""
import numpy as np
import pytest

from official.puppet_cnn.modeling import kernel_quantization as kq


def _reference(kernel):
  """float64, one output channel at a time: (q, scale) of symmetric int8 quantization."""
  kernel = np.asarray(kernel, np.float64)
  q = np.zeros(kernel.shape, np.int64)
  scale = np.zeros(kernel.shape[:-4] + kernel.shape[-1:])
  for index in np.ndindex(*kernel.shape[:-4]):
    for o in range(kernel.shape[-1]):
      w = kernel[index][..., o]
      peak = max(abs(float(v)) for v in w.ravel())
      s = peak / 127 if peak > 0 else 1.0
      scale[index + (o,)] = s
      for position in np.ndindex(*w.shape):
        q[index + position + (o,)] = min(127, max(-127, int(np.rint(w[position] / s))))
  return q, scale


def test_kernel_matches_the_float64_reference_and_rounds_within_half_a_step():
  rng = np.random.default_rng(0)
  kernel = (rng.standard_normal((3, 3, 5, 4)) * [0.01, 1.0, 30.0, 1e-6]).astype(np.float32)
  kernel[:, :, :, 2] = 0.0                   # an all-zero channel: scale 1, q 0
  q, scale = kq.quantize_per_output_channel(kernel)
  want_q, want_scale = _reference(kernel)
  assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (4,)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  assert np.abs(q.astype(np.int64) - want_q).max() <= 1  # float32 vs float64 at a .5 tie
  assert np.mean(q == want_q) > 0.999
  assert scale[2] == 1.0 and not q[..., 2].any()
  # Each channel's largest |w| maps to +-127, and dequantizing is within half a step.
  assert (np.abs(q).max(axis=(0, 1, 2)) == [127, 127, 0, 127]).all()
  back = np.asarray(kq.dequantize(q, scale))
  assert back.dtype == np.float32
  assert (np.abs(back - kernel) <= want_scale / 2 * (1 + 1e-5)).all()


def test_table_gets_a_scale_per_kernel_and_channel():
  rng = np.random.default_rng(1)
  table = rng.standard_normal((3, 3, 3, 2, 6)).astype(np.float32)
  table[1] *= 100.0                          # a much larger kernel must not share scales
  q, scale = kq.quantize_per_output_channel(table)
  want_q, want_scale = _reference(table)
  assert q.shape == table.shape and scale.shape == (3, 6)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  assert np.abs(q.astype(np.int64) - want_q).max() <= 1
  back = np.asarray(kq.dequantize(q, scale[:, None, None, None, :]))
  assert (np.abs(back - table) <= want_scale[:, None, None, None, :] / 2 * (1 + 1e-5)).all()


def test_dequantize_without_scales_only_casts():
  half = np.asarray([[[[1.5, -2.25]]]], np.float16)
  out = np.asarray(kq.dequantize(half, None))
  assert out.dtype == np.float32 and out.tolist() == [[[[1.5, -2.25]]]]


def test_bad_kernels_are_refused():
  with pytest.raises(ValueError, match="NaN or infinite"):
    kq.quantize_per_output_channel(np.full((3, 3, 2, 2), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"\(\.\.\., K, K, C_in, C_out\) kernel"):
    kq.quantize_per_output_channel(np.ones((3, 3), np.float32))
