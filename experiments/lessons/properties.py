"""Properties of attention (the attention/ViT homework, §1.1 e–f and §1.3 c–e), measured and
built with tx's own attention. No training.

  python -m experiments.lessons.properties [--quick] [--workdir=DIR]

Notation: H = softargmax_β(Q Kᵀ) V row by row, h_i = Σ_j p_ij v_j, p_i = softargmax(β s_i),
s_ij = q_i·k_j; Q [n, d], K [m, d], V [m, d_v].

**A key moved a little, k_m → k_m + ε.** Only column m of the scores moves, by q_i·ε. Along the
path k_m + tε (t from 0 to 1), with J_i = diag(p_i) − p_i p_iᵀ the softargmax's Jacobian,

  dh_i/dt = β (q_i·ε) Vᵀ J_i e_m = β (q_i·ε) p_im (v_m − h_i),

so to first order ΔH_i = β (q_i·ε) p_im (v_m − h_i): linear in ε. Two bounds hold for every ε,
not only small ones, because they bound dh_i/dt at every point of the path whatever p is:

  Jacobian bound  ‖ΔH‖_F ≤ (β/2) ‖V‖₂ ‖Q ε‖ ≤ (β/2) ‖V‖₂ ‖Q‖₂ ‖ε‖,
    since ‖J_i‖₂ ≤ 1/2 (Gershgorin: row j of J_i has centre p_j(1 − p_j) and radius
    p_j(1 − p_j), so every eigenvalue lies in [0, 2 p_j(1 − p_j)] ⊂ [0, 1/2]);
  column bound    ‖ΔH‖_F ≤ (β/4) D_m ‖Q ε‖ ≤ (β/4) D_m ‖Q‖₂ ‖ε‖,  D_m = max_j ‖v_j − v_m‖,
    since p_im ‖v_m − h_i‖ = p_im ‖Σ_{j≠m} p_ij (v_m − v_j)‖ ≤ p_im (1 − p_im) D_m ≤ D_m / 4.

The column bound is never looser (D_m ≤ 2 max_j ‖v_j‖ ≤ 2 ‖V‖₂). Both vanish as β → 0 (uniform
weights ignore the keys), and the exact first-order term also vanishes as β → ∞ unless key m
ties for the largest score (p_im(1 − p_im) → 0: a saturated softargmax ignores small moves).
The curves are computed in float64 NumPy, because tx computes logits in float32 by design,
which cannot resolve ‖ε‖ below about 1e-7 · |s|; the float32 curve from
`tx.dot_product_attention` is drawn beside them to show that floor.

**A key stretched, k_m → α k_m, α > 1.** Its weight is a logistic function of α,

  p_m(α) = σ(α β s_m − log Σ_{j≠m} exp(β s_j)),

so p_m → 1 whenever s_m = q·k_m > 0 (not only when s_m is the largest score: a positive score
overtakes the largest other one at α* = max_{j≠m} s_j / s_m), p_m → 0 when s_m < 0, and p_m
stays put when s_m = 0. A larger β gets there at a smaller α. Then h → v_m: the output becomes
that key's value (hard attention).

**Constructions** (homework §1.3 c–e), each with `tx.MultiHeadAttention`'s parameters set by
hand and compared with an independent computation:

  identity      one head; the input carries a one-hot position e_i beside its content x_i, the
                query and key projections read only the position, q_i = k_i = e_i, the value
                projection only the content; logits β δ_ij with β = 1000, so p_ij = δ_ij to
                float32 (exp(−1000) = 0) and h_i = x_i.  Reference: x.
  permutation   the same with q_i = e_π(i): h_i = x_π(i).  Reference: x[π].
  running       identity attention with W^V W^O = W and output bias b: h_i = x_i W + b, a 1×1
  linear        convolution (the homework's "equal weights for all tokens" would instead give
                every position the mean Σ_j x_j / T).  Reference: float64 NumPy x W + b.
  convolution   Cordonnier, Loukas & Jaggi (ICLR 2020, Lemma 1 / Theorem 1): K^D heads, one per
                kernel offset Δ_h ∈ {−⌊K/2⌋..⌊K/2⌋}^D; the query and key projections are zero
                and each head's logits are the relative-position bias
                  b_h(i, j) = −α ‖δ_ij − Δ_h‖²,  δ_ij = pos_j − pos_i
                (their quadratic encoding; it equals their v_h·r_δ up to a per-query constant,
                which softargmax ignores). With α = 1000 head h attends only to pos_i + Δ_h;
                value projection of head h = the identity, output projection of head h = the
                kernel's tap W[Δ_h + ⌊K/2⌋], so Σ_h x_{i+Δ_h} W[Δ_h + ⌊K/2⌋] + b is exactly
                the cross-correlation `lax.conv_general_dilated` computes.
                Reference: `lax.conv_general_dilated`, in 1-D and 2-D.

Borders (the padding convention of the convolution):
  'circular'  δ_ij is taken modulo the grid (in [−n/2, n/2) per axis), so every query has its
              K^D neighbours: equal to lax.conv on `jnp.pad(x, mode='wrap')` ('VALID') at every
              position.
  'zeros'     the grid is padded with ⌊K/2⌋ zero tokens on each side and only the original
              positions are read out: attending to a zero token is how attention "attends to
              nothing" (its weights always sum to 1). Equal to lax.conv with zero 'SAME'
              padding at every position.
  'none'      no padding: a border query's head whose offset leaves the grid attends to the
              nearest existing key instead, so the output equals zero-padded 'SAME' conv only in
              the interior (reported separately from the border).

Writes to the workdir: results.json, results.md, properties_perturbation.png,
properties_scaling.png, properties_beta_limit.png, properties_constructions.png,
properties_conv2d_heads.png.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import tx
from experiments.cli import exit_on_interrupt, fail, fail_unless_verbose, parse_flags
from experiments.metrics import pyplot, save_figure, write_atomically

PADDINGS = ('circular', 'zeros', 'none')
# tx's attention on the einsum path, β traced: one compilation per shape, whatever β.
attention = jax.jit(functools.partial(tx.dot_product_attention, implementation='xla'))
HARD = 1000.0  # β and α of the hard constructions: exp(−1000) is exactly 0 in float32.


# ----------------------------------------------------------------------------- perturbations

def softargmax_np(logits):
  """softargmax over the last axis in float64: exp(z_j − max z) / Σ_j' exp(z_j' − max z)."""
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def attention_np(q, k, v, beta: float):
  """H = softargmax_β(Q Kᵀ) V in float64 NumPy, batched over leading axes; returns (H, P)."""
  p = softargmax_np(beta * np.einsum('...id,...jd->...ij', q, k))
  return np.einsum('...ij,...jd->...id', p, v), p


def first_order_change(q, k, v, beta: float, m: int, eps):
  """ΔH ≈ β (q_i·ε) p_im (v_m − h_i) for k_m → k_m + ε: the softargmax Jacobian's column m.
  q [n, d], k [m, d], v [m, dv], eps [..., d] -> [..., n, dv]."""
  h, p = attention_np(q, k, v, beta)
  qe = np.einsum('id,...d->...i', q, eps)
  return beta * qe[..., None] * (p[:, m, None] * (v[m] - h))


def perturbation_bounds(q, v, beta: float, m: int) -> dict:
  """The two bounds' coefficients c in ‖ΔH‖_F ≤ c ‖ε‖ (module docstring): Jacobian
  (β/2) ‖V‖₂ ‖Q‖₂, column (β/4) max_j ‖v_j − v_m‖ ‖Q‖₂."""
  q_norm = np.linalg.norm(q, 2)
  return {'jacobian': beta / 2 * np.linalg.norm(v, 2) * q_norm,
          'column': beta / 4 * np.linalg.norm(v - v[m], axis=-1).max() * q_norm}


def key_perturbation(rng, betas, scales, directions: int, n=8, m=8, d=16, dv=16, key=0) -> dict:
  """‖ΔH‖_F for k_key → k_key + s·u over ‖ε‖ = s in `scales` and unit directions u (random,
  plus Q's top right-singular vector, the direction the bounds are tight in), per β: measured
  in float64 NumPy and in float32 by `tx.dot_product_attention`, the first-order prediction,
  and the bounds."""
  q, k, v = (rng.standard_normal((n, d)), rng.standard_normal((m, d)),
             rng.standard_normal((m, dv)))
  u = rng.standard_normal((directions, d))
  u[0] = np.linalg.svd(q)[2][0]
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  eps = scales[:, None, None] * u  # [S, U, d]
  moved = np.broadcast_to(k, eps.shape[:2] + k.shape).copy()
  moved[..., key, :] += eps
  out = {'scales': scales, 'key': key, 'shape': dict(n=n, m=m, d=d, dv=dv), 'betas': {}}
  for beta in betas:
    h0, p0 = attention_np(q, k, v, beta)
    dh = np.linalg.norm(attention_np(q, moved, v, beta)[0] - h0, axis=(-2, -1))  # [S, U]
    lin = np.linalg.norm(first_order_change(q, k, v, beta, key, eps), axis=(-2, -1))
    lead = lambda a, kk: jnp.asarray(a, jnp.float32).reshape(
        (1,) * (kk.ndim - 2) + a.shape[:1] + (1,) + a.shape[1:])  # [1..., T, 1 head, D]
    f32 = lambda kk: attention(lead(q, kk), jnp.asarray(kk, jnp.float32)[..., None, :],
                               lead(v, kk), beta=beta)[..., 0, :]
    h0_32 = np.asarray(f32(k), np.float64)
    dh32 = np.linalg.norm(np.asarray(f32(moved), np.float64) - h0_32, axis=(-2, -1))
    out['betas'][beta] = dict(
        measured=dh, first_order=lin, float32=dh32, weights=p0[:, key],
        tx_vs_numpy=float(np.abs(h0_32 - h0).max()), **perturbation_bounds(q, v, beta, key))
  return out


def scaling_keys(scores) -> dict:
  """Three keys of one query's scores s: the largest, a positive one that is not the largest
  (the second largest), and the most negative."""
  order = np.argsort(scores)[::-1]
  if not (scores[order[1]] > 0 > scores[order[-1]]):
    raise ValueError(f'scores={scores}; need at least two positive and one negative score')
  return {'largest': int(order[0]), 'positive': int(order[1]), 'negative': int(order[-1])}


def key_scaling(rng, betas, alphas, m=8, d=16) -> dict:
  """The weight p_m(α) of key m when k_m → α k_m, for one query, per β and per kind of key
  (`scaling_keys`), computed by `tx.dot_product_attention` (float32) and checked against the
  logistic form σ(α β s_m − log Σ_{j≠m} exp(β s_j)) in float64."""
  q, k = rng.standard_normal(d), rng.standard_normal((m, d))
  s = k @ q
  keys = scaling_keys(s)
  v = np.eye(m)  # one-hot values: the output row is the weight vector itself.
  out = {'alphas': alphas, 'scores': s, 'keys': keys, 'betas': {}}
  for beta in betas:
    rows = {}
    for kind, j in keys.items():
      moved = np.broadcast_to(k, (len(alphas), m, d)).copy()
      moved[:, j] *= alphas[:, None]
      w = attention(jnp.asarray(q[None, None, None], jnp.float32),
                    jnp.asarray(moved[:, :, None], jnp.float32),
                    jnp.asarray(v[None, :, None], jnp.float32), beta=beta)[:, 0, 0, j]
      others = np.delete(beta * s, j)
      z = alphas * beta * s[j] - np.log(np.exp(others - others.max()).sum()) - others.max()
      logistic = 0.5 * (1 + np.tanh(z / 2))
      overtakes = s[j] > 0 and s[j] < s.max()
      crossing = float(np.delete(s, j).max() / s[j]) if overtakes else None
      rows[kind] = dict(weight=np.asarray(w, np.float64), logistic=logistic, score=float(s[j]),
                        crossing=crossing)
    out['betas'][beta] = rows
  return out


# ----------------------------------------------------------------------------- constructions

def kernel_offsets(kernel_size: int, ndim: int):
  """The K^D offsets Δ of a K-wide kernel in D dimensions, in raster order, as int [K^D, D]:
  each coordinate in {−⌊K/2⌋, ..., ⌊K/2⌋} (K odd)."""
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'kernel_size={kernel_size}; allowed: an odd integer >= 1 (a centred '
                     'kernel)')
  r = np.arange(kernel_size) - kernel_size // 2
  return np.stack(np.meshgrid(*[r] * ndim, indexing='ij'), -1).reshape(-1, ndim)


def relative_offsets(grid, circular: bool = True):
  """δ_ij = pos_j − pos_i for the T = Π grid tokens in raster order: float32 [T, T, D].
  circular: each coordinate taken modulo its axis' length n, in [−⌊n/2⌋, n − ⌊n/2⌋)."""
  grid = tuple(grid)
  pos = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1)  # [T, D]
  delta = pos[None, :, :] - pos[:, None, :]
  if circular:
    n = np.asarray(grid)
    delta = (delta + n // 2) % n - n // 2
  return delta.astype(np.float32)


def quadratic_bias(grid, centres, alpha, circular: bool = True):
  """Cordonnier et al.'s quadratic relative-position logits, one map per head:
  b_h(i, j) = −α_h ‖δ_ij − Δ_h‖², [H, T, T], for centres Δ [H, D] and widths α (scalar or
  [H]); differentiable in both (jnp)."""
  delta = jnp.asarray(relative_offsets(grid, circular))
  centres = jnp.asarray(centres, jnp.float32)
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), centres.shape[:1])
  dist = jnp.sum((delta[None] - centres[:, None, None]) ** 2, -1)
  return -alpha[:, None, None] * dist


@jax.jit
def apply_attention(params, tokens, bias=None, beta_scale=1.0):
  """`tx.MultiHeadAttention` with the given parameters (their shapes fix the heads and widths)
  on tokens [B, T, C]: (output [B, T, C_out], weights [B, H, T, T] from `tx.attention_weights`).
  β = beta_scale / sqrt(d_head) is traced, so one compilation serves every β."""
  heads, width = params['query']['kernel'].shape[1:]
  module = tx.MultiHeadAttention(num_heads=heads, qkv_features=heads * width,
                                 out_features=params['out']['kernel'].shape[-1],
                                 beta_scale=beta_scale, implementation='xla')
  variables = {'params': params}
  weights = tx.attention_weights(module, variables, tokens, bias=bias)
  return module.apply(variables, tokens, bias=bias), next(iter(weights.values()))


def _projection(kernel, inputs: int = 1):
  """A DenseGeneral's parameters: `kernel`, whose first `inputs` axes are contracted, and a
  zero bias of its output shape."""
  kernel = jnp.asarray(kernel, jnp.float32)
  return {'kernel': kernel, 'bias': jnp.zeros(kernel.shape[inputs:], jnp.float32)}


def conv_attention(kernel, bias=None) -> dict:
  """`tx.MultiHeadAttention` parameters that compute the convolution with `kernel`
  [K, ..., K, C_in, C_out] (D spatial axes) given `conv_bias_map` as the logit bias: K^D heads
  of width C_in, query and key projections zero, head h's value projection the identity of
  C_in and its output projection the tap kernel[Δ_h + ⌊K/2⌋]; output bias `bias` [C_out]
  (default 0)."""
  kernel = np.asarray(kernel, np.float32)
  ndim, (c_in, c_out) = kernel.ndim - 2, kernel.shape[-2:]
  offsets = kernel_offsets(kernel.shape[0], ndim)
  heads = len(offsets)
  zero = np.zeros((c_in, heads, c_in), np.float32)
  taps = kernel[tuple((offsets + kernel.shape[0] // 2).T)]  # [H, C_in, C_out]
  out = {'kernel': jnp.asarray(taps), 'bias': jnp.zeros(c_out, jnp.float32) if bias is None
         else jnp.asarray(bias, jnp.float32)}
  return {'query': _projection(zero), 'key': _projection(zero),
          'value': _projection(np.broadcast_to(np.eye(c_in)[:, None], zero.shape)), 'out': out}


def conv_bias_map(grid, kernel_size: int, padding: str = 'circular', alpha: float = HARD):
  """The logit bias [H, T, T] of `conv_attention` on a grid (after padding): head h's
  quadratic bias centred on offset Δ_h."""
  circular = padding == 'circular'
  return quadratic_bias(grid, kernel_offsets(kernel_size, len(grid)), alpha, circular)


def attention_conv(x, kernel, bias=None, padding: str = 'circular', alpha: float = HARD,
                   return_weights: bool = False):
  """The convolution of x [B, *grid, C_in] with `kernel` by multi-head self-attention
  (`conv_attention`); padding as in the module docstring. Returns y [B, *grid, C_out] (and,
  with return_weights, the weights [B, H, T, T] over the grid after padding)."""
  if padding not in PADDINGS:
    raise ValueError(f'padding={padding!r}; allowed: {", ".join(map(repr, PADDINGS))}')
  x = jnp.asarray(x, jnp.float32)
  ndim, half = x.ndim - 2, np.shape(kernel)[0] // 2
  if padding == 'zeros':
    x = jnp.pad(x, [(0, 0)] + [(half, half)] * ndim + [(0, 0)])
  grid = x.shape[1:-1]
  tokens = x.reshape(x.shape[0], -1, x.shape[-1])
  y, weights = apply_attention(conv_attention(kernel, bias), tokens,
                               conv_bias_map(grid, np.shape(kernel)[0], padding, alpha))
  y = y.reshape(x.shape[:-1] + y.shape[-1:])
  if padding == 'zeros':
    y = y[(slice(None),) + (slice(half, -half or None),) * ndim]
  return (y, weights) if return_weights else y


def reference_conv(x, kernel, bias=None, padding: str = 'circular'):
  """The convolution (cross-correlation, as every deep-learning library) by
  `lax.conv_general_dilated`: 'circular' on `jnp.pad(mode='wrap')`, 'zeros' and 'none' with
  zero 'SAME' padding. x [B, *grid, C_in], kernel [K, ..., C_in, C_out]."""
  x, kernel = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  ndim, half = x.ndim - 2, kernel.shape[0] // 2
  spatial = 'DHW'[-ndim:] if ndim <= 3 else None
  numbers = ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')
  if padding == 'circular':
    x = jnp.pad(x, [(0, 0)] + [(half, half)] * ndim + [(0, 0)], mode='wrap')
    pad = 'VALID'
  else:
    pad = 'SAME'
  y = jax.lax.conv_general_dilated(x, kernel, (1,) * ndim, pad, dimension_numbers=numbers,
                                   precision=jax.lax.Precision.HIGHEST)
  return y if bias is None else y + jnp.asarray(bias, jnp.float32)


def interior(grid, kernel_size: int):
  """Boolean [*grid]: the positions whose every kernel offset stays inside the grid."""
  half = kernel_size // 2
  inside = np.zeros(grid, bool)
  inside[tuple(slice(half, n - half) for n in grid)] = True
  return inside


def position_attention(x, perm=None, weight=None, bias=None, beta: float = HARD,
                       return_weights: bool = False):
  """Self-attention as a permutation of the tokens followed by a running linear layer:
  h_i = x_π(i) W + b, by one `tx.MultiHeadAttention` head on [x_i, e_i] (content beside a
  one-hot position): q_i = e_π(i), k_j = e_j, v_j = x_j, logits β δ_{π(i) j}.
  perm None is the identity, weight None the identity matrix, bias None zero. x [B, T, C].
  At finite β the weights are p_ij = e^β / (e^β + T − 1) on j = π(i), 1 / (e^β + T − 1)
  elsewhere."""
  x = jnp.asarray(x, jnp.float32)
  _, t, c = x.shape
  perm = np.arange(t) if perm is None else np.asarray(perm)
  weight = np.eye(c) if weight is None else np.asarray(weight)
  width = max(t, c)  # one head of width max(T, C) carries both the positions and the content.
  query = np.zeros((c + t, 1, width), np.float32)
  query[c + np.arange(t), 0, perm] = 1  # position i -> e_π(i)
  key = np.zeros_like(query)
  key[c + np.arange(t), 0, np.arange(t)] = 1  # position j -> e_j
  value = np.zeros_like(query)
  value[np.arange(c), 0, np.arange(c)] = 1  # content only
  out = np.zeros((1, width, weight.shape[1]), np.float32)
  out[0, :c] = weight
  params = {'query': _projection(query), 'key': _projection(key), 'value': _projection(value),
            'out': _projection(out, inputs=2)}
  if bias is not None:
    params['out']['bias'] = jnp.asarray(bias, jnp.float32)
  inputs = jnp.concatenate([x, jnp.broadcast_to(jnp.eye(t), x.shape[:1] + (t, t))], -1)
  y, weights = apply_attention(params, inputs, None, beta * np.sqrt(width))
  return (y, weights) if return_weights else y


def _sizes(quick: bool):
  """(batch, T, C, C_out) of the token constructions; C_out = C, so that the running linear
  layer shares the identity's compiled program."""
  return (4, 6, 3, 3) if quick else (4, 10, 4, 4)


def constructions(rng, quick: bool) -> dict:
  """Every construction against its reference: max |Δ| (float32 rounding expected)."""
  rows, maps = [], {}
  batch, t, c, c_out = _sizes(quick)
  x = rng.standard_normal((batch, t, c)).astype(np.float32)
  perm = rng.permutation(t)
  w, b = rng.standard_normal((c, c_out)), rng.standard_normal(c_out)
  y, maps['identity'] = position_attention(x, return_weights=True)
  rows.append(dict(name='identity', shape=f'T={t}, C={c}', heads=1, reference='x',
                   max_abs_diff=float(np.abs(np.asarray(y, np.float64) - x).max())))
  y, maps['permutation'] = position_attention(x, perm, return_weights=True)
  rows.append(dict(name='permutation', shape=f'T={t}, C={c}', heads=1, reference='x[:, π]',
                   max_abs_diff=float(np.abs(np.asarray(y, np.float64) - x[:, perm]).max())))
  y = position_attention(x, weight=w, bias=b)
  exact = x.astype(np.float64) @ w + b
  rows.append(dict(name='running linear', shape=f'T={t}, C={c}→{c_out}', heads=1,
                   reference='x W + b (float64)',
                   max_abs_diff=float(np.abs(np.asarray(y, np.float64) - exact).max())))
  grids = {1: [(12,)] if quick else [(16,)], 2: [(6, 6)] if quick else [(8, 8), (8, 12)]}
  sizes = (3,) if quick else (3, 5)
  for ndim, shapes in grids.items():
    for grid in shapes:
      for size in sizes:
        kernel = rng.standard_normal((size,) * ndim + (c, c_out)).astype(np.float32)
        x = rng.standard_normal((2,) + grid + (c,)).astype(np.float32)
        inside = interior(grid, size)
        for padding in PADDINGS:
          y, weights = attention_conv(x, kernel, b, padding, return_weights=True)
          diff = np.abs(np.asarray(y, np.float64)
                        - np.asarray(reference_conv(x, kernel, b, padding), np.float64))
          row = dict(name=f'{ndim}-D convolution', shape='×'.join(map(str, grid))
                     + f', K={size}, C={c}→{c_out}', heads=size ** ndim, padding=padding,
                     reference='lax.conv_general_dilated'
                     + (' on wrap-padded x' if padding == 'circular' else ', zero SAME'),
                     max_abs_diff=float(diff[:, inside].max()))
          if padding == 'none':
            row['max_abs_diff_border'] = float(diff[:, ~inside].max())
          rows.append(row)
          if padding == 'circular' and size == 3:
            maps[f'conv{ndim}d'] = (grid, weights)
  return {'rows': rows, 'maps': maps, 'perm': perm}


def beta_limit(rng, betas, quick: bool) -> dict:
  """The identity construction at finite β: max |h − x| measured against the exact
  prediction h_i = x_i + w Σ_{j≠i} (x_j − x_i), w = 1 / (e^β + T − 1), on inputs shaped as
  `constructions`' (one compilation serves both)."""
  batch, t, c = _sizes(quick)[:3]
  x = rng.standard_normal((batch, t, c)).astype(np.float32)
  x64 = x.astype(np.float64)
  measured, predicted = [], []
  for beta in betas:
    y = np.asarray(position_attention(x, beta=float(beta)), np.float64)
    w = 1.0 / (np.exp(beta) + t - 1)
    measured.append(np.abs(y - x64).max())
    predicted.append(np.abs(w * (x64.sum(1, keepdims=True) - t * x64)).max())
  return {'betas': np.asarray(betas), 'measured': np.asarray(measured),
          'predicted': np.asarray(predicted)}


# ----------------------------------------------------------------------------- report

def _plot_perturbation(pert, path):
  plt = pyplot()
  betas = list(pert['betas'])
  fig, axes = plt.subplots(1, len(betas), figsize=(4.2 * len(betas), 4), sharey=True)
  s = pert['scales']
  for ax, beta in zip(np.atleast_1d(axes), betas):
    r = pert['betas'][beta]
    ax.plot(s, r['measured'].max(1), 'k-', label='measured, worst direction (float64)')
    ax.plot(s, r['measured'].mean(1), 'C0-', label='measured, mean direction (float64)')
    ax.plot(s, r['first_order'].mean(1), 'C0--', label='first order β(q·ε)p_m(v_m − h)')
    ax.plot(s, r['float32'].mean(1), 'C0:', marker='.', ms=3, label='tx, float32 logits')
    ax.plot(s, r['column'] * s, 'C3-', lw=1, label='(β/4) max‖v_j − v_m‖ ‖Q‖₂ ‖ε‖')
    ax.plot(s, r['jacobian'] * s, 'C1-', lw=1, label='(β/2) ‖V‖₂ ‖Q‖₂ ‖ε‖')
    ax.set(xscale='log', yscale='log', xlabel='‖ε‖', title=f'β = {beta:g}')
  np.atleast_1d(axes)[0].set_ylabel('‖ΔH‖_F')
  np.atleast_1d(axes)[0].legend(fontsize=7, loc='upper left')
  fig.suptitle('one key moved, k_m → k_m + ε: output change against ‖ε‖', fontsize=10)
  save_figure(fig, path)


def _plot_scaling(scale, path):
  plt = pyplot()
  kinds = ('largest', 'positive', 'negative')
  titles = {'largest': 'largest score', 'positive': 'positive, not the largest',
            'negative': 'negative score'}
  fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
  a = scale['alphas']
  for ax, kind in zip(axes, kinds):
    for i, (beta, rows) in enumerate(scale['betas'].items()):
      r = rows[kind]
      ax.plot(a, r['weight'], f'C{i}-', label=f'β = {beta:g}')
      ax.plot(a, r['logistic'], f'C{i}:', lw=2)
    crossing = scale['betas'][next(iter(scale['betas']))][kind]['crossing']
    if crossing:
      ax.axvline(crossing, color='gray', lw=0.8, ls='--')
      ax.text(crossing, 0.5, ' α* = max s_j / s_m', fontsize=8, color='gray')
    s_m = scale['betas'][next(iter(scale['betas']))][kind]['score']
    ax.set(xscale='log', xlabel='α', title=f'{titles[kind]} (q·k_m = {s_m:.2f})', ylim=(-.02, 1.02))
  axes[0].set_ylabel('weight p_m of the stretched key')
  axes[0].legend(fontsize=8, title='tx (solid), σ(αβs_m − LSE) (dotted)', title_fontsize=7)
  fig.suptitle('one key stretched, k_m → α k_m', fontsize=10)
  save_figure(fig, path)


def _plot_beta_limit(lim, path):
  fig, ax = pyplot().subplots(figsize=(5.5, 4))
  shown = lim['measured'] > 0  # float32 rounds h to x exactly from some β on.
  ax.plot(lim['betas'][shown], lim['measured'][shown], 'k.-', label='measured (tx, float32); '
          f'exactly 0 from β = {lim["betas"][~shown].min():g}' if (~shown).any() else
          'measured (tx, float32)')
  ax.plot(lim['betas'], lim['predicted'], 'C3--', label='w Σ_j (x_j − x_i), w = 1/(e^β + T − 1)')
  ax.set(yscale='log', xlabel='β', ylabel='max |h − x|', title='identity attention as β grows')
  ax.legend(fontsize=8)
  save_figure(fig, path)


def _plot_constructions(cons, path):
  plt = pyplot()
  maps = cons['maps']
  _, w1 = maps['conv1d']
  heads = w1.shape[1]
  fig, axes = plt.subplots(1, 2 + heads, figsize=(3 * (2 + heads), 3.2))
  panels = [('identity', maps['identity'][0, 0]), ('permutation π', maps['permutation'][0, 0])]
  offsets = kernel_offsets(heads, 1)[:, 0]
  panels += [(f'1-D conv, head Δ = {d:+d}', w1[0, h]) for h, d in enumerate(offsets)]
  for ax, (title, w) in zip(axes, panels):
    ax.imshow(np.asarray(w), cmap='viridis', vmin=0, vmax=1)
    ax.set(title=title, xlabel='key j', ylabel='query i')
  save_figure(fig, path)


def _plot_conv2d_heads(cons, path):
  plt = pyplot()
  grid, w = cons['maps']['conv2d']
  offsets = kernel_offsets(3, 2)
  query = (grid[0] // 2) * grid[1] + grid[1] // 2
  fig, axes = plt.subplots(3, 3, figsize=(7, 7))
  for h, (dy, dx) in enumerate(offsets):
    ax = axes[dy + 1, dx + 1]
    ax.imshow(np.asarray(w[0, h, query]).reshape(grid), cmap='viridis', vmin=0, vmax=1)
    ax.plot(grid[1] // 2, grid[0] // 2, 'r+', ms=10)
    ax.set(title=f'head Δ = ({dy:+d}, {dx:+d})', xticks=[], yticks=[])
  fig.suptitle('2-D convolution by 9 heads: each head\'s attention from the centre query (+)',
               fontsize=10)
  save_figure(fig, path)


def _fmt(x):
  return f'{x:.2e}' if isinstance(x, float) else str(x)


def summarize(pert, scale, cons, lim) -> dict:
  """The numbers results.json and results.md report."""
  perturbation = []
  s = pert['scales']
  small = s <= 1e-4
  for beta, r in pert['betas'].items():
    slope = np.polyfit(np.log(s[small]), np.log(r['measured'][small].mean(1)), 1)[0]
    ratio = r['measured'][small] / r['first_order'][small]
    good = np.abs(r['float32'].mean(1) / r['measured'].mean(1) - 1) < 0.1
    perturbation.append(dict(
        beta=beta, slope_small_eps=float(slope),
        measured_over_first_order=[float(ratio.min()), float(ratio.max())],
        worst_over_column_bound=float((r['measured'].max(1) / (r['column'] * s)).max()),
        worst_over_jacobian_bound=float((r['measured'].max(1) / (r['jacobian'] * s)).max()),
        key_weight_range=[float(r['weights'].min()), float(r['weights'].max())],
        float32_smallest_eps=float(s[good].min()) if good.any() else None,
        tx_vs_numpy=r['tx_vs_numpy']))
  scaling = []
  for beta, rows in scale['betas'].items():
    for kind, r in rows.items():
      scaling.append(dict(beta=beta, key=kind, score=r['score'],
                          weight_alpha_1=float(r['weight'][0]),
                          weight_alpha_max=float(r['weight'][-1]),
                          crossing_alpha=r['crossing'],
                          tx_vs_logistic=float(np.abs(r['weight'] - r['logistic']).max())))
  return {'perturbation': perturbation, 'scaling': scaling, 'alpha_max': float(scale['alphas'][-1]),
          'constructions': cons['rows'],
          'beta_limit': {'beta': lim['betas'].tolist(), 'measured': lim['measured'].tolist(),
                         'predicted': lim['predicted'].tolist()}}


def write_markdown(results: dict, path: str):
  """results.md: the perturbation, scaling and construction tables."""
  row = lambda cells: '| ' + ' | '.join(map(str, cells)) + ' |'
  lines = ['# Properties of attention', '',
           '## One key moved, k_m → k_m + ε (float64; slope of log ‖ΔH‖ against log ‖ε‖ '
           'for ‖ε‖ ≤ 1e-4)', '',
           row(['β', 'slope', 'measured / first order (‖ε‖ ≤ 1e-4)', 'worst / column bound',
                'worst / Jacobian bound', 'p_im range', 'tx float32 within 10% from ‖ε‖']),
           row(['---'] * 7)]
  for r in results['perturbation']:
    lines.append(row([f'{r["beta"]:g}', f'{r["slope_small_eps"]:.4f}',
                      '{:.6f} – {:.6f}'.format(*r['measured_over_first_order']),
                      f'{r["worst_over_column_bound"]:.3f}',
                      f'{r["worst_over_jacobian_bound"]:.3f}',
                      '{:.2e} – {:.2e}'.format(*r['key_weight_range']),
                      _fmt(r['float32_smallest_eps'])]))
  lines += ['', f'## One key stretched, k_m → α k_m (α from 1 to {results["alpha_max"]:g})', '',
            row(['β', 'key', 'q·k_m', 'p_m at α = 1', f'p_m at α = {results["alpha_max"]:g}',
                 'α* (overtakes the largest)', 'max |tx − logistic|']), row(['---'] * 7)]
  for r in results['scaling']:
    lines.append(row([f'{r["beta"]:g}', r['key'], f'{r["score"]:.3f}',
                      f'{r["weight_alpha_1"]:.4f}', f'{r["weight_alpha_max"]:.4f}',
                      '—' if r['crossing_alpha'] is None else f'{r["crossing_alpha"]:.3f}',
                      f'{r["tx_vs_logistic"]:.1e}']))
  lines += ['', '## Constructions with tx.MultiHeadAttention (β = α = 1000)', '',
            row(['construction', 'sizes', 'heads', 'padding', 'reference', 'max |Δ|',
                 'max |Δ| at the border']), row(['---'] * 7)]
  for r in results['constructions']:
    lines.append(row([r['name'], r['shape'], r['heads'], r.get('padding', '—'), r['reference'],
                      f'{r["max_abs_diff"]:.1e}',
                      _fmt(r['max_abs_diff_border']) if 'max_abs_diff_border' in r else '—']))
  write_atomically(path, '\n'.join(lines) + '\n')


def run(workdir: str, quick: bool = False) -> dict:
  """Computes everything, writes results.json, results.md and the PNGs into `workdir`, and
  returns the results."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(0)
  betas = (0.05, 0.25, 1.0) if quick else (0.05, 0.25, 1.0, 4.0)
  scales = np.logspace(-9, 2, 12 if quick else 45)
  pert = key_perturbation(rng, betas, scales, directions=16 if quick else 256)
  scale = key_scaling(rng, betas, np.logspace(0, 2, 21 if quick else 161))
  cons = constructions(rng, quick)
  lim = beta_limit(rng, np.linspace(0, 30, 7 if quick else 31), quick)
  results = summarize(pert, scale, cons, lim)
  results['quick'] = quick
  results['seconds'] = round(time.time() - start, 1)
  _plot_perturbation(pert, os.path.join(workdir, 'properties_perturbation.png'))
  _plot_scaling(scale, os.path.join(workdir, 'properties_scaling.png'))
  _plot_beta_limit(lim, os.path.join(workdir, 'properties_beta_limit.png'))
  _plot_constructions(cons, os.path.join(workdir, 'properties_constructions.png'))
  _plot_conv2d_heads(cons, os.path.join(workdir, 'properties_conv2d_heads.png'))
  write_atomically(os.path.join(workdir, 'results.json'), json.dumps(results, indent=1) + '\n')
  write_markdown(results, os.path.join(workdir, 'results.md'))
  return results


def define_flags():
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_bool('quick', False, 'Smaller sizes and fewer points (checks the machinery).')
  flags.DEFINE_string('workdir', None, 'Output directory; default runs/lesson-properties[-quick].')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks on errors.')


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use [--quick] [--workdir=DIR]')
  logging.set_verbosity(logging.WARNING)
  workdir = f.workdir or 'runs/lesson-properties' + ('-quick' if f.quick else '')
  try:
    results = run(workdir, f.quick)
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  with open(os.path.join(workdir, 'results.md'), encoding='utf-8') as fh:
    print(fh.read())
  print(f'wrote results.json, results.md and 5 PNGs to {workdir} in {results["seconds"]} s',
        flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main), flags_parser=parse_flags)
