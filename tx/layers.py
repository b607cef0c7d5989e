"""Linen layers: MultiHeadAttention, FeedForward, EncoderBlock, DecoderBlock.

Tensor layout inside attention is [batch..., T, H, D]; activations between
layers are [batch..., T, d_model]. `dtype` is the compute dtype, `param_dtype`
the storage dtype (float32); softmax and LayerNorm statistics stay in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx import scores as scores_lib
from tx.attention import IMPLEMENTATIONS, attend, dot_product_attention
from tx.masks import combine_masks, padding_mask
from tx.posemb import alibi_bias
from tx.posemb import rope as apply_rope
from tx.validate import check_beta, check_choice, concrete

Dtype = Any
SCORES = ('dot', 'general', 'additive', 'cosine', 'location')
BETA_LENGTHS = ('none', 'log')  # MultiHeadAttention.beta_length.
NORMS = ('post', 'pre')
# 'gelu' is the tanh approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (BERT's paper,
# GPT-2); 'gelu_exact' is x·Φ(x) with the normal CDF Φ (erf), as HF ViT, timm and BERT compute.
ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu,
               'gelu_exact': functools.partial(nn.gelu, approximate=False)}
kernel_init = nn.initializers.xavier_uniform()


class MultiHeadAttention(nn.Module):
  """MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W^O,
  head_h = Attention(X_q W^Q_h, X_kv W^K_n, X_kv W^V_n),  n = h // (H/K).

  Self-attention when `inputs_kv` is None, cross-attention otherwise.
  K = `num_kv_heads` key/value projections serve the H = `num_heads` query heads: K = H
  (None, the default) is multi-head attention, K = 1 multi-query (Shazeer 2019), else
  grouped-query (Ainslie et al. 2023). The key/value kernels are [d_model, K, d_head], and a
  decode cache holds K heads.
  The logits are β·score(q, k) with β = beta_scale / sqrt(d_head), fixed, or
  learned per head (`learn_beta`, parametrised as log β so that β stays > 0).
  The attention weights [batch..., H, Tq, Tk] are sown into 'intermediates'
  as 'attention_weights' whenever they are computed.

  score='dot' runs `attention_fn` (as Flax's `MultiHeadDotProductAttention(attention_fn=...)`:
  the module never chooses the kernel), called as
    attention_fn(q, k, v, mask=, bias=, beta=, implementation=, return_weights=,
                 dropout_rate=, dropout_rng=[, key_lengths=]) -> out, or (out, weights)
  with the signature and meaning of `tx.dot_product_attention`, the default, which chooses
  the kernel for implementation=None. The weights are requested whenever 'intermediates' is
  mutable and implementation is not 'fused', so under None they are always sown when asked
  for (which means the einsum path); k and v reach it with their K heads. Other scores compute
  score(q, k) on k repeated to H heads (each score is defined per head, some with per-head
  parameters) and `tx.attend`, which reads v's K heads in place.

  implementation: 'xla' (einsum, weights sown), 'fused' (`jax.nn.dot_product_attention`,
  cuDNN on GPU; score='dot' only, no weights), or None (default): chosen by `attention_fn`.

  decode=True (self-attention only) keeps keys and values in a 'cache'
  collection, sized by the input given to `init`; each call appends its T
  tokens at cache slots s = index ... index + T − 1 and attends causally to everything
  cached so far (key slot j ≤ s). A `mask` there covers the whole cache, [..., Tk = cache
  length], e.g. the padding of left-padded rows, masked at every later step too. Writing past
  the cache length cannot be checked under jit (the index is traced): the decoding loop must
  stop at the length the cache was initialised with.

  key_lengths: integer [batch...] (or a scalar): keys j >= key_lengths are padding, as the
  mask [j < key_lengths] would say. score='dot' hands it to `attention_fn` (passed only when
  given), where the fused kernel takes it as sequence lengths; other scores and
  beta_length='log' fold it into the mask. Not with decode (a mask covers the cache there).

  positions: [batch..., T] (or [T]) the positions rope rotates q and k by, default 0 ... T−1
  (with decode: the cache slots). A left-padded row b has position s − pad_b at slot s, as
  transformers numbers it (rope's q·k depends on m − n only, so the shift changes the logits
  by rounding alone). Ignored without rope.

  alibi (self-attention only): adds ALiBi's bias b_hij = −m_h·|i − j| to the logits
  (`tx.posemb.alibi_bias`; Press et al. 2022), i and j the query's and key's token index
  (with decode: cache slots, whose differences equal those of a left-padded row's positions),
  on top of any `bias` given.

  beta_length: 'none' (β as above) or 'log', the length-aware temperature of Chiang & Cholak
  (2022) and Scalable-Softmax (Nakanishi, 2025): query i's logits are scaled by log n_i,

    β_i = β · log n_i = beta_scale · log(n_i) / sqrt(d_head)   (β learned per head: β_h log n_i)

  where n_i is the number of keys query i may attend, counted from its mask row (causal: i + 1;
  padding: the real keys; decode: the cache slots filled so far, less masked ones; no mask:
  Tk). n_i ≤ 1 gives log n_i = 0, uniform weights over its one key (or none) and never NaN.
  For score='dot' the factor is folded into q (β_i q_i·k_j = β (log n_i · q_i)·k_j), so β stays
  a scalar or per head and the fused kernel remains valid; other scores get a per-query β
  [batch..., H, Tq, 1].
  """
  num_heads: int
  qkv_features: int | None = None  # default: input feature size.
  out_features: int | None = None  # default: input feature size.
  num_kv_heads: int | None = None  # K key/value heads, a divisor of num_heads; None = num_heads.
  beta_scale: float = 1.0
  learn_beta: bool = False
  score: str = 'dot'
  implementation: str | None = None
  attention_fn: Callable = dot_product_attention  # score='dot' only.
  dropout_rate: float = 0.0  # attention-weight dropout.
  rope: bool = False  # rotary position embedding on q and k (self-attention only).
  rope_base: float = 10000.0
  alibi: bool = False  # ALiBi's linear distance bias on the logits (self-attention only).
  beta_length: str = 'none'  # 'none' | 'log': β_i = β · log(n_i keys query i may attend).
  location_keys: int = 512  # key positions the score='location' kernel is built for.
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _beta(self, head_dim: int):
    check_beta(self.beta_scale, 'beta_scale')
    base = 1.0 / np.sqrt(head_dim)
    if not self.learn_beta:
      return self.beta_scale * base
    scale = concrete(self.beta_scale)  # None when traced (a vmapped sweep over β).
    if scale is not None and scale == 0:
      raise ValueError('beta_scale=0 with learn_beta=True; a learned β starts from '
                       'beta_scale/sqrt(d_head) and must be > 0')
    log_beta = self.param('log_beta', nn.initializers.constant(jnp.log(self.beta_scale * base)),
                          (self.num_heads,), jnp.float32)
    return jnp.exp(log_beta)

  def _kv_heads(self) -> int:
    """K, the number of key/value heads: a divisor of num_heads, so that each query head h
    reads key/value head h // (num_heads / K)."""
    if self.num_kv_heads is None:
      return self.num_heads
    kv_heads = self.num_kv_heads
    if (not isinstance(kv_heads, numbers.Integral) or isinstance(kv_heads, bool) or kv_heads < 1
        or self.num_heads % kv_heads):
      divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
      raise ValueError(f'num_kv_heads={kv_heads!r}; allowed: None or a divisor of '
                       f'num_heads={self.num_heads}: {", ".join(map(str, divisors))}')
    return int(kv_heads)

  def _scores(self, q, k):
    if self.score == 'cosine':
      return scores_lib.cosine_score(q, k)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=f'{self.score}_score')
    if self.score == 'general':
      return scores_lib.GeneralScore(**kw)(q, k)
    if self.score == 'additive':
      return scores_lib.AdditiveScore(**kw)(q, k)
    return scores_lib.LocationScore(self.location_keys, **kw)(q, k)

  def _decode_step(self, q, k, v, mask, positions=None):
    """Writes this call's k, v into the cache at `cache_index`; returns full-cache k, v, mask.

    Rope rotates by `positions` (default: the cache slots); the causal mask always compares
    cache slots. Also returns the queries' cache slots [T] (ALiBi's query positions)."""
    initialized = self.has_variable('cache', 'cached_key')
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not initialized:  # `init` only sizes the cache.
      return self._rope(q, positions), self._rope(k, positions), v, mask, jnp.arange(q.shape[-3])
    length = cached_k.value.shape[-3]
    if mask is not None and jnp.shape(mask)[-1] != length:
      # A one-column key mask would mean "every cached key or none": never what a row wants.
      raise ValueError(f'mask (DecoderLM valid=) has {jnp.shape(mask)[-1]} keys; in decode '
                       f'mode it covers the whole cache: {length} keys')
    slots = index.value + jnp.arange(q.shape[-3])
    at = slots if positions is None else positions
    q, k = self._rope(q, at), self._rope(k, at)
    start = (0,) * (k.ndim - 3) + (index.value, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
    index.value = index.value + q.shape[-3]
    causal = jnp.arange(length)[None, :] <= slots[:, None]  # [T, length]
    return q, cached_k.value, cached_v.value, combine_masks(mask, causal), slots

  def _alibi(self, bias, q_slots, num_keys: int):
    """bias + ALiBi's −m_h·|i − j| [H, Tq, Tk] over query slots i and key slots 0 ... Tk − 1."""
    alibi = alibi_bias(self.num_heads, q_slots, jnp.arange(num_keys))
    return alibi if bias is None else bias + alibi

  @staticmethod
  def _log_keys(mask, num_keys: int):
    """log n_i, n_i the keys each query may attend (its mask row's count, or num_keys without a
    mask), floored at n = 1 so that a query with one key or none gets 0: [batch..., H|1, Tq|1]."""
    if mask is None:
      n = jnp.full((1, 1), num_keys, jnp.float32)
    else:
      n = jnp.sum(jnp.asarray(mask, bool), axis=-1, dtype=jnp.float32)
      n = n.reshape((1,) * max(2 - n.ndim, 0) + n.shape)
    return jnp.log(jnp.maximum(n, 1.0))

  def _rope(self, x, positions=None):
    return apply_rope(x, positions, self.rope_base) if self.rope else x

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, mask=None, bias=None, positions=None,
               key_lengths=None, deterministic: bool = True):
    check_choice('score', self.score, SCORES)
    check_choice('implementation', self.implementation, IMPLEMENTATIONS)
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'd_model={features} (qkv_features or the input width) is not divisible '
                       f'by num_heads={self.num_heads}')
    if self.implementation == 'fused' and self.score != 'dot':
      raise ValueError(f'implementation="fused" supports score="dot" only; got score={self.score!r}')
    if key_lengths is not None and self.decode:
      raise ValueError('key_lengths with decode=True; in decode mode a mask covers the cache')
    kv_heads = self._kv_heads()
    head_dim = features // self.num_heads
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if self_attention else inputs_kv

    dense = lambda heads, name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype,
                                                param_dtype=self.param_dtype,
                                                kernel_init=kernel_init, name=name)
    q_BxTxHxD = dense(self.num_heads, 'query')(inputs_q)
    k_BxSxKxD = dense(kv_heads, 'key')(inputs_kv)
    v_BxSxKxD = dense(kv_heads, 'value')(inputs_kv)
    if key_lengths is not None and (self.score != 'dot' or self.beta_length == 'log'):
      # Only dot products reach the kernel's sequence lengths; the rest read the mask.
      mask = combine_masks(mask, padding_mask(key_lengths, kv_len=k_BxSxKxD.shape[-3]))
      key_lengths = None
    if self_attention and self.decode:
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, q_slots = self._decode_step(
          q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, positions)
    elif self_attention:
      q_BxTxHxD, k_BxSxKxD = self._rope(q_BxTxHxD, positions), self._rope(k_BxSxKxD, positions)
      q_slots = jnp.arange(q_BxTxHxD.shape[-3])
    if self.alibi and self_attention:
      bias = self._alibi(bias, q_slots, k_BxSxKxD.shape[-3])

    beta = self._beta(head_dim)
    check_choice('beta_length', self.beta_length, BETA_LENGTHS)
    if self.beta_length == 'log':
      log_n_BxHxT = self._log_keys(mask, k_BxSxKxD.shape[-3])
      if self.score == 'dot':  # q·k is linear in q: β stays what the fused kernel takes.
        log_n_BxTxHx1 = jnp.swapaxes(log_n_BxHxT, -1, -2)[..., None]
        q_BxTxHxD = (q_BxTxHxD.astype(jnp.float32) * log_n_BxTxHx1).astype(q_BxTxHxD.dtype)
      else:
        beta = jnp.reshape(beta, (-1, 1, 1) if jnp.ndim(beta) == 1 else ()) * log_n_BxHxT[..., None]
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng('dropout')
    common = dict(mask=mask, bias=bias, beta=beta, dropout_rate=self.dropout_rate,
                  dropout_rng=dropout_rng)
    weights_BxHxTxS = None
    if self.score == 'dot':
      want_weights = (self.is_mutable_collection('intermediates')
                      and self.implementation != 'fused')
      lengths = {} if key_lengths is None else {'key_lengths': key_lengths}
      out_BxTxHxD = self.attention_fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                                      implementation=self.implementation,
                                      return_weights=want_weights, **common, **lengths)
      if want_weights:
        out_BxTxHxD, weights_BxHxTxS = out_BxTxHxD
    else:
      # Query head h meets key head h // (H/K); v keeps its K heads (`attend` reads them).
      k_BxSxHxD = jnp.repeat(k_BxSxKxD, self.num_heads // kv_heads, axis=-2)
      out_BxTxHxD, weights_BxHxTxS = attend(self._scores(q_BxTxHxD, k_BxSxHxD), v_BxSxKxD,
                                            **common)
    if weights_BxHxTxS is not None:
      self.sow('intermediates', 'attention_weights', weights_BxHxTxS)
    return nn.DenseGeneral(self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=kernel_init, name='out')(out_BxTxHxD)


class FeedForward(nn.Module):
  """FFN(x) = act(x W_1 + b_1) W_2 + b_2, act = ReLU (Vaswani et al.) or GELU (ViT, BERT)."""
  d_ff: int
  activation: str = 'relu'
  dropout: float = 0.0  # on the hidden layer.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    check_choice('activation', self.activation, tuple(ACTIVATIONS))
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=kernel_init, name=name)
    # The products see one [N, d] matrix, N = every leading dim, and the result gets its shape
    # back. From [B, T, d], XLA:CPU took each kernel gradient xᵀ·g with g transposed by a copy
    # first, a product 2.4× slower than xᵀ·g as stored (docs/performance.md).
    rows = x.reshape(-1, x.shape[-1])
    h = ACTIVATIONS[self.activation](dense(self.d_ff, 'hidden')(rows))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(x.shape[-1], 'output')(h).reshape(x.shape)


class BlockHParams(nn.Module):
  """Hyper-parameters shared by the blocks and by every model built from them."""
  num_heads: int = 8
  num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads.
  d_ff: int = 2048  # FFN hidden width; 0: no FFN sublayer (attention-only blocks).
  dropout: float = 0.0  # residual, embedding and FFN-hidden dropout.
  attention_dropout: float = 0.0
  beta_scale: float = 1.0  # β = beta_scale / sqrt(d_head).
  learn_beta: bool = False
  beta_length: str = 'none'  # 'log': β_i = β · log n_i, n_i the keys query i may attend.
  score: str = 'dot'
  implementation: str | None = None
  attention_fn: Callable = dot_product_attention  # a library-only hook: see MultiHeadAttention.
  norm: str = 'post'  # 'post': LN(x + f(x)) (Vaswani); 'pre': x + f(LN(x)) (ViT, GPT-2).
  layer_norm_epsilon: float = 1e-6  # ε in LN(x) = (x − μ)/√(σ² + ε)·γ + b; HF ViT, BERT 1e-12.
  activation: str = 'relu'  # 'relu' | 'gelu' (tanh approximation) | 'gelu_exact' (erf).
  num_positions: int = 512  # rows of a learned posemb table; keys of score='location'.
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


def hparams(module, cls=BlockHParams) -> dict:
  """The values of `cls`'s hyper-parameter fields on `module`, to pass on to a sub-module."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
          if f.init and f.name not in ('parent', 'name')}


class _Block(BlockHParams, kw_only=True):
  rope: bool = False
  alibi: bool = False

  def attention(self, name: str, self_attention: bool):
    return MultiHeadAttention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, beta_scale=self.beta_scale,
        learn_beta=self.learn_beta, beta_length=self.beta_length, score=self.score,
        implementation=self.implementation, attention_fn=self.attention_fn,
        dropout_rate=self.attention_dropout, rope=self.rope and self_attention,
        alibi=self.alibi and self_attention, location_keys=self.num_positions,
        decode=self.decode and self_attention, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)

  def sublayer(self, x, f: Callable, name: str, deterministic: bool):
    """Residual connection with LayerNorm: post-LN LN(x + f(x)) or pre-LN x + f(LN(x))."""
    check_choice('norm', self.norm, NORMS)
    ln = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f'{name}_norm')
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    if self.norm == 'pre':
      return x + drop(f(ln(x)))
    return ln(x + drop(f(x)))

  def ffn(self, x, deterministic: bool):
    return FeedForward(self.d_ff, self.activation, self.dropout, self.dtype, self.param_dtype,
                       name='ffn')(x, deterministic=deterministic)

  def ffn_sublayer(self, x, deterministic: bool):
    """AddNorm(x, FFN(x)); with d_ff = 0 the block has no FFN and x passes unchanged."""
    if not self.d_ff:
      return x
    return self.sublayer(x, lambda y: self.ffn(y, deterministic), 'ffn', deterministic)


class EncoderBlock(_Block):
  """x ← AddNorm(x, SelfAttention(x)); x ← AddNorm(x, FFN(x))."""

  @nn.compact
  def __call__(self, x, mask=None, *, key_lengths=None, deterministic: bool = True):
    attn = self.attention('self_attention', True)
    x = self.sublayer(x, lambda y: attn(y, mask=mask, key_lengths=key_lengths,
                                        deterministic=deterministic),
                      'self_attention', deterministic)
    return self.ffn_sublayer(x, deterministic)


class DecoderBlock(_Block):
  """x ← AddNorm(x, MaskedSelfAttention(x)); x ← AddNorm(x, CrossAttention(x, memory));
  x ← AddNorm(x, FFN(x)).

  Queries of the cross-attention come from the decoder, keys and values from the
  encoder output `memory`. Without `memory` the block has no cross-attention
  (a GPT-style block); the caller supplies the causal `self_mask`. `positions` are the
  self-attention's rope positions (see `MultiHeadAttention`).
  """

  @nn.compact
  def __call__(self, x, memory=None, *, self_mask=None, cross_mask=None, positions=None,
               deterministic: bool = True):
    attn = self.attention('self_attention', True)
    x = self.sublayer(x, lambda y: attn(y, mask=self_mask, positions=positions,
                                        deterministic=deterministic),
                      'self_attention', deterministic)
    if memory is not None:
      cross = self.attention('cross_attention', False)
      x = self.sublayer(
          x, lambda y: cross(y, memory, mask=cross_mask, deterministic=deterministic),
          'cross_attention', deterministic)
    return self.ffn_sublayer(x, deterministic)
