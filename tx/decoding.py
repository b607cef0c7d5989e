"""Autoregressive decoding for `DecoderLM` (from a prompt) and `EncoderDecoder` (from a source).

Greedy decoding, sampling with temperature, top-k and top-p, and beam search with a length
penalty. Each is one jit-compiled program: a prefill of the prompt, then a `lax.while_loop`
that feeds one token per step through a KV cache preallocated for the whole output (or, with
use_cache=False, recomputes the full forward pass at every step: the reference the cache is
tested against). Rows finish independently at `eos_id`; later positions hold `pad_id`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tx.models import DecoderLM, EncoderDecoder

NEG_INF = -1e30  # finite, so that masked scores stay ordered and never make NaNs


class Decoded(NamedTuple):
  tokens: Any  # [batch, length] int32: the prompt then the generated tokens (LM), or the output
  logits: Any  # [batch, length, vocab] float32: the logits each position was chosen from (0
  #              before the prompt's end), or None without return_logits


class Beams(NamedTuple):
  tokens: Any  # [batch, beam_size, length] int32, best first
  scores: Any  # [batch, beam_size] float32: Σ log p / length_penalty(generated length)


class _Model(NamedTuple):
  """How to run a model one chunk at a time: the buffer layout and the prefill/step functions."""
  width: int  # buffer positions: the LM's total length, or <bos> + the output for seq2seq
  first: int  # positions given before generation starts (the common prompt length, or 1)
  prefill: Any  # (buffer) -> (cache, logits [rows, V] predicting position `first`)
  step: Any  # (cache, buffer, t) -> (cache, logits [rows, V] predicting position t + 1)


def _runner(model, params, inputs, max_len: int, first: int | None, bos_id, pad_id,
            use_cache: bool, repeat: int = 1) -> tuple[_Model, Any]:
  """(_Model, initial buffer [rows, width]) for `model`; rows = batch · repeat (beams)."""
  if isinstance(model, EncoderDecoder):
    if bos_id is None:
      raise ValueError('bos_id is required to decode an EncoderDecoder')
    source = jnp.repeat(inputs, repeat, axis=0)
    memory = model.apply({'params': params}, source, method=EncoderDecoder.encode)
    extra, method = (memory, source), EncoderDecoder.decode_logits
    width, first = max_len + 1, 1  # <bos>, then max_len output tokens
    buffer = jnp.full((source.shape[0], width), pad_id, jnp.int32).at[:, 0].set(bos_id)
  elif isinstance(model, DecoderLM):
    prompt = jnp.repeat(jnp.asarray(inputs, jnp.int32), repeat, axis=0)
    width, first = max_len, prompt.shape[1] if first is None else first
    if not 1 <= first < width or prompt.shape[1] > width:
      raise ValueError(f'max_len={max_len} must exceed the prompt length {prompt.shape[1]} '
                       '(and the prompt must have at least 1 token)')
    buffer = jnp.full((prompt.shape[0], width), pad_id, jnp.int32).at[:, :prompt.shape[1]].set(prompt)
    extra, method = (), None
  else:
    raise ValueError(f'decoding needs a DecoderLM or an EncoderDecoder; got {type(model).__name__}')
  fed = width - 1  # the last position is chosen, never fed back
  variables = {'params': params}

  if not use_cache:
    def forward(buffer):
      return model.apply(variables, buffer[:, :fed], *extra, method=method)

    return _Model(width, first, lambda b: (None, forward(b)[:, first - 1]),
                  lambda c, b, t: (None, jnp.take(forward(b), t, axis=1))), buffer

  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(functools.partial(decoder.init, method=method), jax.random.key(0),
                          buffer[:, :fed], *extra)['cache']
  empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def run(cache, tokens):
    logits, state = decoder.apply(dict(variables, cache=cache), tokens, *extra, method=method,
                                  mutable=['cache'])
    return state['cache'], logits[:, -1]

  return _Model(width, first, lambda b: run(empty, b[:, :first]),
                lambda c, b, t: run(c, jax.lax.dynamic_slice_in_dim(b, t, 1, axis=1))), buffer


def _filter_logits(logits, temperature: float, top_k: int | None, top_p: float | None):
  """logits / temperature, then keep the top_k largest, then the smallest set whose
  probability reaches top_p (the most likely token always stays); the rest get NEG_INF."""
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, NEG_INF)
  if top_p is not None and top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, NEG_INF)
  return logits


def _check(max_len, temperature, top_k, top_p):
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f'max_len={max_len!r}; it must be a positive integer')
  if temperature < 0:
    raise ValueError(f'temperature={temperature}; it must be >= 0 (0 = greedy)')
  if top_k is not None and top_k < 0:
    raise ValueError(f'top_k={top_k}; it must be >= 0 (0 or None = no top-k)')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p}; it must be in (0, 1]')


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'temperature', 'top_k', 'top_p',
                                             'eos_id', 'pad_id', 'bos_id', 'first', 'use_cache',
                                             'return_logits'))
def _generate(model, params, inputs, rng, prompt_lengths, *, max_len, temperature, top_k, top_p,
              eos_id, pad_id, bos_id, first, use_cache, return_logits):
  m, buffer = _runner(model, params, inputs, max_len, first, bos_id, pad_id, use_cache)
  rows = buffer.shape[0]
  prompt_lengths = jnp.full((rows,), m.first) if prompt_lengths is None else prompt_lengths

  def choose(state):
    t, buffer, cache, logits, done, record = state
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      filtered = _filter_logits(logits, temperature, top_k, top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, t), filtered).astype(jnp.int32)
    forced = t < prompt_lengths  # still inside this row's prompt
    token = jnp.where(forced, buffer[:, t], jnp.where(done, pad_id, token))
    if eos_id is not None:
      done = done | (~forced & (token == eos_id))
    if record is not None:
      record = record.at[:, t].set(logits)
    return t, buffer.at[:, t].set(token), cache, logits, done, record

  def body(state):
    t, buffer, cache, logits, done, record = choose(state)
    cache, logits = m.step(cache, buffer, t)
    return t + 1, buffer, cache, logits, done, record

  def cond(state):
    t, _, _, _, done, _ = state
    return (t < m.width - 1) & ~jnp.all(done)

  cache, logits = m.prefill(buffer)
  record = jnp.zeros((rows, m.width, logits.shape[-1]), jnp.float32) if return_logits else None
  state = (jnp.asarray(m.first), buffer, cache, logits, jnp.zeros((rows,), bool), record)
  _, buffer, _, _, _, record = choose(jax.lax.while_loop(cond, body, state))
  skip = 1 if isinstance(model, EncoderDecoder) else 0  # drop <bos>
  return Decoded(buffer[:, skip:], None if record is None else record[:, skip:])


def generate(model, params, inputs, *, max_len: int, rng=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             pad_id: int = 0, bos_id: int | None = None, prompt_lengths=None,
             use_cache: bool = True, return_logits: bool = False) -> Decoded:
  """Greedy decoding (temperature=0, the default) or sampling, batched, in one jit program.

  At each step t the next token is
    greedy:   y_t = argmax_v logits_t[v]
    sampling: y_t ~ softmax(filter(logits_t / temperature)),  key = fold_in(rng, t)
  where filter keeps the top_k largest logits, then the smallest set of tokens whose
  probability mass reaches top_p (nucleus sampling; Holtzman et al., 2020).

  model: a `DecoderLM` (inputs = prompt tokens [batch, P]; the output keeps the prompt and has
    max_len tokens in all) or an `EncoderDecoder` (inputs = source [batch, S], padded with
    the model's pad_id; bos_id starts the output, which has max_len tokens).
  prompt_lengths: [batch] real lengths of right-padded prompts (concrete, e.g. NumPy); default
    all P. Positions before a row's length are forced to its prompt.
  eos_id: a row stops at its first generated eos_id; every later position is pad_id. None:
    every row runs to max_len.
  use_cache: False recomputes the full forward pass at every step instead of the KV cache
    (the same tokens and logits, much slower; a reference).
  Returns Decoded(tokens, logits); logits [batch, length, vocab] with return_logits.
  The same rng gives the same output.
  """
  _check(max_len, temperature, top_k, top_p)
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs an explicit rng, e.g. jax.random.key(0)')
  first = None
  if prompt_lengths is not None:
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    first = int(prompt_lengths.min())
    if first < 1 or prompt_lengths.max() > np.shape(inputs)[1]:
      raise ValueError(f'prompt_lengths must be in [1, {np.shape(inputs)[1]}]; got '
                       f'{prompt_lengths.tolist()}')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, params, inputs, rng, prompt_lengths, max_len=max_len,
                   temperature=float(temperature), top_k=top_k or None, top_p=top_p,
                   eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, first=first,
                   use_cache=use_cache, return_logits=return_logits)


def length_penalty(length, alpha: float):
  """The GNMT length penalty (Wu et al., 2016): lp(n) = ((5 + n) / 6)^α; α = 0 gives 1."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_len', 'eos_id', 'pad_id',
                                             'bos_id', 'alpha', 'use_cache'))
def _beam_search(model, params, inputs, *, beam_size, max_len, eos_id, pad_id, bos_id, alpha,
                 use_cache):
  k = beam_size
  m, buffer = _runner(model, params, inputs, max_len, None, bos_id, pad_id, use_cache, repeat=k)
  batch, width = buffer.shape[0] // k, m.width

  def select(state):
    """Extends every beam by every token at position t and keeps the k best by normalised
    score; a finished beam has one extension, <pad> at log-probability 0 (it stays as it is)."""
    t, seqs, cache, logits, score, length, done = state
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    stay = jnp.full((vocab,), NEG_INF, jnp.float32).at[pad_id].set(0.0)
    total = score[..., None] + jnp.where(done[..., None], stay, logp)  # [batch, k, vocab]
    grown = jnp.where(done, length, t + 1 - m.first)  # generated tokens after this step
    ranked = total / length_penalty(grown, alpha)[..., None]
    _, pick = jax.lax.top_k(ranked.reshape(batch, k * vocab), k)
    origin, token = pick // vocab, (pick % vocab).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, origin, axis=1)
    was_done = take(done)
    seqs = jnp.take_along_axis(seqs, origin[..., None], axis=1).at[:, :, t].set(
        jnp.where(was_done, pad_id, token))
    score = jnp.take_along_axis(total.reshape(batch, k * vocab), pick, axis=1)
    done = was_done | ((token == eos_id) if eos_id is not None else False)
    rows = (jnp.arange(batch)[:, None] * k + origin).reshape(-1)
    # Reorder the cache's batch rows: axis 0, or 1 behind the layer axis of a scanned stack
    # (whose per-layer cache_index [layers] has no batch axis, like a scalar index).
    axis = 1 if model.scan_layers else 0
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=axis) if x.ndim > axis else x, cache)
    return t, seqs, cache, logits, score, take(grown), done

  def body(state):
    t, seqs, cache, logits, score, length, done = select(state)
    cache, logits = m.step(cache, seqs.reshape(batch * k, width), t)
    return t + 1, seqs, cache, logits, score, length, done

  def cond(state):
    t, *_, done = state
    return (t < width - 1) & ~jnp.all(done)

  cache, logits = m.prefill(buffer)
  score = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  zeros = jnp.zeros((batch, k), jnp.int32)
  state = (jnp.asarray(m.first), buffer.reshape(batch, k, width), cache, logits, score, zeros,
           zeros.astype(bool))
  _, seqs, _, _, score, length, _ = select(jax.lax.while_loop(cond, body, state))
  skip = 1 if isinstance(model, EncoderDecoder) else 0
  return Beams(seqs[:, :, skip:], score / length_penalty(length, alpha))


def beam_search(model, params, inputs, *, beam_size: int, max_len: int, eos_id: int | None = None,
                length_penalty_alpha: float = 0.6, pad_id: int = 0, bos_id: int | None = None,
                use_cache: bool = True) -> Beams:
  """Beam search with the GNMT length penalty, batched, in one jit program.

  Each step extends each of the `beam_size` beams by every token and keeps the beam_size
  best extensions by
    score(y) = Σ_t log p(y_t | y_<t) / lp(|y|),   lp(n) = ((5 + n) / 6)^α   (α = length_penalty_alpha),
  with |y| the generated length. A beam that has produced eos_id is finished: it stays in
  the beam unchanged (extended only by pad at log-probability 0) while better extensions may
  replace it. A row stops when all its beams are finished, or at max_len. α = 0 ranks by total
  log-probability; larger α favours longer outputs. With beam_size=1 this is greedy decoding
  for any α (every candidate of a step has the same length). Inputs as for `generate`
  (prompts of one length; beam_size ≤ vocabulary size). Returns Beams(tokens [batch,
  beam_size, length], scores [batch, beam_size]) sorted best first; positions after eos_id
  hold pad_id.
  """
  _check(max_len, 0.0, None, None)
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size={beam_size!r}; it must be a positive integer')
  return _beam_search(model, params, inputs, beam_size=beam_size, max_len=max_len, eos_id=eos_id,
                      pad_id=pad_id, bos_id=bos_id, alpha=float(length_penalty_alpha),
                      use_cache=use_cache)
