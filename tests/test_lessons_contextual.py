"""experiments/lessons/contextual.py and its tx.analysis measures (hidden_states,
mean_pairwise_cosine, intra_sentence_similarity, max_explainable_variance) against float64
NumPy written out (every pair's cosine, eigenvalues of XᵀX), and the lesson run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx
from experiments.lessons import contextual
from tx.analysis import (hidden_states, intra_sentence_similarity, max_explainable_variance,
                         mean_pairwise_cosine)


def _cos(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _self_sim(rows):
  """The mean of the n² − n off-diagonal entries of the matrix of cosines."""
  norm = np.linalg.norm(rows, axis=1)
  u = np.asarray(rows, np.float64) / np.where(norm > 0, norm, 1.0)[:, None]
  return (u @ u.T)[~np.eye(len(rows), dtype=bool)].mean()


def _mev(rows):
  """The top eigenvalue of the uncentred second moment XᵀX over its trace."""
  eig = np.linalg.eigvalsh(rows.T @ rows)
  return eig[-1] / eig.sum()


def test_measures_match_numpy_pair_by_pair():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)) + 0.5
  x[3] = 0.0  # a zero row has cosine 0 with every row.
  assert mean_pairwise_cosine(x) == pytest.approx(_self_sim(x), abs=1e-12)
  # A static embedding (every context a positive multiple of one vector): SelfSim = MEV = 1.
  static = np.outer([1.0, 2.0, 0.5, 3.0], rng.normal(size=6))
  assert mean_pairwise_cosine(static) == pytest.approx(1.0, abs=1e-12)
  assert max_explainable_variance(static) == pytest.approx(1.0, abs=1e-12)
  assert max_explainable_variance(x) == pytest.approx(_mev(x), abs=1e-12)
  # Orthonormal rows: cosines 0, MEV 1/n.
  assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0, abs=1e-12)
  assert max_explainable_variance(np.eye(4)) == pytest.approx(0.25, abs=1e-12)
  h = rng.normal(size=(2, 4, 3))
  valid = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
  for s in range(2):
    rows = h[s][valid[s]]
    expected = np.mean([_cos(r, rows.mean(0)) for r in rows])
    assert intra_sentence_similarity(h, valid)[s] == pytest.approx(expected, abs=1e-12)
  with pytest.raises(ValueError, match=r'x.shape=\(1, 3\)'):
    mean_pairwise_cosine(np.ones((1, 3)))


def test_layer_metrics_of_a_hand_made_layer():
  # Word 7 in 5 contexts, word 8 in 5, word 9 once (too rare); padding (0) left out.
  rng = np.random.default_rng(1)
  words = np.array([[7, 8, 7, 9, 0], [8, 7, 8, 7, 8], [7, 8, 0, 0, 0]])
  valid = words > 0
  h = rng.normal(size=words.shape + (4,))
  out = contextual.layer_metrics(h, words, valid, min_count=5)
  sims = [_self_sim(h[words == w]) for w in (7, 8)]
  assert out['words'] == 2 and sorted(out['by_word']) == [7, 8]
  assert out['self_similarity'] == pytest.approx(np.mean(sims), abs=1e-12)
  assert out['mev'] == pytest.approx(np.mean([_mev(h[words == w]) for w in (7, 8)]), abs=1e-12)
  assert out['baseline'] == pytest.approx(_self_sim(h[valid]), abs=1e-12)
  intra = [np.mean([_cos(r, h[s][valid[s]].mean(0)) for r in h[s][valid[s]]]) for s in range(3)]
  assert out['intra_similarity'] == pytest.approx(np.mean(intra), abs=1e-12)
  assert out['self_similarity_adjusted'] == pytest.approx(np.mean(sims) - out['baseline'])
  with pytest.raises(ValueError, match='min_count=6'):
    contextual.layer_metrics(h, words, valid, min_count=6)


def _layer_norm(x, p, eps=1e-6):
  x = np.asarray(x, np.float64)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y * np.asarray(p['scale']) + np.asarray(p['bias'])


def test_hidden_states_are_the_residual_stream():
  kw = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32, num_positions=6, norm='pre')
  lm = tx.DecoderLM(vocab_size=11, posemb='learn', **kw)
  ed = tx.EncoderDecoder(vocab_size=11, posemb='sinusoidal', **kw)
  tokens = jnp.array([[3, 4, 5, 6, 7, 3], [9, 9, 1, 2, 10, 0]])
  rng = np.random.default_rng(2)  # every parameter random, so that nothing passes by symmetry.
  draw = lambda v: jax.tree.map(lambda a: np.float32(0.5 * rng.normal(size=a.shape)), v['params'])
  p = draw(jax.eval_shape(lm.init, jax.random.key(0), tokens))
  pe = draw(jax.eval_shape(ed.init, jax.random.key(0), tokens, tokens))

  @jax.jit  # one program: each compile costs more than these tiny models run.
  def run(p, pe):
    states = lambda m, p: hidden_states(m, {'params': p}, tokens)['decoder']
    return (states(lm, p), lm.apply({'params': p}, tokens),
            states(lm.clone(scan_layers=True), tx.stack_layers(p)),
            hidden_states(ed, {'params': pe}, tokens, method='encode'),
            ed.apply({'params': pe}, tokens, method='encode'))

  layers, logits, scanned, enc, memory = run(p, pe)
  assert len(layers) == 3
  table = np.asarray(p['embed']['embedding']['embedding'], np.float64)
  h0 = table[tokens] * 4.0 + np.asarray(p['decoder']['posemb']['pos_embedding'])[:6]
  np.testing.assert_allclose(layers[0], h0, atol=1e-5)
  # The last layer, through the final LayerNorm and the tied output layer, gives the logits.
  ln = p['decoder']['final_norm']
  np.testing.assert_allclose(_layer_norm(layers[-1], ln, lm.layer_norm_epsilon) @ table.T,
                             logits, atol=2e-4)
  for a, b in zip(scanned, layers, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert list(enc) == ['encoder'] and len(enc['encoder']) == 3
  ln = pe['encoder']['final_norm']
  np.testing.assert_allclose(_layer_norm(enc['encoder'][-1], ln, ed.layer_norm_epsilon), memory,
                             atol=1e-5)
  both = jax.eval_shape(lambda v: hidden_states(ed, {'params': v}, tokens, tokens), pe)
  assert sorted(both) == ['decoder', 'encoder'] and len(both['decoder']) == 3


_SAVED = {}  # seed -> the state _save_initial_states saved


def _save_initial_states(configs, workdirs, vectorize):
  """experiments.train.train's outputs without the optimisation: each seed's initial state
  saved as its last checkpoint (training is tested elsewhere; the lesson's own code is what
  this test runs)."""
  from experiments import steps
  from experiments.checkpoints import Checkpoints
  assert vectorize == (len(configs) > 1)
  run = steps.setup(configs[0])
  for c, d in zip(configs, workdirs):
    state = jax.device_get(jax.jit(lambda: steps.init_state(run, c.seed))())
    _SAVED[c.seed] = state
    ckpt = Checkpoints(d, best_metric=c.best_metric, best_mode=c.best_mode)
    ckpt.save(c.total_steps, state, {})
    ckpt.close()
  return [{'eval/exact_match': 0.5 + c.seed} for c in configs], None


def test_quick_lesson_end_to_end(tmp_path, monkeypatch):
  from experiments import steps, train
  monkeypatch.setattr(train, 'train', _save_initial_states)
  encoder = contextual.MODELS[1]  # its layer 0 is written out below.
  paths = contextual.run_lesson(str(tmp_path), seeds=2, quick=True, models=(encoder,))
  assert [os.path.basename(p) for p in paths] == ['results.json', 'results.md',
                                                  'contextual_by_layer.png']
  results = json.load(open(paths[0]))
  assert list(results['models']) == ['encoder']
  enc = results['models']['encoder']
  assert [e['exact_match'] for e in enc['eval']] == [0.5, 1.5]
  # The checkpoint read back is each seed's initial state: trained = init, seed by seed, and
  # the seeds differ.
  assert enc['per_seed']['trained'] == enc['per_seed']['init']
  assert enc['per_seed']['init'][0] != enc['per_seed']['init'][1]
  # Layer 0 of seed 1's initial encoder, written out: E[token]·√d + the paper's sinusoids.
  run = steps.setup(contextual.model_config(encoder, 1, quick=True))
  params = _SAVED[1].params
  source = np.asarray(run.dataset.test['inputs'])
  d = run.model.d_model
  pos = np.arange(source.shape[1])[:, None] / 10000.0 ** (2 * (np.arange(d) // 2) / d)
  pe = np.where(np.arange(d) % 2 == 0, np.sin(pos), np.cos(pos))
  h0 = np.asarray(params['embed']['embedding']['embedding'], np.float64)[source] * np.sqrt(d) + pe
  symbols = [w for w in range(3, 13) if (source == w).sum() >= contextual.MIN_COUNT]
  layer0 = enc['per_seed']['init'][1][0]
  assert layer0['words'] == len(symbols) == 10
  assert layer0['self_similarity'] == pytest.approx(
      np.mean([_self_sim(h0[source == w]) for w in symbols]), abs=1e-5)
  assert layer0['baseline'] == pytest.approx(_self_sim(h0[source >= 3]), abs=1e-5)
  rows = enc['per_seed']['init']
  assert len(rows) == 2 and all(len(seed) == 2 for seed in rows)  # layers 0 and 1
  for layer in (r for seed in rows for r in seed):
    assert layer['self_similarity_adjusted'] == pytest.approx(
        layer['self_similarity'] - layer['baseline'])
  for i, row in enumerate(enc['summary']['init']):
    x = [seed[i]['mev'] for seed in rows]
    assert row['mev']['mean'] == pytest.approx(np.mean(x))
    assert row['mev']['std'] == pytest.approx(np.std(x, ddof=1))
  assert '| layer | self-similarity' in open(paths[1]).read()
