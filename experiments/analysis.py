"""What a finished run reports beyond its eval metrics, into summary.json:

- attention entropy per layer (every task), for the temperature ablation;
- exact match of greedy decoding by sequence length (seq2seq), in and beyond the training
  lengths, for the length-extrapolation ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tx
from experiments import data as data_lib


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
  """Per member: exact match of greedy decoding (tx.generate with the KV cache, not teacher
  forcing) per source length, over the test and extrapolation splits (`params` stacked over
  members with β scales `betas`). An output matches when it equals the target up to and
  including </s> (then <pad>). This equals teacher-forced exact match example by example: if
  every teacher-forced argmax is right, greedy decoding reproduces the target, and conversely.

  Returns, per member, {'by_length': {length: fraction or None}, 'long': mean over the
  extrapolation split or None, 'note': why some lengths are None, 'train_max_len': the longest
  length of the in-distribution test split}. A split the model cannot take (a learned posemb
  table shorter than the sequences) is reported as None with tx's reason, not run.
  """
  info = run.dataset.info
  ids = dict(eos_id=info['eos_id'], pad_id=info['pad_id'], bos_id=info['bos_id'])
  out = [{'by_length': {}, 'long': None, 'note': '',
          'train_max_len': int(run.dataset.test['length'].max())} for _ in betas]
  for i, (o, beta) in enumerate(zip(out, betas)):
    model = run.model.clone(beta_scale=float(beta))
    member = jax.tree.map(lambda x: x[i], params)
    for name, split in (('test', run.dataset.test), ('extrapolate', run.dataset.extrapolate)):
      if split is None:
        continue
      lengths, targets = split['length'], split['targets']
      first = {key: v[:1] for key, v in split.items()}
      try:  # tx rejects some shapes, e.g. sequences beyond a learned posemb table.
        jax.eval_shape(model.apply, {'params': member}, *model_args('seq2seq', first,
                                                                     info['bos_id']))
      except ValueError as e:
        o['note'] = f'lengths {lengths.min()}-{lengths.max()} not evaluated: {e}'
        o['by_length'].update({int(n): None for n in np.unique(lengths)})
        continue
      hits = []
      for start in range(0, len(lengths), batch_size):  # full batches: one compiled program
        rows = np.arange(start, start + batch_size) % len(lengths)
        decoded = tx.generate(model, member, split['inputs'][rows], max_len=targets.shape[1],
                              **ids).tokens
        hits.append(np.asarray((decoded == targets[rows]).all(-1))[:len(lengths) - start])
      hits = np.concatenate(hits)
      o['by_length'].update({int(n): float(hits[lengths == n].mean()) for n in np.unique(lengths)})
      if name == 'extrapolate':
        o['long'] = float(hits.mean())
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
