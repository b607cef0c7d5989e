"""The same ops timed in XLA (through JAX) and in PyTorch eager, on the shapes of one layer of
the bench's lm-d256 (16 × 128 tokens, d_model 256, d_ff 1024, 4 heads of 64), float32:

  python -m experiments.bench.ops                  # both, each in its own process, alternating
  taskset -c 0 python -m experiments.bench.ops     # on one core: no thread-pool effects

  x·W      the FFN's first product, [N, D]·[D, F]
  xᵀ·g     its kernel gradient, [N, D]ᵀ·[N, F]
  xᵀ·(gᵀ)ᵀ the same product with g handed over transposed, as [F, N]: the orientation
           XLA:CPU chose for the FFN kernel gradients inside the lm-d256 train step
  g·Wᵀ     its input gradient, [N, F]·[D, F]ᵀ
  gelu     tanh-GELU forward over [N, F], and forward + backward
  layernorm  forward + backward over [N, D] (Flax's nn.LayerNorm, as tx uses it)
  attention  causal softmax attention forward + backward, [B, H, T, Dh]; tx's einsums
           against PyTorch's scaled_dot_product_attention

Each op is the median of `repeats` calls after 3 warm-ups; "forward + backward" returns the
output and the gradients in both frameworks. `--rounds` alternates the two processes.
`run_ops(framework, dims)` returns the ops' outputs too, so the test checks that both
frameworks compute the same values.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from experiments.bench.__main__ import run_module

LM_D256 = dict(n=2048, d=256, f=1024, b=16, h=4, t=128, dh=64)


def _inputs(dims: dict) -> dict:
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  n, d, f = dims['n'], dims['d'], dims['f']
  qkv = (dims['b'], dims['h'], dims['t'], dims['dh'])
  g = normal(n, f)
  return dict(x=normal(n, d), w=normal(d, f) * 0.05, g=g, g_t=np.ascontiguousarray(g.T),
              h=normal(n, f), gd=normal(n, d), scale=1 + 0.1 * normal(d),
              bias=0.1 * normal(d), q=normal(*qkv), k=normal(*qkv), v=normal(*qkv))


def _table(a: dict, *, forward, grads, gelu, layernorm, attention) -> dict:
  """name -> (fn, args), the same for both frameworks: the products are written once (the
  operators mean the same on jax and torch arrays); `forward` wraps the forward-only ops,
  grads(fn, *args, cotangent) returns (fn(*args), its gradients)."""
  return {
      'x·W': (forward(lambda x, w: x @ w), (a['x'], a['w'])),
      'xᵀ·g': (forward(lambda x, g: x.T @ g), (a['x'], a['g'])),
      'xᵀ·(gᵀ)ᵀ': (forward(lambda x, gt: x.T @ gt.T), (a['x'], a['g_t'])),
      'g·Wᵀ': (forward(lambda g, w: g @ w.T), (a['g'], a['w'])),
      'gelu forward': (forward(gelu), (a['h'],)),
      'gelu forward + backward': (lambda h, g: grads(gelu, h, cotangent=g), (a['h'], a['g'])),
      'layernorm forward + backward': (
          lambda x, s, b, g: grads(layernorm, x, s, b, cotangent=g),
          (a['x'], a['scale'], a['bias'], a['gd'])),
      'attention forward + backward': (
          lambda q, k, v: grads(attention, q, k, v, cotangent=q), (a['q'], a['k'], a['v'])),
  }


def _jax_ops(a: dict) -> dict:
  """_table in JAX, each op jitted: tx's LayerNorm (Flax's) and tx's einsum attention."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import tx

  def layernorm(x, scale, bias):
    return nn.LayerNorm(epsilon=1e-6).apply({'params': {'scale': scale, 'bias': bias}}, x)

  def attention(q, k, v):
    mask = tx.causal_mask(q.shape[2])
    return tx.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                    mask=mask, implementation='xla').swapaxes(1, 2)

  def grads(fn, *args, cotangent):
    out, backward = jax.vjp(fn, *args)
    return (out,) + backward(cotangent)

  ops = _table({k: jnp.asarray(v) for k, v in a.items()}, forward=lambda fn: fn, grads=grads,
               gelu=lambda h: jax.nn.gelu(h, approximate=True), layernorm=layernorm,
               attention=attention)
  return {name: (jax.jit(fn), args) for name, (fn, args) in ops.items()}


def _torch_ops(a: dict) -> dict:
  """_table in PyTorch eager; the backward ones through torch.autograd.grad."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count() or 1)

  def grads(fn, *args, cotangent):
    args = [t.detach().requires_grad_() for t in args]
    out = fn(*args)
    return (out.detach(),) + torch.autograd.grad(out, args, cotangent)

  def no_grad(fn):
    def call(*args):
      with torch.no_grad():
        return fn(*args)
    return call

  return _table(
      {k: torch.from_numpy(v) for k, v in a.items()}, forward=no_grad, grads=grads,
      gelu=lambda h: F.gelu(h, approximate='tanh'),
      layernorm=lambda x, s, b: F.layer_norm(x, (x.shape[-1],), s, b, eps=1e-6),
      attention=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _numpy(out) -> list:
  out = out if isinstance(out, (tuple, list)) else (out,)
  return [np.asarray(o.detach() if hasattr(o, 'detach') else o) for o in out]


def run_ops(framework: str, dims: dict = LM_D256, repeats: int = 20) -> dict:
  """{op: {'median_ms', 'outputs'}} for 'jax' or 'torch' (outputs as NumPy arrays)."""
  ops = {'jax': _jax_ops, 'torch': _torch_ops}[framework](_inputs(dims))
  if framework == 'jax':
    import jax
    done = jax.block_until_ready
  else:
    done = lambda out: out  # PyTorch's CPU ops return when their values exist.
  result = {}
  for name, (fn, args) in ops.items():
    for _ in range(3):
      out = done(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      done(fn(*args))
      times.append(time.perf_counter() - start)
    result[name] = dict(median_ms=statistics.median(times) * 1e3, outputs=_numpy(out))
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  if f.framework:
    print(json.dumps({k: v['median_ms'] for k, v in run_ops(f.framework, repeats=f.repeats)
                      .items()}), flush=True)
    return
  runs = {'jax': [], 'torch': []}
  for _ in range(f.rounds):
    for framework in runs:
      runs[framework].append(run_module('experiments.bench.ops', f'--framework={framework}',
                                        f'--repeats={f.repeats}', env=None))
  print('| op | XLA ms | PyTorch ms | PyTorch / XLA |\n|---|---|---|---|')
  for name in runs['jax'][0]:
    x, t = (statistics.median(r[name] for r in runs[k]) for k in ('jax', 'torch'))
    print(f'| {name} | {x:.2f} | {t:.2f} | {t / x:.2f} |')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('framework', '', "'jax' or 'torch': time one framework in this process "
                      'and print JSON; empty: both, in alternating processes, as a table.')
  flags.DEFINE_integer('repeats', 20, 'Timed calls per op (the median is reported).')
  flags.DEFINE_integer('rounds', 2, 'Processes per framework, alternating.')
  app.run(main)
