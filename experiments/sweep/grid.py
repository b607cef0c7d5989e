"""A sweep's grid: its points, their configs and workdirs, and training them.

An ablation config file defines `get_config(arg)` (the base config) and `sweep(add, arg)`
(the grid): each `add(**{'model.posemb': 'learn', 'seed': 0})` call is one run, keyed by
dotted config paths.
"""

from __future__ import annotations

import importlib.util
import os
import time

from experiments import library_log as library_logs
from experiments import workdir as workdir_lib
from experiments.sweep import charts, tables


def load(config_spec: str):
  """'path.py:arg' -> (module, arg); the module is named after the file."""
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


def groups(points: list[dict], vectorize: bool) -> dict[str, list[dict]]:
  """Points that train as one program: with `vectorize`, those that differ only in seed and
  model.beta_scale (the vmap runner's members); else each point alone. A group is the same
  whichever of its points are finished, so an interrupted group resumes as the same program."""
  from experiments.train import MAY_DIFFER  # imported here: it imports jax.
  out: dict[str, list[dict]] = {}
  for point in points:
    shared = {k: v for k, v in point.items() if not (vectorize and k in MAY_DIFFER)}
    out.setdefault(run_name(shared) or 'all', []).append(point)
  return out


def run_all(module, arg, points: list[dict], sweepdir: str, vectorize: bool = False,
            allow_config_change=()) -> list[dict]:
  """Trains every group with a point whose workdir (SWEEPDIR/<run_name>) holds no finished
  run of its config (experiments.workdir.finished_summary: a summary.json that parses, and
  the point's config recorded there; a run of another config is an error); returns one row
  per point: the point, its summary and its workdir."""
  import jax  # imported here: after absl has parsed the flags.
  from experiments.config_check import check_config
  from experiments.train import train
  if not jax.config.jax_compilation_cache_dir:
    # The runs of a sweep compile the same programs (shapes agree; β is traced when
    # vectorized): a persistent cache in the sweep directory compiles each once.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(sweepdir, '.jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  base = module.get_config(arg)
  workdir_lib.check_allow_flag(allow_config_change, base)
  workdir = lambda point: os.path.join(sweepdir, run_name(point))
  for point in points:  # every run's config, before the first one trains.
    try:  # with its workdir: a point that resumes reads nothing of its config.init_from.
      check_config(configure(base, point), workdir(point))
    except ValueError as e:
      raise ValueError(f'sweep point {run_name(point)}: {e}') from None
  finished = lambda point: workdir_lib.finished_summary(workdir(point), configure(base, point),
                                                        allow_config_change)
  start, trained, done = time.time(), 0, 0
  for name, group in groups(points, vectorize).items():
    todo = [p for p in group if finished(p) is None]
    if not todo:
      done += len(group)
      print(f'[{done}/{len(points)}] {name}: done before, skipped', flush=True)
      continue
    eta = ''
    if trained:
      left = (time.time() - start) / trained * (len(points) - done)
      eta = f'  (sweep ETA {time.strftime("%H:%M:%S", time.gmtime(left))})'
    if len(group) == 1:
      print(f'[{done + 1}/{len(points)}] {name}{eta}', flush=True)
    else:
      print(f'[{done + 1}-{done + len(group)}/{len(points)}] {len(group)} runs as one program '
            f'({len(todo)} to finish): {name}{eta}', flush=True)
    summaries, _ = train([configure(base, p) for p in group], [workdir(p) for p in group],
                         vectorize=len(group) > 1, allow_config_change=allow_config_change)
    for point, summary in zip(group, summaries):
      if 'diverged' in summary and point in todo:
        print(f'{run_name(point)}: {summary["diverged"]}', flush=True)
    trained += len(todo)
    done += len(group)
  return [{**point, **finished(point), 'workdir': workdir(point)} for point in points]


def run_sweep(config_spec: str, sweepdir: str | None = None, vectorize: bool = False,
              allow_config_change=(), library_log: bool = False) -> str:
  """Expands, trains (skipping finished runs, resuming interrupted ones) and summarises a sweep
  in `sweepdir` (default runs/sweep-<name>[-arg]) as results.csv, results.md and the plots;
  returns its directory. The sweep directory is locked while it runs; with `library_log`,
  library messages go to its library.log instead of the console (the command does this)."""
  module, arg = load(config_spec)
  name = module.__name__  # the config file's name
  sweepdir = sweepdir or os.path.join('runs', f'sweep-{name}' + (f'-{arg}' if arg else ''))
  print(f'workdir: {sweepdir}', flush=True)
  points = expand(module, arg)
  if library_log:
    library_logs.route_to(workdir_lib.library_log(sweepdir))
  with workdir_lib.locked([sweepdir]):
    rows = run_all(module, arg, points, sweepdir, vectorize, allow_config_change)
    summarise(rows, points, sweepdir, name + (f' ({arg})' if arg else ''))
  return sweepdir


def summarise(rows: list[dict], points: list[dict], sweepdir: str, title: str):
  """results.csv, results.md and the plots."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  tables.write_csv(rows, os.path.join(sweepdir, 'results.csv'))
  tables.write_markdown(tables.aggregate(rows, keys), os.path.join(sweepdir, 'results.md'), title)
  written = ['results.csv', 'results.md'] + charts.plot_sweep(rows, keys, sweepdir)
  print(f'wrote {", ".join(written)} in {sweepdir}', flush=True)
