"""What experiments.inspect writes for a trained run: attention maps, ViT rollout, head
statistics, and how much of each head's attention position explains.

Loads RUN/config.json and the latest checkpoint (or --step), runs the model on the first
test examples and writes to DIR (default RUN/inspect/):

  attention_example<i>.png  every layer (rows) and head (columns) on test example i,
                            labelled with its tokens (the patch grid for images)
  rollout.png               ViT: the images with the attention rollout of [CLS] overlaid
  cross_attention.png       seq2seq: head-mean cross-attention, output × source tokens
  head_statistics.png       entropy and mean attention distance of each head, by layer
  position_content.png      each head's attention variance split into relative position,
                            absolute position and content (tx.position_content_shares)
  offset_profiles.png       each head's mean attention as a function of the offset k − q
  inspection.json           the numbers behind the plots

Statistics use the first --stat_examples test examples. [CLS] is not on the patch grid or
the sequence (whatever embedding it gets), so it is left out of distances and of the
position/content split (rows renormalised for distances). Heatmaps of causal layers show
the first --max_tokens tokens, which never attend past themselves; other layers show all.
"""

from __future__ import annotations

import json
import os

import numpy as np

import tx
from experiments import tasks
from experiments.data import BOS, symbol_names
from experiments.inspect import figures
from experiments.inspect.head_stats import alignment_mass, head_statistics, rollout_maps
from experiments.inspect.streams import attention_layers
from experiments.restore import load_run


def inspect_run(workdir: str, out: str | None = None, examples: int = 4,
                stat_examples: int = 256, step: int | None = None,
                max_tokens: int = 32) -> list[str]:
  """Writes the plots and inspection.json of a run (see the module docstring); returns the paths."""
  for name, value in (('examples', examples), ('stat_examples', stat_examples),
                      ('max_tokens', max_tokens)):
    if value <= 0:
      raise ValueError(f'--{name}={value}; it must be a positive integer')
  run, params, step = load_run(workdir, step)
  out = out or os.path.join(workdir, 'inspect')
  os.makedirs(out, exist_ok=True)
  batch = {key: v[:max(examples, stat_examples)] for key, v in run.dataset.test.items()}
  all_layers, all_streams = attention_layers(run, params, batch)
  shown = {key: v[:examples] for key, v in batch.items()}
  layers = [layer.take(examples) for layer in all_layers]
  inputs = tasks.model_inputs(run.task, shown, run.dataset.info.get('bos_id', BOS))
  predictions = np.asarray(run.model.apply({'params': params}, *inputs)).argmax(-1)
  titles = [_describe(run, shown, predictions, i) for i in range(len(shown['inputs']))]
  written = [figures.attention_grid(os.path.join(out, f'attention_example{i}.png'), layers, i,
                                  title, max_tokens) for i, title in enumerate(titles)]
  if isinstance(run.model, tx.ViT):
    written.append(figures.rollout(os.path.join(out, 'rollout.png'), np.asarray(shown['inputs']),
                                 rollout_maps(layers), titles))
  if run.task == 'seq2seq':
    written.append(figures.cross_alignment(os.path.join(out, 'cross_attention.png'),
                                         [l for l in layers if l.path.is_cross],
                                         all_streams['output'].take(examples)))
  stats_layers = [layer.take(stat_examples) for layer in all_layers]
  stats = {layer.path: head_statistics(layer) for layer in stats_layers}
  written.append(figures.head_statistics(os.path.join(out, 'head_statistics.png'), stats,
                                       stats_layers[0].query.unit_name))
  written.append(figures.position_content(os.path.join(out, 'position_content.png'), stats))
  written.append(figures.offset_profiles(os.path.join(out, 'offset_profiles.png'), stats))
  lengths = batch.get('length')
  record = {'workdir': workdir, 'step': step, 'examples': len(shown['inputs']),
            'stat_examples': len(stats_layers[0].weights),
            'alignment_mass': alignment_mass(run.config.data.get('task', ''), stats_layers,
                                             lengths[:stat_examples]) if lengths is not None
            else {},
            'layers': {path: {k: np.asarray(v).tolist() for k, v in s.items() if k != 'profile'}
                       | {'offset_profile': [[list(o), m.tolist()] for o, m in
                                             s['profile'].items()]}
                       for path, s in stats.items()}}
  path = os.path.join(out, 'inspection.json')
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  return written + [path]


def _describe(run, batch: dict, predictions, i: int) -> str:
  if run.task == 'classify':
    return f'test example {i}: label {int(batch["targets"][i])}, predicted {int(predictions[i])}'
  if run.task == 'seq2seq':
    label = symbol_names(run.config.data.task, run.dataset.info['vocab_size'])
    pad = run.dataset.info['pad_id']
    real = batch['targets'][i] != pad
    text = lambda ids: ' '.join(label[int(t)] for t in ids)
    return (f'test example {i}: {text(batch["inputs"][i][batch["inputs"][i] != pad])} → '
            f'{text(predictions[i][real])} (teacher-forced)')
  return f'test window {i}'
