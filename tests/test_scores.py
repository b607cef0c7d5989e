"""Alignment scores against float64 NumPy formulas using each module's own parameters."""

import jax
import numpy as np
import pytest

import tx

rng = np.random.default_rng(0)
Q = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)  # [B, Tq, H, D]
K = rng.normal(size=(2, 5, 2, 4)).astype(np.float32)  # [B, Tk, H, D]
q64, k64 = Q.astype(np.float64), K.astype(np.float64)


def test_dot_scaled_and_cosine():
  dot = np.einsum('bqhd,bkhd->bhqk', q64, k64)
  np.testing.assert_allclose(tx.dot_score(Q, K), dot, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tx.scaled_dot_score(Q, K), dot / 2.0, rtol=1e-5, atol=1e-5)
  cos = dot / (np.linalg.norm(q64, axis=-1).transpose(0, 2, 1)[..., None]
               * np.linalg.norm(k64, axis=-1).transpose(0, 2, 1)[..., None, :])
  np.testing.assert_allclose(tx.cosine_score(Q, K), cos, atol=1e-6)


def test_general():
  module = tx.GeneralScore()
  params = module.init(jax.random.key(0), Q, K)['params']
  w = np.asarray(params['kernel'], np.float64)  # [H, D, D]
  ref = np.einsum('bqhd,hde,bkhe->bhqk', q64, w, k64)
  np.testing.assert_allclose(module.apply({'params': params}, Q, K), ref, rtol=1e-5, atol=1e-5)


def test_additive():
  module = tx.AdditiveScore(features=6)
  p = module.init(jax.random.key(0), Q, K)['params']
  wq, wk, v = (np.asarray(p[n], np.float64) for n in ('w_query', 'w_key', 'v'))
  ref = np.zeros((2, 2, 3, 5))
  for b in range(2):
    for h in range(2):
      for i in range(3):
        for j in range(5):  # vᵀ tanh(W [s; h]) with W = [W_q; W_k].
          concat = np.concatenate([q64[b, i, h], k64[b, j, h]])
          ref[b, h, i, j] = v[h] @ np.tanh(np.concatenate([wq[h], wk[h]]).T @ concat)
  np.testing.assert_allclose(module.apply({'params': p}, Q, K), ref, rtol=1e-5, atol=1e-5)


def test_location_ignores_keys():
  module = tx.LocationScore(num_keys=8)
  p = module.init(jax.random.key(0), Q, K)['params']
  ref = np.einsum('bqhd,hdl->bhql', q64, np.asarray(p['kernel'], np.float64))[..., :5]
  out = module.apply({'params': p}, Q, K)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(module.apply({'params': p}, Q, K * 0 + 3), out)
  with pytest.raises(ValueError, match='num_keys=8'):
    module.apply({'params': p}, Q, np.zeros((2, 9, 2, 4), np.float32))


def test_cosine_gradient_is_finite_at_a_zero_vector():
  q = np.zeros((1, 2, 1, 4), np.float32)
  k = np.ones((1, 3, 1, 4), np.float32)
  g = jax.grad(lambda q: tx.cosine_score(q, k).sum())(q)
  assert np.all(np.isfinite(g))
