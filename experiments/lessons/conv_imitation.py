"""Heads that learn a convolution: a multi-head self-attention layer trained to imitate a fixed
random K×K convolution, and where each of its heads ends up attending.

  python -m experiments.lessons.conv_imitation [--quick] [--workdir=DIR] [--seeds=N]

Cordonnier, Loukas & Jaggi (ICLR 2020) prove that K² heads with relative positional logits can
express any K×K convolution (experiments/lessons/properties.py builds it by hand), and show that
heads trained with their quadratic encoding move their attention centres onto a grid of offsets
around the query, as a convolution's taps. Here the target is a convolution itself:

  y = conv(x, W) + b,  W [K, K, C, C] ~ N(0, 1/(K² C)), b ~ N(0, 0.1²), circular padding,
      x ~ N(0, 1) on a grid × grid image with C channels, fresh at every step (a pure
      function of the seed and the step);
  ŷ = MultiHead(x), K² heads (or --heads), each with content logits β q_i·k_j (q, k, v and
      the output projection learned, β = 1/√d_head) plus the learned quadratic positional
      logits of `properties.quadratic_bias`, −α_h ‖δ_ij − Δ_h‖², with centre Δ_h [2] and width
      α_h = exp(log α_h) learned per head; Δ_h starts at N(0, init_spread²), α_h at 1;
  loss = ‖ŷ − y‖² / ‖y‖² over the batch (relative error; 1 is predicting 0), Adam.

A head's attention centre is its expected offset, Σ_j p_hij δ_ij averaged over queries i and
held-out inputs (δ taken circularly, in [−n/2, n/2)). A kernel offset is covered when some
head's centre rounds to it. One head per offset (Cordonnier's construction) is one exact
solution, not the only one: with A [H, K²] each head's attention on each offset and no mass
outside the window, the layer's output is Σ_h (Σ_Δ A_hΔ x_{i+Δ}) W_h, which equals the
convolution Σ_Δ x_{i+Δ} W[Δ] whenever the K² equations Σ_h A_hΔ W_h = W[Δ] have a solution
W_h = W^V_h W^O_h, which they do for every kernel when A has rank K² (this needs H ≥ K² heads,
and content logits at zero). So the results also report the rank of A and the largest mass a
head puts outside the window.

The normal trainer (experiments/train.py) trains configs' classification, seq2seq and LM tasks
on datasets; this is a regression on synthetic inputs with a bespoke module, so the loop here is
a short optax loop, vmapped over seeds (all seeds train at once, one compilation).

Writes to the workdir: results.json (per seed and mean ± std over seeds), results.md,
conv_imitation_centres.png (each head's centre from start to end on the K×K grid of offsets,
one panel per seed), conv_imitation_loss.png (relative error against step).
"""

from __future__ import annotations

import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import tx
from experiments.cli import exit_on_interrupt, fail, fail_unless_verbose, parse_flags
from experiments.lessons.properties import (kernel_offsets, quadratic_bias, reference_conv,
                                            relative_offsets)
from experiments.metrics import pyplot, save_figure, write_atomically

DEFAULTS = dict(grid=8, channels=4, kernel_size=3, head_dim=4, batch_size=32, steps=3000,
                lr=0.01, init_spread=0.5, records=40, eval_examples=256)
QUICK = dict(grid=6, steps=100, batch_size=16, records=4, eval_examples=32)


class ConvImitator(nn.Module):
  """Multi-head self-attention on a 2-D grid with learned quadratic positional logits:
  MultiHead(x) with logits β q_i·k_j − α_h ‖δ_ij − Δ_h‖² per head h (module docstring)."""
  grid: tuple
  heads: int
  head_dim: int
  features: int
  init_spread: float = 0.5

  @nn.compact
  def __call__(self, x):
    centres = self.param('centres', nn.initializers.normal(self.init_spread),
                         (self.heads, len(self.grid)))
    log_alpha = self.param('log_alpha', nn.initializers.zeros, (self.heads,))
    bias = quadratic_bias(self.grid, centres, jnp.exp(log_alpha), circular=True)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    y = tx.MultiHeadAttention(num_heads=self.heads, qkv_features=self.heads * self.head_dim,
                              out_features=self.features, implementation='xla',
                              name='attention')(tokens, bias=bias)
    return y.reshape(x.shape[:-1] + (self.features,))


def head_statistics(model, params, x, kernel_size: int):
  """Where each head attends, from its weights p_hij on inputs x (`tx.attention_weights`):

    centres [H, 2]   the expected offset Σ_j p_hij δ_ij, averaged over queries and examples;
    window  [H, K²]  A_hΔ, the weight on each kernel offset Δ (raster order), averaged alike.

  Attention whose rows span the K² offsets (rank K²) with no mass outside the window is what
  an exact imitation needs; one head per offset (A = I) is one such A."""
  weights = next(iter(tx.attention_weights(model, {'params': params}, x).values()))
  delta = relative_offsets(model.grid, circular=True)
  at = np.all(delta[:, :, None] == kernel_offsets(kernel_size, 2)[None, None], -1)  # [T, T, K²]
  count = weights.shape[0] * weights.shape[2]
  return (jnp.einsum('bhij,ijd->hd', weights, jnp.asarray(delta)) / count,
          jnp.einsum('bhij,ijo->ho', weights, jnp.asarray(at, weights.dtype)) / count)


def window_rank(a, rtol: float = 0.01) -> int:
  """The rank of A [H, K²]: singular values above `rtol` times the largest."""
  sv = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
  return int(np.sum(sv > rtol * sv[0]))


def covered_offsets(centres, kernel_size: int) -> int:
  """How many of the K×K kernel offsets some head's centre rounds to."""
  rounded = {tuple(np.rint(c).astype(int)) for c in np.asarray(centres)}
  return len(rounded & {tuple(o) for o in kernel_offsets(kernel_size, 2)})


def problem(seed: int, grid: int, channels: int, kernel_size: int, eval_examples: int):
  """The seed's target, W [K, K, C, C] ~ N(0, 1/(K² C)) and b [C] ~ N(0, 0.1²), and its
  held-out inputs [eval_examples, grid, grid, C] (NumPy: no compilation)."""
  rng = np.random.default_rng([seed, 1])
  kernel = rng.standard_normal((kernel_size, kernel_size, channels, channels))
  bias = 0.1 * rng.standard_normal(channels)
  held_out = rng.standard_normal((eval_examples, grid, grid, channels))
  return (kernel / np.sqrt(kernel_size ** 2 * channels)).astype(np.float32), \
      bias.astype(np.float32), held_out.astype(np.float32)


def inputs(seeds, step: int, batch: int, grid: int, channels: int):
  """Training inputs x ~ N(0, 1) [seeds, batch, grid, grid, channels], a pure function of
  each seed and the step."""
  return np.stack([np.random.default_rng([s, 2, step]).standard_normal(
      (batch, grid, grid, channels), np.float32) for s in seeds])


def one_tap_per_head_error(kernel, bias, heads: int) -> float:
  """The expected relative error E‖ŷ − y‖² / E‖y‖² (x ~ N(0, 1)) of the best layer whose heads
  each attend to one offset: the H taps of largest energy ‖W[Δ]‖²_F kept, the rest lost,
  (Σ_lost ‖W[Δ]‖²_F) / (Σ_Δ ‖W[Δ]‖²_F + ‖b‖²). 0 when H ≥ K²."""
  energy = np.sort(np.square(kernel).reshape(-1, kernel.shape[-2] * kernel.shape[-1]).sum(1))
  lost = energy[:max(len(energy) - heads, 0)].sum()
  return float(lost / (energy.sum() + np.square(bias).sum()))


def relative_error(pred, target):
  """‖ŷ − y‖² / ‖y‖² over the whole batch."""
  return jnp.sum((pred - target) ** 2) / jnp.sum(target ** 2)


def train(seeds, heads: int | None = None, log=print, **overrides) -> dict:
  """Trains one layer per seed (vmapped) and returns per-seed results, the centre history and
  the loss curves. `overrides` change DEFAULTS."""
  c = dict(DEFAULTS, **overrides)
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'{sorted(unknown)}; allowed: {", ".join(sorted(DEFAULTS))}')
  heads = heads or c['kernel_size'] ** 2
  g, ch, k = c['grid'], c['channels'], c['kernel_size']
  if k > g:
    raise ValueError(f'kernel_size={k} is wider than grid={g}')
  model = ConvImitator((g, g), heads, c['head_dim'], ch, c['init_spread'])
  schedule = optax.warmup_cosine_decay_schedule(0.0, c['lr'], min(100, c['steps'] // 10),
                                                c['steps'])
  opt = optax.adam(schedule)

  kernels, biases, eval_x = (np.stack(a) for a in zip(
      *[problem(s, g, ch, k, c['eval_examples']) for s in seeds]))
  init = jax.jit(model.init)
  params = [init(jax.random.key(s), eval_x[0, :1])['params'] for s in seeds]
  params = jax.tree.map(lambda *a: jnp.stack(a), *params)
  opt_state = jax.vmap(opt.init)(params)

  def loss(p, x, w, b):
    return relative_error(model.apply({'params': p}, x), reference_conv(x, w, b))

  # The targets and held-out inputs are arguments, not constants XLA would fold at compile time.
  @jax.jit
  def step(params, opt_state, x, kernels, biases):
    def one(p, o, x, w, b):
      value, grads = jax.value_and_grad(loss)(p, x, w, b)
      updates, o = opt.update(grads, o, p)
      return optax.apply_updates(p, updates), o, value
    return jax.vmap(one)(params, opt_state, x, kernels, biases)

  @jax.jit
  def evaluate(params, eval_x, kernels, biases):
    errors = jax.vmap(loss)(params, eval_x, kernels, biases)
    centres, window = jax.vmap(lambda p, x: head_statistics(model, p, x[:16], k))(params,
                                                                                  eval_x)
    return errors, centres, window

  record_at = sorted(set(np.linspace(0, c['steps'], c['records'] + 1).astype(int)))
  history, curve = [], []
  start = last = time.time()
  for i in range(c['steps'] + 1):
    if i in record_at:
      errors, centres, window = evaluate(params, eval_x, kernels, biases)
      now = time.time()
      rate = (i - history[-1]['step']) / (now - last) if history else 0.0
      history.append(dict(step=i, errors=np.asarray(errors), centres=np.asarray(centres)))
      last = now
      log(f'step {i:5d}  held-out relative error {np.mean(errors):.4f} (mean over seeds)  '
          f'{rate:.1f} steps/s')
    if i == c['steps']:
      break
    x = inputs(seeds, i, c['batch_size'], g, ch)
    params, opt_state, value = step(params, opt_state, x, kernels, biases)
    curve.append(value)
  curve = np.asarray(jnp.stack(curve))
  final, window = history[-1], np.asarray(window)
  runs = []
  for s, seed in enumerate(seeds):
    runs.append(dict(seed=int(seed), relative_error=float(final['errors'][s]),
                     covered=covered_offsets(final['centres'][s], k),
                     window_rank=window_rank(window[s]),
                     one_tap_per_head_error=one_tap_per_head_error(kernels[s], biases[s], heads),
                     outside_window=float(1 - window[s].sum(1).min()),
                     centres=final['centres'][s].round(3).tolist(),
                     alpha=np.exp(np.asarray(params['log_alpha'][s])).round(3).tolist()))
  return dict(config=dict(c, heads=heads), runs=runs, history=history, curve=curve,
              seconds=round(time.time() - start, 1))


def mean_std(values) -> list[float]:
  """[mean, std (ddof 1; 0 for one value)]."""
  values = np.asarray(values, np.float64)
  return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]


def summarize(out: dict) -> dict:
  runs = out['runs']
  return dict(config=out['config'], seeds=[r['seed'] for r in runs],
              relative_error=mean_std([r['relative_error'] for r in runs]),
              covered=mean_std([r['covered'] for r in runs]),
              window_rank=mean_std([r['window_rank'] for r in runs]),
              one_tap_per_head_error=mean_std([r['one_tap_per_head_error'] for r in runs]),
              offsets=out['config']['kernel_size'] ** 2, runs=runs,
              history=[dict(step=h['step'], relative_error=h['errors'].tolist(),
                            centres=h['centres'].round(4).tolist()) for h in out['history']],
              seconds=out['seconds'])


def write_markdown(results: dict, path: str):
  """results.md: per seed and mean ± std."""
  c = results['config']
  lines = ['# Heads that learn a convolution', '',
           f'{c["heads"]} heads imitating a {c["kernel_size"]}×{c["kernel_size"]} convolution '
           f'on {c["grid"]}×{c["grid"]}×{c["channels"]} inputs, {c["steps"]} steps of batch '
           f'{c["batch_size"]}, Adam lr {c["lr"]}; error on {c["eval_examples"]} held-out '
           'inputs.', '',
           'Covered: kernel offsets some head\'s attention centre rounds to. Rank: of the '
           'heads\' attention on the K² offsets, A [H, K²] (singular values > 1% of the '
           'largest). Outside: the largest attention mass a head puts outside the window. '
           'One tap per head: the expected error of the best layer whose H heads each hold '
           'one tap (0 when H ≥ K²).', '',
           '| seed | relative error ‖ŷ − y‖²/‖y‖² | offsets covered | rank of A | outside '
           '| α_h (min – max) | one tap per head |', '| --- | --- | --- | --- | --- | --- | --- |']
  n = results['offsets']
  for r in results['runs']:
    lines.append(f'| {r["seed"]} | {r["relative_error"]:.2e} | {r["covered"]} / {n} | '
                 f'{r["window_rank"]} / {n} | {r["outside_window"]:.3f} | '
                 f'{min(r["alpha"]):.2f} – {max(r["alpha"]):.2f} | '
                 f'{r["one_tap_per_head_error"]:.3f} |')
  e, v, a = results['relative_error'], results['covered'], results['window_rank']
  t = results['one_tap_per_head_error']
  lines.append(f'| mean ± std | {e[0]:.2e} ± {e[1]:.2e} | {v[0]:.2f} ± {v[1]:.2f} | '
               f'{a[0]:.2f} ± {a[1]:.2f} | | | {t[0]:.3f} ± {t[1]:.3f} |')
  write_atomically(path, '\n'.join(lines) + '\n')


def plot_centres(results: dict, path: str):
  """One panel per seed: the kernel's offsets (squares) and each head's centre from start
  (hollow circle) to end (dot)."""
  plt = pyplot()
  runs, k = results['runs'], results['config']['kernel_size']
  fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 4.1), squeeze=False)
  track = np.asarray([h['centres'] for h in results['history']])  # [records, seeds, H, 2]
  half, colors = k // 2 + 1.2, plt.get_cmap('tab10')
  for s, (ax, run) in enumerate(zip(axes[0], runs)):
    offsets = kernel_offsets(k, 2)
    ax.scatter(offsets[:, 1], offsets[:, 0], marker='s', s=260, facecolors='none',
               edgecolors='lightgray')
    for h in range(track.shape[2]):
      path_h = track[:, s, h]
      color = colors(h % 10)
      ax.plot(path_h[:, 1], path_h[:, 0], '-', color=color, lw=1)
      ax.plot(*path_h[0, ::-1], 'o', mfc='none', color=color, ms=5)
      ax.plot(*path_h[-1, ::-1], 'o', color=color, ms=6)
      # Half of exp(−α r²)'s mass lies within r = sqrt(ln 2 / α) (Cordonnier et al.'s circles).
      radius = np.sqrt(np.log(2) / run['alpha'][h])
      ax.add_patch(plt.Circle(path_h[-1, ::-1], min(radius, 3), fill=False, color=color,
                              lw=0.6, ls=':'))
    ax.set(xlim=(-half, half), ylim=(half, -half), aspect='equal', xlabel='column offset',
           title=f'seed {run["seed"]}: {run["covered"]}/{k * k} covered, '
                 f'error {run["relative_error"]:.1e}')
    ax.title.set_fontsize(9)
  axes[0, 0].set_ylabel('row offset')
  fig.suptitle('attention centre of each head (start ○ → end ●; dotted: half its positional '
               'mass) on the kernel\'s offsets (□)', fontsize=10)
  save_figure(fig, path)


def plot_loss(out: dict, path: str):
  """Training relative error against step, one line per seed, and the held-out error (mean
  over seeds) at the recorded steps."""
  fig, ax = pyplot().subplots(figsize=(6, 4))
  curve = out['curve']  # [steps, seeds]
  steps = np.arange(1, len(curve) + 1)
  for s, run in enumerate(out['runs']):
    ax.plot(steps, curve[:, s], f'C{s}-', lw=0.6, alpha=0.7,
            label=f'train batch, seed {run["seed"]}')
  held = np.asarray([h['errors'] for h in out['history']])
  ax.plot([h['step'] for h in out['history']], held.mean(1), 'k.', label='held-out (mean)')
  ax.set(yscale='log', xlabel='step', ylabel='‖ŷ − y‖² / ‖y‖²',
         title=f'{out["config"]["heads"]} heads imitating a convolution')
  ax.legend(fontsize=8)
  save_figure(fig, path)


def run(workdir: str, quick: bool = False, seeds: int = 3, heads: int | None = None,
        log=print) -> dict:
  """Trains, writes results.json, results.md and the PNGs into `workdir`, returns results."""
  if seeds < 1:
    raise ValueError(f'seeds={seeds}; it must be a positive integer')
  os.makedirs(workdir, exist_ok=True)
  out = train(list(range(seeds)), heads, log, **(QUICK if quick else {}))
  results = summarize(out)
  results['quick'] = quick
  write_atomically(os.path.join(workdir, 'results.json'), json.dumps(results, indent=1) + '\n')
  write_markdown(results, os.path.join(workdir, 'results.md'))
  plot_centres(results, os.path.join(workdir, 'conv_imitation_centres.png'))
  plot_loss(out, os.path.join(workdir, 'conv_imitation_loss.png'))
  return results


def define_flags():
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_bool('quick', False, f'A smaller, shorter run (checks the machinery): {QUICK}.')
  flags.DEFINE_string('workdir', None, 'Output directory; default '
                      'runs/lesson-conv_imitation[-quick][-Nheads] (N from --heads).')
  flags.DEFINE_integer('seeds', 3, 'Seeds 0 ... N−1, trained together.')
  flags.DEFINE_integer('heads', None, 'Attention heads; default K² = 9.')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks on errors.')


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use [--quick] [--workdir=DIR] [--seeds=N]')
  logging.set_verbosity(logging.WARNING)
  if f.heads is not None and f.heads < 1:
    fail(f'--heads={f.heads}; it must be a positive integer')
  suffix = ('-quick' if f.quick else '') + (f'-{f.heads}heads' if f.heads else '')
  workdir = f.workdir or 'runs/lesson-conv_imitation' + suffix
  try:
    results = run(workdir, f.quick, f.seeds, f.heads, log=functools.partial(print, flush=True))
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  with open(os.path.join(workdir, 'results.md'), encoding='utf-8') as fh:
    print(fh.read())
  print(f'wrote results.json, results.md and 2 PNGs to {workdir} in {results["seconds"]} s',
        flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main), flags_parser=parse_flags)
