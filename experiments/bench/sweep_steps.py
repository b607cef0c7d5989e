"""Train-step time of each variant of an ablation grid, timed side by side in one process.

  python -m experiments.bench.sweep_steps --config=configs/ablations/NAME.py[:ARG] \
      [--rounds=5] [--repeats=20] [--workdir=DIR]

Each distinct point of the grid, seed left out (e.g. each score of scores_vit.py), is built as
its run is (experiments.steps.setup of its config: dataset, model, optimizer), its train step
compiled once (jit, the state donated, one device, as `experiments.run` steps it) and fed one
fixed batch, its config's training batch of step 0. Then, `rounds` times, every variant in
turn times `repeats` steps (experiments.bench.timing.measure, 2 warm-up steps, the median):

  time(variant) = median over rounds r of median_r(variant),  relative = time / time(first)

Alternating the variants round by round spreads a host slowed by other jobs over all of them
alike, where timing one variant after another would charge a slow minute to whichever ran
then; the spread of the round medians (min, max) is reported with each. Writes a markdown table
to stdout and sweep_steps.json (environment, every round's times) to --workdir.
"""

from __future__ import annotations

import json
import os
import statistics

import jax
from absl import app, flags, logging

from experiments import steps
from experiments.bench.step_time import stepper
from experiments.bench.timing import environment, measure
from experiments.cli import exit_on_interrupt, fail_unless_verbose, parse_flags
from experiments.metrics import write_atomically
from experiments.sweep import grid

def variants(config_spec: str) -> tuple[object, list[dict]]:
  """(base config, the grid's distinct points without their seed, in the grid's order)."""
  module, arg = grid.load(config_spec)
  points = [{k: v for k, v in p.items() if k != 'seed'} for p in grid.expand(module, arg)]
  unique = list({grid.run_name(p): p for p in points}.values())
  return module.get_config(arg), unique


def time_variants(base, points: list[dict], rounds: int, repeats: int) -> list[dict]:
  """Every point's train step, compiled once, then timed in `rounds` alternating rounds."""
  if rounds < 1 or repeats < 1:
    raise ValueError(f'rounds={rounds}, repeats={repeats}; both must be >= 1')
  timers = []
  for point in points:
    config = grid.configure(base, point)
    run = steps.setup(config)
    batch = jax.device_put(run.dataset.train_batch(config, 0))
    step = jax.jit(steps.step_functions(run)[0], donate_argnums=(0,))
    timers.append(stepper(step, steps.init_state(run), batch))
  times = [[] for _ in points]
  for _ in range(rounds):
    for timer, out in zip(timers, times):
      out.append(measure(timer, repeats=repeats, warmup=2)['median_s'])
  first = statistics.median(times[0])
  return [{'variant': grid.run_name(p), 'point': p, 'median_s': statistics.median(t),
           'relative': statistics.median(t) / first, 'round_medians_s': t}
          for p, t in zip(points, times)]


def markdown(rows: list[dict]) -> str:
  lines = ['| variant | ms/step (median of rounds) | round medians, min–max (ms) | relative |',
           '| --- | --- | --- | --- |']
  lines += [f'| {r["variant"]} | {1e3 * r["median_s"]:.2f} | {1e3 * min(r["round_medians_s"]):.2f}'
            f'–{1e3 * max(r["round_medians_s"]):.2f} | {r["relative"]:.2f} |' for r in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    if not f.config:
      raise ValueError('--config is required, e.g. --config=configs/ablations/scores_vit.py')
    base, points = variants(f.config)
    rows = time_variants(base, points, f.rounds, f.repeats)
  except Exception as e:  # one line unless --verbose.
    fail_unless_verbose(e, f.verbose)
  print(markdown(rows))
  os.makedirs(f.workdir, exist_ok=True)
  path = os.path.join(f.workdir, 'sweep_steps.json')
  write_atomically(path, json.dumps({'config': f.config, 'rounds': f.rounds,
                                     'repeats': f.repeats, 'environment': environment(),
                                     'rows': rows}, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  flags.DEFINE_string('config', None, 'An ablation config file[:arg].')
  flags.DEFINE_integer('rounds', 5, 'Rounds over the variants (>= 1).')
  flags.DEFINE_integer('repeats', 20, 'Timed steps per variant per round (>= 1).')
  flags.DEFINE_string('workdir', 'runs/bench', 'Output directory for sweep_steps.json.')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks.')
  app.run(exit_on_interrupt(main, 'nothing was written'), flags_parser=parse_flags)
