"""Autoregressive decoding for `DecoderLM` (from a prompt) and `EncoderDecoder` (from a source).

Greedy decoding, sampling with temperature, top-k and top-p, and beam search with a length
penalty. Each is one jit-compiled program: a prefill of the prompt, then a `lax.while_loop`
that feeds one token per step through a KV cache preallocated for the whole output (or, with
use_cache=False, recomputes the full forward pass at every step: the reference the cache is
tested against). Rows finish independently at `eos_id`; later positions hold `pad_id`.

Both count `max_new_tokens` the same way, as the tokens generated after what is given: for a
`DecoderLM` after the prompt [batch, P] (the output has P + max_new_tokens positions), for an
`EncoderDecoder` after <bos> (the output has max_new_tokens positions; <bos> is dropped).
Prompts of different lengths n_b come padded to P, on the right (`generate` forces each row's
prompt until its own end) or on the left (pad_b = P − n_b pads first, as Hugging Face batches
them: every row starts generating at P, its pads masked as keys and its positions t − pad_b).
The loops keep their state in named dataclasses, `GenerateState` and `BeamState`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tx.models import DecoderLM, EncoderDecoder
from tx.validate import check_choice, positive_int

NEG_INF = -1e30  # finite, so that masked scores stay ordered and never make NaNs
PADDINGS = ('right', 'left')  # where a prompt shorter than P has its pads


class Decoded(NamedTuple):
  """What `generate` returns; length = P + max_new_tokens (DecoderLM, P the prompt width) or
  max_new_tokens (EncoderDecoder)."""
  tokens: Any  # [batch, length] int32: the prompt then the generated tokens (LM), or the output
  logits: Any  # [batch, length, vocab] float32: the logits each position was chosen from (0
  #              before the prompt's end), or None without return_logits


class Beams(NamedTuple):
  """What `beam_search` returns; length as in `Decoded`."""
  tokens: Any  # [batch, beam_size, length] int32, best first
  scores: Any  # [batch, beam_size] float32: Σ log p / length_penalty(generated length)


@flax.struct.dataclass
class GenerateState:
  """The `lax.while_loop` state of `generate` before choosing position t (rows = batch)."""
  t: Any  # [] int32: the position chosen next
  buffer: Any  # [rows, width] int32: the tokens so far (pad_id after t)
  cache: Any  # the KV cache after feeding positions < t (None with use_cache=False)
  logits: Any  # [rows, vocab] float32: the prediction for position t
  done: Any  # [rows] bool: the row has produced eos_id
  record: Any  # [rows, width, vocab] float32: the logits of every position, or None


@flax.struct.dataclass
class BeamState:
  """The `lax.while_loop` state of `beam_search` before extending position t."""
  t: Any  # [] int32: the position extended next
  seqs: Any  # [batch, beam_size, width] int32: each beam's tokens so far
  cache: Any  # the KV cache, rows = batch · beam_size, in the order of `seqs`
  logits: Any  # [batch · beam_size, vocab] float32: each beam's prediction for position t
  score: Any  # [batch, beam_size] float32: Σ log p of each beam's generated tokens
  length: Any  # [batch, beam_size] int32: generated tokens, frozen when the beam finished
  done: Any  # [batch, beam_size] bool: the beam has produced eos_id


class _Model(NamedTuple):
  """How to run a model one chunk at a time: the buffer layout and the prefill/step functions."""
  width: int  # buffer positions: the LM's total length, or <bos> + the output for seq2seq
  first: int  # positions given before generation starts (the common prompt length, or 1)
  prefill: Any  # (buffer) -> (cache, logits [rows, V] predicting position `first`)
  step: Any  # (cache, buffer, t) -> (cache, logits [rows, V] predicting position t + 1)


def _runner(model, params, inputs, max_new_tokens: int, first: int | None, bos_id, pad_id,
            use_cache: bool, repeat: int = 1, pads=None) -> tuple[_Model, Any]:
  """(_Model, initial buffer [rows, width]) for `model`; rows = batch · repeat (beams).

  width = P + max_new_tokens for a DecoderLM (prompt width P), 1 + max_new_tokens for an
  EncoderDecoder (<bos> first). pads [batch]: a left-padded DecoderLM prompt's pad_b leading
  pads; every call then gives the model valid[b, s] = s ≥ pad_b over all its fed slots s (the
  whole cache) and positions max(s − pad_b, 0) for the slots it feeds."""
  if isinstance(model, EncoderDecoder):
    if bos_id is None:
      raise ValueError('bos_id is required to decode an EncoderDecoder')
    source = jnp.repeat(inputs, repeat, axis=0)
    memory = model.apply({'params': params}, source, method=EncoderDecoder.encode)
    extra, method = (memory, source), EncoderDecoder.decode_logits
    width, first = max_new_tokens + 1, 1  # <bos>, then max_new_tokens output tokens
    buffer = jnp.full((source.shape[0], width), pad_id, jnp.int32).at[:, 0].set(bos_id)
  elif isinstance(model, DecoderLM):
    prompt = jnp.repeat(jnp.asarray(inputs, jnp.int32), repeat, axis=0)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
      raise ValueError(f'inputs has shape {prompt.shape}; a DecoderLM prompt must be '
                       '[batch, P] with P >= 1 tokens')
    width = prompt.shape[1] + max_new_tokens
    first = prompt.shape[1] if first is None else first
    buffer = jnp.full((prompt.shape[0], width), pad_id, jnp.int32).at[:, :prompt.shape[1]].set(prompt)
    extra, method = (), None
  else:
    raise ValueError(f'decoding needs a DecoderLM or an EncoderDecoder; got {type(model).__name__}')
  fed = width - 1  # the last position is chosen, never fed back
  variables = {'params': params}

  def pad_args(start, size):
    """The keyword arguments telling the model where the left pads are, for slots
    start ... start + size − 1."""
    if pads is None:
      return {}
    slots, pad = jnp.arange(fed), jnp.repeat(jnp.asarray(pads, jnp.int32), repeat)[:, None]
    positions = jax.lax.dynamic_slice_in_dim(jnp.maximum(slots - pad, 0), start, size, axis=1)
    return dict(valid=slots >= pad, positions=positions)

  if not use_cache:
    def forward(buffer):
      return model.apply(variables, buffer[:, :fed], *extra, method=method, **pad_args(0, fed))

    return _Model(width, first, lambda b: (None, forward(b)[:, first - 1]),
                  lambda c, b, t: (None, jnp.take(forward(b), t, axis=1))), buffer

  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(functools.partial(decoder.init, method=method), jax.random.key(0),
                          buffer[:, :fed], *extra)['cache']
  empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def run(cache, tokens, start):
    logits, state = decoder.apply(dict(variables, cache=cache), tokens, *extra, method=method,
                                  mutable=['cache'], **pad_args(start, tokens.shape[1]))
    return state['cache'], logits[:, -1]

  return _Model(width, first, lambda b: run(empty, b[:, :first], 0),
                lambda c, b, t: run(c, jax.lax.dynamic_slice_in_dim(b, t, 1, axis=1), t)), buffer


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


def _check(max_new_tokens, temperature, top_k, top_p) -> int:
  """Raises ValueError for a bad option; returns max_new_tokens as a Python int (a static
  argument of the jit program)."""
  max_new_tokens = positive_int('max_new_tokens', max_new_tokens)
  if temperature < 0:
    raise ValueError(f'temperature={temperature}; it must be >= 0 (0 = greedy)')
  if top_k is not None and top_k < 0:
    raise ValueError(f'top_k={top_k}; it must be >= 0 (0 or None = no top-k)')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p}; it must be in (0, 1]')
  return max_new_tokens


def _prompt_layout(model, inputs, prompt_lengths, padding: str):
  """(prompt_lengths, first, pads) for the decoding programs; ValueError for a bad layout.

  Right padding forces row b until its length n_b: (n, min n, None). Left padding starts every
  row at P, after pad_b = P − n_b pads: (None, None, pads [batch])."""
  check_choice('padding', padding, PADDINGS)
  if padding == 'left' and not isinstance(model, DecoderLM):
    raise ValueError(f"padding='left' with model {type(model).__name__}: left padding is for a "
                     "DecoderLM's prompts (a source is masked by the model's pad_id)")
  if prompt_lengths is None:
    return None, None, None
  lengths, shape = np.asarray(prompt_lengths, np.int32), np.shape(inputs)
  if len(shape) != 2:
    raise ValueError(f'inputs has shape {shape}; prompt_lengths needs prompts [batch, P]')
  batch, width = shape
  if lengths.shape not in ((), (batch,)):
    raise ValueError(f'prompt_lengths has shape {lengths.shape}; it must be [batch] = ({batch},)')
  if lengths.min() < 1 or lengths.max() > width:
    raise ValueError(f'prompt_lengths must be in [1, {width}]; got {lengths.tolist()}')
  if padding == 'right':
    return lengths, int(lengths.min()), None
  return None, None, np.broadcast_to(width - lengths, (batch,))


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'eos_id', 'pad_id', 'bos_id', 'first',
                                             'use_cache', 'return_logits'))
def _generate(model, params, inputs, rng, prompt_lengths, *, max_new_tokens, temperature, top_k,
              top_p, eos_id, pad_id, bos_id, first, use_cache, return_logits, pads=None):
  m, buffer = _runner(model, params, inputs, max_new_tokens, first, bos_id, pad_id, use_cache,
                      pads=pads)
  rows = buffer.shape[0]
  prompt_lengths = jnp.full((rows,), m.first) if prompt_lengths is None else prompt_lengths

  def choose(s: GenerateState) -> GenerateState:
    """Writes position t: the row's prompt token while inside it, else the chosen token
    (pad_id once the row is done)."""
    if temperature == 0:
      token = jnp.argmax(s.logits, axis=-1).astype(jnp.int32)
    else:
      filtered = _filter_logits(s.logits, temperature, top_k, top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, s.t), filtered).astype(jnp.int32)
    forced = s.t < prompt_lengths  # still inside this row's prompt
    token = jnp.where(forced, s.buffer[:, s.t], jnp.where(s.done, pad_id, token))
    done = s.done if eos_id is None else s.done | (~forced & (token == eos_id))
    record = None if s.record is None else s.record.at[:, s.t].set(s.logits)
    return s.replace(buffer=s.buffer.at[:, s.t].set(token), done=done, record=record)

  def body(s: GenerateState) -> GenerateState:
    s = choose(s)
    cache, logits = m.step(s.cache, s.buffer, s.t)
    return s.replace(t=s.t + 1, cache=cache, logits=logits)

  def cond(s: GenerateState):
    return (s.t < m.width - 1) & ~jnp.all(s.done)

  cache, logits = m.prefill(buffer)
  record = jnp.zeros((rows, m.width, logits.shape[-1]), jnp.float32) if return_logits else None
  state = GenerateState(t=jnp.asarray(m.first), buffer=buffer, cache=cache, logits=logits,
                        done=jnp.zeros((rows,), bool), record=record)
  state = choose(jax.lax.while_loop(cond, body, state))
  skip = 1 if isinstance(model, EncoderDecoder) else 0  # drop <bos>
  return Decoded(state.buffer[:, skip:], None if state.record is None else state.record[:, skip:])


def generate(model, params, inputs, *, max_new_tokens: int, rng=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             pad_id: int = 0, bos_id: int | None = None, prompt_lengths=None,
             padding: str = 'right', use_cache: bool = True,
             return_logits: bool = False) -> Decoded:
  """Greedy decoding (temperature=0, the default) or sampling, batched, in one jit program.

  At each step t the next token is
    greedy:   y_t = argmax_v logits_t[v]
    sampling: y_t ~ softmax(filter(logits_t / temperature)),  key = fold_in(rng, t)
  where filter keeps the top_k largest logits, then the smallest set of tokens whose
  probability mass reaches top_p (nucleus sampling; Holtzman et al., 2020).

  model: a `DecoderLM` (inputs = prompt tokens [batch, P]) or an `EncoderDecoder` (inputs =
    source [batch, S], padded with the model's pad_id; bos_id starts the output).
  max_new_tokens: N, the tokens generated after what is given. DecoderLM: the output keeps
    the prompt, tokens [batch, P + N] with positions P ... P + N − 1 generated; the model
    sees positions 0 ... P + N − 2 (a learned posemb needs num_positions ≥ P + N − 1).
    EncoderDecoder: tokens [batch, N] after <bos> (dropped); the decoder sees N positions.
  prompt_lengths: [batch] real lengths n_b ≤ P of padded prompts (concrete, e.g. NumPy);
    default all P. Where the pads are, `padding` says (DecoderLM):
    'right' (default): row b's prompt is its first n_b tokens. The buffer stays P + N wide:
      positions t < n_b are forced to row b's prompt and every later one is generated, so row
      b generates up to P − n_b + N tokens.
    'left': row b's prompt is its last n_b tokens, after pad_b = P − n_b pads (Hugging Face's
      layout, attention_mask = [t ≥ pad_b]). Every row generates positions P ... P + N − 1;
      the pads stay in the output and are masked as keys at every step, and slot t is
      position t − pad_b (the posemb's, or rope's), so each row gets what its n_b tokens give
      alone. The model sees P + N − 1 slots (a learned posemb: num_positions ≥ P + N − 1).
  eos_id: a row stops at its first generated eos_id; every later position is pad_id. None:
    every row runs to the end of the buffer.
  use_cache: False recomputes the full forward pass at every step instead of the KV cache
    (the same tokens and logits, much slower; a reference).
  Returns Decoded(tokens, logits); logits [batch, length, vocab] with return_logits.
  The same rng gives the same output.
  """
  max_new_tokens = _check(max_new_tokens, temperature, top_k, top_p)
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs an explicit rng, e.g. jax.random.key(0)')
  prompt_lengths, first, pads = _prompt_layout(model, inputs, prompt_lengths, padding)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, params, inputs, rng, prompt_lengths, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=top_k or None, top_p=top_p,
                   eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, first=first,
                   use_cache=use_cache, return_logits=return_logits, pads=pads)


def length_penalty(length, alpha: float):
  """The GNMT length penalty (Wu et al., 2016): lp(n) = ((5 + n) / 6)^α; α = 0 gives 1."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_new_tokens', 'eos_id',
                                             'pad_id', 'bos_id', 'alpha', 'use_cache'))
def _beam_search(model, params, inputs, *, beam_size, max_new_tokens, eos_id, pad_id, bos_id,
                 alpha, use_cache, pads=None):
  k = beam_size
  # A batch row's beams share its pads: reordering beams within the row keeps them right.
  m, buffer = _runner(model, params, inputs, max_new_tokens, None, bos_id, pad_id, use_cache,
                      repeat=k, pads=pads)
  batch, width = buffer.shape[0] // k, m.width

  def select(s: BeamState) -> BeamState:
    """Extends every beam by every token at position t and keeps the k best by normalised
    score; a finished beam has one extension, <pad> at log-probability 0 (it stays as it is)."""
    vocab = s.logits.shape[-1]
    logp = jax.nn.log_softmax(s.logits.astype(jnp.float32)).reshape(batch, k, vocab)
    stay = jnp.full((vocab,), NEG_INF, jnp.float32).at[pad_id].set(0.0)
    total = s.score[..., None] + jnp.where(s.done[..., None], stay, logp)  # [batch, k, vocab]
    grown = jnp.where(s.done, s.length, s.t + 1 - m.first)  # generated tokens after this step
    ranked = total / length_penalty(grown, alpha)[..., None]
    _, pick = jax.lax.top_k(ranked.reshape(batch, k * vocab), k)
    origin, token = pick // vocab, (pick % vocab).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, origin, axis=1)
    was_done = take(s.done)
    seqs = jnp.take_along_axis(s.seqs, origin[..., None], axis=1).at[:, :, s.t].set(
        jnp.where(was_done, pad_id, token))
    score = jnp.take_along_axis(total.reshape(batch, k * vocab), pick, axis=1)
    done = was_done | ((token == eos_id) if eos_id is not None else False)
    rows = (jnp.arange(batch)[:, None] * k + origin).reshape(-1)
    # Reorder the cache's batch rows: axis 0, or 1 behind the layer axis of a scanned stack
    # (whose per-layer cache_index [layers] has no batch axis, like a scalar index).
    axis = 1 if model.scan_layers else 0
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=axis) if x.ndim > axis else x,
                         s.cache)
    return s.replace(seqs=seqs, cache=cache, score=score, length=take(grown), done=done)

  def body(s: BeamState) -> BeamState:
    s = select(s)
    cache, logits = m.step(s.cache, s.seqs.reshape(batch * k, width), s.t)
    return s.replace(t=s.t + 1, cache=cache, logits=logits)

  def cond(s: BeamState):
    return (s.t < width - 1) & ~jnp.all(s.done)

  cache, logits = m.prefill(buffer)
  score = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  zeros = jnp.zeros((batch, k), jnp.int32)
  state = BeamState(t=jnp.asarray(m.first), seqs=buffer.reshape(batch, k, width), cache=cache,
                    logits=logits, score=score, length=zeros, done=zeros.astype(bool))
  state = select(jax.lax.while_loop(cond, body, state))
  skip = 1 if isinstance(model, EncoderDecoder) else 0
  return Beams(state.seqs[:, :, skip:], state.score / length_penalty(state.length, alpha))


def beam_search(model, params, inputs, *, beam_size: int, max_new_tokens: int,
                eos_id: int | None = None, length_penalty_alpha: float = 0.6, pad_id: int = 0,
                bos_id: int | None = None, prompt_lengths=None, padding: str = 'right',
                use_cache: bool = True) -> Beams:
  """Beam search with the GNMT length penalty, batched, in one jit program.

  Each step extends each of the `beam_size` beams by every token and keeps the beam_size
  best extensions by
    score(y) = Σ_t log p(y_t | y_<t) / lp(|y|),   lp(n) = ((5 + n) / 6)^α   (α = length_penalty_alpha),
  with |y| the generated length. A beam that has produced eos_id is finished: it stays in
  the beam unchanged (extended only by pad at log-probability 0) while better extensions may
  replace it. A row stops when all its beams are finished, or after max_new_tokens. α = 0
  ranks by total log-probability; larger α favours longer outputs. With beam_size=1 this is
  greedy decoding for any α (every candidate of a step has the same length). Inputs and
  max_new_tokens as for `generate` (beam_size ≤ vocabulary size); prompts of different
  lengths only left-padded (prompt_lengths with padding='left', as in `generate`). Returns
  Beams(tokens [batch, beam_size, length], scores [batch, beam_size]) sorted best first,
  length = P + max_new_tokens (DecoderLM) or max_new_tokens (EncoderDecoder); positions
  after eos_id hold pad_id.
  """
  max_new_tokens = _check(max_new_tokens, 0.0, None, None)
  beam_size = positive_int('beam_size', beam_size)
  right, _, pads = _prompt_layout(model, inputs, prompt_lengths, padding)
  if right is not None and (np.asarray(right) < np.shape(inputs)[1]).any():
    raise ValueError("prompt_lengths with padding='right': beam_search takes prompts of "
                     "different lengths left-padded only (padding='left')")
  return _beam_search(model, params, inputs, beam_size=beam_size, max_new_tokens=max_new_tokens,
                      eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
                      alpha=float(length_penalty_alpha), use_cache=use_cache, pads=pads)
