"""From a config to a tx model, and the loss and metrics of each kind of task.

Losses and metrics are returned as sums with their counts ('*_sum', '*_count'), so that
micro-batches, devices and eval batches combine exactly.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import optax

import tx
from experiments import data as data_lib
from experiments.data import image_dataset
from experiments.data.text import text_lm
from tx.validate import check_choice

MODELS = {'ViT': tx.ViT, 'EncoderClassifier': tx.EncoderClassifier,
          'EncoderDecoder': tx.EncoderDecoder, 'DecoderLM': tx.DecoderLM}
TASK_OF_MODEL = {'ViT': 'classify', 'EncoderClassifier': 'classify',
                 'EncoderDecoder': 'seq2seq', 'DecoderLM': 'lm'}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
LOADERS = {'digits': data_lib.digits, 'mnist1d': data_lib.mnist1d, 'seq2seq': data_lib.seq2seq,
           'char_lm': data_lib.char_lm, 'cifar': data_lib.cifar, 'skips': data_lib.skip_sentences,
           'folder': image_dataset.image_folder, 'tfds': image_dataset.tfds,
           'parquet': image_dataset.parquet, 'text': text_lm}  # config.data.name -> loader.
# Pure functions of their arguments (or, on disk, only listed and read lazily): cached.
CACHED = ('digits', 'mnist1d', 'seq2seq', 'skips', 'folder', 'tfds', 'parquet')
# config.data fields that say how batches are made, not what the dataset is.
PIPELINE_FIELDS = ('augment', 'workers')


def load_dataset(config):
  """config.data's dataset (a data_lib.Dataset in memory, or an image_dataset.ImageDataset).
  The CACHED ones are kept (the last 4 used) for the process, so that a sweep's validation
  and its runs make each once (MNIST-1D takes about 0.8 s, listing ImageNet's folders
  longer); treat the arrays as read-only."""
  d = config.data.to_dict()
  name = d.pop('name')
  check_choice('config.data.name', name, LOADERS)
  for field in PIPELINE_FIELDS:
    d.pop(field, None)
  try:
    if name in CACHED:  # their arguments are numbers, strings and None: JSON keeps them.
      return _cached(name, json.dumps(d, sort_keys=True))
    return LOADERS[name](**d)
  except TypeError as e:
    raise ValueError(f'config.data for {name!r}: {e}') from None


@functools.lru_cache(maxsize=4)
def _cached(name: str, args: str):
  return LOADERS[name](**json.loads(args))


def model_inputs(task: str, batch: dict, bos_id: int = data_lib.BOS) -> tuple:
  """The model's positional inputs for `batch`: (inputs,), or for seq2seq (source, decoder
  input), the decoder input being the targets shifted right behind <bos> (teacher forcing)."""
  if task == 'seq2seq':
    return batch['inputs'], tx.shift_right(batch['targets'], bos_id)
  return (batch['inputs'],)


def build_model(config, info: dict):
  """config.model = {name: 'ViT' | 'EncoderClassifier' | 'EncoderDecoder' | 'DecoderLM', **kwargs}."""
  kwargs = config.model.to_dict()
  name = kwargs.pop('name')
  check_choice('config.model.name', name, MODELS)
  for field in ('dtype', 'param_dtype'):
    if field in kwargs:
      check_choice(f'config.model.{field}', kwargs[field], DTYPES)
      kwargs[field] = DTYPES[kwargs[field]]
  size = 'num_classes' if TASK_OF_MODEL[name] == 'classify' else 'vocab_size'
  kwargs.setdefault(size, info[size])
  if name == 'EncoderDecoder':
    kwargs.setdefault('pad_id', info['pad_id'])
    kwargs.setdefault('num_positions', info['width'])
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f'config.model for {name}: {e}') from None


def _cross_entropy(logits, labels, weights, label_smoothing: float, mix=None):
  """Σ weights · CE(logits, smoothed one-hot labels), plus accuracy sums (against `labels`).
  mix = (λ, labels'): the targets are λ·onehot(labels) + (1 − λ)·onehot(labels') (mixup)."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if mix is not None:
    lam, other = mix
    targets = lam[..., None] * targets + (1 - lam[..., None]) * jax.nn.one_hot(
        other, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  correct = (logits.argmax(-1) == labels).astype(jnp.float32)
  return (ce * weights).sum(), (correct * weights).sum(), weights.sum(), correct


def loss_weights(task: str, batch, pad_id: int = data_lib.PAD):
  """What the loss averages over: examples (classify), non-pad target tokens (seq2seq) or every
  target token (lm), times batch['weight'] (0 for padded examples)."""
  w = batch['weight']
  if task == 'classify':
    return w
  if task == 'seq2seq':
    return (batch['targets'] != pad_id) * w[:, None]
  return jnp.ones(batch['targets'].shape, jnp.float32) * w[:, None]


def exact_match(hit, weights):
  """Teacher-forced exact match per sequence: 1 where every weighted target token is the argmax."""
  return jnp.all((hit > 0) | (weights == 0), axis=-1).astype(jnp.float32)


def loss_and_metrics(task: str, model, params, batch, *, rng=None, train: bool = False,
                     label_smoothing: float = 0.0, bos_id: int = data_lib.BOS,
                     pad_id: int = data_lib.PAD):
  """Returns (loss_sum, metrics) for one batch; `batch['weight']` masks padded examples."""
  rngs = {'dropout': rng} if train and rng is not None else None
  weights = loss_weights(task, batch, pad_id)
  logits = model.apply({'params': params}, *model_inputs(task, batch, bos_id),
                       deterministic=not train, rngs=rngs)
  mix = (batch['mix'], batch['mix_targets']) if 'mix' in batch else None
  loss, correct, count, hit = _cross_entropy(logits, batch['targets'], weights, label_smoothing,
                                             mix)
  accuracy = 'accuracy' if task == 'classify' else 'token_accuracy'
  metrics = {'loss_sum': loss, 'loss_count': count, f'{accuracy}_sum': correct,
             f'{accuracy}_count': count}
  if task == 'seq2seq':
    exact, example_w = exact_match(hit, weights), batch['weight']
    metrics.update(exact_match_sum=(exact * example_w).sum(), exact_match_count=example_w.sum())
  return loss, metrics


def summarize(sums: dict) -> dict:
  """{'x_sum': s, 'x_count': n} -> {'x': s / n}, on device or host arrays."""
  return {key[:-4]: value / jnp.maximum(sums[key[:-4] + '_count'], 1e-9)
          for key, value in sums.items() if key.endswith('_sum')}


# What `eval_metrics_of(task, summarize(loss_and_metrics(...)[1]))` holds, by task (tested).
EVAL_METRICS = {'classify': ('accuracy', 'loss'),
                'seq2seq': ('exact_match', 'loss', 'token_accuracy'),
                'lm': ('loss', 'token_accuracy', 'bits_per_char')}


def eval_metrics_of(task: str, means: dict, chars_per_token: float = 1.0) -> dict:
  """Host floats from summarized eval sums, with bits per character for language models:
  loss / ln 2 per token, divided by the test text's characters per token (1 for a character
  LM, the dataset's info['chars_per_token'] for a subword one)."""
  out = {k: float(v) for k, v in means.items()}
  if task == 'lm':
    out['bits_per_char'] = out['loss'] / math.log(2) / chars_per_token
  return out
