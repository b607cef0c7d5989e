"""The PNG plots of a sweep, drawn from its result rows (one dict per run): each groups the runs
by the swept keys other than seed and shows the mean over seeds (error bars or bands: std)."""

from __future__ import annotations

import numpy as np

from experiments.metrics import pyplot, read_metrics, save_figure

BETA, LEARN, SCORE = 'model.beta_scale', 'model.learn_beta', 'model.score'
LINES_BY_LENGTH = ('model.posemb', 'model.beta_length')  # one line each in against_length.


def _variant_keys(keys: list[str]) -> list[str]:
  """The swept keys that name a variant, one line (against_length) or bar (by_variant) each:
  posemb, beta_length, and a swept score together with the β that goes with it."""
  return [k for k in keys if k in LINES_BY_LENGTH or (SCORE in keys and k in (SCORE, BETA, LEARN))]


def _groups(rows: list[dict], keys: list[str]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for row in rows:
    label = ', '.join(f'{k.split(".")[-1]}={row[k]}' for k in keys) or 'all'
    out.setdefault(label, []).append(row)
  return out


def learning_curves(rows: list[dict], keys: list[str], path: str):
  """Train loss against step, one line per group (up to the shortest run's last step)."""
  fig, ax = pyplot().subplots(figsize=(7, 4.5))
  for label, members in _groups(rows, [k for k in keys if k != 'seed']).items():
    runs = [[r for r in read_metrics(row['workdir']) if r['split'] == 'train'] for row in members]
    n = min(map(len, runs))
    ax.plot([r['step'] for r in runs[0][:n]],
            np.mean([[r['loss'] for r in run[:n]] for run in runs], axis=0), label=label)
  ax.set(xlabel='step', ylabel='train loss (mean over seeds)', yscale='log',
         title='learning curves')
  ax.legend(fontsize=8)
  save_figure(fig, path)


def against_beta(rows: list[dict], keys: list[str], metric: str, ylabel: str, path: str):
  """row[metric] against s = β·√d_head on a log axis, one line per group of the other keys.

  β = 0 cannot sit on a log axis: it is drawn as a dotted horizontal line, and a
  learned β (learn_beta=True) as a dashed one, each with its ±std band.
  """
  fig, ax = pyplot().subplots(figsize=(7, 4.5))
  other = [k for k in keys if k not in ('seed', BETA, LEARN)]
  stats = lambda rs: (np.mean([r[metric] for r in rs]), np.std([r[metric] for r in rs]))
  for i, (label, members) in enumerate(_groups(rows, other).items()):
    color = f'C{i}'
    fixed = [r for r in members if not r.get(LEARN)]
    xs = sorted({r[BETA] for r in fixed if r[BETA] > 0})
    if xs:
      mean, std = zip(*[stats([r for r in fixed if r[BETA] == x]) for x in xs])
      ax.errorbar(xs, mean, yerr=std, marker='o', capsize=3, color=color,
                  label=label if other else 'fixed β')
    for subset, style, name in (([r for r in fixed if r[BETA] == 0], ':', 'β = 0'),
                                ([r for r in members if r.get(LEARN)], '--', 'learned β')):
      if subset:
        mean, std = stats(subset)
        ax.axhline(mean, linestyle=style, color=color,
                   label=name + (f' ({label})' if other else ''))
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)
  ax.set_xscale('log', base=2)
  ax.set(xlabel='s, where β = s / √d_head', ylabel=ylabel, title=f'{ylabel} against β')
  ax.legend(fontsize=8)
  save_figure(fig, path)


def entropy_by_layer_against_beta(rows: list[dict], keys: list[str], path: str):
  """Attention entropy of each layer against s (fixed-β runs; mean over seeds), one panel
  per group of the other swept keys (e.g. per posemb); β = 0 sits left of the smallest s."""
  other = [k for k in keys if k not in ('seed', BETA, LEARN)]
  groups = _groups([r for r in rows if not r.get(LEARN) and r.get('attention_entropy')], other)
  fig, axes = pyplot().subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False,
                                sharey=True)
  for ax, (label, members) in zip(axes[0], groups.items()):
    xs = sorted({r[BETA] for r in members})
    positions = [x if x > 0 else min(v for v in xs if v > 0) / 2 for x in xs]
    for layer in members[0]['attention_entropy']:
      ax.plot(positions, [np.mean([r['attention_entropy'][layer] for r in members
                                   if r[BETA] == x]) for x in xs], marker='o', label=layer)
    ax.set_xscale('log', base=2)
    if xs and xs[0] == 0:
      ax.set_xticks(positions, ['0'] + [f'{x:g}' for x in xs[1:]])
    ax.set(xlabel='s, where β = s / √d_head', ylabel='attention entropy (nats)', title=label)
    ax.legend(fontsize=7)
  fig.suptitle('attention entropy per layer against β')
  save_figure(fig, path)


def against_length(rows: list[dict], keys: list[str], metric: str, ylabel: str, path: str):
  """row[metric] ({length: value}) against sequence length: one panel per group of the swept
  keys other than seed, posemb and beta_length (e.g. per task), one line per posemb and
  beta_length. A shaded band marks lengths beyond training; gaps mark lengths a model could
  not be run on."""
  panels = _groups(rows, [k for k in keys if k != 'seed' and k not in _variant_keys(keys)])
  fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False,
                                sharey=True)
  for ax, (title, members) in zip(axes[0], panels.items()):
    colors = {}  # one colour per posemb; the log-length β dashed.
    for label, runs in _groups(members, _variant_keys(keys)).items():
      lengths = sorted(int(n) for n in runs[0][metric])
      values = [[r[metric].get(str(n)) for r in runs] for n in lengths]
      mean = [np.nan if None in v else np.mean(v) for v in values]
      if any(np.isnan(mean)):
        label += ' (gap: beyond its learned table)'
      ax.plot(lengths, mean, marker='o', label=label,
              color=colors.setdefault(runs[0].get('model.posemb', label), f'C{len(colors)}'),
              linestyle='--' if runs[0].get('model.beta_length') == 'log' else '-')
    trained = max(r.get('train_max_length', 0) for r in members)
    if trained:
      ax.axvspan(trained + 0.5, max(lengths) + 0.5, color='grey', alpha=0.15,
                 label='longer than any training sequence')
    ax.set(xlabel='sequence length', ylabel=ylabel, title=title)
    if metric == 'exact_match_by_length':
      ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
  fig.suptitle('length extrapolation')
  save_figure(fig, path)


def by_variant(rows: list[dict], keys: list[str], metrics: list[tuple[str, str]], path: str):
  """Bars of each (metric, label) of `metrics`, one panel each: a bar per variant (e.g. a score
  with its β), one colour per group of the other swept keys (e.g. per task); the height is the
  mean over seeds, the error bar the std (ddof 1)."""
  other = [k for k in keys if k != 'seed' and k not in _variant_keys(keys)]
  variants = _groups(rows, _variant_keys(keys))
  series = list(_groups(rows, other))
  width = 0.8 / len(series)
  fig, axes = pyplot().subplots(1, len(metrics), squeeze=False,
                                figsize=(1.1 * len(variants) * len(metrics) + 1, 4.8))
  for ax, (metric, ylabel) in zip(axes[0], metrics):
    for i, name in enumerate(series):
      xs, means, stds = [], [], []
      for x, members in enumerate(variants.values()):
        values = [r[metric] for r in _groups(members, other).get(name, [])
                  if r.get(metric) is not None]
        if values:
          xs.append(x + (i - (len(series) - 1) / 2) * width)
          means.append(np.mean(values))
          stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
      ax.bar(xs, means, width, yerr=stds, capsize=3, color=f'C{i}', label=name)
    ax.set_xticks(range(len(variants)), [v.replace(', ', '\n') for v in variants], fontsize=7)
    ax.set(ylabel=ylabel, title=f'{ylabel} (mean ± std over seeds)')
    if other:
      ax.legend(fontsize=8)
  save_figure(fig, path)


def plot_sweep(rows: list[dict], keys: list[str], sweepdir: str) -> list[str]:
  """Writes every plot that this sweep's keys and results support (runs that diverged are
  left out); returns the file names."""
  rows = [r for r in rows if 'diverged' not in r]
  if not rows:
    return []
  written = []

  def plot(name, draw, *args):
    draw(rows, keys, *args, f'{sweepdir}/{name}')
    written.append(name)

  plot('learning_curves.png', learning_curves)
  metric = next((m for m in ('eval/accuracy', 'eval/exact_match') if m in rows[0]), None)
  if SCORE in keys and metric:  # each score comes with its own β: a variant, not an axis.
    plot('scores.png', by_variant, [(metric, metric[5:]), (
        'eval/attention_entropy', 'attention entropy (nats, mean over layers)')])
  elif BETA in keys and metric:
    plot(f'{metric[5:]}_vs_beta.png', against_beta, metric, metric[5:])
    if 'eval/attention_entropy' in rows[0]:
      plot('entropy_vs_beta.png', against_beta, 'eval/attention_entropy',
           'attention entropy (nats, mean over layers)')
      plot('entropy_by_layer_vs_beta.png', entropy_by_layer_against_beta)
  if all('exact_match_by_length' in r for r in rows):
    plot('exact_match_vs_length.png', against_length, 'exact_match_by_length',
         'exact match (teacher-forced)')
  if all('bits_per_char_by_length' in r for r in rows):
    plot('bits_per_char_vs_length.png', against_length, 'bits_per_char_by_length',
         'bits per character (test)')
  return written
