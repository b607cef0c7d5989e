"""The whole GPU measurement in one command, sized for one call of at most 8 minutes on one
H100 or H200 (an estimate from the step and compile times of 2026-11-22; not yet timed whole):

  python -m experiments.bench.gpu --workdir=runs/bench-gpu     # on the GPU machine
  python -m experiments.bench.gpu --tiny --workdir=/tmp/g      # the same parts, toy sizes (CPU)

Parts, in order; gpu.json and gpu.md are rewritten after each, so a run stopped by a time
limit keeps what it measured, and a part (or tx row) that would start after --budget_s is
skipped:
  matmul     the bfloat16 matmul rate, the denominator of MFU (always measured);
  variants   ViT-B/16 at 224, bfloat16, batch 128: tx's train step as it is and with each
             change on top of the last: pad_tokens_to=8 (cuDNN attention for 197 tokens),
             optimizer.mu_dtype=bfloat16 (big_vision's Adam), then each XLA flag of FLAGS;
  vits       ViT-Ti/16 and ViT-S/16 (batch 256), as they are and with the first two changes;
  peers      the same ViT-B/16 step in PyTorch: eager, torch.compile, and timm's
             VisionTransformer under torch.compile (experiments/bench/peer.py);
  sweep      8 members of the small ViT of configs/vit.py vmapped against one after another;
  attention  tx's einsum attention against the fused kernel, T = 1024, 2048, 4096;
  profile    a jax.profiler trace of 5 ViT-B/16 steps (pad_tokens_to=8, mu_dtype=bfloat16),
             summed by op kind and model part (experiments/bench/profile.py); the trace is
             kept in workdir/profile/trace;
  remat      that ViT-B/16 step with remat=True under each policy of REMAT_RUNS: step time
             and XLA's peak memory.
Each tx and peer timing runs in a process of its own (a fresh JAX, XLA_FLAGS set before it
starts, no memory held by another), as its median over `repeats` steps after 2 warm-up steps.

  MFU = flops.train_step(spec) / step time / matmul rate   (197 tokens counted, not 200)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from experiments.bench import attention_kernels, profile, specs, step_time
from experiments.bench.__main__ import run_module
from experiments.bench.timing import environment
from experiments.cli import exit_on_interrupt
from experiments.metrics import write_atomically

# (name, pad_tokens_to, mu_dtype, XLA flags): each row adds to the row that precedes it.
FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',
         '--xla_gpu_enable_triton_gemm=false')
VARIANTS = (('as it is', 1, '', ''),
            ('pad_tokens_to=8', 8, '', ''),
            ('+ mu_dtype=bfloat16', 8, 'bfloat16', ''),
            *((f'+ {flag[2:]}', 8, 'bfloat16', flag) for flag in FLAGS))
REMAT_RUNS = ('nothing', 'dots_no_batch')  # model.remat_policy: recompute all; keep projections


def plan(tiny: bool) -> dict:
  """Sizes: the GPU's, or toy ones that run the same code on a CPU in seconds."""
  if tiny:
    vit = specs.by_name('vit-tiny')
    return dict(main=vit, others=(), peer_runs=(('tx', False),), sweep=vit, members=2,
                lengths=(64, 128), attention=(1, 2, 16), dtype='float32', repeats=2,
                matmul_sizes=(128, 256), variants=VARIANTS[:2], tuned=VARIANTS[1],
                profile_steps=2, remat_runs=REMAT_RUNS[:1])
  by = specs.by_name
  return dict(main=by('vit-b16-224'), others=(by('vit-ti16-224'), by('vit-s16-224')),
              peer_runs=(('tx', False), ('tx', True), ('timm', True)), sweep=by('vit-digits'),
              members=8, lengths=(1024, 2048, 4096), attention=(4, 16, 64), dtype='bfloat16',
              repeats=10, matmul_sizes=(4096, 8192, 16384), variants=VARIANTS, tuned=VARIANTS[2],
              profile_steps=5, remat_runs=REMAT_RUNS)


def _tx_row(p, spec, variant, env, rate, remat: str = '') -> dict:
  name, pad, mu_dtype, flag = variant
  env = dict(env, XLA_FLAGS=f'{env.get("XLA_FLAGS", "")} {flag}'.strip())
  row = dict(model=spec.name, variant=name, pad_tokens_to=pad, mu_dtype=mu_dtype,
             xla_flags=flag, remat=remat, batch=spec.batch, dtype=p['dtype'])
  try:
    row.update(run_module('experiments.bench.step_time', f'--spec={spec.name}', f'--pad={pad}',
                          f'--mu_dtype={mu_dtype}', f'--dtype={p["dtype"]}', f'--remat={remat}',
                          f'--repeats={p["repeats"]}', env=env))
    row['mfu'] = row['flop_per_s'] / rate
  except RuntimeError as e:  # a flag this XLA does not know, say: reported, not fatal.
    row['error'] = str(e)
  return row


def run(out: str, tiny: bool = False, budget_s: float = 450.0, log=print) -> dict:
  """Runs the parts of the module docstring; writes gpu.json and gpu.md after each; returns
  the results."""
  start = time.time()
  p = plan(tiny)
  results = {'command': ' '.join(sys.argv), 'environment': environment(), 'tiny': tiny,
             'budget_s': budget_s, 'skipped': []}
  env = dict(os.environ)

  def part(name, measure):
    if time.time() - start > budget_s:
      results['skipped'].append(name)
      log(f'{name}: skipped, past the {budget_s:.0f} s budget')
    else:
      results[name] = measure()
    save(results, out)

  results['matmul'] = step_time.matmul_rate(p['dtype'], p['matmul_sizes'], p['repeats'])
  rate = results['matmul']['flop_per_s']
  log(f'matmul {p["dtype"]}: {rate / 1e12:.2f} TFLOP/s')

  def rows(spec_list, variants, remats=('',)):
    out_rows = []
    for spec in spec_list:
      for v in variants:
        for remat in remats:
          name = f'{v[0]}, remat={remat}' if remat else v[0]
          if time.time() - start > budget_s:
            results['skipped'].append(f'{spec.name} {name}')
            continue
          out_rows.append(_tx_row(p, spec, (name, *v[1:]), env, rate, remat))
          log(_row_line(out_rows[-1]))
    return out_rows

  part('variants', lambda: rows([p['main']], p['variants']))
  part('vits', lambda: rows(p['others'], p['variants'][:3]))
  part('peers', lambda: _peers(p, log))
  part('sweep', lambda: dict(step_time.time_vectorized(p['sweep'], p['members'],
                                                       repeats=p['repeats']),
                             model=p['sweep'].name))
  batch, heads, head_dim = p['attention']
  part('attention', lambda: attention_kernels.bench(
      p['lengths'], batch=batch, heads=heads, head_dim=head_dim, dtype=jnp.dtype(p['dtype']),
      repeats=p['repeats'], log=log))
  part('profile', lambda: _profile(p, out, env))
  part('remat', lambda: rows([p['main']], [p['tuned']], p['remat_runs']))
  results['wall_s'] = round(time.time() - start, 1)
  log(save(results, out))
  return results


def _profile(p, out: str, env: dict) -> dict:
  """experiments.bench.profile of the main model as the plan's `tuned` variant sets it up
  (padding and Adam's moment dtype; no XLA flag), in its own process."""
  _, pad, mu_dtype, _ = p['tuned']
  try:
    return run_module('experiments.bench.profile', f'--spec={p["main"].name}',
                      f'--dtype={p["dtype"]}', f'--pad={pad}', f'--mu_dtype={mu_dtype}',
                      f'--steps={p["profile_steps"]}', '--print_json',
                      f'--workdir={os.path.abspath(os.path.join(out, "profile"))}', env=env)
  except RuntimeError as e:
    return {'error': str(e)}


def _peers(p, log) -> list[dict]:
  if not importlib.util.find_spec('torch'):
    return [{'error': 'torch is not installed'}]
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # the peer's process leaves the GPU to torch.
  rows = []
  for impl, compiled in p['peer_runs']:
    row = dict(model=p['main'].name, impl=impl, compiled=compiled)
    try:
      row.update(run_module('experiments.bench.peer', f'--spec={p["main"].name}',
                            f'--compile={compiled}', f'--impl={impl}', f'--dtype={p["dtype"]}',
                            f'--repeats={p["repeats"]}', '--warmup=3', env=env))
    except RuntimeError as e:
      row['error'] = str(e)
    rows.append(row)
    log(f'peer {impl}{" compiled" if compiled else ""}: '
        + (row.get('error') or f'{row["step_s_median"] * 1e3:.1f} ms/step'))
  return rows


def _row_line(r: dict) -> str:
  if 'error' in r:
    return f'tx {r["model"]} {r["variant"]}: {r["error"]}'
  return (f'tx {r["model"]} {r["variant"]}: {r["median_s"] * 1e3:.1f} ms/step, '
          f'{r["examples_per_s"]:.0f} examples/s, MFU {r["mfu"]:.1%}')


def markdown(results: dict) -> str:
  """The tables of what has been measured so far."""
  lines = [f'# GPU benchmark ({results["environment"].get("device", "")})', '',
           f'`{results["command"]}`', '']
  if 'matmul' in results:
    m = results['matmul']
    lines += [f'matmul {m["dtype"]}: {m["flop_per_s"] / 1e12:.1f} TFLOP/s at n = {m["n"]}', '']
  tx_rows = results.get('variants', []) + results.get('vits', []) + results.get('remat', [])
  if tx_rows:
    lines += ['| model | variant | ms/step | examples/s | MFU | peak GiB | compile s |',
              '|---|---|---|---|---|---|---|']
    for r in tx_rows:
      if 'error' in r:
        lines.append(f'| {r["model"]} | {r["variant"]} | failed: {r["error"]} | | | | |')
      else:
        peak = f'{r["peak_bytes"] / 2**30:.2f}' if r.get('peak_bytes') else ''
        lines.append(f'| {r["model"]} | {r["variant"]} | {r["median_s"] * 1e3:.1f} | '
                     f'{r["examples_per_s"]:.0f} | {r["mfu"]:.1%} | {peak} | '
                     f'{r["compile_s"]:.1f} |')
    lines.append('')
  peers = [r for r in results.get('peers', []) if 'error' not in r]
  best = min((r['median_s'] for r in results.get('variants', []) if 'error' not in r),
             default=None)
  if peers and best:
    lines += ['| peer | ms/step | peer / fastest tx variant (> 1: tx faster) |', '|---|---|---|']
    for r in peers:
      name = ('timm' if r['impl'] == 'timm' else 'PyTorch') + (
          ' compile' if r['compiled'] else ' eager')
      lines.append(f'| {name} | {r["step_s_median"] * 1e3:.1f} | '
                   f'{r["step_s_median"] / best:.2f}x |')
    lines.append('')
  if 'sweep' in results:
    s = results['sweep']
    lines += [f'sweep, {s["members"]} members of {s["model"]}: vectorized '
              f'{s["vectorized_member_steps_per_s"]:.1f} member-steps/s, sequential '
              f'{s["sequential_member_steps_per_s"]:.1f}: {s["speedup"]:.2f}x', '']
  if 'profile' in results:
    lines += [f'profile failed: {results["profile"]["error"]}' if 'error' in results['profile']
              else profile.markdown(results['profile']), '']
  if 'attention' in results:
    lines += ['| T | implementation | ms | peak MiB |', '|---|---|---|---|']
    lines += [f'| {r["length"]} | {r["implementation"]} | {r["median_s"] * 1e3:.2f} | '
              f'{(r["peak_bytes"] or 0) / 2**20:.0f} |' for r in results['attention']]
    lines.append('')
  if results['skipped']:
    lines.append(f'Skipped (past the budget): {", ".join(results["skipped"])}.')
  return '\n'.join(lines)


def save(results: dict, out: str) -> str:
  os.makedirs(out, exist_ok=True)
  write_atomically(os.path.join(out, 'gpu.json'), json.dumps(results, indent=1))
  text = markdown(results)
  write_atomically(os.path.join(out, 'gpu.md'), text + '\n')
  return text


def main(argv):
  del argv
  f = flags.FLAGS
  # Several processes share the GPU in turn: none may take 75% of its memory up front.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  jax.devices()
  run(f.workdir, f.tiny, f.budget_s)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', 'runs/bench-gpu', 'Where gpu.json and gpu.md go.')
  flags.DEFINE_bool('tiny', False, 'Toy sizes: the same parts on a CPU in seconds (tested).')
  flags.DEFINE_float('budget_s', 450.0, 'Parts that would start after this many seconds are '
                     'skipped (a call on the GPU machine is limited to 8-10 minutes).')
  app.run(exit_on_interrupt(main, lambda: 'the parts measured so far are in '
                            f'{flags.FLAGS.workdir}/gpu.json'))
