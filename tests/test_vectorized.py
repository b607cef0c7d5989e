"""--vectorize: runs that differ in β and seed, trained as one vmapped program, equal the
sequential runs within 1e-4 (train losses, eval metrics, final parameters)."""

import json

import jax
import numpy as np
import pytest

from experiments import trainer, vectorized
from experiments.checkpoints import Checkpoints
from experiments.metrics import read_metrics
from tests.test_runner import tiny_config

MEMBERS = [dict(seed=0, beta_scale=0.5), dict(seed=1, beta_scale=0.5), dict(seed=0, beta_scale=2.0)]


def _config(seed, beta_scale, learn_beta, name='vit'):
  # seq2seq evaluates once (its greedy decoding is the slow part), ViT at steps 6 and 12.
  c = tiny_config(name, steps=12, num_devices=1, log_every=3,
                  eval_every=12 if name == 'seq2seq' else 6, checkpoint_every=6, seed=seed)
  c.model.update(beta_scale=beta_scale, learn_beta=learn_beta, dropout=0.1)
  return c


def _final_params(workdir):
  ckpt = Checkpoints(workdir)
  state, _ = ckpt.restore(None)
  ckpt.close()
  return state['params']


# ViT with a learned β (its own parameter tree), seq2seq with fixed β (a traced β in every layer).
@pytest.mark.parametrize('name,learn_beta', [('vit', True), ('seq2seq', False)])
def test_vectorized_equals_sequential(tmp_path, name, learn_beta):
  members = MEMBERS if name == 'vit' else MEMBERS[1:]  # seq2seq: 2 runs (its decoding is slow).
  configs = [_config(**m, learn_beta=learn_beta, name=name) for m in members]
  seq_dirs = [str(tmp_path / f'seq{i}') for i in range(len(configs))]
  vec_dirs = [str(tmp_path / f'vec{i}') for i in range(len(configs))]
  for c, d in zip(configs, seq_dirs):
    trainer.train_and_evaluate(c, d)
  summaries = vectorized.train_group(configs, vec_dirs, str(tmp_path / 'group'))
  for seq, vec, summary in zip(seq_dirs, vec_dirs, summaries):
    a, b = read_metrics(seq), read_metrics(vec)
    assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
    for ra, rb in zip(a, b):
      for key in ('loss', 'grad_norm', 'accuracy', 'exact_match'):
        if key in ra:
          np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, atol=1e-5, err_msg=key)
    with open(f'{seq}/summary.json') as f:
      expected = json.load(f)
    for key, value in expected.items():
      if key.startswith('eval/'):
        np.testing.assert_allclose(summary[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # atol 1e-4: the key bias has a zero gradient in exact arithmetic (softmax is shift
    # invariant), so Adam turns rounding noise into steps of ±lr whose sign can differ.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4),
                 _final_params(seq), _final_params(vec))
  # Members really differ (different seeds or β), so the comparison above is not vacuous.
  losses = [read_metrics(d)[-2]['loss'] for d in vec_dirs]
  assert len(set(np.round(losses, 6))) == len(losses)


def test_interrupted_group_resumes_to_the_same_result(tmp_path):
  configs = [_config(**m, learn_beta=False) for m in MEMBERS[:2]]
  full = vectorized.train_group(configs, [str(tmp_path / f'a{i}') for i in range(2)],
                                str(tmp_path / 'ga'))
  dirs = [str(tmp_path / f'b{i}') for i in range(2)]
  assert vectorized.train_group(configs, dirs, str(tmp_path / 'gb'), stop_after=8) is None
  resumed = vectorized.train_group(configs, dirs, str(tmp_path / 'gb'))  # from step 6.
  for x, y in zip(full, resumed):
    assert x['eval/accuracy'] == y['eval/accuracy'] and x['eval/loss'] == y['eval/loss']


def test_groups_must_differ_only_in_seed_and_beta():
  a, b = _config(0, 1.0, False), _config(0, 1.0, False)
  b.model.posemb = 'none'
  with pytest.raises(ValueError, match='runs differ in model.posemb; only seed, model.beta_scale'):
    vectorized.check_group([a, b])
