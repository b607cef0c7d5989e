"""The benchmark's figures: attention time and memory against length, and train throughput."""

from __future__ import annotations

import os

from experiments.metrics import pyplot, save_figure


def draw(results: dict, out: str):
  for key, plot, name in (('attention', _attention, 'attention.png'),
                          ('train', _throughput, 'throughput.png')):
    if key in results:
      save_figure(plot(results), os.path.join(out, name), dpi=120)


def _attention(results: dict):
  rows = results['attention']
  fig, (ax_t, ax_m) = pyplot().subplots(1, 2, figsize=(10, 4))
  for impl, label in (('xla', 'ours (einsum, float32 softmax)'), ('fused', 'fused')):
    mine = [r for r in rows if r['implementation'] == impl]
    lengths = [r['length'] for r in mine]
    ax_t.plot(lengths, [r['median_s'] * 1e3 for r in mine], 'o-', label=label)
    ax_m.plot(lengths, [(r['peak_bytes'] or 0) / 2**20 for r in mine], 'o-', label=label)
  first = rows[0]
  for ax, ylabel in ((ax_t, 'forward + backward (ms)'), (ax_m, 'peak memory (MiB)')):
    ax.set(xscale='log', yscale='log', xlabel='sequence length T', ylabel=ylabel)
    ax.set_xticks([r['length'] for r in rows], [str(r['length']) for r in rows])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f'Attention, batch {first["batch"]}, {first["heads"]} heads × {first["head_dim"]}, '
               f'{first["dtype"]}')
  return fig


def _throughput(results: dict):
  fp32 = [r for r in results['train'] if r['dtype'] == 'float32']
  peer = {(r['model'], r['compiled']): r['examples_per_s']
          for r in results.get('peer', {}).get('rows', []) if r.get('impl', 'tx') == 'tx'
          and 'examples_per_s' in r}
  peer_dtype = results.get('peer', {}).get('dtype', 'float32')
  bf16 = {r['model']: r['examples_per_s'] for r in results['train'] if r['dtype'] == 'bfloat16'}
  series = [('tx float32', [r['examples_per_s'] for r in fp32]),
            ('tx bfloat16', [bf16.get(r['model'], 0) for r in fp32]),
            (f'torch eager {peer_dtype}', [peer.get((r['model'], False), 0) for r in fp32]),
            (f'torch.compile {peer_dtype}', [peer.get((r['model'], True), 0) for r in fp32])]
  series = [(name, values) for name, values in series if any(values)]
  fig, ax = pyplot().subplots(figsize=(max(6, 1.6 * len(fp32)), 4))
  width = 0.8 / len(series)
  for i, (name, values) in enumerate(series):
    ax.bar([j + i * width for j in range(len(fp32))], values, width, label=name)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fp32))], [r['model'] for r in fp32])
  ax.set(yscale='log', ylabel='train examples/s (higher is better)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  ax.set_title(f'Train-step throughput on {results["environment"]["device_kind"]}')
  return fig
