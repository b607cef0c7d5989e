"""Grouped-query and multi-query attention (K key/value heads for H query heads): the pure
function against float64 NumPy and jax.nn, MultiHeadAttention against its own parameters,
the KV cache, the one-line errors, and a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
import tx

H = 4  # query heads.
SMALL = dict(num_layers=2, d_model=16, num_heads=H, d_ff=32, num_positions=12)


def _qkv(rng, kv_heads, batch=(2,), tq=5, tk=7, d=8):
  q = rng.normal(size=batch + (tq, H, d)).astype(np.float32)
  k = rng.normal(size=batch + (tk, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=batch + (tk, kv_heads, d)).astype(np.float32)
  return q, k, v


def _causal_and_padding(lengths, tq, tk):
  """[B, 1, Tq, Tk]: causal over the last Tq of Tk positions, and padding after `lengths`."""
  return np.asarray(tx.combine_masks(
      tx.causal_mask(tq, tk), tx.padding_mask(tx.valid_from_lengths(np.array(lengths), tk))))


def _repeat_heads(x, kv_heads):
  """[..., T, K, D] -> [..., T, H, D]: query head h gets key/value head h // (H/K)."""
  return np.repeat(x, H // kv_heads, axis=-2)


@pytest.mark.parametrize('kv_heads', [1, 2, H])
@pytest.mark.parametrize('beta', [0.7, 'per_head'])
def test_matches_float64_reference_that_repeats_heads(kv_heads, beta):
  rng = np.random.default_rng(kv_heads)
  q, k, v = _qkv(rng, kv_heads)
  mask = _causal_and_padding([7, 0], 5, 7)  # the second row has no attendable key at all.
  bias = rng.normal(size=(H, 5, 7)).astype(np.float32)
  beta = rng.uniform(0.2, 2.0, size=H).astype(np.float32) if beta == 'per_head' else beta
  out, w = tx.dot_product_attention(q, k, v, mask=mask, bias=bias, beta=beta,
                                    return_weights=True, implementation='xla')
  ref_out, ref_w = reference.attention(q, _repeat_heads(k, kv_heads), _repeat_heads(v, kv_heads),
                                       mask, bias, beta)
  assert w.shape == (2, H, 5, 7) and out.shape == q.shape
  np.testing.assert_allclose(w, ref_w, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] == 0.0)
  assert np.all(np.asarray(out)[1] == 0.0)


@pytest.mark.parametrize('kv_heads', [1, 2, H])
def test_matches_jax_nn_grouped_query_attention(kv_heads):
  rng = np.random.default_rng(10 + kv_heads)
  q, k, v = _qkv(rng, kv_heads)
  mask = np.broadcast_to(_causal_and_padding([7, 4], 5, 7), (2, H, 5, 7))  # no empty rows.
  ours = tx.dot_product_attention(q, k, v, mask=mask, beta=0.3, implementation='xla')
  theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3, implementation='xla')
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize('kv_heads', [1, 2])
@pytest.mark.parametrize('beta', [None, 1.3, 'per_head', 'traced'])
def test_fused_equals_xla(kv_heads, beta):
  rng = np.random.default_rng(20 + kv_heads)
  q, k, v = _qkv(rng, kv_heads, batch=(2, 3))  # two batch dims.
  mask = rng.random((2, 1, H, 5, 7)) < 0.7
  mask[0, 0, 0, 0] = False  # a fully-masked row.
  bias = rng.normal(size=(H, 5, 7)).astype(np.float32)
  b = rng.uniform(0.1, 1.0, size=H).astype(np.float32) if beta in ('per_head', 'traced') else beta
  run = lambda b, impl: tx.dot_product_attention(q, k, v, mask=mask, bias=bias, beta=b,
                                                 implementation=impl)
  fused = jax.jit(lambda b: run(b, 'fused'))(b) if beta == 'traced' else run(b, 'fused')
  np.testing.assert_allclose(fused, run(b, 'xla'), atol=1e-5)
  expected, _ = reference.attention(q, _repeat_heads(k, kv_heads), _repeat_heads(v, kv_heads),
                                    mask, bias, b)  # float64, heads repeated
  np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_attend_reads_grouped_values_as_repeated_ones_also_with_dropout():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(2, H, 5, 7)).astype(np.float32)
  v = rng.normal(size=(2, 7, 2, 6)).astype(np.float32)
  kw = dict(mask=_causal_and_padding([7, 3], 5, 7), beta=0.8, dropout_rate=0.3,
            dropout_rng=jax.random.key(4))
  out, w = tx.attend(scores, v, **kw)
  ref_out, ref_w = tx.attend(scores, _repeat_heads(v, 2), **kw)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  np.testing.assert_array_equal(w, ref_w)


def test_gradients_match_repeated_heads():
  """d/dk of grouped attention is the sum over each key head's H/K query heads."""
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 2)
  mask = _causal_and_padding([7, 5], 5, 7)
  f = lambda k, v: (tx.dot_product_attention(q, k, v, mask=mask, implementation='xla') ** 2).sum()
  dk, dv = jax.grad(f, argnums=(0, 1))(k, v)
  dk_rep, dv_rep = jax.grad(f, argnums=(0, 1))(_repeat_heads(k, 2), _repeat_heads(v, 2))
  group_sum = lambda g: np.asarray(g).reshape(g.shape[:-2] + (2, H // 2, g.shape[-1])).sum(-2)
  np.testing.assert_allclose(dk, group_sum(dk_rep), atol=1e-5)
  np.testing.assert_allclose(dv, group_sum(dv_rep), atol=1e-5)


def _project(x, p):
  """x [.., T, D] through a DenseGeneral to heads: [.., T, heads, Dh], in float64."""
  return np.einsum('...td,dhe->...the', x, np.asarray(p['kernel'], np.float64)) + np.asarray(
      p['bias'], np.float64)


def _mha_reference(params, xq, xkv, beta, kv_heads, mask=None, rope=False):
  """Concat_h softargmax_β(q_h k_{h // (H/K)}ᵀ) v_{h // (H/K)} W^O, from the module's params."""
  q, k, v = (_project(x, params[n]) for x, n in ((xq, 'query'), (xkv, 'key'), (xkv, 'value')))
  if rope:
    q = np.stack([reference.rope(x, range(x.shape[0])) for x in q])
    k = np.stack([reference.rope(x, range(x.shape[0])) for x in k])
  out, w = reference.attention(q, _repeat_heads(k, kv_heads), _repeat_heads(v, kv_heads), mask,
                               beta=beta)
  o = params['out']
  return np.einsum('...the,hed->...td', out, np.asarray(o['kernel'], np.float64)) + np.asarray(
      o['bias'], np.float64), w


@pytest.mark.parametrize('kv_heads', [1, 2])
def test_mha_self_attention_matches_its_own_params(kv_heads):
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 6, 16)).astype(np.float32)
  mha = tx.MultiHeadAttention(num_heads=H, num_kv_heads=kv_heads, learn_beta=True, rope=True)
  params = mha.init(jax.random.key(0), x)['params']
  assert params['key']['kernel'].shape == (16, kv_heads, 4)
  assert params['value']['bias'].shape == (kv_heads, 4)
  assert params['query']['kernel'].shape == (16, H, 4) and params['log_beta'].shape == (H,)
  beta = np.array([0.2, 0.6, 1.1, 3.0], np.float32)  # β per query head.
  params = dict(params, log_beta=jnp.log(beta))
  mask = _causal_and_padding([6, 4], 6, 6)
  out, state = mha.apply({'params': params}, x, mask=mask, mutable=['intermediates'])
  ref_out, ref_w = _mha_reference(params, x, x, beta, kv_heads, mask, rope=True)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  (w,) = state['intermediates']['attention_weights']
  np.testing.assert_allclose(w, ref_w, atol=2e-6)


@pytest.mark.parametrize('implementation', ['xla', 'fused'])
def test_mha_cross_attention_matches_its_own_params(implementation):
  rng = np.random.default_rng(7)
  xq = rng.normal(size=(2, 3, 16)).astype(np.float32)
  xkv = rng.normal(size=(2, 7, 16)).astype(np.float32)
  mha = tx.MultiHeadAttention(num_heads=H, num_kv_heads=2, beta_scale=1.7,
                              implementation=implementation)
  params = mha.init(jax.random.key(0), xq, xkv)['params']
  mask = np.asarray(tx.padding_mask(tx.valid_from_lengths(np.array([7, 4]), 7)))
  out = mha.apply({'params': params}, xq, xkv, mask=mask)
  ref_out, _ = _mha_reference(params, xq, xkv, 1.7 / np.sqrt(4), 2, mask)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)


def _as_multi_head(params, kv_heads):
  """The same module's params with W^K, W^V repeated to H heads: an MHA computing the same."""
  rep = lambda p: {n: np.repeat(np.asarray(a), H // kv_heads, axis=-2 if n == 'kernel' else 0)
                   for n, a in p.items()}
  return dict(params, key=rep(params['key']), value=rep(params['value']))


@pytest.mark.parametrize('score', ['dot', 'general', 'additive', 'cosine', 'location'])
def test_every_score_equals_multi_head_with_repeated_projections(score):
  x = jax.random.normal(jax.random.key(8), (2, 6, 16))
  common = dict(num_heads=H, score=score, location_keys=6, dropout_rate=0.2,
                implementation='xla' if score == 'dot' else None)
  gqa = tx.MultiHeadAttention(num_kv_heads=2, **common)
  params = gqa.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape), params)
  mha = tx.MultiHeadAttention(**common)
  kw = dict(mask=tx.causal_mask(6), deterministic=False, rngs={'dropout': jax.random.key(2)},
            mutable=['intermediates'])
  out, state = gqa.apply({'params': params}, x, **kw)
  ref, ref_state = mha.apply({'params': _as_multi_head(params, 2)}, x, **kw)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(state['intermediates']['attention_weights'][0],
                             ref_state['intermediates']['attention_weights'][0], atol=1e-6)
  g = jax.grad(lambda p: (gqa.apply({'params': p}, x, mask=tx.causal_mask(6)) ** 2).sum())(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
  assert np.abs(g['value']['kernel']).max() > 0
  if score != 'location':  # the location score never looks at the keys.
    assert np.abs(g['key']['kernel']).max() > 0


def test_none_is_multi_head_attention_unchanged():
  x = jax.random.normal(jax.random.key(10), (2, 5, 16))
  none = tx.MultiHeadAttention(num_heads=H)
  full = tx.MultiHeadAttention(num_heads=H, num_kv_heads=H)
  params = none.init(jax.random.key(0), x)['params']
  assert jax.tree.structure(params) == jax.tree.structure(full.init(jax.random.key(0), x)['params'])
  assert params['key']['kernel'].shape == params['value']['kernel'].shape == (16, H, 4)
  jax.tree.map(np.testing.assert_array_equal, params, full.init(jax.random.key(0), x)['params'])
  mask = tx.causal_mask(5)
  out = none.apply({'params': params}, x, mask=mask)
  np.testing.assert_array_equal(out, full.apply({'params': params}, x, mask=mask))
  ref, _ = _mha_reference(params, x, x, 1 / np.sqrt(4), H, np.asarray(mask))
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Every model carries the field down to its blocks: the default builds H key heads.
  lm = tx.DecoderLM(vocab_size=20, **SMALL)
  shapes = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))['params']
  assert shapes['decoder']['block_0']['self_attention']['key']['kernel'].shape == (16, H, 4)


def _decode_stepwise(model, params, tokens, chunks):
  cache = model.clone(decode=True).init(jax.random.key(0), tokens)['cache']
  outs, start = [], 0
  for size in chunks:
    out, state = model.clone(decode=True).apply({'params': params, 'cache': cache},
                                                tokens[:, start:start + size], mutable=['cache'])
    cache, start = state['cache'], start + size
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


def test_kv_cache_holds_kv_heads_and_decoding_equals_full_pass():
  tokens = jax.random.randint(jax.random.key(11), (2, 8), 0, 20)
  lm = tx.DecoderLM(vocab_size=20, posemb='rope', num_kv_heads=2, **SMALL)
  params = lm.init(jax.random.key(0), tokens)['params']
  full = lm.apply({'params': params}, tokens)
  cached, cache = _decode_stepwise(lm, params, tokens, chunks=(4, 1, 1, 1, 1))
  np.testing.assert_allclose(cached, full, atol=1e-5)
  block_cache = cache['decoder']['block_0']['self_attention']
  assert block_cache['cached_key'].shape == block_cache['cached_value'].shape == (2, 8, 2, 4)


def _one_line_error(match, fn):
  with pytest.raises(ValueError, match=match) as info:
    fn()
  assert '\n' not in str(info.value)


def test_heads_that_do_not_divide_are_one_line_errors():
  rng = np.random.default_rng(12)
  q, k, v = _qkv(rng, 3)
  _one_line_error(r'k has K=3 heads .* does not divide the H=4 query heads',
                  lambda: tx.dot_product_attention(q, k, v))
  _one_line_error('k and v must share the number of key/value heads',
                  lambda: tx.dot_product_attention(q, k[..., :2, :], v))
  _one_line_error(r'v has K=3 heads .* does not divide the H=4 query heads',
                  lambda: tx.attend(np.zeros((2, H, 5, 7), np.float32), v))
  x = jnp.zeros((1, 5, 16))
  for bad in (3, 0, 2.0):
    _one_line_error(rf'num_kv_heads={bad!r}; allowed: None or a divisor of num_heads=4: 1, 2, 4',
                    lambda: tx.MultiHeadAttention(num_heads=H, num_kv_heads=bad).init(
                        jax.random.key(0), x))
  _one_line_error('num_kv_heads=3; allowed',
                  lambda: tx.ViT(num_classes=3, patch_size=4, num_layers=1, d_model=16,
                                 num_heads=H, d_ff=32, num_kv_heads=3).init(
                                     jax.random.key(0), jnp.zeros((1, 8, 8, 1))))


def test_decoder_lm_trains_one_step():
  tokens = jax.random.randint(jax.random.key(13), (4, 8), 0, 20)
  lm = tx.DecoderLM(vocab_size=20, posemb='rope', num_kv_heads=1, learn_beta=True,
                    attention_dropout=0.1, **SMALL)
  params = lm.init(jax.random.key(0), tokens)['params']

  def loss(p):
    logits = lm.apply({'params': p}, tokens[:, :-1], deterministic=False,
                      rngs={'dropout': jax.random.key(1)})
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  loss_and_grad = jax.jit(jax.value_and_grad(loss))
  value, grads = loss_and_grad(params)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  attn = grads['decoder']['block_0']['self_attention']
  assert attn['key']['kernel'].shape == (16, 1, 4)
  assert np.abs(attn['key']['kernel']).max() > 0 and np.abs(attn['log_beta']).max() > 0
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  assert loss_and_grad(stepped)[0] < value


def test_encoder_decoder_cross_attention_uses_kv_heads():
  source = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
  target = jax.random.randint(jax.random.key(14), (2, 5), 1, 20)
  model = tx.EncoderDecoder(vocab_size=20, num_kv_heads=1, **SMALL)
  params = jax.eval_shape(model.init, jax.random.key(0), source, target)['params']
  for stack, names in (('encoder', ('self_attention',)),
                       ('decoder', ('self_attention', 'cross_attention'))):
    for name in names:
      attn = params[stack]['block_0'][name]
      assert attn['key']['kernel'].shape == attn['value']['kernel'].shape == (16, 1, 4)
      assert attn['query']['kernel'].shape == (16, H, 4)
  logits = jax.eval_shape(lambda p: model.apply({'params': p}, source, target), params)
  assert logits.shape == (2, 5, 20)
