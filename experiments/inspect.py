"""Look inside a trained run: attention maps, ViT rollout, head statistics, and how much of
each head's attention position explains.

  python -m experiments.inspect --workdir=RUN [--examples=N] [--out=DIR] [--step=S]

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

import dataclasses
import json
import os

import jax
import numpy as np
from absl import app, flags

import tx
from experiments import analysis
from experiments import inspect_plots as plots
from experiments.restore import load_run
from experiments.data import BOS, PAD, symbol_names
from experiments.cli import (define_run_reader_flags, fail_unless_verbose, parse_flags,
                             start_run_reader)



@dataclasses.dataclass
class Stream:
  """The tokens an attention layer reads on one side: labels and positions."""
  labels: list  # per example, the labels of its real (non-pad) tokens
  valid: np.ndarray  # [N, T] bool, real tokens
  grid: np.ndarray  # [T, d] integer position (d = 2 for image patches)
  special: np.ndarray  # [T] bool, tokens off the grid ([CLS])
  unit: float = 1.0  # grid step in input units (pixels per patch, samples per token)
  unit_name: str = 'tokens'  # what distances are measured in

  def take(self, n: int) -> 'Stream':
    """The first n examples."""
    return dataclasses.replace(self, labels=self.labels[:n], valid=self.valid[:n])


@dataclasses.dataclass
class Layer:
  """One attention layer's weights on the examples, and how to read them."""
  path: str
  weights: np.ndarray  # [N, H, Tq, Tk]
  query: Stream
  key: Stream
  causal: bool
  is_self: bool

  def take(self, n: int) -> 'Layer':
    """The first n examples."""
    return dataclasses.replace(self, weights=self.weights[:n], query=self.query.take(n),
                               key=self.key.take(n))

  def valid(self) -> np.ndarray:
    """[N, Tq, Tk]: cells that can carry attention (real query and key, causal order)."""
    cells = self.query.valid[:, :, None] & self.key.valid[:, None, :]
    return cells & np.tril(np.ones(cells.shape[1:], bool)) if self.causal else cells


def _sequence_stream(ids, valid, label_of) -> Stream:
  t = ids.shape[1]
  return Stream([[label_of(x) for x, v in zip(row, ok) if v] for row, ok in zip(ids, valid)],
                valid, np.arange(t)[:, None], np.zeros(t, bool))


def _with_cls(stream: Stream, n: int) -> Stream:
  """The stream with a [CLS] token in front (off the grid)."""
  return Stream([['CLS'] + labels for labels in stream.labels],
                np.concatenate([np.ones((n, 1), bool), stream.valid], 1),
                np.concatenate([np.zeros((1, stream.grid.shape[1]), int), stream.grid]),
                np.concatenate([[True], stream.special]), stream.unit, stream.unit_name)


def streams(run, batch: dict) -> dict[str, Stream]:
  """The token streams of `batch`: 'tokens' (classify, lm) or 'source' and 'target' (seq2seq),
  plus 'output' labels for seq2seq (the target token each decoder position predicts)."""
  x = np.asarray(batch['inputs'])
  n = len(x)
  if run.task == 'seq2seq':
    label = symbol_names(run.config.data.task, run.dataset.info['vocab_size'])
    pad, bos = run.dataset.info['pad_id'], run.dataset.info['bos_id']
    targets = np.asarray(batch['targets'])
    target_valid = targets != pad
    source = _sequence_stream(x, x != pad, label.get)
    target = _sequence_stream(np.asarray(tx.shift_right(targets, bos)), target_valid, label.get)
    output = _sequence_stream(targets, target_valid, label.get)
    return {'source': source, 'target': target, 'output': output}
  if run.task == 'lm':
    chars = run.dataset.info['chars']
    shown = {' ': '␣', '\n': '\\n', '\t': '\\t'}
    return {'tokens': _sequence_stream(x, np.ones(x.shape, bool),
                                       lambda i: shown.get(chars[i], chars[i]))}
  model = run.config.model
  if x.ndim == 4:  # images: the patch grid, row-major.
    p = model.patch_size
    gh, gw = x.shape[1] // p, x.shape[2] // p
    grid = np.array([(r, c) for r in range(gh) for c in range(gw)])
    tokens = Stream([[f'{r},{c}' for r, c in grid]] * n, np.ones((n, gh * gw), bool), grid,
                    np.zeros(gh * gw, bool), float(p), 'pixels')
  elif x.ndim == 3:  # feature vectors, e.g. MNIST-1D patches of x.shape[2] samples.
    tokens = _sequence_stream(np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]),
                              np.ones(x.shape[:2], bool), str)
    tokens.unit, tokens.unit_name = float(x.shape[2]), 'input samples'
  else:  # token ids
    pad = model.get('pad_id', PAD)
    tokens = _sequence_stream(x, x != pad, str)
  return {'tokens': _with_cls(tokens, n) if model.get('pool', 'cls') == 'cls' else tokens}


def model_args(run, batch: dict) -> tuple:
  return analysis.model_args(run.task, batch, run.dataset.info.get('bos_id', BOS))


def attention_layers(run, params, batch: dict) -> tuple[list[Layer], dict[str, Stream]]:
  """Every attention layer of the run's model on `batch`, in call order, with its token
  streams; and the streams (see `streams`)."""
  weights = jax.jit(lambda p, *a: tx.attention_weights(run.model, {'params': p}, *a))(
      params, *model_args(run, batch))
  s = streams(run, batch)
  layers = []
  for path in sorted(weights, key=_call_order):  # jit returns dicts with sorted keys.
    decoder_self = path.startswith('decoder') and path.endswith('self_attention')
    if run.task == 'seq2seq':
      q = s['source'] if path.startswith('encoder') else s['target']
      k = s['target'] if decoder_self else s['source']
    else:
      q = k = s['tokens']
    layers.append(Layer(path, np.asarray(weights[path], np.float64), q, k, causal=decoder_self,
                        is_self=not path.endswith('cross_attention')))
  return layers, s


def _call_order(path: str):
  """Sort key: encoder before decoder, blocks by number, self- before cross-attention."""
  parts = path.split('/')
  block = [int(p[6:]) for p in parts if p.startswith('block_') and p[6:].isdigit()]
  return (parts[0] != 'encoder', block, path.endswith('cross_attention'), path)


def offset_groups(layer: Layer):
  """(ids [Tq, Tk], offsets): relative-position group of each cell, and each group's offset
  (k − q in grid units; a (dy, dx) pair for image patches)."""
  dims = layer.query.grid.shape[1]
  diff = layer.key.grid[None, :, :] - layer.query.grid[:, None, :]
  offsets, ids = np.unique(diff.reshape(-1, dims), axis=0, return_inverse=True)
  return ids.reshape(diff.shape[:2]), [tuple(int(v) for v in o) for o in offsets]


def head_statistics(layer: Layer) -> dict:
  """Per head: entropy (nats), mean attention distance (self-attention; input units), and the
  relative-position / absolute-position / content shares, with the offset profile."""
  w, queries = layer.weights, layer.query.valid
  out = {'entropy': np.asarray(tx.attention_entropy(w, queries)).mean(0)}
  keep_q, keep_k = ~layer.query.special, ~layer.key.special
  if layer.is_self:
    plain = w[:, :, keep_q][:, :, :, keep_k]
    plain = plain / np.maximum(plain.sum(-1, keepdims=True), 1e-30)
    positions = (layer.query.grid[keep_q] + 0.5) * layer.query.unit
    out['mean_distance'] = np.asarray(tx.mean_attention_distance(
        plain, positions, queries[:, keep_q])).mean(0)
  ids, offsets = offset_groups(layer)
  valid = layer.valid() & keep_q[None, :, None] & keep_k[None, None, :]
  shares = tx.position_content_shares(w, ids, valid)
  out.update({k: shares[k] for k in ('relative', 'absolute', 'content')})
  out['profile'] = {offsets[i]: m for i, m in shares['profile'].items()}
  return out


def alignment_mass(data_task: str, layers: list[Layer], lengths) -> dict:
  """copy / reverse: the mean head-averaged cross-attention each output position puts on the
  source token it copies (position j, or n − 1 − j in reverse; </s> on </s> at n), per
  cross-attention layer; {} for other tasks."""
  if data_task not in ('copy', 'reverse'):
    return {}
  out = {}
  for layer in layers:
    if not layer.path.endswith('cross_attention'):
      continue
    mean = layer.weights.mean(1)  # [N, Tq, Tk]
    hits = [mean[i, j, (n - 1 - j if data_task == 'reverse' else j) if j < n else n]
            for i, n in enumerate(np.asarray(lengths)) for j in range(n + 1)]
    out[layer.path] = float(np.mean(hits))
  return out


def rollout_maps(layers: list[Layer]) -> np.ndarray:
  """[N, rows, cols]: the attention rollout (tx.attention_rollout) over the patch grid of the
  output token: [CLS]'s row, or the mean of the patch rows with mean pooling."""
  stream = layers[0].query
  maps = np.asarray(tx.attention_rollout([layer.weights for layer in layers]))  # [N, T, T]
  patches = ~stream.special
  rows = maps[:, 0] if stream.special[0] else maps[:, patches].mean(1)
  gh, gw = stream.grid[patches].max(0) + 1
  return rows[:, patches].reshape(-1, gh, gw)


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
  predictions = np.asarray(run.model.apply({'params': params}, *model_args(run, shown))).argmax(-1)
  titles = [_describe(run, shown, predictions, i) for i in range(len(shown['inputs']))]
  written = [plots.attention_grid(os.path.join(out, f'attention_example{i}.png'), layers, i,
                                  title, max_tokens) for i, title in enumerate(titles)]
  if isinstance(run.model, tx.ViT):
    written.append(plots.rollout(os.path.join(out, 'rollout.png'), np.asarray(shown['inputs']),
                                 rollout_maps(layers), titles))
  if run.task == 'seq2seq':
    written.append(plots.cross_alignment(os.path.join(out, 'cross_attention.png'),
                                         [l for l in layers if l.path.endswith('cross_attention')],
                                         all_streams['output'].take(examples)))
  stats_layers = [layer.take(stat_examples) for layer in all_layers]
  stats = {layer.path: head_statistics(layer) for layer in stats_layers}
  written.append(plots.head_statistics(os.path.join(out, 'head_statistics.png'), stats,
                                       stats_layers[0].query.unit_name))
  written.append(plots.position_content(os.path.join(out, 'position_content.png'), stats))
  written.append(plots.offset_profiles(os.path.join(out, 'offset_profiles.png'), stats))
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


def define_flags():
  """The command's flags; defined only when run as a program, so that importing this module
  next to the other entry points (in tests) defines no flag twice."""
  define_run_reader_flags('A run directory written by experiments.run.')
  flags.DEFINE_integer('examples', 4, 'Test examples to draw attention maps of.')
  flags.DEFINE_integer('stat_examples', 256, 'Test examples the head statistics average over.')
  flags.DEFINE_string('out', None, 'Output directory; default: WORKDIR/inspect.')
  flags.DEFINE_integer('max_tokens', 32, 'Tokens shown per heatmap axis of causal layers (the '
                       'first ones, which never attend past themselves); other layers show all.')


def main(argv):
  f = flags.FLAGS
  start_run_reader(argv, '--workdir=RUN [--examples=N] [--out=DIR]')
  try:
    paths = inspect_run(f.workdir, f.out, f.examples, f.stat_examples, f.step, f.max_tokens)
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  print(f'wrote {len(paths)} files to {os.path.dirname(paths[-1])}: '
        + ', '.join(os.path.basename(p) for p in paths), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
