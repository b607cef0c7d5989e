"""Reading attention out of a model: the weights of every layer, their entropy, rollout
and mean distance."""

from __future__ import annotations

import flax
import jax.numpy as jnp


def attention_weights(model, variables, *args, method=None, **kwargs) -> dict:
  """Runs `model.apply(variables, *args, **kwargs)` and returns the attention weights of
  every attention layer, {'path/of/layer': weights [batch..., H, Tq, Tk]}, in call order.

  The weights are what `MultiHeadAttention` sows into 'intermediates'. A model
  configured with implementation='fused' (whose kernel cannot return weights)
  is run on the 'xla' path, which computes the same function.
  """
  if getattr(model, 'implementation', None) == 'fused':
    model = model.clone(implementation='xla')
  _, state = model.apply(variables, *args, method=method, mutable=['intermediates'], **kwargs)
  flat = flax.traverse_util.flatten_dict(state.get('intermediates', {}), sep='/')
  suffix = '/attention_weights'
  return {k[:-len(suffix)]: v[0] for k, v in flat.items() if k.endswith(suffix)}


def attention_entropy(weights, query_mask=None):
  """Entropy of each head's attention distribution, averaged over queries, in nats.

    H_h = Σ_q m_q · (-Σ_k w_hqk log w_hqk) / Σ_q m_q,   with 0 · log 0 = 0,

  for weights [batch..., H, Tq, Tk] (rows sum to 1) and an optional query mask
  m [batch..., Tq] (1 = a real query; default all). Returns [batch..., H].
  Uniform attention over T keys gives log T (β = 0); one-hot attention gives 0
  (β → ∞).
  """
  w = weights.astype(jnp.float32)
  per_query = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
  if query_mask is None:
    return per_query.mean(axis=-1)
  m = jnp.asarray(query_mask, jnp.float32)[..., None, :]  # [batch..., 1, Tq]
  return (per_query * m).sum(-1) / jnp.maximum(m.sum(-1), 1e-9)


def attention_rollout(weights, residual: float = 0.5):
  """Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each
  output token through all layers, with the residual path counted as identity attention.

  With Ā_l the head-mean of layer l's weights [batch..., H, T, T]:
    Â_l = residual · I + (1 - residual) · Ā_l,   rows renormalised to sum to 1,
    rollout = Â_L · ... · Â_2 · Â_1                [batch..., T, T].
  `weights` is a sequence of per-layer weights, first layer first (e.g. the values of
  `attention_weights` of a ViT). Row q of the result is the share of each input token in
  output token q (for ViT, row 0 is the [CLS] token's map over the patches).
  """
  rollout = None
  for w in weights:
    a = jnp.asarray(w, jnp.float32).mean(axis=-3)
    a = residual * jnp.eye(a.shape[-1], dtype=a.dtype) + (1.0 - residual) * a
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  if rollout is None:
    raise ValueError('attention_rollout needs the weights of at least one layer')
  return rollout


def mean_attention_distance(weights, positions):
  """Mean attention distance per head (Dosovitskiy et al., 2021, Fig. 7), averaged over queries:

    D_h = mean_q Σ_k w_hqk · ‖p_q − p_k‖₂

  for weights [batch..., H, Tq, Tk] and token positions [T] (1-D) or [T, dims] (e.g. patch
  centres (y, x) in pixels; Tq = Tk = T). Returns [batch..., H]: 0 when every token attends
  to itself, large for global heads.
  """
  p = jnp.asarray(positions, jnp.float32)
  if p.ndim == 1:
    p = p[:, None]
  distance = jnp.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))  # [T, T]
  return (jnp.asarray(weights, jnp.float32) * distance).sum(-1).mean(-1)
