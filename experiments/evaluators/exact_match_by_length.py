"""Exact match of real greedy decoding by sequence length, in and beyond the training lengths
(seq2seq), for the length-extrapolation ablation.

For each source length n of the test split and of the extrapolation split (longer sequences):

  exact_match(n) = (1 / |S_n|) Σ_{x ∈ S_n} [decode(x) = target(x)]

where decode is `tx.generate` with the KV cache (greedy, not teacher forcing) and an output
matches when it equals the target up to and including </s> (then <pad>). This equals
teacher-forced exact match example by example: if every teacher-forced argmax is right,
greedy decoding reproduces the target, and conversely (tested).

Summary entries: 'exact_match_by_length' {n: fraction, or None where not evaluated},
'train_max_length' (the longest length of the test split), 'eval/exact_match_long' (the mean
over the extrapolation split) and, when a split cannot be run (a learned posemb table shorter
than its sequences), 'extrapolation_note' with tx's reason, instead of a crash.
"""

from __future__ import annotations

import jax
import numpy as np

import tx
from experiments import tasks


def evaluate(context, *, batch_size: int = 250) -> list[dict]:
  params, run = context.params(), context.run
  out = []
  for i, beta in enumerate(context.betas):
    member = jax.tree.map(lambda x: x[i], params)
    out.append(_member(run, run.model_for(float(beta)), member, batch_size))
  return out


def _member(run, model, params, batch_size: int) -> dict:
  info = run.dataset.info
  ids = dict(eos_id=info['eos_id'], pad_id=info['pad_id'], bos_id=info['bos_id'])
  by_length, long, note = {}, None, ''
  for name, split in (('test', run.dataset.test), ('extrapolate', run.dataset.extrapolate)):
    if split is None:
      continue
    lengths, targets = split['length'], split['targets']
    first = {key: v[:1] for key, v in split.items()}
    try:  # tx rejects some shapes, e.g. sequences beyond a learned posemb table.
      jax.eval_shape(model.apply, {'params': params},
                     *tasks.model_inputs('seq2seq', first, info['bos_id']))
    except ValueError as e:
      note = f'lengths {lengths.min()}-{lengths.max()} not evaluated: {e}'
      by_length.update({int(n): None for n in np.unique(lengths)})
      continue
    hits = []
    for start in range(0, len(lengths), batch_size):  # full batches: one compiled program
      rows = np.arange(start, start + batch_size) % len(lengths)
      decoded = tx.generate(model, params, split['inputs'][rows],
                            max_new_tokens=targets.shape[1], **ids).tokens
      hits.append(np.asarray((decoded == targets[rows]).all(-1))[:len(lengths) - start])
    hits = np.concatenate(hits)
    by_length.update({int(n): float(hits[lengths == n].mean()) for n in np.unique(lengths)})
    if name == 'extrapolate':
      long = float(hits.mean())
  out = {'exact_match_by_length': dict(sorted(by_length.items())),
         'train_max_length': int(run.dataset.test['length'].max())}
  if note:
    out['extrapolation_note'] = note
  if long is not None:
    out['eval/exact_match_long'] = long
  return out
