"""experiments.lessons.properties: self-attention built by hand as identity, permutation, running
linear layer and convolution equals its float64 NumPy reference; the perturbation formulas
match finite differences; the --quick command runs end to end."""

import json
import os

import numpy as np
import pytest

from experiments.lessons import properties as P


def conv_np(x, kernel, bias, padding):
  """Cross-correlation in float64 by summing shifted copies: y_i = Σ_Δ x_{i+Δ} W[Δ + K//2] + b,
  x_{i+Δ} taken circularly or as 0 outside the grid."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  ndim, half = x.ndim - 2, kernel.shape[0] // 2
  y = np.zeros(x.shape[:-1] + kernel.shape[-1:]) + bias
  for tap in np.ndindex(*kernel.shape[:ndim]):
    shift = tuple(half - t for t in tap)  # x_{i+Δ} at i: roll by −Δ.
    moved = np.roll(x, shift, axis=tuple(range(1, ndim + 1)))
    if padding == 'zeros':
      for axis, s in enumerate(shift, 1):
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, s) if s > 0 else slice(x.shape[axis] + s, None)
        moved[tuple(index)] = 0
    y += moved @ kernel[tap]
  return y


@pytest.mark.parametrize('grid', [(12,), (6, 6)])
def test_attention_is_a_convolution(grid):
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((3,) * len(grid) + (3, 3)).astype(np.float32)
  bias = rng.standard_normal(3)
  x = rng.standard_normal((2,) + grid + (3,)).astype(np.float32)
  for padding in ('circular', 'zeros'):
    y = np.asarray(P.attention_conv(x, kernel, bias, padding), np.float64)
    np.testing.assert_allclose(y, conv_np(x, kernel, bias, padding), atol=1e-5, rtol=0)
  # Without padding only the interior is a convolution: a border head falls back to its
  # nearest key instead of a zero.
  y = np.asarray(P.attention_conv(x, kernel, bias, 'none'), np.float64)
  inside = P.interior(grid, 3)
  diff = np.abs(y - conv_np(x, kernel, bias, 'zeros'))
  assert diff[:, inside].max() < 1e-5 and diff[:, ~inside].max() > 0.1


def test_position_attention_permutes_and_applies_a_layer():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 6, 3)).astype(np.float32)
  perm, w, b = rng.permutation(6), rng.standard_normal((3, 3)), rng.standard_normal(3)
  np.testing.assert_array_equal(np.asarray(P.position_attention(x)), x)
  np.testing.assert_array_equal(np.asarray(P.position_attention(x, perm)), x[:, perm])
  np.testing.assert_allclose(P.position_attention(x, perm, w, b), x[:, perm] @ w + b,
                             atol=1e-5, rtol=0)
  # At β = 0 every query sees the uniform average of all tokens.
  np.testing.assert_allclose(P.position_attention(x, beta=0.0),
                             np.broadcast_to(x.mean(1, keepdims=True), x.shape), atol=1e-6)


def test_quadratic_bias_by_hand():
  bias = np.asarray(P.quadratic_bias((4,), [[1.0]], 2.0, circular=True))[0]
  # δ_ij = j − i taken modulo 4 in [−2, 2): row 0 sees δ = 0, 1, −2, −1.
  np.testing.assert_array_equal(bias[0], -2.0 * np.array([1, 0, 9, 4]))
  bias = np.asarray(P.quadratic_bias((4,), [[1.0]], 2.0, circular=False))[0]
  np.testing.assert_array_equal(bias[3], -2.0 * np.array([16, 9, 4, 1]))
  np.testing.assert_array_equal(P.kernel_offsets(3, 2)[[0, 4, 5]], [[-1, -1], [0, 0], [0, 1]])
  with pytest.raises(ValueError, match='kernel_size=4'):
    P.kernel_offsets(4, 1)


def test_first_order_change_and_bounds():
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal(s) for s in ((5, 4), (6, 4), (6, 3)))
  for beta in (0.3, 2.0):
    h0, _ = P.attention_np(q, k, v, beta)
    eps = rng.standard_normal(4)
    moved = k.copy()
    moved[2] += 1e-6 * eps
    numeric = (P.attention_np(q, moved, v, beta)[0] - h0) / 1e-6
    np.testing.assert_allclose(P.first_order_change(q, k, v, beta, 2, eps), numeric,
                               rtol=1e-4, atol=1e-9)
    bounds = P.perturbation_bounds(q, v, beta, 2)
    assert bounds['column'] <= bounds['jacobian']
    for scale in (1e-3, 1.0, 30.0):  # the bounds hold for large moves too.
      moved = k.copy()
      moved[2] += scale * eps / np.linalg.norm(eps)
      change = np.linalg.norm(P.attention_np(q, moved, v, beta)[0] - h0)
      assert change <= bounds['column'] * scale


def test_quick_end_to_end(tmp_path):
  results = P.run(str(tmp_path), quick=True)
  for name in ('results.json', 'results.md', 'properties_perturbation.png',
               'properties_scaling.png', 'properties_beta_limit.png',
               'properties_constructions.png', 'properties_conv2d_heads.png'):
    assert os.path.getsize(tmp_path / name) > 0
  assert json.loads((tmp_path / 'results.json').read_text())['quick'] is True
  for r in results['perturbation']:
    assert abs(r['slope_small_eps'] - 1) < 1e-3
    assert 0.999 < r['measured_over_first_order'][0] <= r['measured_over_first_order'][1] < 1.001
    assert r['worst_over_column_bound'] <= 1 and r['worst_over_jacobian_bound'] <= 1
  for r in results['scaling']:
    assert r['tx_vs_logistic'] < 1e-5
    if r['key'] == 'negative':
      assert r['weight_alpha_max'] < r['weight_alpha_1']
    if r['key'] == 'largest':
      assert r['weight_alpha_max'] > 0.99
  assert all(r['max_abs_diff'] < 1e-5 for r in results['constructions'])
  # Identity attention at finite β: off by w Σ_j (x_j − x_i) until float32 rounding (~1e-6).
  lim = {k: np.asarray(v) for k, v in results['beta_limit'].items()}
  above = lim['predicted'] > 1e-4
  assert above.sum() >= 2 and (~above).any()
  np.testing.assert_allclose(lim['measured'][above], lim['predicted'][above], rtol=1e-3)
  assert lim['measured'][~above].max() < 1e-4
