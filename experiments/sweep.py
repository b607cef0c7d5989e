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
import hashlib
import importlib.util
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments import sweep_plots
from experiments.cli import fail_unless_verbose

_CONFIG = flags.DEFINE_string('config', None, 'An ablation config file[:arg].')
_SWEEPDIR = flags.DEFINE_string('sweepdir', None, 'Sweep directory; default runs/sweep-<name>[-arg].')
_VECTORIZE = flags.DEFINE_bool('vectorize', False, 'Train runs that differ only in seed and '
                                'model.beta_scale together, as one vmapped program.')
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


def run_all(module, arg, points: list[dict], sweepdir: str, vectorize: bool = False) -> list[dict]:
  """Trains every point that has no summary.json yet; returns one row per point.

  vectorize: points that differ only in seed and model.beta_scale train together
  as one vmapped program (`experiments.vectorized`).
  """
  import jax  # imported here: after absl has parsed the flags.
  from experiments import trainer, vectorized
  if not jax.config.jax_compilation_cache_dir:
    # The runs of a sweep compile the same programs (shapes agree; β is traced when
    # vectorized): a persistent cache in the sweep directory compiles each once.
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(sweepdir, '.jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from experiments.config_check import check_config
  base = module.get_config(arg)
  for point in points:  # every run's config, before the first one trains.
    try:
      check_config(configure(base, point))
    except ValueError as e:
      raise ValueError(f'sweep point {run_name(point)}: {e}') from None
  os.makedirs(sweepdir, exist_ok=True)
  workdir = lambda point: os.path.join(sweepdir, run_name(point))
  finished = lambda point: os.path.exists(os.path.join(workdir(point), 'summary.json'))
  groups: dict[str, list[dict]] = {}
  for point in points:
    shared = {k: v for k, v in point.items() if not (vectorize and k in vectorized.MAY_DIFFER)}
    groups.setdefault(run_name(shared) or 'all', []).append(point)
  start, trained, done = time.time(), 0, 0
  for name, group in groups.items():
    todo = [p for p in group if not finished(p)]
    done += len(group) - len(todo)
    if not todo:
      print(f'[{done}/{len(points)}] {name}: done before, skipped', flush=True)
      continue
    eta = ''
    if trained:
      left = (time.time() - start) / trained * (len(points) - done)
      eta = f'  (sweep ETA {time.strftime("%H:%M:%S", time.gmtime(left))})'
    configs = [configure(base, p) for p in todo]
    if len(todo) == 1:
      print(f'[{done + 1}/{len(points)}] {run_name(todo[0])}{eta}', flush=True)
      trainer.train_and_evaluate(configs[0], workdir(todo[0]))
    else:
      print(f'[{done + 1}-{done + len(todo)}/{len(points)}] {len(todo)} runs as one program: '
            f'{name}{eta}', flush=True)
      # The group's checkpoint is named by its members: a different set starts afresh.
      members = hashlib.sha1('|'.join(map(run_name, todo)).encode()).hexdigest()[:8]
      vectorized.train_group(configs, [workdir(p) for p in todo],
                             os.path.join(sweepdir, 'vectorized', f'{name}-{members}'))
    trained += len(todo)
    done += len(todo)
  rows = []
  for point in points:
    with open(os.path.join(workdir(point), 'summary.json')) as f:
      rows.append({**point, **json.load(f), 'workdir': workdir(point)})
  return rows


def write_csv(rows: list[dict], path: str):
  """One row per run; nested results become columns 'name/key' (e.g. attention_entropy/<layer>)."""
  flat = [{f'{k}/{sub}' if isinstance(v, dict) else k: x
           for k, v in row.items() for sub, x in (v.items() if isinstance(v, dict) else [(k, v)])}
          for row in rows]
  columns = list(dict.fromkeys(k for row in flat for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)


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
      xs = np.array([r[m] for r in members if r.get(m) is not None], float)
      entry[m] = (xs.mean(), xs.std(ddof=1) if len(xs) > 1 else 0.0) if len(xs) else None
    out.append(entry)
  return out


def write_markdown(groups: list[dict], path: str, title: str):
  if not groups:
    return
  metrics = [k for k in groups[0] if k.startswith('eval/')]
  keys = [k for k in groups[0] if k not in metrics]
  lines = [f'# {title}', '', 'Mean ± std over seeds (n runs per row); n/a: not evaluated '
           '(see extrapolation_note in results.csv).', '',
           '| ' + ' | '.join(keys + metrics) + ' |', '|' + ' --- |' * (len(keys) + len(metrics))]
  for g in groups:
    cells = [str(g[k]) for k in keys] + [f'{g[m][0]:.4f} ± {g[m][1]:.4f}' if g[m] else 'n/a'
                                         for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def summarize(rows: list[dict], points: list[dict], sweepdir: str, title: str) -> list[str]:
  """results.csv, results.md and the plots; returns the names of the files written."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  write_csv(rows, os.path.join(sweepdir, 'results.csv'))
  write_markdown(aggregate(rows, keys), os.path.join(sweepdir, 'results.md'), title)
  return ['results.csv', 'results.md'] + sweep_plots.plot_sweep(rows, keys, sweepdir)


def run_sweep(config_spec: str, sweepdir: str | None = None, vectorize: bool = False) -> str:
  """Expands, trains (skipping finished runs) and summarises a sweep; returns its directory."""
  module, arg = load(config_spec)
  name = os.path.splitext(os.path.basename(config_spec.split(':')[0]))[0]
  sweepdir = sweepdir or os.path.join('runs', f'sweep-{name}' + (f'-{arg}' if arg else ''))
  print(f'sweepdir: {sweepdir}', flush=True)
  points = expand(module, arg)
  rows = run_all(module, arg, points, sweepdir, vectorize)
  written = summarize(rows, points, sweepdir, f'{name}' + (f' ({arg})' if arg else ''))
  print(f'wrote {", ".join(written)} in {sweepdir}', flush=True)
  return sweepdir


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if not _CONFIG.value:
      raise ValueError('--config is required, e.g. --config=configs/ablations/posemb_vit.py:quick')
    run_sweep(_CONFIG.value, _SWEEPDIR.value, _VECTORIZE.value)
  except Exception as e:  # one line unless --verbose.
    fail_unless_verbose(e, _VERBOSE.value)


if __name__ == '__main__':
  app.run(main)
