"""Positional encodings against their formulas."""

import math

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


def fairseq_get_embedding(num_embeddings, embedding_dim, padding_idx=None, base=10000.0):
  """fairseq's SinusoidalPositionalEmbedding.get_embedding in float64 NumPy (its 10000 is
  `base` here): row p is position p; row padding_idx is zeros."""
  half_dim = embedding_dim // 2
  emb = math.log(base) / (half_dim - 1)
  emb = np.exp(np.arange(half_dim, dtype=np.float64) * -emb)
  emb = np.arange(num_embeddings, dtype=np.float64)[:, None] * emb[None, :]
  emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1).reshape(num_embeddings, -1)
  if embedding_dim % 2 == 1:
    emb = np.concatenate([emb, np.zeros((num_embeddings, 1))], axis=1)
  if padding_idx is not None:
    emb[padding_idx, :] = 0
  return emb


@pytest.mark.parametrize('length,d_model,base',
                         [(50, 16, 10000.0), (7, 5, 10000.0), (20, 8, 100.0)])
def test_sinusoidal_concat_1d_is_fairseqs_table(length, d_model, base):
  pe = np.asarray(tx.posemb.sinusoidal_concat_1d(length, d_model, base))
  assert pe.shape == (length, d_model) and pe.dtype == np.float32
  np.testing.assert_allclose(pe, fairseq_get_embedding(length, d_model, base=base), atol=2e-5)
  # Pinned values: sines of ω_0 = 1 first, cosines from column h = d/2; the last frequency is
  # exactly 1/base (fairseq's i/(h−1)), where the paper's 2i/d would stop at base^(−(h−1)/h).
  h = d_model // 2
  np.testing.assert_allclose(pe[3, [0, h]], [np.sin(3.0), np.cos(3.0)], atol=1e-6)
  np.testing.assert_allclose(pe[5, [h - 1, 2 * h - 1]], [np.sin(5 / base), np.cos(5 / base)],
                             atol=1e-6)
  if d_model % 2:
    np.testing.assert_array_equal(pe[:, -1], 0)
  np.testing.assert_allclose(tx.posemb.sinusoidal_concat_1d(4, d_model, base, offset=3),
                             pe[3:7], atol=1e-6)


def test_sinusoidal_concat_module_reproduces_fairseqs_positions():
  """fairseq numbers tokens from padding_idx + 1: explicit positions give its rows."""
  padding_idx, t, d = 1, 9, 16
  x = np.random.default_rng(3).normal(size=(2, t, d)).astype(np.float32)
  module = tx.AddPositionEmbs('sinusoidal_concat')
  positions = np.broadcast_to(padding_idx + 1 + np.arange(t), (2, t))
  table = fairseq_get_embedding(padding_idx + 1 + t, d, padding_idx)
  np.testing.assert_allclose(module.apply({}, x, positions), x + table[padding_idx + 1:],
                             atol=2e-5)
  # Without positions the rows start at 0; the paper's interleaved table is another one.
  np.testing.assert_allclose(module.apply({}, x), x + fairseq_get_embedding(t, d), atol=2e-5)
  assert np.abs(module.apply({}, x) - tx.AddPositionEmbs('sinusoidal').apply({}, x)).max() > 0.5


def test_sinusoidal_concat_decoding_continues_the_positions():
  """In decode mode each chunk's positions continue from the cache; a DecoderLM decoding one
  token at a time equals its full pass."""
  module = tx.AddPositionEmbs('sinusoidal_concat', decode=True)
  x = jnp.zeros((1, 7, 8))
  cache = module.init(jax.random.key(0), x)['cache']
  outs = []
  for start, stop in [(0, 3), (3, 4), (4, 7)]:
    out, state = module.apply({'cache': cache}, x[:, start:stop], mutable=['cache'])
    cache = state['cache']
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1)[0], fairseq_get_embedding(7, 8), atol=2e-5)

  small = dict(num_layers=2, d_model=16, num_heads=4, d_ff=32, vocab_size=20)
  lm = tx.DecoderLM(posemb='sinusoidal_concat', **small)
  tokens = jax.random.randint(jax.random.key(6), (2, 6), 0, 20)
  params = lm.init(jax.random.key(0), tokens)['params']
  full = lm.apply({'params': params}, tokens)
  cache = lm.clone(decode=True).init(jax.random.key(0), tokens)['cache']
  steps = []
  for i in range(6):
    logits, state = lm.clone(decode=True).apply({'params': params, 'cache': cache},
                                                tokens[:, i:i + 1], mutable=['cache'])
    cache = state['cache']
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
  other = tx.DecoderLM(posemb='sinusoidal', **small).apply({'params': params}, tokens)
  assert np.abs(np.asarray(other) - np.asarray(full)).max() > 1e-3


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
  for posemb in ('sinusoidal', 'sinusoidal_concat', 'learn'):
    module = tx.AddPositionEmbs(posemb, num_positions=10)
    variables = module.init(jax.random.key(0), x)
    default = module.apply(variables, x)
    positions = jnp.stack([jnp.arange(5), jnp.arange(5) + 3])
    explicit = module.apply(variables, x, positions)
    np.testing.assert_array_equal(explicit[0], default[0])
    np.testing.assert_allclose(explicit[1, :2], default[0, 3:], atol=1e-6)
  with pytest.raises(ValueError, match="positions with posemb='rope'"):
    tx.AddPositionEmbs('rope').apply({}, x, positions)
