"""ALiBi and the length-aware β: slopes and bias against the paper's numbers and NumPy, attention
against a float64 reference, incremental decoding against the full pass, the bits_by_length
evaluator against a hand count, and the two extrapolation ablations end to end (`:quick`)."""

import csv
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
import tx
from experiments.evaluators import Context, bits_by_length
from experiments.sweep import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alibi_slopes_are_the_papers():
  # Press et al.: H = 8 gives 1/2, 1/4, ..., 1/256; otherwise the 2^⌊log2 H⌋ slopes, then the
  # odd-numbered slopes of twice as many heads (their get_slopes), written out by hand.
  np.testing.assert_array_equal(tx.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
  np.testing.assert_array_equal(tx.alibi_slopes(1), [2.0 ** -8])
  np.testing.assert_array_equal(tx.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                     2 ** -1, 2 ** -3])
  np.testing.assert_allclose(tx.alibi_slopes(12), [2.0 ** -k for k in range(1, 9)]
                             + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5], rtol=1e-15)
  with pytest.raises(ValueError, match='num_heads=0; allowed: a positive integer'):
    tx.alibi_slopes(0)


def test_alibi_bias_is_minus_slope_times_distance():
  q_pos, k_pos = np.array([3, 4]), np.arange(6)
  bias = np.asarray(tx.alibi_bias(4, q_pos, k_pos))
  slopes = 2.0 ** -np.array([2, 4, 6, 8])
  ref = np.array([[[-m * abs(i - j) for j in k_pos] for i in q_pos] for m in slopes])
  np.testing.assert_allclose(bias, ref, rtol=1e-6)
  assert bias.shape == (4, 2, 6) and bias.dtype == np.float32


def _mha_reference(params, xq, xkv, mask, beta_h, score, alibi):
  """float64: β_h·log(n_i)·s(q_i, k_j) − m_h|i − j| over the attendable keys, n_i ≥ 1."""
  proj = lambda x, n: np.einsum('btd,dhe->bthe', x, np.asarray(params[n]['kernel'],
                                                               np.float64)) + params[n]['bias']
  q, k, v = proj(xq, 'query'), proj(xkv, 'key'), proj(xkv, 'value')
  t, heads = xq.shape[1], q.shape[2]
  n = np.broadcast_to(mask, (xq.shape[0], heads, t, xkv.shape[1])).sum(-1)  # [B, H, Tq]
  beta = np.asarray(beta_h, np.float64)[None, :, None, None] * np.log(np.maximum(n, 1))[..., None]
  if score == 'general':  # s = q W_h k: fold W_h into k for the plain dot-product reference.
    k = np.einsum('bkhe,hde->bkhd', k, np.asarray(params['general_score']['kernel'], np.float64))
  ij = np.arange(t)
  slopes = 2.0 ** -(8 * np.arange(1, heads + 1) / heads)
  bias = -slopes[:, None, None] * np.abs(ij[:, None] - ij[None, :]) if alibi else None
  out, _ = reference.attention(q, k, v, mask=mask, bias=bias, beta=beta)
  o = params['out']
  return np.einsum('bthe,hed->btd', out, np.asarray(o['kernel'], np.float64)) + np.asarray(
      o['bias'], np.float64)


@pytest.mark.parametrize('score,learn_beta,cross', [('dot', False, False),
                                                    ('general', True, False), ('dot', True, True)])
def test_log_length_beta_and_alibi_match_numpy(score, learn_beta, cross):
  """β_i = β·log n_i with n_i counted from the causal and padding mask: query 0 has one key
  (log 1 = 0, uniform), and row 1's padded query 0 sees no key at all (output 0, no NaN).
  The cross-attention gets no ALiBi bias; its n_i counts the real source tokens."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 16)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]], bool)
  mask = np.asarray(tx.combine_masks(None if cross else tx.causal_mask(6),
                                     tx.padding_mask(valid)))
  xkv = rng.normal(size=(2, 6, 16)).astype(np.float32) if cross else x
  mha = tx.MultiHeadAttention(num_heads=4, beta_scale=2.0, learn_beta=learn_beta, score=score,
                              alibi=True, beta_length='log', implementation='xla')
  params = mha.init(jax.random.key(0), x, xkv if cross else None)['params']
  beta_h = np.full(4, 2.0 / np.sqrt(4))
  if learn_beta:  # composes with a learned per-head β.
    beta_h = np.array([0.3, 0.7, 1.1, 2.0])
    params = dict(params, log_beta=jnp.log(jnp.asarray(beta_h, jnp.float32)))
  out = np.asarray(mha.apply({'params': params}, x, xkv if cross else None, mask=mask))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, _mha_reference(params, x, xkv, mask, beta_h, score, not cross),
                             atol=2e-5)


def test_fused_path_keeps_the_folded_log_length_beta():
  """implementation='fused' (jax.nn's kernel; cuDNN on a GPU) takes a scalar β only: the
  log n_i factor folded into q gives the einsum path's output."""
  x = np.random.default_rng(1).normal(size=(2, 8, 32)).astype(np.float32)
  mask = tx.combine_masks(tx.causal_mask(8), tx.padding_mask(np.arange(8) < np.array([[8], [5]])))
  outs = []
  for impl in ('xla', 'fused'):
    mha = tx.MultiHeadAttention(num_heads=4, alibi=True, beta_length='log', implementation=impl)
    params = mha.init(jax.random.key(0), x)['params']
    outs.append(np.asarray(mha.apply({'params': params}, x, mask=mask)))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_incremental_decoding_equals_the_full_pass():
  """The KV cache's alibi bias (query slot against key slots) and log n_i (slots filled, the
  left pads masked and never counted): tx.generate's cached logits equal those recomputed on
  the whole prefix at every step. EncoderDecoder decodes through the same Decoder."""
  m = tx.DecoderLM(vocab_size=13, num_layers=2, d_model=16, num_heads=4, d_ff=32, norm='pre',
                   posemb='alibi', beta_length='log', implementation='xla')
  inputs = np.random.default_rng(3).integers(3, 13, (2, 4))
  params = m.init(jax.random.key(0), inputs)['params']
  run = lambda cache: tx.generate(m, params, inputs, max_new_tokens=5, use_cache=cache,
                                  return_logits=True, prompt_lengths=np.array([4, 2]),
                                  padding='left')
  cached, full = run(True), run(False)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.logits, full.logits, atol=1e-5)


def test_bits_by_length_counts_every_token_once_at_each_length():
  """bpc(n) = Σ −log2 p over the same K·n_max tokens cut into windows of n, against a float64
  log-softmax of the model's logits window by window; a learned table of L rows cannot take
  2L (None and a note); batches that wrap around count each window once."""
  stream = np.random.default_rng(4).integers(0, 7, 8 * 11 + 1).astype(np.int32)  # 11 windows.
  length = 8
  test = {'inputs': stream[:-1].reshape(-1, length), 'targets': stream[1:].reshape(-1, length)}
  np.testing.assert_array_equal(bits_by_length.test_stream(test), stream)
  results = {}
  for posemb in ('alibi', 'learn'):
    model = tx.DecoderLM(vocab_size=7, num_layers=1, d_model=8, num_heads=2, d_ff=16,
                         posemb=posemb, num_positions=length, norm='pre')
    params = model.init(jax.random.key(0), test['inputs'][:1])['params']
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(data=types.SimpleNamespace(seq_len=length)),
        dataset=types.SimpleNamespace(test=test, info={}), model_for=lambda beta: model)
    runner = types.SimpleNamespace(fetch=lambda state: [types.SimpleNamespace(params=state)])
    (result,) = bits_by_length.evaluate(Context(run, [1.0], runner, params), max_factor=2,
                                        batch_size=3)
    results[posemb] = result
    scored = (len(stream) - 1) // 16 * 16  # five windows of 2L = 16: 80 tokens at each length.
    for f in (1, 2):
      n = f * length
      if posemb == 'learn' and f > 1:
        assert result['bits_per_char_by_length'][n] is None
        continue
      logits = np.asarray(jax.jit(model.apply)({'params': params},
                                               stream[:scored].reshape(-1, n)), np.float64)
      logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      targets = stream[1:scored + 1].reshape(-1, n)
      bits = -np.take_along_axis(logp, targets[..., None], -1).sum() / scored / math.log(2)
      np.testing.assert_allclose(result['bits_per_char_by_length'][n], bits, rtol=1e-5)
      assert result[f'eval/bits_per_char_{f}L'] == result['bits_per_char_by_length'][n]
  assert results['learn']['train_max_length'] == length
  assert 'exceeds the learned posemb table' in results['learn']['extrapolation_note']
  assert 'extrapolation_note' not in results['alibi']


def _quick_sweep(tmp_path, name):
  grid.run_sweep(os.path.join(ROOT, f'configs/ablations/{name}.py:quick,steps=10'),
                 str(tmp_path), vectorize=True)
  with open(tmp_path / 'results.csv') as f:
    return list(csv.DictReader(f))


def test_extrapolation_seq2seq_quick_end_to_end(tmp_path):
  rows = _quick_sweep(tmp_path, 'extrapolation_seq2seq')
  assert len(rows) == 2 and {(r['model.posemb'], r['model.beta_length']) for r in rows} == {
      ('alibi', 'log')}
  for r in rows:  # greedy decoding on every length 1..20; the long mean is that of 11..20.
    by_length = [float(r[f'exact_match_by_length/{n}']) for n in range(1, 21)]
    assert all(0.0 <= v <= 1.0 for v in by_length) and r['train_max_length'] == '10'
    long = float(r['eval/exact_match_long'])  # a mean over examples, weighted by length.
    assert min(by_length[10:]) <= long <= max(by_length[10:])
  assert (tmp_path / 'exact_match_vs_length.png').stat().st_size > 10_000


def test_extrapolation_lm_quick_end_to_end(tmp_path):
  rows = _quick_sweep(tmp_path, 'extrapolation_lm')
  assert len(rows) == 2 and all(r['train_max_length'] == '32' for r in rows)
  for r in rows:  # alibi runs at 2L and 4L; every value is a bpc between 0 and log2(vocab).
    bpc = [float(r[f'bits_per_char_by_length/{n}']) for n in (32, 64, 128)]
    assert all(0.0 < b < math.log2(200) for b in bpc)
    assert float(r['eval/bits_per_char_4L']) == bpc[2]
    # 1L scores a prefix of the test windows that task_metrics scores: close, not equal.
    assert bpc[0] == pytest.approx(float(r['eval/bits_per_char']), rel=0.05)
  table = (tmp_path / 'results.md').read_text()
  assert 'eval/bits_per_char_2L' in table and '| alibi | log | 2 |' in table
  assert (tmp_path / 'bits_per_char_vs_length.png').stat().st_size > 10_000
