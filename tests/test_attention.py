"""dot_product_attention / attend / softargmax_beta against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
import tx

MASK_KINDS = ('none', 'causal', 'window', 'padding', 'random')


def make_mask(kind, rng, batch, tq, tk, heads):
  if kind == 'none':
    return None
  if kind == 'causal':
    return np.asarray(tx.causal_mask(tq, tk))
  if kind == 'window':
    return np.asarray(tx.local_window_mask(max(tq, tk), 1))[:tq, :tk]
  if kind == 'padding':
    lengths = rng.integers(0, tk + 1, size=batch)  # length 0 -> fully masked rows.
    return np.asarray(tx.padding_mask(tx.valid_from_lengths(lengths, tk)))
  return rng.random(batch + (heads, tq, tk)) < 0.6


@st.composite
def attention_case(draw):
  batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
  tq, tk = draw(st.integers(1, 6)), draw(st.integers(1, 6))
  heads, dk, dv = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
  kind = draw(st.sampled_from(MASK_KINDS))
  beta = draw(st.sampled_from([None, 0.0, 0.3, 2.0, 'per_head']))
  seed = draw(st.integers(0, 2**16))
  return batch, tq, tk, heads, dk, dv, kind, beta, seed


@given(attention_case())
def test_matches_float64_reference(case):
  batch, tq, tk, heads, dk, dv, kind, beta, seed = case
  rng = np.random.default_rng(seed)
  q = rng.normal(size=batch + (tq, heads, dk)).astype(np.float32)
  k = rng.normal(size=batch + (tk, heads, dk)).astype(np.float32)
  v = rng.normal(size=batch + (tk, heads, dv)).astype(np.float32)
  bias = rng.normal(size=(heads, tq, tk)).astype(np.float32) if seed % 3 == 0 else None
  mask = make_mask(kind, rng, batch, tq, tk, heads)
  if beta == 'per_head':
    beta = rng.uniform(0.0, 2.0, size=heads).astype(np.float32)
  out, w = tx.dot_product_attention(q, k, v, mask=mask, bias=bias, beta=beta, return_weights=True)
  ref_out, ref_w = reference.attention(q, k, v, mask, bias, beta)
  np.testing.assert_allclose(w, ref_w, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  assert out.dtype == jnp.float32 and w.shape == batch + (heads, tq, tk)
  if mask is not None:  # masked keys get weight exactly 0.
    assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] == 0.0)


def test_matches_jax_nn_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
  mask = np.asarray(tx.causal_mask(5))
  ours = tx.dot_product_attention(q, k, v, mask=mask, beta=0.7)
  theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.7)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_beta_zero_is_mean_of_attendable_values():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(4, 2, 3)).astype(np.float32) for _ in range(3))
  mask = rng.random((2, 4, 4)) < 0.5
  mask[..., 0] = True  # every row has at least one attendable key.
  out = np.asarray(tx.dot_product_attention(q, k, v, mask=mask, beta=0.0))
  for h in range(2):
    for i in range(4):
      np.testing.assert_allclose(out[i, h], v[mask[h, i], h].mean(0), atol=1e-6)


def test_large_beta_is_hard_argmax():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(6, 1, 4))
  k = rng.normal(size=(9, 1, 4))
  v = rng.normal(size=(9, 1, 5))
  s = np.einsum('qhd,khd->qk', q, k)
  top2 = np.sort(s, axis=-1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)  # the argmax is unambiguous.
  out = tx.dot_product_attention(*(x.astype(np.float32) for x in (q, k, v)), beta=1e5)
  np.testing.assert_allclose(out[:, 0], v[s.argmax(-1), 0], atol=1e-5)


def test_fully_masked_rows_are_zero_and_finite_with_gradients():
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32) for _ in range(3))
  mask = np.ones((2, 3, 3), bool)
  mask[:, 1, :] = False
  out, w = tx.dot_product_attention(q, k, v, mask=mask, return_weights=True)
  assert np.all(np.isfinite(out)) and np.all(out[1] == 0) and np.all(w[:, 1] == 0)
  grads = jax.grad(lambda q, k, v: tx.dot_product_attention(q, k, v, mask=mask).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_bfloat16_inputs_keep_float32_softmax():
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(2, 16, 2, 32)).astype(jnp.bfloat16) for _ in range(3))
  out, w = tx.dot_product_attention(q, k, v, beta=1.0, return_weights=True)
  assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
  _, ref_w = reference.attention(*(np.asarray(x, np.float32) for x in (q, k, v)), beta=1.0)
  # A bfloat16 softmax is off by ~1e-2 here; float32 logits and softmax are not.
  np.testing.assert_allclose(w, ref_w, atol=1e-5)


@pytest.mark.parametrize('beta', [None, 0.0, 1.3, 'per_head', 'traced'])
def test_fused_equals_ours(beta):
  rng = np.random.default_rng(5)
  q = rng.normal(size=(2, 3, 5, 4, 8)).astype(np.float32)  # two batch dims.
  k, v = (rng.normal(size=(2, 3, 7, 4, 8)).astype(np.float32) for _ in range(2))
  mask = rng.random((2, 1, 4, 5, 7)) < 0.7
  mask[0, 0, 0, 0] = False  # a fully-masked row.
  bias = rng.normal(size=(4, 5, 7)).astype(np.float32)
  b = rng.uniform(0.1, 1.0, size=4).astype(np.float32) if beta in ('per_head', 'traced') else beta
  run = lambda b, impl: tx.dot_product_attention(q, k, v, mask=mask, bias=bias, beta=b,
                                                 implementation=impl)
  if beta == 'traced':
    fused = jax.jit(lambda b: run(b, 'fused'))(b)
  else:
    fused = run(b, 'fused')
  np.testing.assert_allclose(fused, run(b, 'xla'), atol=1e-5)
  np.testing.assert_allclose(run(b, None), run(b, 'xla'), atol=0)


def test_softargmax_beta():
  x = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]], np.float32)
  np.testing.assert_allclose(tx.softargmax_beta(x, 2.0), jax.nn.softmax(2.0 * x), atol=1e-7)
  m = np.array([[True, False, True], [False, False, False]])
  w = np.asarray(tx.softargmax_beta(x, 1.0, m))
  np.testing.assert_allclose(w[0], np.exp([1, 0, 3]) * [1, 0, 1] / (np.e + np.e**3), atol=1e-6)
  assert np.all(w[1] == 0)


def test_attention_dropout_is_keyed_and_unbiased():
  rng = np.random.default_rng(6)
  q, k, v = (rng.normal(size=(4, 1, 8)).astype(np.float32) for _ in range(3))
  plain = tx.dot_product_attention(q, k, v)
  drop = lambda key: tx.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  a, b = drop(jax.random.key(0)), drop(jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - plain).max() > 1e-2
  mean = jax.vmap(drop)(jax.random.split(jax.random.key(1), 4000)).mean(0)
  np.testing.assert_allclose(mean, plain, atol=0.1)


def test_fused_takes_traced_scalar_beta_and_its_gradient():
  rng = np.random.default_rng(7)
  q, k, v = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
  f = lambda b, impl: tx.dot_product_attention(q, k, v, beta=b, implementation=impl).sum()
  np.testing.assert_allclose(jax.jit(lambda b: f(b, 'fused'))(0.4), f(0.4, 'xla'), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(0.4, 'fused'), jax.grad(f)(0.4, 'xla'), rtol=1e-4)


@pytest.mark.parametrize('shape', [(3, 1, 1), (1,), (3,)])
def test_beta_shapes_agree_across_implementations(shape):
  rng = np.random.default_rng(8)
  q, k, v = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
  beta = rng.uniform(0.2, 1.0, size=shape).astype(np.float32)
  ours = tx.dot_product_attention(q, k, v, beta=beta)
  np.testing.assert_allclose(tx.dot_product_attention(q, k, v, beta=beta, implementation='fused'),
                             ours, atol=1e-5)
  ref, _ = reference.attention(q, k, v, beta=beta.reshape(-1))
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_extreme_beta_and_bias_stay_finite():
  rng = np.random.default_rng(9)
  q, k, v = (rng.normal(size=(4, 1, 4)).astype(np.float32) for _ in range(3))
  for beta in (1e38, np.inf):
    assert np.all(np.isfinite(tx.dot_product_attention(q, k, v, beta=beta)))
  bias = np.zeros((1, 4, 4), np.float32)
  bias[:, 2, :] = -np.inf
  assert np.all(np.isfinite(tx.dot_product_attention(q, k, v, bias=bias)))
  with pytest.raises(ValueError, match='negative or NaN'):
    tx.dot_product_attention(q, k, v, beta=np.nan)


@pytest.mark.parametrize('implementation', ['xla', 'fused'])
def test_key_lengths_are_the_padding_mask(implementation):
  """key_lengths = the mask [j < length] ANDed with `mask`, on both paths; a length of 0
  leaves every row of its batch element without keys (output 0), as a mask would."""
  rng = np.random.default_rng(11)
  q = rng.normal(size=(3, 5, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(3, 7, 2, 8)).astype(np.float32) for _ in range(2))  # grouped query.
  lengths = np.array([7, 3, 0])
  mask = rng.random((3, 1, 5, 7)) < 0.8
  mask[1, :, 0] = np.arange(7) >= 3  # this row's keys are all at or past its length: none.
  padding = np.arange(7) < lengths[:, None, None, None]
  for m in (None, mask):
    got = tx.dot_product_attention(q, k, v, mask=m, key_lengths=lengths,
                                   implementation=implementation)
    ref, _ = reference.attention(q, np.repeat(k, 2, -2), np.repeat(v, 2, -2),
                                 mask=padding if m is None else padding & m)
    np.testing.assert_allclose(got, ref, atol=1e-5)
  assert np.all(np.asarray(got)[2] == 0) and np.all(np.asarray(got)[1, 0] == 0)


def test_key_lengths_are_checked():
  q = np.zeros((2, 4, 1, 8), np.float32)
  with pytest.raises(ValueError, match='key_lengths has dtype float32; it must be integer'):
    tx.dot_product_attention(q, q, q, key_lengths=np.ones(2, np.float32))
  with pytest.raises(ValueError, match=r'key_lengths has shape \(3,\), which does not broadcast'):
    tx.dot_product_attention(q, q, q, key_lengths=np.ones(3, np.int32))
