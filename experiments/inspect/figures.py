"""The figures of experiments.inspect, drawn from attention layers (streams.Layer) or their
statistics (head_stats); layers are named by their tx.AttentionLayer label ('dec 1 cross')."""

from __future__ import annotations

import numpy as np

from experiments.metrics import pyplot

MAX_TICKS = 40  # tokens labelled per axis; longer axes label every k-th token.
MAX_OFFSET = 32  # offset profiles of long sequences are shown for |k − q| up to this.
PARTS = (('relative', '#4c72b0', 'relative position'),
         ('absolute', '#dd8452', 'absolute position'), ('content', '#55a868', 'content'))


def _heatmap(ax, weights, labels_x, labels_y, title, panel: float):
  """weights on a colour scale from 0 to their largest, with the token labels in the largest
  font (≤ 8 pt) that fits a `panel`-inch axis."""
  ax.imshow(weights, cmap='viridis', vmin=0.0, vmax=max(float(weights.max()), 1e-9),
            interpolation='nearest', aspect='auto')
  size = max(3.0, min(8.0, 0.8 * 72 * panel / max(len(labels_x), len(labels_y), 1)))
  for labels, axis, rotation in ((labels_x, ax.xaxis, 90), (labels_y, ax.yaxis, 0)):
    idx = np.arange(0, len(labels), -(-len(labels) // MAX_TICKS))
    axis.set_ticks(idx, [labels[i] for i in idx], fontsize=size, rotation=rotation)
  ax.set_title(title, fontsize=8)


def attention_grid(layers, i: int, title: str, max_tokens: int):
  """Example i's attention in every layer (rows) and head (columns): query rows, key columns,
  each on its own colour scale from 0 to its largest weight. Causal layers show their first
  max_tokens tokens (exact: a query never attends past itself)."""
  heads = layers[0].weights.shape[1]  # every layer of a tx model has the same heads
  shown = lambda layer, labels: labels[:max_tokens] if layer.path.is_causal else labels
  tokens = max(len(shown(layer, layer.key.labels[i])) for layer in layers)
  panel = max(2.3, 0.11 * min(tokens, 60))  # inches: room for a label per token.
  fig, axes = pyplot().subplots(len(layers), heads, squeeze=False,
                                figsize=(panel * heads + 0.6, panel * len(layers) + 0.6))
  cropped = ''
  for row, layer in zip(axes, layers):
    q, k = shown(layer, layer.query.labels[i]), shown(layer, layer.key.labels[i])
    if len(k) < len(layer.key.labels[i]):
      cropped = f' (causal layers: first {len(k)} of {len(layer.key.labels[i])} tokens)'
    for h, ax in enumerate(row):
      _heatmap(ax, layer.weights[i, h, :len(q), :len(k)], k, q, f'{layer.path.label} head {h}',
               panel)
  fig.suptitle(f'{title}{cropped}\nrows: queries, columns: keys', fontsize=10)
  return fig


def _show_image(ax, image):
  """An image [H, W, C] with values in 0..1 (C = 1: grey), pixel (0, 0) top left, no ticks."""
  gray = image.shape[-1] == 1
  ax.imshow(image[..., 0] if gray else np.clip(image, 0, 1), cmap='gray' if gray else None,
            extent=(0, image.shape[1], image.shape[0], 0))
  ax.set(xticks=[], yticks=[])


def rollout(images, maps, titles):
  """Each image above itself with its attention rollout map [rows, cols] over the patches
  overlaid (see head_stats.rollout_maps); titles of more than two lines get the room they
  need."""
  titles = [title.replace(': ', ':\n', 1) for title in titles]
  lines = max(title.count('\n') + 1 for title in titles)
  fig, axes = pyplot().subplots(2, len(images), squeeze=False,
                                figsize=(2.6 * len(images), 5.4 + 0.12 * max(lines - 2, 0)))
  for (top, bottom), image, rollout_map, title in zip(axes.T, images, maps, titles):
    extent = (0, image.shape[1], image.shape[0], 0)
    for ax in (top, bottom):
      _show_image(ax, image)
    top.set_title(title, fontsize=7)
    overlay = bottom.imshow(rollout_map, cmap='inferno', alpha=0.6, extent=extent,
                            interpolation='nearest')
    fig.colorbar(overlay, ax=bottom, fraction=0.046)
    bottom.set_title('rollout over patches', fontsize=7)
  return fig


def patch_attention(maps, labels, image, title: str, query: str = '[CLS]'):
  """One image's attention from the output token (`query`) to each patch, for every layer
  (rows, labelled by `labels`) and head (columns): maps [layers, H, rows, cols] overlaid on
  the image, each panel on its own colour scale from 0 to its largest weight."""
  heads = maps.shape[1]
  panel = 1.7  # inches, and 0.25 more in height for each panel's title
  fig, axes = pyplot().subplots(len(maps), heads, squeeze=False,
                                figsize=(panel * heads + 0.6, (panel + 0.25) * len(maps) + 0.8))
  extent = (0, image.shape[1], image.shape[0], 0)
  for row, layer_maps, label in zip(axes, maps, labels):
    for h, ax in enumerate(row):
      _show_image(ax, image)
      ax.imshow(layer_maps[h], cmap='inferno', alpha=0.6, extent=extent, interpolation='nearest',
                vmin=0.0, vmax=max(float(layer_maps[h].max()), 1e-9))
      ax.set_title(f'{label} head {h}', fontsize=7)
  fig.suptitle(f'{title}\nattention of {query} to each patch (bright: more)', fontsize=9)
  return fig


def cross_alignment(layers, outputs):
  """Head-mean cross-attention of each decoder layer (columns) on each example (rows): the
  output token being predicted against the source tokens. Reverse shows an anti-diagonal."""
  n = len(outputs.labels)
  fig, axes = pyplot().subplots(n, len(layers), squeeze=False,
                                figsize=(3.0 * len(layers) + 0.6, 3.0 * n + 0.6))
  for i, row in enumerate(axes):
    for ax, layer in zip(row, layers):
      q, k = outputs.labels[i], layer.key.labels[i]
      _heatmap(ax, layer.weights[i].mean(0)[:len(q), :len(k)], k, q,
               f'example {i}, {layer.path.label} (head mean)', 3.0)
      ax.set_xlabel('source', fontsize=7)
      ax.set_ylabel('output', fontsize=7)
  return fig


def head_statistics(stats: dict, unit: str):
  """Entropy and mean attention distance of every head (dots) by layer, as in Dosovitskiy
  et al. (2021, Fig. 7); the distance of self-attention layers only."""
  names = list(stats)
  fig, axes = pyplot().subplots(1, 2, figsize=(max(10.0, 1.3 * len(names) + 4), 4.2))
  for ax, key, label in ((axes[0], 'entropy', 'entropy (nats)'),
                         (axes[1], 'mean_distance', f'mean attention distance ({unit})')):
    shown = [(x, n) for x, n in enumerate(names) if key in stats[n]]
    for x, n in shown:
      ax.scatter(np.full(len(stats[n][key]), x), stats[n][key], s=18)
      for h, v in enumerate(stats[n][key]):
        ax.annotate(str(h), (x, v), xytext=(4, 0), textcoords='offset points', fontsize=6)
    ax.set_xticks([x for x, _ in shown], [n.label for _, n in shown], rotation=30, fontsize=8)
    ax.set(ylabel=label, title=label.split(' (')[0] + ' per head (dots labelled by head)')
    ax.set_ylim(bottom=0)
  return fig


def position_content(stats: dict):
  """A stacked bar per head: the shares of its attention variance explained by relative
  position, added by absolute position, and left to content (tx.position_content_shares)."""
  names = list(stats)
  heads = [len(stats[n]['entropy']) for n in names]
  fig, ax = pyplot().subplots(figsize=(max(8.0, 0.35 * sum(heads) + 2), 4.2))
  starts = np.cumsum([0] + [h + 1 for h in heads[:-1]])  # a bar's gap between layers.
  for n, h, x in zip(names, heads, starts):
    bottom = np.zeros(h)
    for key, colour, label in PARTS:
      values = np.asarray(stats[n][key])
      ax.bar(x + np.arange(h), values, bottom=bottom, color=colour, width=0.8,
             label=label if n == names[0] else None)
      bottom += values
  ax.set_xticks(starts + (np.array(heads) - 1) / 2, [n.label for n in names], rotation=30,
                fontsize=8)
  ax.set(ylabel='share of attention variance', ylim=(0, 1),
         title='what each head\'s attention varies with (one bar per head)')
  ax.legend(loc='upper right', fontsize=8, framealpha=0.9)
  return fig


def offset_profiles(stats: dict):
  """Each head's mean attention weight at each offset k − q: one line per head and a panel
  per layer for sequences; a (dy, dx) map per layer and head for image patches."""
  names = list(stats)
  if len(stats[names[0]]['offset_profile'][0][0]) != 2:  # offsets k − q along a sequence
    return _offset_lines(stats)
  heads = len(stats[names[0]]['entropy'])
  fig, axes = pyplot().subplots(len(names), heads, squeeze=False,
                                figsize=(2.2 * heads + 0.6, 2.2 * len(names) + 0.6))
  for row, n in zip(axes, names):
    offsets = np.array([o for o, _ in stats[n]['offset_profile']])  # [offsets, 2]
    lo, hi = offsets.min(0), offsets.max(0)
    grid = np.full((*(hi - lo + 1), len(row)), np.nan)  # [dy, dx, H]; NaN: offset never seen
    grid[tuple((offsets - lo).T)] = [m for _, m in stats[n]['offset_profile']]
    for h, ax in enumerate(row):
      ax.imshow(grid[..., h], cmap='viridis',
                extent=(lo[1] - 0.5, hi[1] + 0.5, hi[0] + 0.5, lo[0] - 0.5))
      ax.set_title(f'{n.label} head {h}', fontsize=8)
      ax.tick_params(labelsize=6)
  fig.suptitle('mean attention by patch offset (dy down, dx right; centre = self)', fontsize=10)
  return fig


def _offset_lines(stats: dict):
  names = list(stats)
  cols = min(len(names), 4)
  rows = -(-len(names) // cols)
  fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols + 0.6, 3.4 * rows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  for ax, n in zip(axes.flat, names):
    xs = [o[0] for o, _ in stats[n]['offset_profile']]
    values = np.array([m for _, m in stats[n]['offset_profile']])  # [offsets, H]
    ax.plot(xs, values, lw=1, label=[f'head {h}' for h in range(values.shape[1])])
    ax.set_title(n.label, fontsize=9)
    wide = max(xs) - min(xs) > 2 * MAX_OFFSET
    if wide:
      ax.set_xlim(max(min(xs), -MAX_OFFSET), min(max(xs), MAX_OFFSET))
    ax.set_xlabel(f'offset k − q (|k − q| ≤ {MAX_OFFSET} shown)' if wide else 'offset k − q')
  for row in axes:
    row[0].set_ylabel('mean attention weight')
  axes[0, 0].legend(fontsize=7)
  return fig
