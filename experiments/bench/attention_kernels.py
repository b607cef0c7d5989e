"""Attention implementations against sequence length: time and peak memory.

For each implementation and length T, one forward and backward pass of
`tx.dot_product_attention` over q, k, v [batch, T, heads, head_dim] (no mask; loss = Σ out),
gradients with respect to q, k and v:
  'xla'    ours: einsum scores, float32 softmax, einsum with the values; the T×T weights
           are materialised;
  'fused'  jax.nn.dot_product_attention: cuDNN's flash attention on a GPU with bf16/fp16,
           XLA's own composition elsewhere.
Peak memory is XLA's buffer assignment for the compiled program (arguments + outputs +
temporaries, from `compiled.memory_analysis()`), which is what the device must hold; it is
the same number on every backend and needs no allocator statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import tx
from experiments.bench.timing import measure, peak_bytes

IMPLEMENTATIONS = ('xla', 'fused')


def time_attention(length: int, implementation: str, *, batch: int, heads: int, head_dim: int,
                   dtype, repeats: int) -> dict:
  """One forward and backward pass: (q, k, v) -> (Σ out, gradients with respect to q, k, v)."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys)
  loss = lambda q, k, v: tx.dot_product_attention(
      q, k, v, implementation=implementation).astype(jnp.float32).sum()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  t = measure(lambda: compiled(q, k, v), repeats=repeats)
  flop = 3 * 4 * batch * heads * length * length * head_dim  # (QKᵀ and W·V) × 3 for fwd + bwd
  return dict(t, length=length, implementation=implementation, peak_bytes=peak_bytes(compiled),
              flop_per_s=flop / t['median_s'], batch=batch, heads=heads, head_dim=head_dim,
              dtype=jnp.dtype(dtype).name)


def bench(lengths, *, batch: int, heads: int, head_dim: int, dtype, repeats: int,
          log=print) -> list[dict]:
  rows = []
  for length in lengths:
    for implementation in IMPLEMENTATIONS:
      row = time_attention(length, implementation, batch=batch, heads=heads, head_dim=head_dim,
                           dtype=dtype, repeats=repeats)
      rows.append(row)
      log(f'attention T={length} {implementation}: {row["median_s"] * 1e3:.1f} ms, '
          f'{(row["peak_bytes"] or 0) / 2**20:.0f} MiB')
  return rows
