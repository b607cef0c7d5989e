"""The PNG plots of a sweep, each drawn from its result rows (one dict per run).

Every plot groups runs by the swept keys other than seed and shows the mean
over seeds (error bars: std). Which plots a sweep gets depends on what it swept:
learning curves always; metric and attention entropy against β when it swept
model.beta_scale; exact match against sequence length when its runs report it.
"""

from __future__ import annotations

import numpy as np

from experiments import metrics as metrics_lib

BETA, LEARN = 'model.beta_scale', 'model.learn_beta'


def _label(row: dict, keys: list[str]) -> str:
  return ', '.join(f'{k.split(".")[-1]}={row[k]}' for k in keys) or 'all'


def _groups(rows: list[dict], keys: list[str]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for row in rows:
    out.setdefault(_label(row, keys), []).append(row)
  return out


def learning_curves(rows: list[dict], keys: list[str], path: str):
  """Train loss against step, one line per group."""
  plt = metrics_lib.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, members in _groups(rows, [k for k in keys if k != 'seed']).items():
    runs = []
    for row in members:
      train = [r for r in metrics_lib.read_metrics(row['workdir']) if r['split'] == 'train']
      runs.append(([r['step'] for r in train], [r['loss'] for r in train]))
    n = min(len(steps) for steps, _ in runs)
    ax.plot(runs[0][0][:n], np.mean([loss[:n] for _, loss in runs], axis=0), label=label)
  ax.set(xlabel='step', ylabel='train loss (mean over seeds)', yscale='log',
         title='learning curves')
  ax.legend(fontsize=8)
  metrics_lib.save_figure(fig, path)


def against_beta(rows: list[dict], keys: list[str], value, ylabel: str, path: str):
  """value(row) against s = β·√d_head on a log axis, one line per group of the other keys.

  β = 0 cannot sit on a log axis: it is drawn as a dotted horizontal line, and a
  learned β (learn_beta=True) as a dashed one, each with its ±std band.
  """
  plt = metrics_lib.pyplot()
  other = [k for k in keys if k not in ('seed', BETA, LEARN)]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, members) in enumerate(_groups(rows, other).items()):
    color = f'C{i}'
    fixed = [r for r in members if not r.get(LEARN)]
    xs = sorted({r[BETA] for r in fixed if r[BETA] > 0})
    stats = lambda rs: (np.mean([value(r) for r in rs]), np.std([value(r) for r in rs]))
    if xs:
      mean, std = zip(*[stats([r for r in fixed if r[BETA] == x]) for x in xs])
      ax.errorbar(xs, mean, yerr=std, marker='o', capsize=3, color=color,
                  label=label if other else 'fixed β')
    for subset, style, name in (([r for r in fixed if r[BETA] == 0], ':', 'β = 0'),
                                ([r for r in members if r.get(LEARN)], '--', 'learned β')):
      if subset:
        mean, std = stats(subset)
        ax.axhline(mean, linestyle=style, color=color, label=f'{name}' + (f' ({label})' if other else ''))
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)
  ax.set_xscale('log', base=2)
  ax.set(xlabel='s, where β = s / √d_head', ylabel=ylabel, title=f'{ylabel} against β')
  ax.legend(fontsize=8)
  metrics_lib.save_figure(fig, path)


def entropy_by_layer_against_beta(rows: list[dict], keys: list[str], path: str):
  """Attention entropy of each layer against s (fixed-β runs; mean over seeds), one panel
  per group of the other swept keys (e.g. per posemb)."""
  plt = metrics_lib.pyplot()
  other = [k for k in keys if k not in ('seed', BETA, LEARN)]
  fixed = [r for r in rows if not r.get(LEARN) and r.get('attention_entropy')]
  groups = _groups(fixed, other)
  fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False,
                           sharey=True)
  for ax, (label, members) in zip(axes[0], groups.items()):
    xs = sorted({r[BETA] for r in members})
    positions = [x if x > 0 else min(v for v in xs if v > 0) / 2 for x in xs]  # β=0 at left.
    for layer in members[0]['attention_entropy']:
      ax.plot(positions, [np.mean([r['attention_entropy'][layer] for r in members
                                   if r[BETA] == x]) for x in xs], marker='o', label=layer)
    ax.set_xscale('log', base=2)
    if xs and xs[0] == 0:
      ax.set_xticks(positions, ['0'] + [f'{x:g}' for x in xs[1:]])
    ax.set(xlabel='s, where β = s / √d_head', ylabel='attention entropy (nats)', title=label)
    ax.legend(fontsize=7)
  fig.suptitle('attention entropy per layer against β')
  metrics_lib.save_figure(fig, path)


def against_length(rows: list[dict], keys: list[str], path: str):
  """Exact match against sequence length: one panel per group of the swept keys other than
  posemb and seed (e.g. per task), one line per posemb. A shaded band marks lengths beyond
  training; gaps mark lengths a model could not be run on."""
  plt = metrics_lib.pyplot()
  panel_keys = [k for k in keys if k not in ('seed', 'model.posemb')]
  panels = _groups(rows, panel_keys)
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False,
                           sharey=True)
  for ax, (title, members) in zip(axes[0], panels.items()):
    for label, runs in _groups(members, [k for k in keys if k == 'model.posemb']).items():
      lengths = sorted(int(n) for n in runs[0]['exact_match_by_length'])
      values = [[r['exact_match_by_length'].get(str(n), r['exact_match_by_length'].get(n))
                 for r in runs] for n in lengths]
      mean = [np.mean(v) if all(x is not None for x in v) else np.nan for v in values]
      if any(np.isnan(mean)):
        label += ' (gap: beyond its learned table)'
      ax.plot(lengths, mean, marker='o', label=label)
    trained = max(r.get('train_max_length', 0) for r in members)
    if trained:
      ax.axvspan(trained + 0.5, max(lengths) + 0.5, color='grey', alpha=0.15,
                 label='longer than any training sequence')
    ax.set(xlabel='sequence length', ylabel='exact match (teacher-forced)', ylim=(-0.02, 1.02),
           title=title)
    ax.legend(fontsize=8)
  fig.suptitle('length extrapolation')
  metrics_lib.save_figure(fig, path)


def plot_sweep(rows: list[dict], keys: list[str], sweepdir: str) -> list[str]:
  """Writes every plot that this sweep's keys and results support (runs that diverged are
  left out); returns the file names."""
  rows = [r for r in rows if 'diverged' not in r]
  if not rows:
    return []
  written = ['learning_curves.png']
  learning_curves(rows, keys, f'{sweepdir}/learning_curves.png')
  metric = next((m for m in ('eval/accuracy', 'eval/exact_match') if m in rows[0]), None)
  if BETA in keys and metric:
    against_beta(rows, keys, lambda r: r[metric], metric[5:], f'{sweepdir}/{metric[5:]}_vs_beta.png')
    written.append(f'{metric[5:]}_vs_beta.png')
    if 'eval/attention_entropy' in rows[0]:
      against_beta(rows, keys, lambda r: r['eval/attention_entropy'],
                   'attention entropy (nats, mean over layers)', f'{sweepdir}/entropy_vs_beta.png')
      entropy_by_layer_against_beta(rows, keys, f'{sweepdir}/entropy_by_layer_vs_beta.png')
      written += ['entropy_vs_beta.png', 'entropy_by_layer_vs_beta.png']
  if all('exact_match_by_length' in r for r in rows):
    against_length(rows, keys, f'{sweepdir}/exact_match_vs_length.png')
    written.append('exact_match_vs_length.png')
  return written
