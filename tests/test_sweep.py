"""experiments.sweep: a :quick ablation end to end, skip-on-rerun, and the aggregate table."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_posemb_ablation_end_to_end(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.sweep',
         '--config=configs/ablations/posemb_vit.py:quick', f'--sweepdir={tmp_path}']
  first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 15 and {r['model.posemb'] for r in rows} == {
      'none', 'learn', 'sinusoidal', 'sincos2d', 'rope'}
  assert all(0.0 <= float(r['eval/accuracy']) <= 1.0 for r in rows)
  table = (tmp_path / 'results.md').read_text()
  data_rows = [line for line in table.splitlines() if line.startswith('| ') and ' ± ' in line]
  assert len(data_rows) == 5 and all('| 3 |' in line for line in data_rows)  # 5 groups, n=3.
  assert (tmp_path / 'learning_curves.png').stat().st_size > 10_000
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and again.stdout.count('done before, skipped') == 15


def test_aggregate_mean_and_std_over_seeds():
  rows = [{'model.posemb': p, 'seed': s, 'eval/accuracy': a}
          for p, s, a in [('learn', 0, 0.5), ('learn', 1, 0.7), ('none', 0, 0.1),
                          ('none', 1, 0.3), ('none', 2, 0.2)]]
  groups = {g['model.posemb']: g for g in sweep.aggregate(rows, ['model.posemb', 'seed'])}
  assert groups['learn']['n'] == 2 and groups['none']['n'] == 3
  np.testing.assert_allclose(groups['learn']['eval/accuracy'], (0.6, np.std([0.5, 0.7], ddof=1)))
  np.testing.assert_allclose(groups['none']['eval/accuracy'], (0.2, 0.1))


def test_unknown_sweep_key_is_an_error():
  import ml_collections
  base = ml_collections.ConfigDict({'model': {'posemb': 'learn'}, 'seed': 0})
  with pytest.raises(ValueError, match="sweep key 'model.posmb' is not a config field"):
    sweep.configure(base, {'model.posmb': 'none'})
  assert sweep.configure(base, {'model.posemb': 'none'}).model.posemb == 'none'
