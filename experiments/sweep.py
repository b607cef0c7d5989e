"""Run a grid of `experiments.run` trainings and summarise them as tables and plots.

  python -m experiments.sweep --config=configs/ablations/NAME.py[:ARG] [--sweepdir=DIR]

An ablation config file defines `get_config(arg)` (the base config) and
`sweep(add, arg)` (the grid): each `add(**{'model.posemb': 'learn', 'seed': 0})`
call is one run, keyed by dotted config paths. Each run trains in its own
workdir under the sweep directory; rerunning the command skips finished runs
and resumes interrupted ones. The sweep writes results.csv (a row per run),
results.md (mean ± std over seeds) and PNG plots.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments import metrics as metrics_lib
from experiments.cli import fail_unless_verbose

_CONFIG = flags.DEFINE_string('config', None, 'An ablation config file[:arg].')
_SWEEPDIR = flags.DEFINE_string('sweepdir', None, 'Sweep directory; default runs/sweep-<name>[-arg].')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks on errors.')


def load(config_spec: str):
  """'path.py:arg' -> (module, arg)."""
  path, _, arg = config_spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={config_spec!r}: no such file {path!r}')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{path} defines no sweep(add, arg) function; it is not an ablation config')
  return module, arg or None


def expand(module, arg) -> list[dict]:
  """The grid points, in the order the config's sweep() adds them."""
  points = []
  module.sweep(lambda **overrides: points.append(dict(overrides)), arg)
  return points


def run_name(point: dict) -> str:
  return ','.join(f'{k.split(".")[-1]}={v}' for k, v in point.items()).replace('/', '_')


def configure(base, point: dict):
  """A copy of the base config with the point's dotted overrides (unknown keys are errors)."""
  config = base.copy_and_resolve_references()
  for key, value in point.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f'sweep key {key!r} is not a config field')
    node[leaf] = value
  return config


def run_all(module, arg, points: list[dict], sweepdir: str) -> list[dict]:
  """Trains every point that has no summary.json yet; returns one row per point."""
  from experiments import trainer  # imports jax: after absl has parsed the flags.
  base = module.get_config(arg)
  os.makedirs(sweepdir, exist_ok=True)
  rows, start, trained = [], time.time(), 0
  for i, point in enumerate(points, 1):
    workdir = os.path.join(sweepdir, run_name(point))
    summary_path = os.path.join(workdir, 'summary.json')
    if os.path.exists(summary_path):
      print(f'[{i}/{len(points)}] {run_name(point)}: done before, skipped', flush=True)
    else:
      eta = ''
      if trained:
        left = (time.time() - start) / trained * (len(points) - i + 1)
        eta = f'  (sweep ETA {time.strftime("%H:%M:%S", time.gmtime(left))})'
      print(f'[{i}/{len(points)}] {run_name(point)}{eta}', flush=True)
      trainer.train_and_evaluate(configure(base, point), workdir)
      trained += 1
    with open(summary_path) as f:
      rows.append({**point, **json.load(f), 'workdir': workdir})
  return rows


def write_csv(rows: list[dict], path: str):
  columns = list(dict.fromkeys(k for row in rows for k in row if not isinstance(row[k], dict)))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
  """Groups rows by every swept key except 'seed': mean and std of each eval metric."""
  group_keys = [k for k in keys if k != 'seed']
  metrics = sorted({k for row in rows for k in row if k.startswith('eval/')})
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
  out = []
  for values, members in groups.items():
    entry = dict(zip(group_keys, values), n=len(members))
    for m in metrics:
      xs = np.array([r[m] for r in members if m in r], float)
      entry[m] = (xs.mean(), xs.std(ddof=1) if len(xs) > 1 else 0.0)
    out.append(entry)
  return out


def write_markdown(groups: list[dict], path: str, title: str):
  if not groups:
    return
  metrics = [k for k in groups[0] if k.startswith('eval/')]
  keys = [k for k in groups[0] if k not in metrics]
  lines = [f'# {title}', '', 'Mean ± std over seeds (n runs per row).', '',
           '| ' + ' | '.join(keys + metrics) + ' |', '|' + ' --- |' * (len(keys) + len(metrics))]
  for g in groups:
    cells = [str(g[k]) for k in keys] + [f'{g[m][0]:.4f} ± {g[m][1]:.4f}' for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def plot_learning_curves(rows: list[dict], keys: list[str], path: str):
  """Train loss against step, one line per non-seed group (mean over seeds)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  group_keys = [k for k in keys if k != 'seed']
  curves: dict[str, list] = {}
  for row in rows:
    train = [r for r in metrics_lib.read_metrics(row['workdir']) if r['split'] == 'train']
    label = ', '.join(f'{k.split(".")[-1]}={row[k]}' for k in group_keys) or 'all'
    curves.setdefault(label, []).append(([r['step'] for r in train], [r['loss'] for r in train]))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, runs in curves.items():
    n = min(len(steps) for steps, _ in runs)
    ax.plot(runs[0][0][:n], np.mean([loss[:n] for _, loss in runs], axis=0), label=label)
  ax.set(xlabel='step', ylabel='train loss (mean over seeds)', yscale='log',
         title='learning curves')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summarize(rows: list[dict], points: list[dict], sweepdir: str, title: str):
  keys = list(dict.fromkeys(k for p in points for k in p))
  write_csv(rows, os.path.join(sweepdir, 'results.csv'))
  write_markdown(aggregate(rows, keys), os.path.join(sweepdir, 'results.md'), title)
  plot_learning_curves(rows, keys, os.path.join(sweepdir, 'learning_curves.png'))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if not _CONFIG.value:
      raise ValueError('--config is required, e.g. --config=configs/ablations/posemb_vit.py:quick')
    module, arg = load(_CONFIG.value)
    name = os.path.splitext(os.path.basename(_CONFIG.value.split(':')[0]))[0]
    sweepdir = _SWEEPDIR.value or os.path.join('runs', f'sweep-{name}' + (f'-{arg}' if arg else ''))
    print(f'sweepdir: {sweepdir}', flush=True)
    points = expand(module, arg)
    rows = run_all(module, arg, points, sweepdir)
    summarize(rows, points, sweepdir, f'{name}' + (f' ({arg})' if arg else ''))
    print(f'wrote {sweepdir}/results.csv, results.md, learning_curves.png', flush=True)
  except Exception as e:  # one line unless --verbose.
    fail_unless_verbose(e, _VERBOSE.value)


if __name__ == '__main__':
  app.run(main)
