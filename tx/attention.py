"""Scaled dot-product attention with an explicit temperature β.

Layout follows `jax.nn.dot_product_attention`:

  q_BxTqxHxD  queries      [batch..., Tq, H, Dk]
  k_BxTkxKxD  keys         [batch..., Tk, K, Dk]
  v_BxTkxKxD  values       [batch..., Tk, K, Dv]
  mask        boolean, True = "may attend", broadcastable to [batch..., H, Tq, Tk]
  weights     [batch..., H, Tq, Tk]

K key/value heads serve H query heads, K a divisor of H: query head h reads key/value
head h // (H/K), as in `jax.nn.dot_product_attention`. K = H is multi-head attention
(Vaswani et al.), K = 1 multi-query attention (Shazeer 2019), anything between
grouped-query attention (Ainslie et al. 2023).

Logits and the softargmax are always computed in float32; the output takes the
dtype of the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tx.masks import combine_masks, padding_mask
from tx.scores import dot_score
from tx.validate import check_beta, check_choice, concrete

IMPLEMENTATIONS = (None, 'xla', 'fused')


def _beta_for_logits(beta, num_heads: int):
  """A 1-D β is per head: [H] (or [1]) becomes [H, 1, 1] so it broadcasts over [..., H, Tq, Tk]."""
  beta = jnp.asarray(beta, jnp.float32)
  if beta.ndim == 1:
    if beta.shape[0] not in (1, num_heads):
      raise ValueError(f'beta has shape {beta.shape}; a 1-D beta is per head and needs '
                       f'shape ({num_heads},)')
    return beta[:, None, None]
  return beta


def _check_kv_heads(heads: int, x, name: str):
  """Query head h reads key/value head h // (H/K), so x's K heads (axis -2) must divide H."""
  kv_heads = x.shape[-2]
  if kv_heads < 1 or heads % kv_heads:
    raise ValueError(f'{name} has K={kv_heads} heads (shape {x.shape}), which does not divide '
                     f'the H={heads} query heads; allowed: K a divisor of H (K = H: multi-head, '
                     'K = 1: multi-query, else grouped-query attention)')


def _split_heads(x, axis: int, kv_heads: int):
  """Splits the H axis of x into [K, H/K]: query head h = n·(H/K) + g becomes (n, g), the g-th
  of the H/K query heads that share key/value head n = h // (H/K)."""
  axis = axis % x.ndim
  return x.reshape(x.shape[:axis] + (kv_heads, x.shape[axis] // kv_heads) + x.shape[axis + 1:])


def _dot_scores(q, k):
  """s_hij = q_ih · k_jn with n = h // (H/K), in float32: [batch..., H, Tq, Tk].

  With fewer key heads than query heads (K < H) each key head is contracted with its H/K
  query heads in one einsum, never repeated in memory.
  """
  heads, kv_heads = q.shape[-2], k.shape[-2]
  if kv_heads == heads:
    return dot_score(q, k)
  s_BxKxGxTqxTk = jnp.einsum('...qngd,...knd->...ngqk', _split_heads(q, -2, kv_heads), k,
                             preferred_element_type=jnp.float32)
  return s_BxKxGxTqxTk.reshape(s_BxKxGxTqxTk.shape[:-4] + (heads,) + s_BxKxGxTqxTk.shape[-2:])


def _weighted_values(weights, v):
  """out_ih = Σ_j w_hij v_jn with n = h // (H/K): [batch..., Tq, H, Dv] in float32."""
  heads, kv_heads = weights.shape[-3], v.shape[-2]
  if kv_heads == heads or heads == 1:  # equal heads, or one row of weights for every head.
    return jnp.einsum('...hqk,...khd->...qhd', weights, v, preferred_element_type=jnp.float32)
  out_BxTqxKxGxD = jnp.einsum('...ngqk,...knd->...qngd', _split_heads(weights, -3, kv_heads), v,
                              preferred_element_type=jnp.float32)
  return out_BxTqxKxGxD.reshape(out_BxTqxKxGxD.shape[:-3] + (heads, v.shape[-1]))


def softargmax_beta(scores, beta=1.0, mask=None, axis: int = -1):
  """softargmax_β(s)_j = exp(β s_j) / Σ_{j' attendable} exp(β s_j'), in float32.

  Masked positions (mask False) get weight exactly 0. A row with no attendable
  position gets all-zero weights instead of NaN. β = 0 gives the uniform
  distribution over attendable positions; β → ∞ approaches one-hot argmax.
  """
  logits = jnp.asarray(scores, jnp.float32) * jnp.asarray(beta, jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=axis)
  mask = jnp.asarray(mask, bool)
  # A finite floor (not -inf) keeps fully-masked rows NaN-free; the final
  # `where` makes masked weights exactly zero.
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=axis)
  return jnp.where(mask, weights, 0.0)


def _check_broadcast(x, shape, name: str, what: str):
  """ValueError unless x (None passes) broadcasts to `shape` without growing it."""
  if x is None:
    return
  shape, own = tuple(shape), tuple(np.shape(x))
  try:
    ok = np.broadcast_shapes(own, shape) == shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f'{name} has shape {own}, which does not broadcast to {what} = {shape}')


def _check_mask(mask, logits_shape, name='mask'):
  _check_broadcast(mask, logits_shape, name, 'the attention logits [batch..., H, Tq, Tk]')


def _check_qkv(q, k, v):
  if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
    raise ValueError(f'q, k, v must be [batch..., T, H, D] with equal rank; got shapes '
                     f'q={q.shape}, k={k.shape}, v={v.shape}')
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f'q and k must share the head dim Dk; got q={q.shape}, k={k.shape}')
  if k.shape[-3] != v.shape[-3]:
    raise ValueError(f'k and v must share the key length Tk; got k={k.shape}, v={v.shape}')
  if k.shape[-2] != v.shape[-2]:
    raise ValueError(f'k and v must share the number of key/value heads K; got k={k.shape}, '
                     f'v={v.shape}')
  _check_kv_heads(q.shape[-2], k, 'k')
  try:
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
  except ValueError:
    raise ValueError(f'q, k, v batch dims do not broadcast: q={q.shape}, k={k.shape}, '
                     f'v={v.shape}') from None
  return tuple(batch) + (q.shape[-2], q.shape[-3], k.shape[-3])


def _check_real(**arrays):
  """Attention is defined on real vectors: a complex input's imaginary part would be dropped by
  the float32 softmax, and integers are not vectors to compare."""
  for name, x in arrays.items():
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name} has dtype {jnp.dtype(x.dtype).name}; allowed: real floating '
                       'point (float16, bfloat16, float32, float64)')


@jax.custom_jvp
def _finite(logits):
  """Clips float32 logits to ±max: a huge β (or a −∞ bias) must not overflow to ±∞, whose
  difference in the softmax is NaN. Its derivative is taken as 1 everywhere (exact wherever
  the logits are finite): clip's own derivative is a select over the [T, T] logits, which
  makes the backward pass of attention about 2× slower on CPU (docs/performance.md)."""
  big = jnp.finfo(jnp.float32).max
  return jnp.clip(logits, -big, big)


_finite.defjvp(lambda primals, tangents: (_finite(primals[0]), tangents[0]))


def attend(scores, v, *, mask=None, bias=None, beta=1.0, dropout_rate: float = 0.0,
           dropout_rng=None):
  """Turns alignment scores into attention: H = softargmax_β(scores + bias/β) V.

  Args:
    scores: [batch..., H, Tq, Tk] alignment scores s(q_i, k_j) (any score function).
    v: [batch..., Tk, K, Dv] values, K a divisor of H: query head h reads value head
      h // (H/K) (grouped-query attention; K = H is multi-head attention).
    mask: boolean, broadcastable to `scores`; True = may attend.
    bias: added to the β-scaled logits: logits = β·scores + bias.
    beta: temperature β; scalar, per-head [H], or broadcastable to `scores`.
    dropout_rate, dropout_rng: attention-weight dropout (inverted scaling),
      applied only when a key is given; the returned weights are pre-dropout.

  Returns:
    (out [batch..., Tq, H, Dv] in v.dtype, weights [batch..., H, Tq, Tk] float32).

  scores and v must be real floating point; anything else is a ValueError.
  """
  scores, v = jnp.asarray(scores), jnp.asarray(v)
  _check_real(scores=scores, v=v)
  if scores.shape[-3] != 1:  # one row of scores broadcasts over any number of value heads.
    _check_kv_heads(scores.shape[-3], v, 'v')
  _check_mask(mask, scores.shape)
  _check_mask(bias, scores.shape, 'bias')
  logits = jnp.asarray(scores, jnp.float32) * _beta_for_logits(beta, scores.shape[-3])
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  logits = _finite(logits)
  weights = softargmax_beta(logits, 1.0, mask)
  used = weights
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    used = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = _weighted_values(used.astype(v.dtype), v)
  return out.astype(v.dtype), weights


def dot_product_attention(q, k, v, *, mask=None, bias=None, beta=None, key_lengths=None,
                          return_weights: bool = False, implementation: str | None = None,
                          dropout_rate: float = 0.0, dropout_rng=None):
  """Scaled dot-product attention: softargmax_β(Q Kᵀ + bias) V, row-wise over keys.

    out_i = Σ_j w_ij v_j,  w_ij = exp(β q_i·k_j + b_ij) / Σ_{j' attendable} exp(β q_i·k_j' + b_ij')

  per query head h, with the keys and values of head n = h // (H/K).

  Args:
    q: [batch..., Tq, H, Dk] queries.
    k: [batch..., Tk, K, Dk] keys, K a divisor of H (anything else is a ValueError): K = H
      is multi-head attention, K = 1 multi-query (Shazeer 2019), else grouped-query
      attention (Ainslie et al. 2023). The 'xla' path never repeats k or v.
    v: [batch..., Tk, K, Dv] values; q, k, v are real floating point (a complex or
      integer input is a ValueError).
    mask: boolean, broadcastable to [batch..., H, Tq, Tk]; True = may attend.
      Masked keys get weight exactly 0; a query with no attendable key outputs 0.
    bias: additive logit bias, broadcastable to [batch..., H, Tq, Tk].
    beta: inverse temperature β >= 0. None means 1/sqrt(Dk) (Vaswani et al.).
      A scalar, a per-head array [H] (e.g. a learned β), or anything broadcastable
      to the logits. β = 0 averages the attendable values uniformly; β → ∞
      returns the value of the argmax key.
    key_lengths: integer, broadcastable to [batch...]: only keys j < key_lengths may be
      attended (trailing keys are padding). The same as the mask [j < key_lengths] ANDed
      with `mask`, but the fused kernel takes it as its sequence lengths instead of a
      [T, T] bias: how a sequence padded to a length cuDNN accepts stays on cuDNN.
    return_weights: also return the float32 weights [batch..., H, Tq, Tk].
    implementation: 'xla' for this einsum path; 'fused' for
      `jax.nn.dot_product_attention` (cuDNN where `fused_is_valid`, jax.nn's XLA
      path otherwise), which cannot return weights; None (default) chooses: 'fused'
      where `fused_is_valid`, else 'xla'. This is the one place None is resolved.
    dropout_rate, dropout_rng: attention-weight dropout, as in `attend`.

  Returns:
    out [batch..., Tq, H, Dv] in q's dtype, and the weights if requested.
  """
  check_choice('implementation', implementation, IMPLEMENTATIONS)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_real(q=q, k=k, v=v)
  logits_shape = _check_qkv(q, k, v)
  _check_mask(mask, logits_shape)
  _check_mask(bias, logits_shape, 'bias')
  if beta is None:
    beta = 1.0 / np.sqrt(q.shape[-1])
  check_beta(beta)
  if key_lengths is not None:
    key_lengths = jnp.asarray(key_lengths)
    if not jnp.issubdtype(key_lengths.dtype, jnp.integer):
      raise ValueError(f'key_lengths has dtype {key_lengths.dtype}; it must be integer')
    _check_broadcast(key_lengths, logits_shape[:-3], 'key_lengths', 'the batch dims [batch...]')
  dropout = dropout_rng is not None and dropout_rate > 0.0
  if implementation is None:
    implementation = 'fused' if fused_is_valid(q, k, v, beta=beta, dropout=dropout,
                                               return_weights=return_weights) else 'xla'

  if implementation == 'fused':
    if return_weights:
      raise ValueError('return_weights=True needs implementation=None or "xla"; '
                       'the fused kernel never materialises the weights')
    if dropout:
      raise ValueError(f'dropout_rate={dropout_rate} needs implementation=None or "xla"; '
                       'the fused kernel has no attention-weight dropout')
    return _fused(q, k, v, mask, bias, beta, key_lengths, logits_shape)

  if key_lengths is not None:
    mask = combine_masks(mask, padding_mask(key_lengths, kv_len=k.shape[-3]))
  out, weights = attend(_dot_scores(q, k), v, mask=mask, bias=bias, beta=beta,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  out = out.astype(q.dtype)
  return (out, weights) if return_weights else out


FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
FUSED_MAX_HEAD_DIM = 128  # on every GPU cuDNN supports; 256 on Hopper and later.


def fused_is_valid(q, k, v, *, beta=None, score: str = 'dot',
                   dropout: bool = False, return_weights: bool = False,
                   backend: str | None = None,
                   max_head_dim: int = FUSED_MAX_HEAD_DIM) -> bool:
  """Whether the fused cuDNN kernel runs this call: the one rule for choosing the kernel.

  `dot_product_attention` takes it for implementation=None (auto), and `_fused` (under
  implementation='fused') to decide whether to try cuDNN at all, with max_head_dim=256:
  asked for explicitly, cuDNN is tried up to Hopper's limit, and an older GPU's refusal
  comes at trace time, where it is caught.

  True only when all of these hold (the limits of cuDNN flash attention in
  jax/_src/cudnn/fused_attention_stablehlo.py: check_layout and check_is_flash_attention;
  and of `jax.nn.dot_product_attention`):
    - backend is 'gpu' (default: `jax.default_backend()`);
    - q, k, v share one dtype, bfloat16 or float16;
    - the head dims are equal (Dk == Dv), a multiple of 8 and <= max_head_dim (128, which
      holds on every GPU; cuDNN allows 256 on Hopper and later);
    - Tq and Tk are even: cuDNN's backward pass rejects odd sequence lengths whenever a
      bias is present, and its forward rule always passes one (an empty placeholder
      stands in for a missing bias), so the gradient of any odd-length call fails, with
      or without a mask. Whether a gradient will be taken is not known here, and under
      `nn.scan` or `jax.checkpoint` that error is raised where no fallback can catch it;
    - β is None, a scalar or per head ([H], [1], [H, 1, 1]): what `_fused` can fold in;
    - score is 'dot' (the kernel computes q·k only);
    - no attention-weight dropout is in use (the kernel has none);
    - the weights are not requested (the kernel never materialises them).
  Masks and biases are no condition (cuDNN takes both), nor are fewer key/value heads than
  query heads (cuDNN takes grouped-query attention as it is). Otherwise the einsum ('xla')
  path runs. q, k, v need only `.shape` and `.dtype`.
  """
  backend = jax.default_backend() if backend is None else backend
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  heads, d_k, d_v = q.shape[-2], q.shape[-1], v.shape[-1]
  t_q, t_k = q.shape[-3], k.shape[-3]
  beta_shape = np.shape(beta)
  return (backend == 'gpu'
          and len(dtypes) == 1 and dtypes <= {jnp.dtype(d) for d in FUSED_DTYPES}
          and d_k == d_v and d_k % 8 == 0 and d_k <= max_head_dim
          and t_q % 2 == 0 and t_k % 2 == 0
          and beta_shape in ((), (1,), (heads,), (1, 1, 1), (heads, 1, 1))
          and score == 'dot' and not dropout and not return_weights)


def _fused(q, k, v, mask, bias, beta, key_lengths, logits_shape):
  """`jax.nn.dot_product_attention` on our [batch..., T, H, D] layout; k and v keep their K
  heads (jax.nn and cuDNN compute grouped-query attention themselves); key_lengths become
  its key_value_seq_lengths."""
  batch = logits_shape[:-3]
  flat = lambda x: jnp.broadcast_to(x, batch + x.shape[-3:]).reshape((-1,) + x.shape[-3:])

  def as4d(m):  # [B·, H, Tq, Tk]; one that is the same for every batch element stays [1, ...].
    if m is None:
      return None
    lead, per_example = tuple(jnp.shape(m)[:-3]), tuple(logits_shape[-3:])
    if all(d == 1 for d in lead):
      return jnp.broadcast_to(m, lead + per_example).reshape((1,) + per_example)
    return jnp.broadcast_to(m, logits_shape).reshape((-1,) + logits_shape[-3:])

  beta_value = concrete(beta)
  if beta_value is not None and beta_value.ndim == 0:
    scale = float(beta_value)
  else:  # traced or per-head β: fold it into the queries (q·k is linear in q).
    b = _beta_for_logits(beta, q.shape[-2])  # [] or [H, 1, 1]
    if b.ndim not in (0, 3) or b.shape[1:] not in ((), (1, 1)):
      raise ValueError(f'implementation="fused" takes a scalar or per-head beta ([H] or '
                       f'[H, 1, 1]); got shape {jnp.shape(beta)}')
    scale = 1.0
    q = (q.astype(jnp.float32) * (b[..., 0] if b.ndim else b)).astype(q.dtype)
  args = (flat(q), flat(k), flat(v), as4d(bias), as4d(mask))
  lengths = {}
  if key_lengths is not None:
    flat_lengths = jnp.broadcast_to(key_lengths, batch).reshape(-1).astype(jnp.int32)
    lengths['key_value_seq_lengths'] = flat_lengths
  out = None
  # The rule sees q with β folded in, as cuDNN will; cuDNN's remaining refusals come at trace
  # time and are caught here.
  if fused_is_valid(q, k, v, max_head_dim=256):
    try:
      out = jax.nn.dot_product_attention(*args, scale=scale, implementation='cudnn', **lengths)
    except (ValueError, NotImplementedError, RuntimeError):
      out = None  # shapes or a layout cuDNN does not support: jax.nn's XLA path below.
  if out is None:
    out = jax.nn.dot_product_attention(*args, scale=scale, implementation='xla', **lengths)
  out = out.reshape(batch + out.shape[-3:])
  # jax.nn gives a uniform average over all keys where mask and lengths leave a row none; we
  # give 0, as the xla path does.
  valid = mask if key_lengths is None else combine_masks(
      mask, padding_mask(key_lengths, kv_len=logits_shape[-1]))
  if valid is not None:
    row_ok = jnp.any(jnp.broadcast_to(valid, logits_shape), axis=-1)  # [batch..., H, Tq]
    out = jnp.where(jnp.swapaxes(row_ok, -1, -2)[..., None], out, 0)
  return out.astype(q.dtype)
