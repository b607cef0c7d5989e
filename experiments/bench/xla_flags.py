"""Does an XLA flag change tx's train step? Each flag set against none, in alternating
processes, on the same host in the same minutes:

  python -m experiments.bench.xla_flags --specs=vit-digits,vit-c32-d256 --rounds=3 \\
      --flags='--xla_cpu_use_onednn=true;--xla_cpu_experimental_ynn_fusion_type=dot'

For each round, each spec and each flag set ('' = none, first), one process times the step
(`python -m experiments.bench.step_time`, XLA_FLAGS set before JAX starts). A flag set's time
is the median over rounds of its per-process medians, and its ratio is that over the
baseline's: a host whose speed drifts between minutes moves both, since they alternate. An
unknown flag fails its process; the row says so. Writes xla_flags.json and prints a table.
"""

from __future__ import annotations

import json
import os
import statistics

from experiments.bench.__main__ import run_module
from experiments.metrics import write_atomically


def run(spec_names, flag_sets, *, rounds: int, repeats: int, dtype: str, out: str,
        log=print) -> list[dict]:
  """Times every (spec, flag set) `rounds` times, alternating; returns one row per pair."""
  flag_sets = [''] + [f for f in flag_sets if f]
  times = {(s, f): [] for s in spec_names for f in flag_sets}
  errors = {}
  for r in range(rounds):
    for spec in spec_names:
      for flag in flag_sets:
        env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip())
        try:
          t = run_module('experiments.bench.step_time', f'--spec={spec}', f'--dtype={dtype}',
                         f'--repeats={repeats}', env=env)
          times[spec, flag].append(t['median_s'])
          log(f'round {r + 1} {spec} {flag or "(none)"}: {t["median_s"] * 1e3:.1f} ms')
        except RuntimeError as e:
          errors[spec, flag] = str(e)
  rows = []
  for spec in spec_names:
    base = statistics.median(times[spec, '']) if times[spec, ''] else None
    for flag in flag_sets:
      t = times[spec, flag]
      row = dict(spec=spec, flags=flag, dtype=dtype, medians_s=t)
      if t:
        row['median_s'] = statistics.median(t)
        row['ratio'] = row['median_s'] / base if base else None
      if (spec, flag) in errors:
        row['error'] = errors[spec, flag]
      rows.append(row)
  os.makedirs(out, exist_ok=True)
  write_atomically(os.path.join(out, 'xla_flags.json'), json.dumps(rows, indent=1))
  return rows


def markdown(rows) -> str:
  lines = ['| spec | XLA flags | ms/step (median of rounds) | per round | time / no flags |',
           '|---|---|---|---|---|']
  for r in rows:
    if 'median_s' not in r:
      lines.append(f'| {r["spec"]} | `{r["flags"]}` | failed: {r.get("error", "")} | | |')
      continue
    rounds = ', '.join(f'{t * 1e3:.1f}' for t in r['medians_s'])
    ratio = f'{r["ratio"]:.2f}' if r['ratio'] else ''
    lines.append(f'| {r["spec"]} | `{r["flags"] or "(none)"}` | {r["median_s"] * 1e3:.1f} | '
                 f'{rounds} | {ratio} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  rows = run([s for s in f.specs.split(',') if s], f.flags.split(';'), rounds=f.rounds,
             repeats=f.repeats, dtype=f.dtype, out=f.workdir)
  print(markdown(rows))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('specs', 'vit-digits,vit-c32-d256', 'Comma-separated specs.')
  flags.DEFINE_string('flags', '--xla_cpu_use_onednn=true', "';'-separated XLA flag sets.")
  flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
  flags.DEFINE_integer('repeats', 10, 'Timed steps per process.')
  flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
  flags.DEFINE_string('workdir', 'runs/bench-xla-flags', 'Where xla_flags.json goes.')
  app.run(main)
