"""experiments.sweep: a :quick ablation end to end, skip-on-rerun, and the aggregate table."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.sweep import grid, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# posemb_mnist1d runs as posemb_vit does (a classifier sweep); its points are validated below.
QUICK = {  # config: (runs, grid keys, plots beyond learning_curves.png)
    'posemb_vit': (10, {'model.posemb'}, []),
    'posemb_seq2seq': (8, {'data.task', 'model.posemb'}, ['exact_match_vs_length.png']),
    'temperature_vit': (6, {'model.posemb', 'model.learn_beta', 'model.beta_scale'},
                        ['accuracy_vs_beta.png', 'entropy_vs_beta.png',
                         'entropy_by_layer_vs_beta.png']),
}


@pytest.mark.parametrize('name', ['posemb_mnist1d', 'posemb_seq2seq', 'posemb_vit',
                                  'temperature_vit'])
def test_every_quick_ablation_point_is_a_valid_config(name):
  """experiments.config_check accepts each point (the sweep checks them all before training)."""
  from experiments.config_check import check_config
  module, arg = grid.load(os.path.join(ROOT, f'configs/ablations/{name}.py:quick'))
  base, points = module.get_config(arg), grid.expand(module, arg)
  assert len(points) >= 6
  for point in points:
    check_config(grid.configure(base, point))


@pytest.mark.parametrize('name', sorted(QUICK))
def test_quick_ablation_end_to_end(tmp_path, name):
  runs, keys, plots = QUICK[name]
  spec = f'configs/ablations/{name}.py:quick,steps=20'  # the machinery, in a third of :quick
  grid.run_sweep(os.path.join(ROOT, spec), str(tmp_path), vectorize=True)
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == runs and {r['seed'] for r in rows} == {'0', '1'}
  assert all(0.0 <= float(r.get('eval/accuracy') or r['eval/exact_match']) <= 1.0 for r in rows)
  assert all(float(r['eval/attention_entropy']) >= 0.0 for r in rows)
  table = (tmp_path / 'results.md').read_text()
  data_rows = [line for line in table.splitlines() if line.startswith('| ') and ' ± ' in line]
  assert len(data_rows) == runs // 2 and all('| 2 |' in line for line in data_rows)
  for key in keys:
    assert key in table
  for plot in ['learning_curves.png'] + plots:
    assert (tmp_path / plot).stat().st_size > 10_000, plot
  if name == 'posemb_seq2seq':  # the learned table cannot take lengths 11-20: reported, no crash.
    learned = [r for r in rows if r['model.posemb'] == 'learn']
    assert all('exceeds the learned posemb table' in r['extrapolation_note'] for r in learned)
    assert all(r['exact_match_by_length/20'] == '' for r in learned)
    assert all(r['exact_match_by_length/20'] != '' for r in rows if r not in learned)
  if name == 'posemb_vit':  # the command line (the older --sweepdir) skips every finished run.
    again = subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--config={spec}',
                            f'--sweepdir={tmp_path}', '--vectorize'], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count('done before, skipped') == 5
    assert 'as one program' not in again.stdout and 'Resumed' not in again.stdout


def test_aggregate_mean_and_std_over_seeds():
  rows = [{'model.posemb': p, 'seed': s, 'eval/accuracy': a}
          for p, s, a in [('learn', 0, 0.5), ('learn', 1, 0.7), ('none', 0, 0.1),
                          ('none', 1, 0.3), ('none', 2, 0.2)]]
  groups = {g['model.posemb']: g for g in tables.aggregate(rows, ['model.posemb', 'seed'])}
  assert groups['learn']['n'] == 2 and groups['none']['n'] == 3
  np.testing.assert_allclose(groups['learn']['eval/accuracy'], (0.6, np.std([0.5, 0.7], ddof=1)))
  np.testing.assert_allclose(groups['none']['eval/accuracy'], (0.2, 0.1))
  assert 'diverged' not in groups['none']


def test_aggregate_leaves_diverged_runs_out_and_counts_them():
  rows = [{'model.posemb': 'learn', 'seed': 0, 'eval/accuracy': 0.5},
          {'model.posemb': 'learn', 'seed': 1, 'eval/accuracy': 0.7},
          {'model.posemb': 'learn', 'seed': 2, 'diverged': 'loss=nan at step 3: ...'}]
  (group,) = tables.aggregate(rows, ['model.posemb', 'seed'])
  assert group['n'] == 2 and group['diverged'] == 1
  np.testing.assert_allclose(group['eval/accuracy'], (0.6, np.std([0.5, 0.7], ddof=1)))


def test_unknown_sweep_key_is_an_error():
  import ml_collections
  base = ml_collections.ConfigDict({'model': {'posemb': 'learn'}, 'seed': 0})
  with pytest.raises(ValueError, match="sweep key 'model.posmb' is not a config field"):
    grid.configure(base, {'model.posmb': 'none'})
  assert grid.configure(base, {'model.posemb': 'none'}).model.posemb == 'none'
