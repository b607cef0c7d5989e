"""Positional encodings against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
import tx


@pytest.mark.parametrize('length,d_model,base', [(50, 16, 10000.0), (7, 5, 10000.0), (20, 8, 100.0)])
def test_sinusoidal_1d_is_the_paper_formula(length, d_model, base):
  pe = np.asarray(tx.sinusoidal_1d(length, d_model, base))
  assert pe.shape == (length, d_model) and pe.dtype == np.float32
  np.testing.assert_allclose(pe, reference.sinusoid(length, d_model, base), atol=2e-5)
  # Pinned values: PE(pos, 0) = sin(pos), PE(pos, 1) = cos(pos); PE(1, 2) = sin(1/base^(2/d)).
  np.testing.assert_allclose(pe[3, :2], [np.sin(3.0), np.cos(3.0)], atol=1e-6)
  np.testing.assert_allclose(pe[1, 2], np.sin(1 / base ** (2 / d_model)), atol=1e-6)


def test_sinusoidal_offset_continues_the_sequence():
  np.testing.assert_allclose(tx.sinusoidal_1d(4, 8, offset=6), tx.sinusoidal_1d(10, 8)[6:],
                             atol=1e-6)


def test_sincos_2d_formula():
  h, w, d = 3, 4, 16
  pe = np.asarray(tx.sincos_2d(h, w, d))
  omega = 1.0 / 10000.0 ** (np.arange(4) / 3)
  for y in range(h):
    for x in range(w):
      expect = np.concatenate([np.sin(x * omega), np.cos(x * omega),
                               np.sin(y * omega), np.cos(y * omega)])
      np.testing.assert_allclose(pe[y * w + x], expect, atol=1e-6)


def test_rope_matches_rotation_matrices_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 2, 8)).astype(np.float32)
  positions = np.array([0, 1, 2, 5, 9, 30])
  np.testing.assert_allclose(tx.rope(x, positions), reference.rope(x, positions), atol=2e-5)
  q, k = (rng.normal(size=(1, 1, 8)).astype(np.float32) for _ in range(2))
  dot = lambda m, n: float(np.sum(np.asarray(tx.rope(q, [m])) * np.asarray(tx.rope(k, [n]))))
  assert dot(3, 1) == pytest.approx(dot(12, 10), abs=1e-5)  # depends on m - n only.
  assert abs(dot(3, 1) - dot(3, 2)) > 1e-3
  np.testing.assert_allclose(tx.rope(x, np.zeros(6)), x)  # position 0 is the identity.


def test_resample_posemb():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)  # CLS + 4x4 grid.
  same = tx.resample_posemb(table, (4, 4), num_prefix_tokens=1)
  np.testing.assert_allclose(same, table, atol=1e-6)
  up = tx.resample_posemb(table, (8, 6), num_prefix_tokens=1)
  assert up.shape == (1, 1 + 48, 8)
  np.testing.assert_array_equal(up[0, 0], table[0, 0])  # CLS kept apart.
  # Bilinear resizing reproduces a function linear in the (half-pixel) grid coordinates.
  ys, xs = np.mgrid[:4, :4]
  ramp = (2.0 * ys + 3.0 * xs).reshape(16, 1).astype(np.float32)
  big = np.asarray(tx.resample_posemb(ramp, (8, 8))).reshape(8, 8)
  yy, xx = (np.mgrid[:8, :8] + 0.5) / 2 - 0.5
  interior = (slice(1, 7), slice(1, 7))
  np.testing.assert_allclose(big[interior], (2 * yy + 3 * xx)[interior], atol=1e-5)


def test_learned_posemb_module():
  module = tx.AddPositionEmbs('learn', num_positions=10)
  x = jnp.zeros((2, 6, 4))
  params = module.init(jax.random.key(0), x)['params']
  assert params['pos_embedding'].shape == (10, 4)
  np.testing.assert_allclose(module.apply({'params': params}, x)[1],
                             params['pos_embedding'][:6])
  with pytest.raises(ValueError, match='exceeds the learned posemb table'):
    module.apply({'params': params}, jnp.zeros((2, 11, 4)))
  # 'none' and 'rope' leave the inputs unchanged (rope acts inside attention).
  for kind in ('none', 'rope'):
    np.testing.assert_array_equal(tx.AddPositionEmbs(kind).apply({}, x + 1), x + 1)


def test_explicit_positions_equal_the_default_ones_and_shift_per_row():
  x = jnp.zeros((2, 5, 8))
  for posemb in ('sinusoidal', 'learn'):
    module = tx.AddPositionEmbs(posemb, num_positions=10)
    variables = module.init(jax.random.key(0), x)
    default = module.apply(variables, x)
    positions = jnp.stack([jnp.arange(5), jnp.arange(5) + 3])
    explicit = module.apply(variables, x, positions)
    np.testing.assert_array_equal(explicit[0], default[0])
    np.testing.assert_allclose(explicit[1, :2], default[0, 3:], atol=1e-6)
  with pytest.raises(ValueError, match="positions with posemb='rope'"):
    tx.AddPositionEmbs('rope').apply({}, x, positions)
