"""A sweep's tables: results.csv (a row per run) and results.md (mean ± std over seeds)."""

from __future__ import annotations

import csv
import io

import numpy as np

from experiments.metrics import write_atomically

# summary.json's times, aggregated beside the eval metrics: a run's whole wall time (start-up,
# compiles, training, evaluations; a vectorized group's members share theirs).
TIMES = ('wall_time_s',)


def write_csv(rows: list[dict], path: str):
  """One row per run; nested results become columns 'name/key' (e.g. attention_entropy/<layer>)."""
  flat = [{f'{k}/{sub}' if isinstance(v, dict) else k: x
           for k, v in row.items() for sub, x in (v.items() if isinstance(v, dict) else [(k, v)])}
          for row in rows]
  columns = list(dict.fromkeys(k for row in flat for k in row))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  writer.writerows(flat)
  write_atomically(path, text.getvalue())


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
  """Groups rows by every swept key except 'seed': mean and std of each eval metric (and of
  each of TIMES) over the runs that did not diverge (n), and how many diverged when any did."""
  group_keys = [k for k in keys if k != 'seed']
  metrics = sorted({k for row in rows for k in row if k.startswith('eval/')})
  metrics += [k for k in TIMES if any(k in row for row in rows)]
  any_diverged = any('diverged' in row for row in rows)
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
  out = []
  for values, members in groups.items():
    healthy = [r for r in members if 'diverged' not in r]
    entry = dict(zip(group_keys, values), n=len(healthy))
    if any_diverged:
      entry['diverged'] = len(members) - len(healthy)
    for m in metrics:
      xs = np.array([r[m] for r in healthy if r.get(m) is not None], float)
      entry[m] = (xs.mean(), xs.std(ddof=1) if len(xs) > 1 else 0.0) if len(xs) else None
    out.append(entry)
  return out


def write_markdown(groups: list[dict], path: str, title: str):
  """The groups of `aggregate` as a Markdown table, each metric as mean ± std."""
  if not groups:
    return
  metrics = [k for k in groups[0] if k.startswith('eval/') or k in TIMES]
  keys = [k for k in groups[0] if k not in metrics]
  row = lambda cells: '| ' + ' | '.join(cells) + ' |'
  lines = [f'# {title}', '', 'Mean ± std over seeds (n runs per row); n/a: not evaluated '
           '(see extrapolation_note in results.csv).', '', row(keys + metrics),
           '|' + ' --- |' * (len(keys) + len(metrics))]
  cell = lambda m, v: f'{v[0]:.{1 if m in TIMES else 4}f} ± {v[1]:.{1 if m in TIMES else 4}f}'
  for g in groups:
    lines.append(row([str(g[k]) for k in keys]
                     + [cell(m, g[m]) if g[m] else 'n/a' for m in metrics]))
  write_atomically(path, '\n'.join(lines) + '\n')
