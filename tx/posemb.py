"""Positional encodings: sinusoidal 1-D (interleaved or [sin | cos]), sincos 2-D, rotary (RoPE),
ALiBi (a bias on the attention logits), learned, none.

Self-attention is permutation-equivariant; a positional encoding is what tells
the model where each token is. `base` is the sinusoid frequency base (10000 in
Vaswani et al.); it is not the attention temperature β.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx.validate import check_choice

SEQUENCE_POSEMBS = ('learn', 'sinusoidal', 'rope', 'none', 'sinusoidal_concat', 'alibi')
SINUSOIDS = ('sinusoidal', 'sinusoidal_concat')  # the fixed 1-D tables.


def _angles(positions, dim: int, base: float):
  """angle[p, i] = p / base^(2i/dim) for i < ceil(dim/2), in float32."""
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq.astype(np.float32)


def sinusoidal_1d(length: int, d_model: int, base: float = 10000.0, offset=0):
  """Vaswani et al. (2017), sine and cosine interleaved, shape [length, d_model]:

    PE(pos, 2i)   = sin(pos / base^(2i/d_model))
    PE(pos, 2i+1) = cos(pos / base^(2i/d_model))

  for pos = offset, ..., offset + length - 1 (`offset` may be traced, for decoding).
  """
  return _sinusoids(offset + jnp.arange(length), d_model, base)


def _sinusoids(positions, d_model: int, base: float):
  """PE at integer `positions` [...], interleaved as in `sinusoidal_1d`: [..., d_model]."""
  angles = _angles(positions, d_model, base)  # [..., ceil(d/2)]
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(pe.shape[:-2] + (-1,))[..., :d_model]


def sinusoidal_concat_1d(length: int, d_model: int, base: float = 10000.0, offset=0):
  """Sines then cosines, as fairseq, Marian and tensor2tensor build them: [length, d_model].

  With h = floor(d_model / 2) frequencies ω_i = base^(−i / (h − 1)), i = 0, ..., h − 1,

    PE(pos, i)     = sin(pos · ω_i)
    PE(pos, h + i) = cos(pos · ω_i)

  and a zero last column when d_model is odd, for pos = offset, ..., offset + length − 1.
  This is fairseq's `SinusoidalPositionalEmbedding.get_embedding`, Marian's (C++)
  `sinusoidalPositionEmbeddings` and tensor2tensor's `get_timing_signal_1d` (min_timescale 1,
  max_timescale = base): the exponent is i / (h − 1), not the paper's 2i / d_model, so ω
  runs from 1 down to exactly 1/base (h = 1 takes ω_0 = 1, as tensor2tensor does; fairseq
  divides by zero there). Marian and tensor2tensor number tokens from 0. fairseq's table has
  a row of zeros at its `padding_idx` and numbers a sequence's tokens from padding_idx + 1:
  `AddPositionEmbs` with `positions` = padding_idx + 1 + t reproduces it. Hugging Face's
  MarianMTModel concatenates the paper's frequencies base^(−2i/d_model) instead: not this.
  """
  return _concat_sinusoids(offset + jnp.arange(length), d_model, base)


def _concat_sinusoids(positions, d_model: int, base: float):
  """PE at integer `positions` [...], [sin | cos] as in `sinusoidal_concat_1d`: [..., d_model]."""
  half = d_model // 2
  inv_freq = np.exp(-np.log(base) * np.arange(half, dtype=np.float64) / max(half - 1, 1))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq.astype(np.float32)
  parts = [jnp.sin(angles), jnp.cos(angles)]
  if d_model % 2:
    parts.append(jnp.zeros(angles.shape[:-1] + (1,), jnp.float32))
  return jnp.concatenate(parts, axis=-1)


def sincos_2d(h: int, w: int, d_model: int, base: float = 10000.0):
  """2-D sin-cos encoding of an h×w patch grid (MoCo v3 / big_vision), shape [h*w, d_model].

  With ω_i = 1 / base^(i/(d/4 - 1)), i < d/4, the row-major patch (y, x) gets
    [sin(x ω), cos(x ω), sin(y ω), cos(y ω)].
  """
  if d_model % 4:
    raise ValueError(f'd_model={d_model}; sincos_2d needs a multiple of 4')
  quarter = d_model // 4
  omega = 1.0 / base ** (np.arange(quarter) / max(quarter - 1, 1))
  y, x = np.mgrid[:h, :w]
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)


def rope(x, positions=None, base: float = 10000.0):
  """Rotary position embedding (Su et al., RoFormer) of x [batch..., T, H, D], D even.

  Each pair (x_2i, x_2i+1) at position p is rotated by the angle θ = p / base^(2i/D):
    x'_2i   = x_2i cos θ - x_2i+1 sin θ
    x'_2i+1 = x_2i sin θ + x_2i+1 cos θ
  so that rope(q, m) · rope(k, n) depends on m - n only. `positions` is [T] or
  [batch..., T], default 0..T-1. Computed in float32, returned in x.dtype.
  """
  t, d = x.shape[-3], x.shape[-1]
  if d % 2:
    raise ValueError(f'rope needs an even head dim; got D={d}')
  if positions is None:
    positions = jnp.arange(t)
  angles = _angles(positions, d, base)[..., None, :]  # [..., T, 1, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  even, odd = xf[..., 0::2], xf[..., 1::2]
  out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes m_h (Press et al., ICLR 2022), float64 [num_heads].

  For H a power of 2, the geometric sequence m_h = 2^(−8h/H), h = 1, ..., H (H = 8: 1/2, 1/4,
  ..., 1/256). Otherwise, the paper's rule: with P = 2^⌊log2 H⌋, the P slopes of P heads, then
  the first H − P of the odd-numbered slopes of 2P heads, 2^(−8(2i−1)/(2P)), i = 1, ..., H − P
  (which fall between the first ones).
  """
  if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) or num_heads < 1:
    raise ValueError(f'num_heads={num_heads!r}; allowed: a positive integer')
  power = 2 ** int(np.floor(np.log2(num_heads)))
  geometric = lambda n: 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
  extra = geometric(2 * power)[0::2][:num_heads - power]
  return np.concatenate([geometric(power), extra])


def alibi_bias(num_heads: int, q_positions, k_positions):
  """ALiBi's logit bias b_hij = −m_h·|i − j|, float32 [H, Tq, Tk], for query positions i
  [Tq] and key positions j [Tk], with the slopes m_h of `alibi_slopes`.

  Press et al. define it for causal attention, b_hij = −m_h·(i − j) for j ≤ i; the keys j > i
  are masked there, so |i − j| gives the same logits. Without a causal mask (an encoder) the
  symmetric −m_h·|i − j| penalises distance in both directions alike, one of the
  bidirectional variants the authors suggest. The bias is added to the β-scaled logits
  (β·q·k + b), so it does not change with β.
  """
  slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  i = jnp.asarray(q_positions, jnp.float32)[:, None]
  j = jnp.asarray(k_positions, jnp.float32)[None, :]
  return -slopes[:, None, None] * jnp.abs(i - j)


def resample_posemb(posemb, new_grid: tuple[int, int], num_prefix_tokens: int = 0,
                    old_grid: tuple[int, int] | None = None):
  """Resizes a learned 2-D posemb table to a new patch grid (bilinear), e.g. for a new image size.

  posemb is [N, D] or [1, N, D] with N = num_prefix_tokens + h*w (row-major
  grid; the old grid is taken as square unless `old_grid` is given). Prefix
  tokens such as CLS keep their embeddings unchanged.
  """
  squeeze = posemb.ndim == 2
  table = posemb if squeeze else posemb[0]
  prefix, grid = table[:num_prefix_tokens], table[num_prefix_tokens:]
  if old_grid is None:
    side = int(round(np.sqrt(grid.shape[0])))
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise ValueError(f'posemb has {grid.shape[0]} grid tokens, which is not old_grid={old_grid}; '
                     'pass old_grid or num_prefix_tokens')
  grid = grid.reshape(*old_grid, -1)
  grid = jax.image.resize(grid, (*new_grid, grid.shape[-1]), method='bilinear')
  out = jnp.concatenate([prefix, grid.reshape(-1, grid.shape[-1]).astype(table.dtype)])
  return out if squeeze else out[None]


class AddPositionEmbs(nn.Module):
  """x [batch..., T, D] + PE[offset : offset + T] for a 1-D sequence.

  posemb: 'learn' (a trained table of `num_positions` rows, N(0, 0.02) init),
    'sinusoidal' (`sinusoidal_1d`, any length), 'sinusoidal_concat' (`sinusoidal_concat_1d`:
    [sin | cos], fairseq's frequencies), or 'rope'/'alibi'/'none' (identity here; rope
    rotates q and k and alibi biases the logits inside attention).
  decode: positions continue from a counter in the 'cache' collection, one
    call per generated chunk. Positions past num_positions are not checked at
    run time (the index is traced): the decoding loop must stop there.
  positions: [batch..., T] integer positions instead of 0 ... T−1 (or, with decode, instead
    of the counter's, which still advances by T): PE[positions] ('learn'; the sinusoids at
    those positions). A left-padded row b has position t − pad_b at buffer slot t, so its
    first real token is position 0. Not with 'rope', whose positions go to the attention.
  """
  posemb: str = 'sinusoidal'
  num_positions: int = 512  # rows of the learned table.
  base: float = 10000.0
  decode: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions=None):
    check_choice('posemb', self.posemb, SEQUENCE_POSEMBS)
    if positions is not None and self.posemb == 'rope':
      raise ValueError("positions with posemb='rope': rope rotates q and k inside attention "
                       "(MultiHeadAttention(positions=)); here they are for 'learn' or a sinusoid")
    if self.posemb in ('rope', 'alibi', 'none'):
      return x
    t, d = x.shape[-2], x.shape[-1]
    offset = 0
    if self.decode:
      initialized = self.has_variable('cache', 'pos_index')
      index = self.variable('cache', 'pos_index', lambda: jnp.array(0, jnp.int32))
      if initialized:
        offset = index.value
        index.value = offset + t
    if self.posemb in SINUSOIDS:
      at = offset + jnp.arange(t) if positions is None else positions
      table = _sinusoids if self.posemb == 'sinusoidal' else _concat_sinusoids
      return x + table(at, d, self.base).astype(x.dtype)
    if t > self.num_positions:
      raise ValueError(f'sequence length {t} exceeds the learned posemb table (num_positions='
                       f'{self.num_positions}); use a larger num_positions or '
                       'posemb="sinusoidal"/"rope"')
    table = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                       (self.num_positions, d), self.param_dtype)
    if positions is not None:
      return x + jnp.take(table, positions, axis=0).astype(x.dtype)
    return x + jax.lax.dynamic_slice_in_dim(table, offset, t).astype(x.dtype)
