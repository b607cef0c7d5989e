"""The learning-rate schedule and the optimizer of a run, from config.optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'rsqrt', 'constant')
MU_DTYPES = ('', 'float32', 'bfloat16')  # '' = the parameters' dtype


def make_schedule(config, total_steps: int):
  """'cosine': linear warmup to lr, then cosine decay to 0 (Loshchilov & Hutter).
  'rsqrt': lr · min(s/warmup, sqrt(warmup/s)), the inverse-square-root schedule of
  Vaswani et al. (their d_model^-0.5 · warmup^-0.5 is folded into lr).
  'constant': warmup, then lr."""
  o = config.optimizer
  warmup = o.warmup_steps
  if o.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={o.schedule!r}; allowed: '
                     f'{", ".join(map(repr, SCHEDULES))}')
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1))
  if o.schedule == 'rsqrt':
    def rsqrt(step):
      s = jnp.maximum(step, 1).astype(jnp.float32)
      return o.lr * jnp.minimum(s / max(warmup, 1), jnp.sqrt(max(warmup, 1) / s))
    return rsqrt
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                               optax.constant_schedule(o.lr)], [warmup])


def decay_mask(params):
  """Which parameters weight decay applies to: arrays with ndim > 1 (matrices, embeddings,
  posemb tables, [CLS], and the Q/K/V biases stored as [heads, d_head]); not vectors or β."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule):
  """Global-norm clipping, then AdamW with weight decay where `decay_mask` says.

  optimizer.mu_dtype='bfloat16' stores Adam's first moment m_t = β₁ m_{t-1} + (1 − β₁) g_t
  in bfloat16 (big_vision's `mu_dtype`), which halves its memory and the bytes each step
  reads and writes for it; the second moment and the update stay float32."""
  o = config.optimizer
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask, mu_dtype=o.mu_dtype or None))
  return optax.chain(*chain)
