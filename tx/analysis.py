"""Reading attention out of a model: the weights of every layer, and their entropy."""

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
