"""Bits per character of a language model at context lengths beyond the one it was trained at,
for the length-extrapolation ablation.

The test split's windows tile the test text; it is cut again into non-overlapping windows of
n = f·L tokens for f = 1, 2, 4, ..., max_factor (powers of 2), L the training window
(config.data.seq_len).
Every length scores the same tokens: the first K·n_max + 1 of the test text, n_max the longest
n, so the K·n_max predictions differ only in how much context they see. For each n,

  bpc(n) = (1 / (N · c · ln 2)) Σ_windows Σ_{t=1..n} −ln p(x_t | x_<t in its window)

over the N = K·n_max predicted tokens (c: characters per token, 1 for a character LM), the
non-overlapping evaluation of Press et al. (2022). Each window starts without context, so the
average covers context sizes 0 ... n − 1: a model that extrapolates has bpc(2L) ≤ bpc(L)
(more context per token on average); one that does not degrades as positions pass L.

Summary entries: 'bits_per_char_by_length' {n: bpc, or None where not evaluated},
'train_max_length' (L), 'eval/bits_per_char_<f>L' for each factor f, and, when a length cannot
be run (a learned posemb table of L rows), 'extrapolation_note' with tx's reason.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import optax


def evaluate(context, *, max_factor: int = 4, batch_size: int = 32) -> list[dict]:
  params, run = context.params(), context.run
  factors = tuple(2 ** k for k in range(int(math.log2(max_factor)) + 1))
  out = []
  for i, beta in enumerate(context.betas):
    member = jax.tree.map(lambda x: x[i], params)
    out.append(_member(run, run.model_for(float(beta)), member, factors, batch_size))
  return out


def test_stream(test: dict) -> np.ndarray:
  """The test text as one token stream, from windows that tile it: inputs row r is
  x[rL : rL + L] and targets row r is x[rL + 1 : rL + L + 1]."""
  inputs, targets = np.asarray(test['inputs']), np.asarray(test['targets'])
  if not np.array_equal(inputs[1:, 0], targets[:-1, -1]):
    raise ValueError('the test windows do not tile one text (inputs[r + 1, 0] != '
                     'targets[r, -1]); bits_by_length needs a character LM test split')
  return np.concatenate([inputs.reshape(-1), targets[-1, -1:]])


@functools.partial(jax.jit, static_argnames='model')
def _window_nll(model, params, inputs, targets):
  """Nats per window [B]: one program per model and window length, shared by the members of a
  vectorized group that have the same β."""
  return optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': params}, inputs), targets).sum(-1)


def _member(run, model, params, factors: tuple, batch_size: int) -> dict:
  train_length = int(run.config.data.seq_len)
  stream = test_stream(run.dataset.test)
  longest = max(factors) * train_length
  count = (len(stream) - 1) // longest
  if count < 1:
    raise ValueError(f'max_factor={max(factors)}: the test text has {len(stream)} tokens, '
                     f'fewer than one window of {longest}')
  scored = count * longest  # the same predicted tokens at every length.
  per_token = run.dataset.info.get('chars_per_token', 1.0)
  by_length, out, note = {}, {}, ''
  for f in sorted(factors):
    n = f * train_length
    inputs = stream[:scored].reshape(-1, n)
    targets = stream[1:scored + 1].reshape(-1, n)
    try:  # tx rejects some lengths, e.g. beyond a learned posemb table.
      jax.eval_shape(model.apply, {'params': params}, inputs[:1])
    except ValueError as e:
      note = note or f'lengths from {n} not evaluated: {e}'
      by_length[n] = None
      continue
    total = 0.0
    for start in range(0, len(inputs), batch_size):  # full batches: one compiled program.
      rows = np.arange(start, start + batch_size) % len(inputs)
      nats = np.asarray(_window_nll(model, params, inputs[rows], targets[rows]), np.float64)
      total += nats[:len(inputs) - start].sum()
    bpc = total / scored / math.log(2) / per_token
    by_length[n] = bpc
    out[f'eval/bits_per_char_{f}L'] = bpc
  result = {'bits_per_char_by_length': by_length, 'train_max_length': train_length, **out}
  if note:
    result['extrapolation_note'] = note
  return result
