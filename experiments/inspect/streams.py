"""The token streams attention layers read, and every attention layer of a run on a batch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import tx
from experiments import tasks
from experiments.data import BOS, PAD, symbol_names
from experiments.data import text as text_data


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
  """One attention layer's weights on the examples, and the streams its queries and keys read.
  `path` says where it sits in the model, hence whether it is causal or cross-attention."""
  path: tx.AttentionLayer
  weights: np.ndarray  # [N, H, Tq, Tk]
  query: Stream
  key: Stream

  def take(self, n: int) -> 'Layer':
    """The first n examples."""
    return dataclasses.replace(self, weights=self.weights[:n], query=self.query.take(n),
                               key=self.key.take(n))

  def valid(self) -> np.ndarray:
    """[N, Tq, Tk]: cells that can carry attention (real query and key, causal order)."""
    cells = self.query.valid[:, :, None] & self.key.valid[:, None, :]
    return cells & np.tril(np.ones(cells.shape[1:], bool)) if self.path.is_causal else cells


def _sequence_stream(ids, valid, label_of, **units) -> Stream:
  t = ids.shape[1]
  return Stream([[label_of(x) for x, v in zip(row, ok) if v] for row, ok in zip(ids, valid)],
                valid, np.arange(t)[:, None], np.zeros(t, bool), **units)


def patch_stream(n: int, rows: int, cols: int, patch_size: int) -> Stream:
  """The patch tokens of n images on a rows × cols grid of patch_size-pixel patches, row-major
  (as tx.ViT orders them), labelled 'row,col'."""
  grid = np.array([(r, c) for r in range(rows) for c in range(cols)])
  return Stream([[f'{r},{c}' for r, c in grid]] * n, np.ones((n, rows * cols), bool), grid,
                np.zeros(rows * cols, bool), float(patch_size), 'pixels')


def prefix_labels(model) -> list[str]:
  """The labels of the tokens a ViT or an EncoderClassifier module puts before its inputs:
  'CLS' when it has a class token (class_token, or by default when it pools [CLS]), then one
  per extra token (a ViT's registers). An EncoderClassifier has neither field: its [CLS] is
  there when it pools it."""
  labels = ['CLS'] if getattr(model, 'has_class_token', model.pool == 'cls') else []
  return labels + [f'extra {i}' for i in range(getattr(model, 'extra_tokens', 0))]


def with_prefix(stream: Stream, n: int, labels=('CLS',)) -> Stream:
  """The stream with tokens off the grid in front, one per label: [CLS], then a ViT's extra
  (register) tokens, if any."""
  k = len(labels)
  return Stream([list(labels) + row for row in stream.labels],
                np.concatenate([np.ones((n, k), bool), stream.valid], 1),
                np.concatenate([np.zeros((k, stream.grid.shape[1]), int), stream.grid]),
                np.concatenate([np.ones(k, bool), stream.special]), stream.unit, stream.unit_name)


def streams(run, batch: dict) -> dict[str, Stream]:
  """The token streams of `batch`: 'tokens' (classify, lm) or 'source' and 'target' (seq2seq),
  plus 'output' labels for seq2seq (the target token each decoder position predicts)."""
  x = np.asarray(batch['inputs'])
  n = len(x)
  if run.task == 'seq2seq':
    label = symbol_names(run.config.data.task, run.dataset.info['vocab_size']).get
    pad, bos = run.dataset.info['pad_id'], run.dataset.info['bos_id']
    targets = np.asarray(batch['targets'])
    real = targets != pad
    return {'source': _sequence_stream(x, x != pad, label),
            'target': _sequence_stream(np.asarray(tasks.model_inputs('seq2seq', batch, bos)[1]),
                                       real, label),
            'output': _sequence_stream(targets, real, label)}
  if run.task == 'lm':  # characters or subword tokens, as text_data.codec labels them.
    token_name = text_data.codec(run.dataset.info)[2]
    return {'tokens': _sequence_stream(x, np.ones(x.shape, bool), token_name)}
  model = run.model
  if x.ndim == 4:  # images: the patch grid, row-major.
    p = model.patch_size
    tokens = patch_stream(n, x.shape[1] // p, x.shape[2] // p, p)
  elif x.ndim == 3:  # feature vectors, e.g. MNIST-1D patches of x.shape[2] samples.
    tokens = _sequence_stream(np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]),
                              np.ones(x.shape[:2], bool), str, unit=float(x.shape[2]),
                              unit_name='input samples')
  else:  # token ids
    tokens = _sequence_stream(x, x != getattr(model, 'pad_id', PAD), str)
  return {'tokens': with_prefix(tokens, n, prefix_labels(model))}


def attention_layers(run, params, batch: dict) -> list[Layer]:
  """Every attention layer of the run's model on `batch`, in call order, with the token streams
  its queries and keys read."""
  inputs = tasks.model_inputs(run.task, batch, run.dataset.info.get('bos_id', BOS))
  weights = jax.jit(lambda p, *a: tx.attention_weights(run.model, {'params': p}, *a))(
      params, *inputs)
  s = streams(run, batch)
  layers = []
  for path in sorted(weights, key=lambda layer: layer.call_order):  # jit sorts dict keys.
    if run.task == 'seq2seq':
      q = s['source'] if path.stack == 'encoder' else s['target']
      k = s['target'] if path.is_causal else s['source']
    else:
      q = k = s['tokens']
    layers.append(Layer(path, np.asarray(weights[path], np.float64), q, k))
  return layers
