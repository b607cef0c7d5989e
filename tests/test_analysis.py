"""tx/analysis.py: entropy, rollout, mean distance and the position/content split against NumPy,
and every layer found by attention_weights, named by AttentionLayer."""

import copy
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx


def test_entropy_of_uniform_is_log_t_and_of_one_hot_is_zero():
  t = 7
  uniform = jnp.full((2, 3, 5, t), 1.0 / t)
  np.testing.assert_allclose(tx.attention_entropy(uniform), np.log(t), rtol=1e-6)
  one_hot = jax.nn.one_hot(jnp.zeros((2, 3, 5), jnp.int32), t)
  np.testing.assert_allclose(tx.attention_entropy(one_hot), 0.0, atol=1e-7)


def test_entropy_matches_numpy_and_masks_queries():
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.ones(6), size=(2, 3, 4))  # [batch, H, Tq, Tk]
  w[0, 0, 0] = [1, 0, 0, 0, 0, 0]  # a zero weight contributes 0, not NaN.
  per_query = -(w * np.log(np.where(w > 0, w, 1))).sum(-1)
  np.testing.assert_allclose(tx.attention_entropy(w), per_query.mean(-1), rtol=1e-5)
  queries = np.array([[1, 1, 0, 0], [1, 0, 1, 1]])
  expected = (per_query * queries[:, None]).sum(-1) / queries.sum(-1)[:, None]
  np.testing.assert_allclose(tx.attention_entropy(w, queries), expected, rtol=1e-5)


@pytest.mark.parametrize('implementation', [None, 'fused'])
def test_attention_weights_of_every_layer(implementation):
  model = tx.EncoderDecoder(vocab_size=11, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                            implementation=implementation)
  src = jnp.array([[3, 4, 5, 2, 0]])
  tgt = jnp.array([[1, 6, 7, 8]])
  variables = model.init(jax.random.key(0), src, tgt)
  weights = tx.attention_weights(model, variables, src, tgt)
  assert sorted(weights) == sorted(
      [f'encoder/block_{i}/self_attention' for i in range(2)] +
      [f'decoder/block_{i}/{kind}' for i in range(2) for kind in ('self_attention',
                                                                   'cross_attention')])
  assert weights['encoder/block_0/self_attention'].shape == (1, 2, 5, 5)
  assert weights['decoder/block_1/cross_attention'].shape == (1, 2, 4, 5)
  np.testing.assert_allclose(weights['decoder/block_0/cross_attention'][..., -1], 0.0)  # pad key.
  causal = weights['decoder/block_0/self_attention'][0, 0]
  np.testing.assert_allclose(np.triu(causal, 1), 0.0, atol=1e-7)


def _seq2seq():
  model = tx.EncoderDecoder(vocab_size=11, num_layers=2, d_model=16, num_heads=2, d_ff=32)
  src, tgt = jnp.array([[3, 4, 5, 2, 0]]), jnp.array([[1, 6, 7, 8]])
  return model, model.init(jax.random.key(0), src, tgt), (src, tgt)


def test_attention_layers_carry_their_place_in_the_model():
  model, variables, args = _seq2seq()
  weights = tx.attention_weights(model, variables, *args)
  assert all(type(layer) is tx.AttentionLayer for layer in weights)
  described = [(layer.stack, layer.block, layer.name, layer.is_cross, layer.is_causal,
                layer.label) for layer in weights]
  assert described == [  # in call order
      ('encoder', 0, 'self_attention', False, False, 'enc 0 self'),
      ('encoder', 1, 'self_attention', False, False, 'enc 1 self'),
      ('decoder', 0, 'self_attention', False, True, 'dec 0 self'),
      ('decoder', 0, 'cross_attention', True, False, 'dec 0 cross'),
      ('decoder', 1, 'self_attention', False, True, 'dec 1 self'),
      ('decoder', 1, 'cross_attention', True, False, 'dec 1 cross')]
  layer = list(weights)[3]
  assert layer.scope == ('decoder', 'block_0', 'cross_attention')
  assert layer == 'decoder/block_0/cross_attention' and hash(layer) == hash(str(layer))
  assert tx.AttentionLayer(layer.scope) == layer  # built from Flax's tuple of module names
  for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
    assert type(copied) is tx.AttentionLayer and copied.scope == layer.scope
    assert (copied.stack, copied.block, copied.label) == ('decoder', 0, 'dec 0 cross')
  assert json.loads(json.dumps({layer: 1})) == {'decoder/block_0/cross_attention': 1}
  with pytest.raises(ValueError, match=r"scope=\(\); allowed: a non-empty tuple"):
    tx.AttentionLayer(())


def test_attention_layers_survive_jit_and_call_order_restores_the_order():
  model, variables, args = _seq2seq()
  eager = tx.attention_weights(model, variables, *args)
  jitted = jax.jit(lambda v, *a: tx.attention_weights(model, v, *a))(variables, *args)
  assert list(jitted) == sorted(eager)  # jit returns the keys sorted as strings
  assert all(type(layer) is tx.AttentionLayer for layer in jitted)
  ordered = sorted(jitted, key=lambda layer: layer.call_order)
  assert ordered == list(eager) and [l.label for l in ordered] == [l.label for l in eager]
  for layer in eager:
    np.testing.assert_allclose(jitted[layer], eager[layer], atol=1e-6)


def test_attention_layers_of_bare_modules():
  x = jax.random.normal(jax.random.key(1), (1, 4, 16))
  mha = tx.MultiHeadAttention(num_heads=2)
  (layer, w), = tx.attention_weights(mha, mha.init(jax.random.key(0), x), x).items()
  assert layer == 'attention' and (layer.stack, layer.block, layer.label) == ('', None, 'attention')
  assert w.shape == (1, 2, 4, 4)
  block = tx.EncoderBlock(num_heads=2, d_ff=32)
  (layer,) = tx.attention_weights(block, block.init(jax.random.key(0), x), x)
  assert layer == 'self_attention' and (layer.stack, layer.block, layer.label) == ('', None, 'self')
  small = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32)
  decoder = tx.Decoder(**small)  # its blocks sit at the root: the stack is named for the model
  layers = list(tx.attention_weights(decoder, decoder.init(jax.random.key(0), x), x))
  assert layers == ['block_0/self_attention', 'block_1/self_attention']
  assert [(l.stack, l.block, l.is_causal, l.label) for l in layers] == [
      ('decoder', 0, True, 'dec 0 self'), ('decoder', 1, True, 'dec 1 self')]
  encoder = tx.Encoder(**small)
  layers = list(tx.attention_weights(encoder, encoder.init(jax.random.key(0), x), x))
  assert [(l.stack, l.is_causal, l.label) for l in layers] == [('encoder', False, 'enc 0 self'),
                                                               ('encoder', False, 'enc 1 self')]


def test_beta_zero_attention_is_uniform():
  model = tx.ViT(num_classes=3, patch_size=2, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                 beta_scale=0.0)
  images = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  variables = model.init(jax.random.key(0), images)
  for w in tx.attention_weights(model, variables, images).values():
    np.testing.assert_allclose(w, 1.0 / 5, rtol=1e-6)  # 4 patches + CLS.
    np.testing.assert_allclose(tx.attention_entropy(w), np.log(5), rtol=1e-6)


def test_rollout_of_identity_attention_is_identity():
  eye = np.broadcast_to(np.eye(6), (2, 3, 6, 6))
  np.testing.assert_allclose(tx.attention_rollout([eye, eye, eye]), np.broadcast_to(
      np.eye(6), (2, 6, 6)), atol=1e-7)


def test_rollout_matches_numpy():
  rng = np.random.default_rng(1)
  layers = [rng.dirichlet(np.ones(5), size=(2, 4, 5)) for _ in range(3)]  # [batch, H, T, T]
  expected = None
  for w in layers:  # float64, written out independently.
    a = 0.5 * np.eye(5) + 0.5 * w.mean(axis=1)
    a /= a.sum(-1, keepdims=True)
    expected = a if expected is None else np.einsum('bij,bjk->bik', a, expected)
  out = np.asarray(tx.attention_rollout(layers))
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)  # rows stay distributions.


def test_mean_attention_distance():
  positions = np.array([[y, x] for y in range(3) for x in range(3)], np.float32) * 4.0
  self_only = np.broadcast_to(np.eye(9), (2, 9, 9))
  np.testing.assert_allclose(tx.mean_attention_distance(self_only, positions), 0.0, atol=1e-7)
  rng = np.random.default_rng(2)
  w = rng.dirichlet(np.ones(9), size=(2, 9))  # [H, Tq, Tk]
  d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  np.testing.assert_allclose(tx.mean_attention_distance(w, positions),
                             (w * d).sum(-1).mean(-1), rtol=1e-5)
  first_two = np.array([1, 1] + [0] * 7)  # a query mask: the mean over queries 0 and 1 only.
  np.testing.assert_allclose(tx.mean_attention_distance(w, positions, first_two),
                             (w * d).sum(-1)[:, :2].mean(-1), rtol=1e-5)
  line = np.full((1, 4, 4), 0.25)  # uniform over 4 tokens at 0, 1, 2, 3 (1-D positions).
  np.testing.assert_allclose(tx.mean_attention_distance(line, np.arange(4)), [1.25], rtol=1e-6)


def _shares_reference(w, offsets, valid):
  """The nested ANOVA written out cell by cell, in float64."""
  n, h, tq, tk = w.shape
  out = {k: np.zeros(h) for k in ('relative', 'absolute', 'content')}
  for head in range(h):
    cells = [(i, q, k) for i in range(n) for q in range(tq) for k in range(tk) if valid[i, q, k]]
    grand = np.mean([w[i, head, q, k] for i, q, k in cells])
    by_cell, by_offset = {}, {}
    for i, q, k in cells:
      by_cell.setdefault((q, k), []).append(w[i, head, q, k])
      by_offset.setdefault(offsets[q, k], []).append(w[i, head, q, k])
    cell_mean = {c: np.mean(v) for c, v in by_cell.items()}
    offset_mean = {o: np.mean(v) for o, v in by_offset.items()}
    ss = dict(relative=0.0, absolute=0.0, content=0.0)
    for i, q, k in cells:
      ss['relative'] += (offset_mean[offsets[q, k]] - grand) ** 2
      ss['absolute'] += (cell_mean[q, k] - offset_mean[offsets[q, k]]) ** 2
      ss['content'] += (w[i, head, q, k] - cell_mean[q, k]) ** 2
    total = sum((w[i, head, q, k] - grand) ** 2 for i, q, k in cells)  # computed on its own
    for key in out:
      out[key][head] = ss[key] / total
  return out


def test_position_content_shares_match_the_written_out_anova():
  rng = np.random.default_rng(3)
  n, h, t = 5, 2, 6
  w = rng.dirichlet(np.ones(t), size=(n, h, t))
  offsets = np.arange(t)[None, :] - np.arange(t)[:, None]
  lengths = rng.integers(2, t + 1, n)  # padded examples and a causal mask: unequal cells.
  valid = ((np.arange(t)[None, :, None] < lengths[:, None, None]) &
           (np.arange(t)[None, None, :] <= np.arange(t)[None, :, None]))
  got = tx.position_content_shares(w, offsets, valid)
  want = _shares_reference(w, offsets, valid)
  for key in want:  # the reference divides by Σ (w − ḡ)² itself: the split must be exact.
    np.testing.assert_allclose(got[key], want[key], rtol=1e-9)
  np.testing.assert_allclose(sum(want.values()), 1.0, rtol=1e-9)


def test_position_content_shares_of_pure_position_and_pure_content_heads():
  rng = np.random.default_rng(4)
  n, t = 8, 7
  offsets = (np.arange(t)[None, :] - np.arange(t)[:, None]) % t  # circulant offsets.
  profile = rng.normal(size=t)
  circulant = jax.nn.softmax(profile[offsets], axis=-1)  # depends on (k - q) mod t only.
  fixed = rng.dirichlet(np.ones(t), size=t)  # the same map for every example.
  w = np.stack([np.broadcast_to(circulant, (n, t, t)), np.broadcast_to(fixed, (n, t, t)),
                rng.dirichlet(np.ones(t), size=(n, t))], axis=1)  # [N, 3 heads, T, T]
  got = tx.position_content_shares(w, offsets)
  np.testing.assert_allclose(got['relative'][0], 1.0, rtol=1e-9)  # pure relative position
  np.testing.assert_allclose(got['content'][:2], 0.0, atol=1e-12)  # no example dependence
  assert got['absolute'][1] > 0.5 and got['content'][2] > 0.5
  np.testing.assert_allclose([got['profile'][o][0] for o in range(t)],
                             np.asarray(circulant)[0], rtol=1e-6)
