"""What experiments.inspect computes and writes for a trained run; what the files show on real
runs, and how to read them: docs/inspect.md."""

from __future__ import annotations

import json
import os

import numpy as np

import tx
from experiments import tasks
from experiments.data import BOS, symbol_names
from experiments.inspect import figures
from experiments.inspect.head_stats import alignment_mass, head_statistics, rollout_maps
from experiments.inspect.output import check_replaceable, staged
from experiments.inspect.streams import attention_layers, streams
from experiments.metrics import save_figure
from experiments.restore import load_run


def output_dir(workdir: str, out: str | None = None) -> str:
  """Where inspect writes: `out`, default RUN/inspect."""
  return out or os.path.join(workdir, 'inspect')


def inspect_run(workdir: str, out: str | None = None, examples: int = 4,
                stat_examples: int = 256, step: int | None = None,
                max_tokens: int = 32) -> list[str]:
  """Loads RUN/config.json and the checkpoint at `step` (default: the latest), runs the model on
  the first test examples and writes into `out` (default RUN/inspect/): attention_example<i>.png
  for the first `examples` (causal layers cropped to `max_tokens` tokens), rollout.png (ViT),
  cross_attention.png (seq2seq), head_statistics.png, position_content.png and
  offset_profiles.png over the first `stat_examples`, and inspection.json. Returns the paths.

  `examples` is capped at the test set's size, with a line saying so, and each drawn example
  prints a progress line. The files are written into a temporary folder beside `out`, which
  replaces `out` (and an earlier output there) only once complete: an error or Ctrl-C leaves
  `out` as it was."""
  for name, value in (('examples', examples), ('stat_examples', stat_examples),
                      ('max_tokens', max_tokens)):
    if value <= 0:
      raise ValueError(f'--{name}={value}; it must be a positive integer')
  out = output_dir(workdir, out)
  check_replaceable(out)
  run, params, step = load_run(workdir, step)
  available = run.dataset.num_test
  if examples > available:
    print(f'--examples={examples}: the test set has {available}; drawing {available}',
          flush=True)
    examples = available
  with staged(out) as staging:
    names = _write(run, params, step, staging, examples, stat_examples, max_tokens, workdir)
  return [os.path.join(out, name) for name in names]


def _write(run, params, step, out, examples, stat_examples, max_tokens, workdir) -> list[str]:
  """Computes and writes inspect's files into `out`; returns their names."""
  written = []

  def save(name, fig):
    written.append(name)
    save_figure(fig, os.path.join(out, name))

  batch = run.dataset.test_examples(max(examples, stat_examples))
  all_layers = attention_layers(run, params, batch)
  layers = [layer.take(examples) for layer in all_layers]
  shown = {key: v[:examples] for key, v in batch.items()}
  titles = _titles(run, params, shown)
  for i, title in enumerate(titles):
    save(f'attention_example{i}.png', figures.attention_grid(layers, i, title, max_tokens))
    print(f'example {i + 1}/{len(titles)}: attention_example{i}.png', flush=True)
  if isinstance(run.model, tx.ViT):
    save('rollout.png', figures.rollout(np.asarray(shown['inputs']),
                                        rollout_maps(layers, run.model.pool == 'cls'), titles))
  if run.task == 'seq2seq':
    save('cross_attention.png', figures.cross_alignment(
        [layer for layer in layers if layer.path.is_cross], streams(run, shown)['output']))
  stats_layers = [layer.take(stat_examples) for layer in all_layers]
  stats = {layer.path: head_statistics(layer) for layer in stats_layers}
  save('head_statistics.png', figures.head_statistics(stats, stats_layers[0].query.unit_name))
  save('position_content.png', figures.position_content(stats))
  save('offset_profiles.png', figures.offset_profiles(stats))
  record = {'workdir': workdir, 'step': step, 'examples': len(titles),
            'stat_examples': len(stats_layers[0].weights),
            'alignment_mass': alignment_mass(run.config.data.get('task', ''), stats_layers,
                                             batch.get('length')),
            'layers': stats}
  written.append('inspection.json')
  with open(os.path.join(out, written[-1]), 'w') as f:
    json.dump(record, f, indent=1, default=lambda array: np.asarray(array).tolist())
  return written


def _titles(run, params, batch: dict) -> list[str]:
  """A title per example of `batch`: its label and the model's prediction (classify), source
  and teacher-forced output (seq2seq), or its index (lm)."""
  inputs = tasks.model_inputs(run.task, batch, run.dataset.info.get('bos_id', BOS))
  predictions = np.asarray(run.model.apply({'params': params}, *inputs)).argmax(-1)
  if run.task == 'classify':
    return [f'test example {i}: label {int(y)}, predicted {int(p)}'
            for i, (y, p) in enumerate(zip(batch['targets'], predictions))]
  if run.task == 'seq2seq':
    label = symbol_names(run.config.data.task, run.dataset.info['vocab_size'])
    pad = run.dataset.info['pad_id']
    text = lambda ids: ' '.join(label[int(t)] for t in ids)
    return [f'test example {i}: {text(x[x != pad])} → {text(p[y != pad])} (teacher-forced)'
            for i, (x, y, p) in enumerate(zip(batch['inputs'], batch['targets'], predictions))]
  return [f'test window {i}' for i in range(len(batch['inputs']))]
