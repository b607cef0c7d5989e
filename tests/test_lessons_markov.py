"""experiments.lessons.markov: the skip sentences, the n-gram tables, attention-only blocks
(d_ff = 0), and the lesson's --quick end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx
from experiments.data import skips
from experiments.lessons import markov


def words(ids):
  return [skips.WORDS[i] for i in ids]


def test_sentences_put_the_decisive_word_k_back_and_hide_it_from_short_contexts():
  d = skips.skip_sentences(train_size=200, test_size=60, max_distance=12, seq_len=20, seed=3)
  t = d.test
  rows = np.arange(len(t['ran']))
  assert np.bincount(t['distance']).tolist() == [0] + [5] * 12
  assert (t['ran'] - t['decisive'] == t['distance']).all()
  assert set(words(t['inputs'][rows, t['ran']])) == {'ran'}
  decisive = words(t['inputs'][rows, t['decisive']])
  after = words(t['targets'][rows, t['ran']])
  assert set(zip(decisive, after)) == {('program', 'please'), ('battery', 'down')}
  before = words(t['inputs'][rows, t['ran'] - 1])
  assert all(b == (x if k == 1 else 'it') for b, x, k in zip(before, decisive, t['distance']))
  assert sum(x == 'program' for x in decisive) == 12 * round(0.6 * 5)  # the prior, at every k.
  lecture = 'check the battery log and find out whether it ran down please .'.split()
  assert skips.sentence('battery', 7, np.random.default_rng(0)) == lecture
  assert (d.train['inputs'][:, 1:] == d.train['targets'][:, :-1]).all()
  with pytest.raises(ValueError, match='data.seq_len=10'):
    skips.skip_sentences(max_distance=12, seq_len=10)


def test_ngram_counts_match_counting_by_hand():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, 4, (3, 9))
  inputs, targets = seq[:, :-1], seq[:, 1:]
  for order in (1, 2, 3):
    counts = markov.ngram_counts(inputs, targets, order, 4)
    by_hand = {}
    for row in seq:
      for t in range(order, len(row)):
        key = (tuple(row[t - order:t]), row[t])
        by_hand[key] = by_hand.get(key, 0) + 1
    for (context, nxt), n in by_hand.items():
      index = sum(w * 4 ** i for i, w in enumerate(reversed(context)))
      assert counts[index, nxt] == n
    assert counts.sum() == sum(by_hand.values())


def test_attention_only_block_is_the_block_with_a_zero_ffn():
  """d_ff = 0: no FFN parameters, and the output of a pre-LN block whose FFN output is zero."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  mask = tx.causal_mask(5)
  full = tx.DecoderBlock(num_heads=2, d_ff=16, norm='pre')
  bare = tx.DecoderBlock(num_heads=2, d_ff=0, norm='pre')
  params = jax.jit(full.init)(jax.random.key(1), x, self_mask=mask)['params']
  attention_only = {k: v for k, v in params.items() if not k.startswith('ffn')}
  shapes = jax.eval_shape(bare.init, jax.random.key(1), x, self_mask=mask)['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(attention_only)
  zeroed = dict(params, ffn=dict(params['ffn'], output=jax.tree.map(jnp.zeros_like,
                                                                     params['ffn']['output'])))
  np.testing.assert_array_equal(
      jax.jit(bare.apply)({'params': attention_only}, x, self_mask=mask),
      jax.jit(full.apply)({'params': zeroed}, x, self_mask=mask))


def test_quick_lesson_end_to_end(tmp_path):
  results = markov.run_lesson(str(tmp_path), quick=True)
  with open(tmp_path / 'results.json') as f:
    assert json.load(f) == results
  k = np.array(results['distances'])
  acc = results['accuracy']
  # Counting by hand: the test set has round(0.6 · n) program sentences at every k; order n
  # sees the decisive word for k <= n - 1 only, and otherwise guesses please.
  prior = round(0.6 * results['test_per_distance']) / results['test_per_distance']
  assert results['prior'] == [prior] * len(k)
  for order in markov.ORDERS:
    np.testing.assert_allclose(acc[f'markov{order}'], np.where(k <= order - 1, 1.0, prior))
  assert min(acc['attention']['mean']) >= 0.9  # measured 1.0 at every k
  assert results['steps'] == [60, 60] and results['seeds'] == [0, 1]
  for cls in ('program', 'battery'):
    total = sum(np.array(results['attention_mass'][cls][p]['mean']) for p in markov.PARTS)
    np.testing.assert_allclose(total, 1.0, atol=1e-4)
  assert min(results['attention_mass']['program']['decisive']['mean']) > 0.5
  table = (tmp_path / 'results.md').read_text()
  assert table.count(' ± ') >= 3 * len(k) and '| 10 | 0.600 |' in table
  for png in ('accuracy_vs_distance.png', 'attention_heatmap.png'):
    assert (tmp_path / png).stat().st_size > 10_000
