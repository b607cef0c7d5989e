"""Attention entropy of every layer, for the temperature ablation.

Per layer l, over the first `examples` test examples n, the heads h and the real queries q
(seq2seq: non-pad source positions in the encoder, non-pad target positions in the decoder):

  H_l = mean_{n, h} mean_{q real in n} −Σ_k w_nhqk log w_nhqk    (nats; log T for uniform
                                                                 over T keys, 0 for one-hot)

Summary entries: 'attention_entropy' {layer path: H_l} and 'eval/attention_entropy', the mean
over layers. The members of a vectorized group are evaluated in one compiled program, β traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tx
from experiments import data, tasks


def evaluate(context, *, examples: int = 256) -> list[dict]:
  run = context.run
  pad, bos = run.dataset.info.get('pad_id', data.PAD), run.dataset.info.get('bos_id', data.BOS)
  batch = run.dataset.test_examples(examples)

  def entropies(params, beta):
    weights = tx.attention_weights(run.model_for(beta), {'params': params},
                                   *tasks.model_inputs(run.task, batch, bos))
    out = {}
    for layer, w in weights.items():
      queries = None
      if run.task == 'seq2seq':
        queries = batch['inputs' if layer.stack == 'encoder' else 'targets'] != pad
      out[layer] = tx.attention_entropy(w, queries).mean()
    return out

  betas = jnp.asarray(context.betas, jnp.float32)
  values = jax.device_get(jax.jit(jax.vmap(entropies))(context.params(), betas))
  out = []
  for i in range(len(context.betas)):
    per_layer = {str(k): float(v[i]) for k, v in values.items()}
    out.append({'attention_entropy': per_layer})
    if per_layer:
      out[-1]['eval/attention_entropy'] = float(np.mean(list(per_layer.values())))
  return out
