"""What a finished run reports beyond its eval metrics, into summary.json:

- attention entropy per layer (every task), for the temperature ablation;
- exact match by sequence length (seq2seq), in and beyond the training lengths,
  for the length-extrapolation ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tx
from experiments import data as data_lib
from experiments import tasks


def model_args(task: str, batch: dict, bos_id: int) -> tuple:
  """The model's positional inputs for `batch`: (inputs,), or (source, <bos>-shifted targets)."""
  if task == 'seq2seq':
    return batch['inputs'], tx.shift_right(batch['targets'], bos_id)
  return (batch['inputs'],)


def attention_entropy_by_layer(run, params, betas, num_examples: int = 256) -> list[dict]:
  """Per member: {layer path: mean attention entropy in nats} over the first test examples.

  `params` are stacked over members whose β scales are `betas` (one compiled
  program for all). Averaged over examples, heads and real queries (seq2seq:
  non-pad source positions in the encoder, non-pad target positions in the decoder).
  """
  info = run.dataset.info
  pad, bos = info.get('pad_id', data_lib.PAD), info.get('bos_id', data_lib.BOS)
  batch = {k: v[:num_examples] for k, v in run.dataset.test.items()}

  def entropies(params, beta):
    weights = tx.attention_weights(run.model.clone(beta_scale=beta), {'params': params},
                                   *model_args(run.task, batch, bos))
    out = {}
    for path, w in weights.items():
      queries = None
      if run.task == 'seq2seq':
        queries = batch['inputs' if path.startswith('encoder') else 'targets'] != pad
      out[path] = tx.attention_entropy(w, queries).mean()
    return out

  values = jax.device_get(jax.jit(jax.vmap(entropies))(params, jnp.asarray(betas, jnp.float32)))
  return [{k: float(v[i]) for k, v in values.items()} for i in range(len(betas))]


def exact_match_by_length(run, params, betas, batch_size: int = 250) -> list[dict]:
  """Per member: teacher-forced exact match per source length over the test and
  extrapolation splits (`params` stacked over members with β scales `betas`).

  Returns, per member, {'by_length': {length: fraction or None}, 'long': mean
  over the extrapolation split or None, 'note': why some lengths are None,
  'train_max_len': the longest length of the in-distribution test split}. A
  split the model cannot take (a learned posemb table shorter than the
  sequences) is reported as None with tx's reason, not run.
  """
  info = run.dataset.info
  pad, bos = info.get('pad_id', data_lib.PAD), info.get('bos_id', data_lib.BOS)
  betas = jnp.asarray(betas, jnp.float32)

  def exact(params, beta, batch):
    logits = run.model.clone(beta_scale=beta).apply({'params': params},
                                                    *model_args('seq2seq', batch, bos))
    return tasks.exact_match(logits.argmax(-1) == batch['targets'], batch['targets'] != pad)

  exact = jax.jit(jax.vmap(exact, in_axes=(0, 0, None)))
  k = len(betas)
  out = [{'by_length': {}, 'long': None, 'note': '',
          'train_max_len': int(run.dataset.test['length'].max())} for _ in range(k)]
  for name, split in (('test', run.dataset.test), ('extrapolate', run.dataset.extrapolate)):
    if split is None:
      continue
    lengths = split['length']
    first = {key: v[:1] for key, v in split.items()}
    one = jax.tree.map(lambda x: x[0], params)
    try:
      jax.eval_shape(run.model.apply, {'params': one}, *model_args('seq2seq', first, bos))
    except ValueError as e:  # tx rejects the shape, e.g. beyond a learned posemb table.
      for o in out:
        o['note'] = f'lengths {lengths.min()}-{lengths.max()} not evaluated: {e}'
        o['by_length'].update({int(n): None for n in np.unique(lengths)})
      continue
    hits = np.concatenate([np.asarray(exact(params, betas, {key: v[i:i + batch_size]
                                                            for key, v in split.items()}))
                           for i in range(0, len(lengths), batch_size)], axis=1)  # [k, N]
    for o, h in zip(out, hits):
      o['by_length'].update({int(n): float(h[lengths == n].mean()) for n in np.unique(lengths)})
      if name == 'extrapolate':
        o['long'] = float(h.mean())
  for o in out:
    o['by_length'] = dict(sorted(o['by_length'].items()))
  return out


def final_analysis(run, params, betas=None) -> list[dict] | dict:
  """The summary.json entries of a finished run (see the module docstring).

  With `betas`, `params` are stacked over members with those β scales and a
  list (one dict per member) is returned; without, one run's dict.
  """
  single = betas is None
  if single:
    params, betas = jax.tree.map(lambda x: np.asarray(x)[None], params), [run.model.beta_scale]
  entropies = attention_entropy_by_layer(run, params, betas)
  lengths = exact_match_by_length(run, params, betas) if run.task == 'seq2seq' else None
  out = []
  for i, entropy in enumerate(entropies):
    o = {'attention_entropy': entropy}
    if entropy:
      o['eval/attention_entropy'] = float(np.mean(list(entropy.values())))
    if lengths:
      o['exact_match_by_length'] = lengths[i]['by_length']
      o['train_max_len'] = lengths[i]['train_max_len']
      if lengths[i]['note']:
        o['extrapolation_note'] = lengths[i]['note']
      if lengths[i]['long'] is not None:
        o['eval/exact_match_long'] = lengths[i]['long']
    out.append(o)
  return out[0] if single else out
