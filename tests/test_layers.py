"""MultiHeadAttention, blocks and stacks: reference math, symmetry, causality, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
import tx

SMALL = dict(num_layers=2, d_model=16, num_heads=4, d_ff=32, num_positions=12)


def _project(x, p):
  """x [.., T, D] through a DenseGeneral to heads: [.., T, H, Dh]."""
  return np.einsum('...td,dhe->...the', x, np.asarray(p['kernel'], np.float64)) + np.asarray(
      p['bias'], np.float64)


def mha_reference(params, xq, xkv, beta, mask=None):
  q, k, v = (_project(x, params[n]) for x, n in ((xq, 'query'), (xkv, 'key'), (xkv, 'value')))
  out, _ = reference.attention(q, k, v, mask=mask, beta=beta)
  o = params['out']
  return np.einsum('...the,hed->...td', out, np.asarray(o['kernel'], np.float64)) + np.asarray(
      o['bias'], np.float64)


@pytest.mark.parametrize('beta_scale', [1.0, 0.0, 3.0])
def test_mha_self_attention_matches_reference(beta_scale):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  mha = tx.MultiHeadAttention(num_heads=4, beta_scale=beta_scale)
  mask = np.asarray(tx.causal_mask(5))
  params = mha.init(jax.random.key(0), x)['params']
  out = mha.apply({'params': params}, x, mask=mask)
  ref = mha_reference(params, x, x, beta_scale / np.sqrt(4), mask)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mha_cross_attention_with_learned_per_head_beta():
  rng = np.random.default_rng(1)
  xq = rng.normal(size=(2, 3, 16)).astype(np.float32)
  xkv = rng.normal(size=(2, 7, 16)).astype(np.float32)
  mha = tx.MultiHeadAttention(num_heads=4, learn_beta=True, beta_scale=2.0)
  params = mha.init(jax.random.key(0), xq, xkv)['params']
  np.testing.assert_allclose(np.exp(params['log_beta']), np.full(4, 2.0 / np.sqrt(4)), rtol=1e-6)
  beta = np.array([0.1, 0.5, 1.0, 4.0], np.float32)
  params = dict(params, log_beta=jnp.log(beta))
  mask = np.asarray(tx.padding_mask(tx.valid_from_lengths(np.array([7, 4]), 7)))
  out = mha.apply({'params': params}, xq, xkv, mask=mask)
  np.testing.assert_allclose(out, mha_reference(params, xq, xkv, beta, mask), atol=1e-5)
  # β is trainable: the loss has a gradient with respect to it.
  g = jax.grad(lambda p: mha.apply({'params': p}, xq, xkv).sum())(params)
  assert np.all(np.abs(g['log_beta']) > 0)


def test_mha_sows_attention_weights():
  x = jnp.ones((1, 4, 16))
  mha = tx.MultiHeadAttention(num_heads=2)
  v = mha.init(jax.random.key(0), x)
  _, state = mha.apply(v, x, mask=tx.causal_mask(4), mutable=['intermediates'])
  (w,) = state['intermediates']['attention_weights']
  assert w.shape == (1, 2, 4, 4)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.asarray(w)[0, :, 0, 1:] == 0)


@pytest.mark.parametrize('score', ['general', 'additive', 'cosine', 'location'])
def test_every_score_trains_a_gradient(score):
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  mha = tx.MultiHeadAttention(num_heads=2, score=score, location_keys=6)
  params = mha.init(jax.random.key(0), x)['params']
  g = jax.grad(lambda p: (mha.apply({'params': p}, x, mask=tx.causal_mask(6)) ** 2).sum())(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
  assert np.abs(g['query']['kernel']).max() > 0
  if score != 'cosine':  # cosine has no parameters of its own.
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(g[f'{score}_score']))


def _apply_encoder(posemb, x, norm='post'):
  enc = tx.Encoder(posemb=posemb, norm=norm, **SMALL)
  params = enc.init(jax.random.key(0), x)
  return enc.apply(params, x)


@pytest.mark.parametrize('posemb,equivariant', [('none', True), ('sinusoidal', False),
                                                ('learn', False), ('rope', False)])
def test_permutation_equivariance_without_posemb_only(posemb, equivariant):
  x = jax.random.normal(jax.random.key(2), (1, 8, 16))
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  enc = tx.Encoder(posemb=posemb, **SMALL)
  params = enc.init(jax.random.key(0), x)
  if posemb == 'learn':  # make the learned table clearly non-constant.
    params['params']['posemb']['pos_embedding'] = jax.random.normal(jax.random.key(3), (12, 16))
  out, out_perm = enc.apply(params, x), enc.apply(params, x[:, perm])
  gap = np.abs(np.asarray(out)[:, perm] - np.asarray(out_perm)).max()
  assert (gap < 1e-5) if equivariant else (gap > 1e-2)


def _input_jacobian_norms(module, params, x):
  """norms[t, s] = |d out[t] / d x[s]| for a single sequence x [T, D]."""
  jac = jax.jacrev(lambda x: module.apply(params, x[None])[0])(x)  # [T, D, T, D]
  return np.sqrt((np.asarray(jac) ** 2).sum(axis=(1, 3)))


@pytest.mark.parametrize('posemb', ['learn', 'sinusoidal', 'rope', 'none'])
@pytest.mark.parametrize('norm', ['post', 'pre'])
def test_decoder_is_causal_through_gradients(posemb, norm):
  x = jax.random.normal(jax.random.key(4), (6, 16))
  dec = tx.Decoder(posemb=posemb, norm=norm, **SMALL)
  params = dec.init(jax.random.key(0), x[None])
  norms = _input_jacobian_norms(dec, params, x)
  future = np.triu(np.ones((6, 6), bool), k=1)
  assert np.all(norms[future] == 0.0)  # exactly zero, not just small.
  assert np.all(norms[~future] > 0.0)


def test_encoder_sees_everything_through_gradients():
  x = jax.random.normal(jax.random.key(5), (6, 16))
  enc = tx.Encoder(posemb='sinusoidal', **SMALL)
  norms = _input_jacobian_norms(enc, enc.init(jax.random.key(0), x[None]), x)
  assert np.all(norms > 0.0)


def _decode_stepwise(model, params, full_args, step_args, method=None, chunks=(4, 1, 1, 1, 1)):
  cache = model.clone(decode=True).init(jax.random.key(0), *full_args)['cache']
  outs, start = [], 0
  for size in chunks:
    args = step_args(start, size)
    out, state = model.clone(decode=True).apply({'params': params, 'cache': cache}, *args,
                                                method=method, mutable=['cache'])
    cache, start = state['cache'], start + size
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize('posemb', ['learn', 'sinusoidal', 'rope', 'none'])
def test_kv_cache_decoding_equals_full_pass_lm(posemb):
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, 20)
  lm = tx.DecoderLM(vocab_size=20, posemb=posemb, **SMALL)
  params = lm.init(jax.random.key(0), tokens)['params']
  full = lm.apply({'params': params}, tokens)
  # A 4-token prefill, then one token at a time.
  cached = _decode_stepwise(lm, params, (tokens,), lambda s, n: (tokens[:, s:s + n],))
  np.testing.assert_allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize('posemb', ['learn', 'sinusoidal', 'rope'])
def test_kv_cache_decoding_equals_full_pass_seq2seq(posemb):
  source = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])  # padded source.
  target = jax.random.randint(jax.random.key(7), (2, 8), 1, 20)
  model = tx.EncoderDecoder(vocab_size=20, posemb=posemb, **SMALL)
  params = model.init(jax.random.key(0), source, target)['params']
  full = model.apply({'params': params}, source, target)
  memory = model.apply({'params': params}, source, method=tx.EncoderDecoder.encode)
  cached = _decode_stepwise(
      model, params, (source, target),
      lambda s, n: (target[:, s:s + n], memory, source),
      method=tx.EncoderDecoder.decode_logits)
  np.testing.assert_allclose(cached, full, atol=1e-5)


def test_kv_cache_seq2seq_with_bos_equal_to_pad_and_padded_targets():
  """The Flax WMT convention (bos = pad = 0) and targets with trailing padding."""
  source = jnp.array([[3, 4, 5, 0], [6, 7, 8, 9]])
  target = jnp.array([[4, 5, 2, 0, 0, 0], [6, 7, 8, 9, 2, 0]])
  decoder_input = tx.shift_right(target, 0)
  model = tx.EncoderDecoder(vocab_size=20, pad_id=0, **SMALL)
  params = model.init(jax.random.key(0), source, decoder_input)['params']
  full = model.apply({'params': params}, source, decoder_input)
  memory = model.apply({'params': params}, source, method=tx.EncoderDecoder.encode)
  cached = _decode_stepwise(model, params, (source, decoder_input),
                            lambda s, n: (decoder_input[:, s:s + n], memory, source),
                            method=tx.EncoderDecoder.decode_logits, chunks=(1,) * 6)
  np.testing.assert_allclose(cached, full, atol=1e-5)


def test_decode_init_longer_than_learned_table_is_an_error():
  lm = tx.DecoderLM(vocab_size=20, posemb='learn', decode=True, **SMALL)
  with pytest.raises(ValueError, match='exceeds the learned posemb table'):
    lm.init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


def test_encoder_decoder_ignores_source_padding():
  model = tx.EncoderDecoder(vocab_size=20, **SMALL)
  src_a = jnp.array([[3, 4, 5, 0, 0]])
  src_b = jnp.array([[3, 4, 5, 0, 0, 0, 0, 0]])  # same tokens, more padding.
  tgt = jnp.array([[1, 6, 7]])
  params = model.init(jax.random.key(0), src_a, tgt)
  np.testing.assert_allclose(model.apply(params, src_a, tgt), model.apply(params, src_b, tgt),
                             atol=1e-5)


def test_shift_right():
  np.testing.assert_array_equal(tx.shift_right(jnp.array([[5, 6, 7]]), 1), [[1, 5, 6]])


def test_encoder_classifier_mean_pool_ignores_padding():
  model = tx.EncoderClassifier(num_classes=3, vocab_size=20, pool='mean', posemb='none', **SMALL)
  a, b = jnp.array([[4, 5, 6, 0]]), jnp.array([[4, 5, 6, 0, 0, 0]])
  params = model.init(jax.random.key(0), a)
  np.testing.assert_allclose(model.apply(params, a), model.apply(params, b), atol=1e-5)


def test_bfloat16_compute_float32_params():
  model = tx.DecoderLM(vocab_size=20, dtype=jnp.bfloat16, **SMALL)
  tokens = jnp.arange(8)[None] % 20
  variables = model.init(jax.random.key(0), tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  logits, state = model.apply(variables, tokens, mutable=['intermediates'])
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  w = state['intermediates']['decoder']['block_0']['self_attention']['attention_weights'][0]
  assert w.dtype == jnp.float32


def _recording(calls):
  """An attention_fn that records how it is called and delegates to tx.dot_product_attention."""
  def attention_fn(q, k, v, **kwargs):
    calls.append(dict(kwargs, shapes=(q.shape, k.shape, v.shape)))
    return tx.dot_product_attention(q, k, v, **kwargs)
  return attention_fn


def test_models_call_the_attention_fn_they_are_given():
  source, target = jnp.array([[3, 4, 5, 0]]), jnp.array([[1, 6, 7]])
  model = tx.EncoderDecoder(vocab_size=20, **SMALL)
  variables = model.init(jax.random.key(0), source, target)
  calls = []
  given = model.clone(attention_fn=_recording(calls))
  np.testing.assert_array_equal(given.apply(variables, source, target),
                                model.apply(variables, source, target))
  assert len(calls) == 6  # 2 encoder self-attentions, 2 × (self, cross) in the decoder
  assert {c['shapes'][0][1] for c in calls[:2]} == {4} and calls[3]['shapes'][1][1] == 4
  assert all(c['implementation'] is None and not c['return_weights'] for c in calls)
  calls.clear()  # weights asked for: attention_fn returns them (on the xla path) to be sown
  weights = tx.attention_weights(given, variables, source, target)
  assert len(calls) == 6 and len(weights) == 6
  assert all(c['implementation'] == 'xla' and c['return_weights'] for c in calls)
  calls.clear()
  lm = tx.DecoderLM(vocab_size=20, **SMALL)
  prompt = jnp.array([[3, 4]])
  params = lm.init(jax.random.key(0), prompt)['params']
  decoded = tx.generate(lm.clone(attention_fn=_recording(calls)), params, prompt,
                        max_new_tokens=3)
  np.testing.assert_array_equal(decoded.tokens,
                                tx.generate(lm, params, prompt, max_new_tokens=3).tokens)
  assert calls  # the cached decoding steps run it too
  calls.clear()  # other scores compute score(q, k) and attend: attention_fn is for 'dot'
  other = tx.Encoder(score='general', attention_fn=_recording(calls), **SMALL)
  other.init(jax.random.key(0), jnp.ones((1, 4, 16)))
  assert not calls


def jax_nn_attention(q, k, v, *, mask=None, bias=None, beta=None, implementation=None,
                     return_weights=False, dropout_rate=0.0, dropout_rng=None):
  """jax.nn.dot_product_attention behind the attention_fn interface (no weights, no dropout)."""
  assert not return_weights and dropout_rng is None
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=beta)


@pytest.mark.parametrize('kind', ['lm', 'vit'])
def test_a_jax_nn_attention_fn_gives_the_default_output(kind):
  if kind == 'lm':
    model = tx.DecoderLM(vocab_size=20, posemb='rope', **SMALL)
    inputs = jax.random.randint(jax.random.key(1), (2, 6), 0, 20)
  else:
    model = tx.ViT(num_classes=3, patch_size=2, **SMALL)
    inputs = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  variables = model.init(jax.random.key(0), inputs)
  np.testing.assert_allclose(model.clone(attention_fn=jax_nn_attention).apply(variables, inputs),
                             model.apply(variables, inputs), atol=1e-5, rtol=1e-5)


def test_dropout_needs_rng_and_changes_output_in_training():
  model = tx.EncoderClassifier(num_classes=3, dropout=0.5, attention_dropout=0.5, **SMALL)
  x = jnp.ones((2, 5, 3))
  params = model.init(jax.random.key(0), x)
  train = lambda k: model.apply(params, x, deterministic=False, rngs={'dropout': k})
  np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
  assert np.abs(train(jax.random.key(1)) - train(jax.random.key(2))).max() > 0
  np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x))


@pytest.mark.parametrize('shape', [(2, 5, 16), (3, 1, 16), (2, 3, 4, 16)])
def test_feed_forward_matches_reference_on_any_leading_dims(shape):
  """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2 row by row, whatever the leading dims (decoding's
  [B, 1, d] included), in float64 NumPy."""
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  ffn = tx.FeedForward(d_ff=24, activation='gelu')
  params = ffn.init(jax.random.key(0), x)['params']
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = x.astype(np.float64) @ p['hidden']['kernel'] + p['hidden']['bias']
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  want = h @ p['output']['kernel'] + p['output']['bias']
  got = ffn.apply({'params': params}, x)
  assert got.shape == shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_feed_forward_kernel_gradients_contract_g_as_stored():
  """From [B, T, d] inputs, XLA:CPU's compiled kernel gradients xᵀ·g contract the leading
  axis of both operands: no transposed copy of g in the slow orientation (what flattening the
  FFN's input buys; docs/performance.md)."""
  x = jnp.ones((4, 32, 16))
  ffn = tx.FeedForward(d_ff=64, activation='gelu')
  params = ffn.init(jax.random.key(0), x)['params']
  loss = lambda p, x: jnp.sum(ffn.apply({'params': p}, x) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  kernel_grads = [line for line in text.splitlines()
                  if ' dot(' in line and 'lhs_contracting_dims={0}' in line]
  assert kernel_grads, 'no kernel gradient found as a dot'
  assert all('rhs_contracting_dims={0}' in line for line in kernel_grads), kernel_grads


@pytest.mark.parametrize('options', [dict(), dict(score='general'), dict(beta_length='log')])
def test_mha_key_lengths_equal_the_padding_mask(options):
  """key_lengths=L gives what mask=padding_mask(L) gives, also where they are folded into the
  mask (other scores; the log-length β, whose n_i counts the keys a query may attend)."""
  x = np.random.default_rng(0).normal(size=(3, 6, 16)).astype(np.float32)
  lengths = np.array([6, 4, 1])
  mha = tx.MultiHeadAttention(num_heads=4, **options)
  variables = mha.init(jax.random.key(0), x)
  got = mha.apply(variables, x, key_lengths=lengths)
  want = mha.apply(variables, x, mask=tx.padding_mask(lengths, kv_len=6))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(got, mha.apply(variables, x), atol=1e-3)  # the lengths do matter
