"""Boolean attention masks: True = "query i may attend to key j".

Every mask broadcasts to the logits [batch..., H, Tq, Tk]; combine them with
`combine_masks` (logical AND).
"""

from __future__ import annotations

import jax.numpy as jnp


def causal_mask(length: int, key_length: int | None = None):
  """M_ij = [j <= i]: query i sees keys 0..i (autoregressive decoding). Shape [Tq, Tk].

  With key_length > length the queries are the last `length` positions of the
  key sequence (j <= i + key_length - length), as when queries extend a prefix.
  """
  key_length = length if key_length is None else key_length
  i = jnp.arange(length)[:, None] + (key_length - length)
  return jnp.arange(key_length)[None, :] <= i


def local_window_mask(length: int, window: int | tuple[int, int]):
  """M_ij = [i - left <= j <= i + right]: attention as a (soft) convolution. Shape [T, T].

  `window` is the radius w (left = right = w, a receptive field of 2w+1 keys),
  or a (left, right) pair; (w, 0) is a causal sliding window.
  """
  left, right = (window, window) if isinstance(window, int) else window
  if left < 0 or right < 0:
    raise ValueError(f'window={window!r}; sizes must be >= 0')
  offset = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]  # j - i
  return (offset >= -left) & (offset <= right)


def valid_from_lengths(lengths, length: int):
  """valid[..., t] = t < lengths[...] for t < length: which of `length` positions hold real
  tokens. Shape [batch..., length]."""
  return jnp.arange(length) < jnp.asarray(lengths)[..., None]


def valid_from_tokens(tokens, pad_id: int = 0):
  """valid[..., t] = tokens[..., t] != pad_id."""
  return jnp.asarray(tokens) != pad_id


def padding_mask(kv, q=None, *, pad_id: int | None = None, kv_len: int | None = None,
                 q_len: int | None = None):
  """M_ij = valid_kv[j] (∧ valid_q[i]), shape [batch..., 1, Tq or 1, Tk].

  `kv` (and `q`) describe which positions hold real tokens, as
    token ids [batch..., T] with pad_id=...:        valid = tokens != pad_id;
    lengths [batch...] with kv_len=Tk (q_len=Tq):   valid[t] = t < length;
    boolean validity [batch..., T] otherwise.
  Works for self-attention and cross-attention (decoder queries × encoder
  keys). Masking padded keys is what matters; masking padded queries as well
  makes their rows all-zero outputs.
  """
  def valid(x, length):
    if pad_id is not None:
      return valid_from_tokens(x, pad_id)
    if length is not None:
      return valid_from_lengths(x, length)
    return jnp.asarray(x, bool)

  m = valid(kv, kv_len)[..., None, None, :]
  if q is not None:
    m = m & valid(q, q_len if q_len is not None else kv_len)[..., None, :, None]
  return m


def combine_masks(*masks):
  """Logical AND of the given masks (None entries are skipped); None if all are None."""
  masks = [jnp.asarray(m, bool) for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out
