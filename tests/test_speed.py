"""The speed options: fused attention chosen automatically, remat and scan over layers.

Each option must compute the same function as the plain model: the automatic choice is the
xla path on CPU, remat gives the same loss and gradients, and a scanned model with the stacked
parameters of an unscanned one gives the same outputs, gradients, decoded tokens and attention
weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx
from tx import attention as attention_lib

SMALL = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32, num_positions=12)


# --- 1. fused attention where valid -------------------------------------------------------

def _qkv(dtype=jnp.bfloat16, t_q=8, t_k=8, heads=4, d_k=64, d_v=None):
  shape = lambda t, d: jax.ShapeDtypeStruct((2, t, heads, d), dtype)
  return shape(t_q, d_k), shape(t_k, d_k), shape(t_k, d_v or d_k)


VALID = dict(backend='gpu')


@pytest.mark.parametrize('change,valid', [
    (dict(), True),
    (dict(backend='cpu'), False),
    (dict(backend='tpu'), False),
    (dict(dtype=jnp.float16), True),
    (dict(dtype=jnp.float32), False),
    (dict(mixed=True), False),  # q bfloat16, k and v float16
    (dict(d_k=8), True),
    (dict(d_k=128), True),
    (dict(d_k=12), False),  # not a multiple of 8
    (dict(d_k=136), False),  # over 128
    (dict(d_k=256, max_head_dim=256), True),  # Hopper's limit, which explicit 'fused' tries
    (dict(d_k=264, max_head_dim=256), False),
    (dict(d_v=32), False),  # Dv != Dk
    (dict(t_q=7), False),  # odd lengths: cuDNN's backward pass refuses them
    (dict(t_k=9), False),
    (dict(beta=0.5), True),
    (dict(beta=np.ones(4)), True),  # per head
    (dict(beta=np.ones((4, 1, 1))), True),
    (dict(beta=np.ones((4, 8, 8))), False),  # a full β map cannot be folded into q
    (dict(score='general'), False),
    (dict(dropout=True), False),
    (dict(return_weights=True), False),
])
def test_fused_is_valid_checks_every_condition(change, valid):
  change = dict(change)
  shapes = {k: change.pop(k) for k in ('dtype', 't_q', 't_k', 'd_k', 'd_v') if k in change}
  q, k, v = _qkv(**shapes)
  if change.pop('mixed', False):
    k, v = (jax.ShapeDtypeStruct(x.shape, jnp.float16) for x in (k, v))
  assert tx.fused_is_valid(q, k, v, **dict(VALID, **change)) is valid


def test_auto_is_the_xla_path_on_cpu():
  rng = np.random.default_rng(0)
  mask = tx.causal_mask(8)
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 16)), dtype) for _ in range(3))
    np.testing.assert_array_equal(
        tx.dot_product_attention(q, k, v, mask=mask),
        tx.dot_product_attention(q, k, v, mask=mask, implementation='xla'))
  model = tx.DecoderLM(vocab_size=20, dtype=jnp.bfloat16, **SMALL)
  tokens = jnp.arange(16).reshape(2, 8) % 20
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = lambda m: jax.jit(m.apply)(params, tokens)
  np.testing.assert_array_equal(apply(model), apply(model.clone(implementation='xla')))


def test_auto_takes_the_fused_kernel_only_when_valid_and_weights_are_not_asked(monkeypatch):
  """With the backend reported as 'gpu', bfloat16 attention goes through `_fused` (which on
  this CPU falls back to jax.nn's XLA path) unless 'intermediates' is mutable."""
  calls = []
  fused = attention_lib._fused
  monkeypatch.setattr(attention_lib, '_fused', lambda *a: calls.append(1) or fused(*a))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  block = tx.EncoderBlock(num_heads=2, d_ff=32, dtype=jnp.bfloat16)
  variables = block.init(jax.random.key(1), x)
  calls.clear()
  out = block.apply(variables, x)
  assert len(calls) == 1
  ref, state = block.apply(variables, x, mutable=['intermediates'])
  assert len(calls) == 1 and 'attention_weights' in state['intermediates']['self_attention']
  np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=5e-2)
  weights = tx.attention_weights(block, variables, x)
  assert len(calls) == 1 and weights['self_attention'].shape == (2, 2, 6, 6)
  block.clone(dtype=jnp.float32).apply(variables, x)  # float32: not valid, the xla path
  block.clone(attention_dropout=0.1).apply(variables, x, deterministic=False,
                                           rngs={'dropout': jax.random.key(2)})
  assert len(calls) == 1
  block.clone(attention_dropout=0.1).apply(variables, x)  # deterministic: no dropout in use
  assert len(calls) == 2


def _walk(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _walk(sub)


@pytest.mark.parametrize('norm', ['post', 'pre'])
def test_bfloat16_block_keeps_layernorm_statistics_and_softmax_in_float32(norm):
  """Every reduction, exp and rsqrt (LayerNorm mean/variance, softmax max/sum/exp) of a
  bfloat16 encoder block runs on float32 values."""
  block = tx.EncoderBlock(num_heads=2, d_ff=32, norm=norm, dtype=jnp.bfloat16)
  x = jnp.ones((2, 5, 16), jnp.bfloat16)
  variables = block.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda x: block.apply(variables, x, mask=tx.causal_mask(5)))(x).jaxpr
  ops = [e for e in _walk(jaxpr)
         if e.primitive.name in ('reduce_sum', 'reduce_max', 'exp', 'rsqrt')]
  names = {e.primitive.name for e in ops}
  assert names == {'reduce_sum', 'reduce_max', 'exp', 'rsqrt'}, names
  assert all(v.aval.dtype == jnp.float32 for e in ops for v in e.invars), [
      (e.primitive.name, [v.aval.dtype for v in e.invars]) for e in ops]
  assert block.apply(variables, x).dtype == jnp.bfloat16


# --- 2. remat -----------------------------------------------------------------------------

def _vit(**kw):
  model = tx.ViT(num_classes=3, patch_size=2, **{**SMALL, 'posemb': 'learn', **kw})
  images = jax.random.normal(jax.random.key(2), (2, 4, 4, 1))
  return model, images, (images,)


def _lm(**kw):
  model = tx.DecoderLM(vocab_size=20, **{**SMALL, 'posemb': 'learn', **kw})
  tokens = jax.random.randint(jax.random.key(2), (2, 6), 3, 20)
  return model, tokens, (tokens,)


def _seq2seq(**kw):
  model = tx.EncoderDecoder(vocab_size=20, **{**SMALL, 'posemb': 'rope', **kw})
  source = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
  return model, source, (source, tx.shift_right(source, 1))


def _classifier(**kw):
  model = tx.EncoderClassifier(num_classes=3, vocab_size=20, pool='mean', **dict(SMALL, **kw))
  tokens = jnp.array([[3, 4, 5, 0], [6, 7, 8, 9]])
  return model, tokens, (tokens,)


MODELS = {'vit': _vit, 'lm': _lm, 'seq2seq': _seq2seq, 'classifier': _classifier}


def _close(a, b, atol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


def _init(model, *args):
  return jax.jit(model.init)(jax.random.key(0), *args)['params']


def _shapes(model, *args):
  return jax.eval_shape(model.init, jax.random.key(0), *args)['params']


def _loss(model, args, **kw):
  return lambda params: jnp.mean(model.apply({'params': params}, *args, **kw) ** 2)


def _outputs_and_grads(model, args, **kw):
  """params -> (outputs, gradient of the loss), in one jit program."""
  def loss(params):
    out = model.apply({'params': params}, *args, **kw)
    return jnp.mean(out ** 2), out
  return jax.jit(lambda params: (lambda r: (r[0][1], r[1]))(
      jax.value_and_grad(loss, has_aux=True)(params)))


@pytest.mark.parametrize('kind,dropout,policy', [
    ('vit', 0.0, 'nothing'), ('lm', 0.1, 'nothing'), ('vit', 0.0, 'dots'),
    ('lm', 0.1, 'dots_no_batch')])
def test_remat_gives_the_same_params_outputs_and_gradients(kind, dropout, policy):
  model, _, args = MODELS[kind](dropout=dropout)
  params = _init(model, *args)
  remat = model.clone(remat=True, remat_policy=policy)
  assert _shapes(remat, *args) == _shapes(model, *args)  # the same parameter tree
  kw = dict(deterministic=False, rngs={'dropout': jax.random.key(3)})  # the same masks
  out, grads = _outputs_and_grads(model, args, **kw)(params)
  out_r, grads_r = _outputs_and_grads(remat, args, **kw)(params)
  _close(out_r, out, atol=2e-6)
  _close(grads_r, grads, atol=1e-6)
  remats = lambda m: [e for e in _walk(jax.make_jaxpr(jax.grad(_loss(m, args)))(params).jaxpr)
                      if 'remat' in e.primitive.name or e.primitive.name == 'checkpoint']
  assert len(remats(remat)) == SMALL['num_layers'] and not remats(model)


def _saved(model, args, params) -> int:
  """How many numbers the backward pass keeps: the sizes of jax.vjp's residuals."""
  _, backward = jax.vjp(_loss(model, args), params)
  return sum(x.size for x in jax.tree.leaves(backward))


def test_each_remat_policy_keeps_what_it_names():
  """Recomputing everything keeps least; keeping the projections (dots_no_batch) more;
  every product (dots) more again, but still less than no remat, which also keeps the
  elementwise results."""
  model, _, args = _lm()
  params = _init(model, *args)
  saved = {p: _saved(model.clone(remat=True, remat_policy=p), args, params)
           for p in tx.REMAT_POLICIES}
  assert saved['nothing'] < saved['dots_no_batch'] < saved['dots'] < _saved(model, args, params)
  with pytest.raises(ValueError, match="remat_policy='all'; allowed: 'nothing', 'dots'"):
    _saved(model.clone(remat=True, remat_policy='all'), args, params)
  with pytest.raises(ValueError, match="remat_policy='dots' needs remat=True"):
    _saved(model.clone(remat_policy='dots'), args, params)


# --- 3. scan over layers ------------------------------------------------------------------

@pytest.mark.parametrize('kind,options', [
    ('vit', dict(learn_beta=True)),
    ('seq2seq', dict()),
    ('classifier', dict(learn_beta=True, posemb='rope')),
    ('lm', dict(remat=True, posemb='sinusoidal', norm='pre')),
])
def test_scanned_model_with_stacked_params_equals_the_unscanned_one(kind, options):
  model, _, args = MODELS[kind](**options)
  params = _init(model, *args)
  scanned = model.clone(scan_layers=True)
  stacked = tx.stack_layers(params)
  own = _shapes(scanned, *args)
  assert own == jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stacked)
  _close(tx.unstack_layers(stacked), params, atol=0)  # the conversion round trip
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(own)[0]]
  assert any("['blocks']" in p for p in paths) and not any('block_' in p for p in paths)
  out, grads = _outputs_and_grads(model, args)(params)
  out_scanned, grads_scanned = _outputs_and_grads(scanned, args)(stacked)
  _close(out_scanned, out)
  _close(tx.unstack_layers(grads_scanned), grads, atol=1e-6)


def test_scanned_model_trains_with_dropout_and_remat():
  model, _, args = _lm(dropout=0.2, attention_dropout=0.2, scan_layers=True, remat=True)
  params = _init(model, *args)
  train = jax.jit(lambda key: jax.value_and_grad(_loss(model, args, deterministic=False,
                                                       rngs={'dropout': key}))(params))
  (loss1, grads1), (loss2, _) = train(jax.random.key(1)), train(jax.random.key(2))
  assert loss1 != loss2 and loss1 == train(jax.random.key(1))[0]
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads1))


@pytest.mark.parametrize('kind', ['lm', 'seq2seq'])
def test_generate_with_a_scanned_model_equals_the_unscanned_one(kind):
  model, inputs, args = MODELS[kind](posemb='rope')
  params = _init(model, *args)
  scanned, stacked = model.clone(scan_layers=True), tx.stack_layers(params)
  prompt = inputs[:, :3] if kind == 'lm' else inputs
  common = dict(max_new_tokens=7 if kind == 'lm' else 10, return_logits=True,
                bos_id=None if kind == 'lm' else 1)
  a = tx.generate(model, params, prompt, **common)
  b = tx.generate(scanned, stacked, prompt, **common)
  np.testing.assert_array_equal(b.tokens, a.tokens)
  np.testing.assert_allclose(b.logits, a.logits, atol=2e-5)


def test_beam_search_with_a_scanned_model_equals_the_unscanned_one():
  """Beam search reorders the cache rows: axis 1 of a scanned stack's [layers, batch, ...]."""
  model, tokens, args = _lm(posemb='rope')
  params = _init(model, *args)
  common = dict(beam_size=3, max_new_tokens=7)
  a = tx.beam_search(model, params, tokens[:, :3], **common)
  b = tx.beam_search(model.clone(scan_layers=True), tx.stack_layers(params), tokens[:, :3],
                     **common)
  np.testing.assert_array_equal(b.tokens, a.tokens)
  np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5)


def test_attention_weights_of_a_scanned_model_have_the_unscanned_keys():
  model, _, args = _seq2seq()
  params = _init(model, *args)
  plain = tx.attention_weights(model, {'params': params}, *args)
  scanned = tx.attention_weights(model.clone(scan_layers=True),
                                 {'params': tx.stack_layers(params)}, *args)
  assert list(scanned) == list(plain) == (  # in call order
      ['encoder/block_0/self_attention', 'encoder/block_1/self_attention'] +
      [f'decoder/block_{i}/{kind}' for i in range(2)
       for kind in ('self_attention', 'cross_attention')])
  _close(scanned, plain)


def test_scan_compiles_one_while_loop_smaller_than_the_unrolled_layers():
  model, images, _ = _vit(num_layers=6)
  params = _init(model, images)
  hlo = lambda m, p: jax.jit(_loss(m, (images,))).lower(p).compile().as_text()
  unrolled = hlo(model, params)
  scanned = hlo(model.clone(scan_layers=True), tx.stack_layers(params))
  assert ' while(' in scanned and len(scanned) < len(unrolled) / 2, (len(scanned),
                                                                      len(unrolled))


def test_config_options_reach_the_model():
  from configs import vit
  from experiments import tasks
  config = vit.get_config('quick')
  config.model.update(num_layers=2, d_model=16, num_heads=2, d_ff=32, remat=True,
                      scan_layers=True)
  model = tasks.build_model(config, {'num_classes': 10})
  assert model.remat and model.scan_layers
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  assert params['encoder']['blocks']['ffn']['hidden']['kernel'].shape == (2, 16, 32)
