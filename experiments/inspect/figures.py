"""The PNG plots of experiments.inspect, each drawn from attention layers (streams.Layer) or their
statistics; layers are named by their tx.AttentionLayer label ('dec 1 cross')."""

from __future__ import annotations

import numpy as np

from experiments.metrics import pyplot, save_figure

MAX_TICKS = 40  # tokens labelled per axis; longer axes label every k-th token.
MAX_OFFSET = 32  # offset profiles of long sequences are shown for |k − q| up to this.


def _ticks(ax, labels_x, labels_y, panel: float):
  """Token labels on both axes, in the largest font (≤ 8 pt) that fits a `panel`-inch axis."""
  size = max(3.0, min(8.0, 0.8 * 72 * panel / max(len(labels_x), len(labels_y), 1)))
  for labels, set_ticks, set_labels in ((labels_x, ax.set_xticks, ax.set_xticklabels),
                                        (labels_y, ax.set_yticks, ax.set_yticklabels)):
    every = -(-len(labels) // MAX_TICKS)
    idx = np.arange(0, len(labels), every)
    set_ticks(idx)
    set_labels([labels[i] for i in idx], fontsize=size,
               rotation=90 if set_labels == ax.set_xticklabels else 0)


def _heatmap(ax, weights, labels_x, labels_y, title, panel: float):
  ax.imshow(weights, cmap='viridis', vmin=0.0, vmax=max(float(weights.max()), 1e-9),
            interpolation='nearest', aspect='auto')
  _ticks(ax, labels_x, labels_y, panel)
  ax.set_title(title, fontsize=8)


def attention_grid(path: str, layers, i: int, title: str, max_tokens: int) -> str:
  """Example i's attention in every layer (rows) and head (columns): query rows, key columns,
  each on its own colour scale from 0 to its largest weight. Causal layers show their first
  max_tokens tokens (exact: a query never attends past itself)."""
  plt = pyplot()
  heads = max(layer.weights.shape[1] for layer in layers)
  shown = lambda layer, labels: labels[:max_tokens] if layer.causal else labels
  tokens = max(len(shown(layer, layer.key.labels[i])) for layer in layers)
  panel = max(2.3, 0.11 * min(tokens, 60))  # inches: room for a label per token.
  fig, axes = plt.subplots(len(layers), heads, figsize=(panel * heads + 0.6,
                                                        panel * len(layers) + 0.6), squeeze=False)
  cropped = ''
  for row, layer in zip(axes, layers):
    q, k = shown(layer, layer.query.labels[i]), shown(layer, layer.key.labels[i])
    if len(k) < len(layer.key.labels[i]):
      cropped = f' (causal layers: first {len(k)} of {len(layer.key.labels[i])} tokens)'
    for h, ax in enumerate(row):
      if h >= layer.weights.shape[1]:
        ax.axis('off')
        continue
      _heatmap(ax, layer.weights[i, h, :len(q), :len(k)], k, q, f'{layer.path.label} head {h}',
               panel)
  fig.suptitle(f'{title}{cropped}\nrows: queries, columns: keys', fontsize=10)
  save_figure(fig, path)
  return path


def rollout(path: str, images, maps, titles) -> str:
  """Each image above itself with its attention rollout map [rows, cols] over the patches
  overlaid (see inspect.rollout_maps)."""
  plt = pyplot()
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), squeeze=False)
  for j in range(n):
    image = images[j]
    gray = image.shape[-1] == 1
    shown = image[..., 0] if gray else np.clip(image, 0, 1)
    extent = (0, image.shape[1], image.shape[0], 0)
    axes[0, j].imshow(shown, cmap='gray' if gray else None, extent=extent)
    axes[0, j].set_title(titles[j].replace(': ', ':\n', 1), fontsize=7)
    axes[1, j].imshow(shown, cmap='gray' if gray else None, extent=extent)
    overlay = axes[1, j].imshow(maps[j], cmap='inferno', alpha=0.6, extent=extent,
                                interpolation='nearest')
    fig.colorbar(overlay, ax=axes[1, j], fraction=0.046)
    axes[1, j].set_title('rollout over patches', fontsize=7)
    for ax in axes[:, j]:
      ax.set_xticks([])
      ax.set_yticks([])
  save_figure(fig, path)
  return path


def cross_alignment(path: str, layers, outputs) -> str:
  """Head-mean cross-attention of each decoder layer (columns) on each example (rows): the
  output token being predicted against the source tokens. Reverse shows an anti-diagonal."""
  plt = pyplot()
  n = len(outputs.labels)
  fig, axes = plt.subplots(n, len(layers), figsize=(3.0 * len(layers) + 0.6, 3.0 * n + 0.6),
                           squeeze=False)
  for i in range(n):
    for ax, layer in zip(axes[i], layers):
      q, k = outputs.labels[i], layer.key.labels[i]
      _heatmap(ax, layer.weights[i].mean(0)[:len(q), :len(k)], k, q,
               f'example {i}, {layer.path.label} (head mean)', 3.0)
      ax.set_xlabel('source', fontsize=7)
      ax.set_ylabel('output', fontsize=7)
  save_figure(fig, path)
  return path


def head_statistics(path: str, stats: dict, unit: str) -> str:
  """Entropy and mean attention distance of every head (dots) by layer, as in Dosovitskiy
  et al. (2021, Fig. 7); the distance of self-attention layers only."""
  plt = pyplot()
  names = list(stats)
  fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.3 * len(names) + 4), 4.2))
  for ax, key, label in ((axes[0], 'entropy', 'entropy (nats)'),
                         (axes[1], 'mean_distance', f'mean attention distance ({unit})')):
    shown = [(x, np.asarray(stats[n][key])) for x, n in enumerate(names) if key in stats[n]]
    for x, values in shown:
      ax.scatter(np.full(len(values), x), values, s=18)
      for h, v in enumerate(values):
        ax.annotate(str(h), (x, v), xytext=(4, 0), textcoords='offset points', fontsize=6)
    ax.set_xticks([x for x, _ in shown])
    ax.set_xticklabels([names[x].label for x, _ in shown], rotation=30, fontsize=8)
    ax.set(ylabel=label, title=label.split(' (')[0] + ' per head (dots labelled by head)')
    ax.set_ylim(bottom=0)
  save_figure(fig, path)
  return path


def position_content(path: str, stats: dict) -> str:
  """A stacked bar per head: the shares of its attention variance explained by relative
  position, added by absolute position, and left to content (tx.position_content_shares)."""
  plt = pyplot()
  names = list(stats)
  heads = [len(stats[n]['entropy']) for n in names]
  fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * sum(heads) + 2), 4.2))
  x, ticks, tick_labels = 0, [], []
  parts = {'relative': ('#4c72b0', 'relative position'),
           'absolute': ('#dd8452', 'absolute position'), 'content': ('#55a868', 'content')}
  for n, h in zip(names, heads):
    xs = x + np.arange(h)
    bottom = np.zeros(h)
    for key, (colour, label) in parts.items():
      values = np.asarray(stats[n][key])
      ax.bar(xs, values, bottom=bottom, color=colour, width=0.8,
             label=label if n == names[0] else None)
      bottom += values
    ticks.append(x + (h - 1) / 2)
    tick_labels.append(n.label)
    x += h + 1
  ax.set_xticks(ticks)
  ax.set_xticklabels(tick_labels, rotation=30, fontsize=8)
  ax.set(ylabel='share of attention variance', ylim=(0, 1),
         title='what each head\'s attention varies with (one bar per head)')
  ax.legend(loc='upper right', fontsize=8, framealpha=0.9)
  save_figure(fig, path)
  return path


def offset_profiles(path: str, stats: dict) -> str:
  """Each head's mean attention weight at each offset k − q: one line per head and a panel
  per layer for sequences; a (dy, dx) map per layer and head for image patches."""
  plt = pyplot()
  names = list(stats)
  profile = {n: stats[n]['profile'] for n in names}
  two_d = len(next(iter(profile[names[0]]))) == 2
  if two_d:
    heads = max(len(stats[n]['entropy']) for n in names)
    fig, axes = plt.subplots(len(names), heads, figsize=(2.2 * heads + 0.6, 2.2 * len(names) + 0.6),
                             squeeze=False)
    for row, n in zip(axes, names):
      offsets = np.array(list(profile[n]))
      lo = offsets.min(0)
      size = offsets.max(0) - lo + 1
      for h, ax in enumerate(row):
        grid = np.full(size, np.nan)
        for o, m in profile[n].items():
          grid[o[0] - lo[0], o[1] - lo[1]] = m[h]
        ax.imshow(grid, cmap='viridis', extent=(lo[1] - 0.5, lo[1] + size[1] - 0.5,
                                                lo[0] + size[0] - 0.5, lo[0] - 0.5))
        ax.set_title(f'{n.label} head {h}', fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle('mean attention by patch offset (dy down, dx right; centre = self)', fontsize=10)
  else:
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.6, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
      ax.axis('off')
    for ax, n in zip(axes.flat, names):
      offsets = sorted(profile[n])
      values = np.array([profile[n][o] for o in offsets])  # [offsets, H]
      for h in range(values.shape[1]):
        ax.plot([o[0] for o in offsets], values[:, h], label=f'head {h}', lw=1)
      ax.set(title=n.label, xlabel='offset k − q')
      ax.title.set_fontsize(9)
      xs = [o[0] for o in offsets]
      if max(xs) - min(xs) > 2 * MAX_OFFSET:
        ax.set_xlim(max(min(xs), -MAX_OFFSET), min(max(xs), MAX_OFFSET))
        ax.set_xlabel(f'offset k − q (|k − q| ≤ {MAX_OFFSET} shown)')
    for row in axes:
      row[0].set_ylabel('mean attention weight')
    axes[0, 0].legend(fontsize=7)
  save_figure(fig, path)
  return path
