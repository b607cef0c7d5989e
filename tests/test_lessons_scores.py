"""The score-function ablation (configs/ablations/scores_*.py): each variant's β, every variant
of :quick traced in both models, the wall-time column, the bar chart's numbers, and the grid
the side-by-side step timer times."""

import csv
import math
import os

import numpy as np
import pytest

from experiments.bench import sweep_steps
from experiments.sweep import charts, grid, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (score, β = beta_scale / √d_head as a function of d_head, learned)
EXPECTED = {'dot': ('dot', lambda d: 1.0, False),
            'scaled dot': ('dot', lambda d: 1 / math.sqrt(d), False),
            'general': ('general', lambda d: 1 / math.sqrt(d), False),
            'additive': ('additive', lambda d: 1.0, False),
            'cosine': ('cosine', math.sqrt, True),  # the start of the learned β
            'location': ('location', lambda d: 1.0, False)}


def _load(spec):
  module, arg = grid.load(os.path.join(ROOT, 'configs/ablations', spec))
  return module.get_config(arg), grid.expand(module, arg)


@pytest.mark.parametrize('spec, d_head, runs', [
    ('scores_seq2seq.py', 16, 36), ('scores_seq2seq.py:quick', 8, 12),
    ('scores_vit.py', 16, 18), ('scores_vit.py:quick', 8, 12)])
def test_each_variant_gets_its_beta(spec, d_head, runs):
  base, points = _load(spec)
  assert base.model.d_model // base.model.num_heads == d_head and len(points) == runs
  variants = [p for p in points if p['seed'] == 0 and p.get('data.task', 'reverse') == 'reverse']
  assert len(variants) == 6
  for (score, beta, learned), p in zip(EXPECTED.values(), variants):
    assert (p['model.score'], p['model.learn_beta']) == (score, learned)
    np.testing.assert_allclose(p['model.beta_scale'] / math.sqrt(d_head), beta(d_head))
  assert sweep_steps.variants(os.path.join(ROOT, 'configs/ablations', spec))[1] == [
      {k: v for k, v in p.items() if k != 'seed'} for p in points if p['seed'] == 0]


def test_seq2seq_grid_trains_500_steps_without_decoding_by_length():
  base, points = _load('scores_seq2seq.py')
  assert base.total_steps == 500 and 'exact_match_by_length' not in base.evals
  assert {p['data.task'] for p in points} == {'reverse', 'sort'}
  assert _load('scores_seq2seq.py:steps=700')[0].total_steps == 700


def test_wall_time_is_aggregated_beside_the_eval_metrics(tmp_path):
  rows = [{'model.score': 'dot', 'seed': s, 'eval/accuracy': a, 'wall_time_s': t}
          for s, a, t in [(0, 0.5, 10.0), (1, 0.7, 14.0)]]
  (group,) = tables.aggregate(rows, ['model.score', 'seed'])
  np.testing.assert_allclose(group['wall_time_s'], (12.0, np.std([10.0, 14.0], ddof=1)))
  tables.write_markdown([group], str(tmp_path / 'results.md'), 'scores')
  assert '| dot | 2 | 0.6000 ± 0.1414 | 12.0 ± 2.8 |' in (tmp_path / 'results.md').read_text()


def test_bars_are_means_with_std_error_bars(monkeypatch):
  """scores.png: a bar per score (with its β) and task, height the mean over seeds, error bar
  the std (ddof 1), checked against NumPy on made-up rows."""
  drawn = []
  monkeypatch.setattr(charts, 'save_figure', lambda fig, path: drawn.append(fig))
  keys = ['data.task', 'model.score', 'model.beta_scale', 'seed']
  values = {('reverse', 'dot', 4.0): [0.9, 0.8, 0.6], ('reverse', 'dot', 1.0): [1.0, 0.9, 0.95],
            ('sort', 'dot', 4.0): [0.5, 0.7, 0.6], ('sort', 'dot', 1.0): [0.2, 0.4, 0.9]}
  rows = [dict(zip(keys, (*point, seed)), **{'eval/exact_match': v, 'eval/attention_entropy': 1.0})
          for point, vs in values.items() for seed, v in enumerate(vs)]
  charts.by_variant(rows, keys, [('eval/exact_match', 'exact match')], 'scores.png')
  ax = drawn[-1].axes[0]
  bars = [c for c in ax.containers if hasattr(c, 'errorbar')]
  assert [c.get_label() for c in bars] == ['task=reverse', 'task=sort']
  for container, task in zip(bars, ('reverse', 'sort')):
    expected = [values[task, 'dot', beta] for beta in (4.0, 1.0)]
    np.testing.assert_allclose([b.get_height() for b in container], np.mean(expected, axis=1))
    segments = container.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[1][1] - s[0][1]) / 2 for s in segments],
                               np.std(expected, axis=1, ddof=1))
  assert [t.get_text() for t in ax.get_xticklabels()] == [
      'score=dot\nbeta_scale=4.0', 'score=dot\nbeta_scale=1.0']


def test_every_quick_variant_traces(tmp_path):
  """Each score builds and traces in both models (config_check runs the model under
  jax.eval_shape): location over the ViT's 17 tokens and over seq2seq's padded source keys."""
  from experiments.config_check import check_config
  for spec in ('scores_vit.py:quick', 'scores_seq2seq.py:quick'):
    base, points = _load(spec)
    for point in points[::2]:
      check_config(grid.configure(base, point))
