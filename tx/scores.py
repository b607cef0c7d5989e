"""Alignment scores s(q_i, k_j) from the attention literature.

Every score maps queries q [batch..., Tq, H, D] and keys k [batch..., Tk, H, D]
to scores [batch..., H, Tq, Tk]; `tx.attention.attend` then applies the
temperature β, the mask and the softargmax. In Luong et al. (2015) notation the
query is the decoder state s (h_t there) and the key an encoder state h.

  dot         s·h                               (Luong)
  scaled dot  s·h / sqrt(d)                     (Vaswani: dot with β = 1/sqrt(d))
  general     sᵀ W h                            (Luong)            GeneralScore
  additive    vᵀ tanh(W [s; h])                 (Bahdanau)         AdditiveScore
  cosine      s·h / (|s| |h|)                   (Graves' content-based addressing)
  location    softmax(W s)  — ignores the keys  (Luong)            LocationScore
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dot_score(q, k):
  """s_ij = q_i · k_j, in float32."""
  return jnp.einsum('...qhd,...khd->...hqk', q, k, preferred_element_type=jnp.float32)


def scaled_dot_score(q, k):
  """s_ij = q_i · k_j / sqrt(d) (Vaswani et al., 2017)."""
  return dot_score(q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))


def cosine_score(q, k, eps: float = 1e-6):
  """s_ij = q_i · k_j / (|q_i| |k_j|) ∈ [-1, 1]; β then acts as the key strength."""
  # rsqrt(max(|x|², eps²)) rather than x / max(|x|, eps): finite gradients at x = 0.
  normalize = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps**2))
  return dot_score(normalize(q.astype(jnp.float32)), normalize(k.astype(jnp.float32)))


class GeneralScore(nn.Module):
  """s_ij = q_iᵀ W_h k_j with a learned bilinear form W_h [D, D] per head."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k):
    h, d = q.shape[-2], q.shape[-1]
    w = self.param('kernel', nn.initializers.lecun_normal(batch_axis=(0,)), (h, d, k.shape[-1]),
                   self.param_dtype)
    q, w, k = (x.astype(self.dtype) for x in (q, w, k))
    return jnp.einsum('...qhd,hde,...khe->...hqk', q, w, k, preferred_element_type=jnp.float32)


class AdditiveScore(nn.Module):
  """s_ij = vᵀ tanh(W_q q_i + W_k k_j), i.e. vᵀ tanh(W [q_i; k_j]) (Bahdanau et al., 2015).

  Memory is O(Tq·Tk·features) per head: meant for study, not for long sequences.
  """
  features: int | None = None  # hidden size of the alignment MLP; default D.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k):
    h, d = q.shape[-2], q.shape[-1]
    a = self.features or d
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    w_q = self.param('w_query', init, (h, d, a), self.param_dtype)
    w_k = self.param('w_key', init, (h, k.shape[-1], a), self.param_dtype)
    v = self.param('v', nn.initializers.lecun_normal(), (h, a), self.param_dtype)
    cast = lambda x: x.astype(self.dtype)
    aq = jnp.einsum('...qhd,hda->...hqa', cast(q), cast(w_q))
    ak = jnp.einsum('...khd,hda->...hka', cast(k), cast(w_k))
    hidden = jnp.tanh(aq[..., :, None, :] + ak[..., None, :, :])  # [..., H, Tq, Tk, A]
    return jnp.einsum('...hqka,ha->...hqk', hidden, cast(v), preferred_element_type=jnp.float32)


class LocationScore(nn.Module):
  """s_ij = (W_h q_i)_j: the alignment is predicted from the query alone (Luong et al.).

  W_h is [D, num_keys] per head: one output per key position j < num_keys, so more
  keys than `num_keys` are an error.
  """
  num_keys: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k):
    tk = k.shape[-3]
    if tk > self.num_keys:
      raise ValueError(f'score="location" was built for num_keys={self.num_keys} keys; got {tk}')
    h, d = q.shape[-2], q.shape[-1]
    w = self.param('kernel', nn.initializers.lecun_normal(batch_axis=(0,)),
                   (h, d, self.num_keys), self.param_dtype)
    s = jnp.einsum('...qhd,hdl->...hql', q.astype(self.dtype), w.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return s[..., :tk]
