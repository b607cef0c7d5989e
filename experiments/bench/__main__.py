"""Benchmarks: python -m experiments.bench [--quick|--tiny] [--workdir=DIR] [--sections=...]

Sections (all by default, in this order; docs/performance.md has more, and the results):
  matmul      the n×n matmul rate in float32 and bfloat16 that MFU divides by (step_time.py)
  train       tx train-step throughput per model of specs.py, float32 and bfloat16, and MFU
  peer        the same steps in PyTorch, eager and torch.compile (peer.py), and tx/peer
  attention   ours against the fused implementation, T = 128 … 8192: time and peak memory
  parallel    pmap against jit on 8 devices (8 simulated CPU devices on a CPU host)
  vectorized  a vmapped sweep of 8 members against one run after another
  data        images/s of the image pipeline (JPEG decode + augmentation, one process and
              through grain's workers), and the workers the ViT step rates need (data_rate.py)

CPU hosts time specs.CPU_SPECS, GPU hosts specs.GPU_SPECS. After every section it writes
bench.json, bench.md, attention.png and throughput.png into --workdir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench import attention_kernels, data_rate, plots, report, specs, step_time
from experiments.bench.timing import environment
from experiments.cli import exit_on_interrupt
from experiments.metrics import write_atomically

SECTIONS = ('matmul', 'train', 'peer', 'attention', 'parallel', 'vectorized', 'data')
SIMULATED_DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(mode: str, backend: str) -> dict:
  """What each mode measures: models, dtypes, matmul sizes, attention lengths, repeats, and
  the data section's images (data_rate.bench's arguments)."""
  gpu = backend == 'gpu'
  full = specs.GPU_SPECS if gpu else specs.CPU_SPECS
  common = dict(dtypes=('float32', 'bfloat16'), parallel_spec='vit-digits',
                vectorized_spec=specs.CPU_SPECS[0], members=8, compile_peer=True,
                matmul_sizes=(4096, 8192, 16384) if gpu else (512, 1024, 2048),
                attention_shape=(4, 16, 64) if gpu else (1, 4, 64),  # batch, heads, head dim
                peer_dtype='bfloat16' if gpu else 'float32',  # the dtype of each target
                # ImageNet-sized JPEGs to 224, the ViT-B/16 input; 64 files, read again and again
                data=dict(count=64, width=500, height=375, size=224, batch=32, repeats=5,
                          batches=16, workers=(1, 2)))
  if mode == 'tiny':
    # The ViT only: the test suite's time budget (tests/test_bench_peer.py tests every
    # kind's peer, and tests/test_bench.py the FLOP count of every kind).
    return dict(common, specs=specs.TINY_SPECS[:1], matmul_sizes=(128, 256), lengths=(64, 128),
                attention_shape=(1, 2, 16), repeats=1, parallel_spec='vit-tiny',
                vectorized_spec=specs.TINY_SPECS[0], members=2, compile_peer=False,
                # One worker only: its start-up (~2 s of imports) is most of the section's time.
                data=dict(count=8, width=80, height=60, size=32, batch=8, repeats=2, batches=4,
                          workers=(1,)))
  if mode == 'quick':
    return dict(common, specs=full[:2] + full[3:], lengths=(128, 512, 2048), repeats=3,
                data=dict(common['data'], repeats=3, batches=8))
  return dict(common, specs=full, lengths=(128, 256, 512, 1024, 2048, 4096, 8192), repeats=5)


def run_module(module: str, *args: str, env: dict) -> dict:
  """`python -m module *args` in a fresh process; returns the JSON of its last output line."""
  done = subprocess.run([sys.executable, '-m', module, *args], env=env, capture_output=True,
                        text=True, cwd=ROOT)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'python -m {module} {" ".join(args)} failed: {last}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def save(results: dict, out: str) -> str:
  """Writes bench.json, bench.md and the plots of what has been measured so far; returns
  the markdown. Called after every section, so that a run stopped part-way keeps its numbers."""
  os.makedirs(out, exist_ok=True)
  write_atomically(os.path.join(out, 'bench.json'), json.dumps(results, indent=1))
  text = report.markdown(results)
  write_atomically(os.path.join(out, 'bench.md'), text + '\n')
  plots.draw(results, out)
  return text


def run(mode: str, out: str, sections=SECTIONS, log=print) -> dict:
  """Runs the sections of `mode` ('tiny' | 'quick' | 'full'); writes and returns the results
  (with the markdown report under 'markdown')."""
  start = time.time()
  p = plan(mode, jax.default_backend())
  results = {'mode': mode, 'command': ' '.join(sys.argv), 'environment': environment(),
             'sections': list(sections)}
  # spec name -> its compiled tx step in the peer's dtype, which 'peer' times again
  timers = {} if 'peer' in sections else None
  measure = dict(matmul=_matmul, train=_train, peer=_peer, attention=_attention,
                 parallel=_parallel, vectorized=_vectorized,
                 data=lambda p, timers, log: _data(p, results.get('train'), log))
  for name in SECTIONS:
    if name not in sections and not (name == 'matmul' and 'train' in sections):  # MFU needs it
      continue
    results[name] = measure[name](p, timers, log)
    if name == 'train':
      # Measured again after the models: the faster of the two is the rate MFU divides by.
      results['matmul'] = [step_time.best_rate(before, after) for before, after in
                           zip(results['matmul'], _matmul(p, timers, log, 'again'))]
    save(results, out)
  results['wall_s'] = round(time.time() - start, 1)
  results['markdown'] = save(results, out)
  return results


def _matmul(p: dict, timers, log, when: str = '') -> list[dict]:
  rates = [step_time.matmul_rate(d, p['matmul_sizes'], p['repeats'] + 2) for d in p['dtypes']]
  for m in rates:
    log(f'matmul {m["dtype"]} n={m["n"]}{" " + when if when else ""}: '
        f'{m["flop_per_s"] / 1e9:.1f} GFLOP/s')
  return rates


def _train(p: dict, timers: dict | None, log) -> list[dict]:
  """The tx train step of every model and dtype; the peer's dtype's timers are kept in
  `timers` (unless None)."""
  rows = []
  for spec in p['specs']:
    for dtype in p['dtypes']:
      timer = step_time.step_timer(spec, dtype)
      r = timer(p['repeats'])
      if dtype == p['peer_dtype'] and timers is not None:
        timers[spec.name] = timer
      rows.append(dict(r, model=spec.name, dtype=dtype, batch=spec.batch))
      log(f'tx {spec.name} {dtype}: {r["median_s"] * 1e3:.1f} ms/step, '
          f'{r["examples_per_s"]:.1f} examples/s')
  return rows


def _peer(p: dict, timers: dict, log) -> dict:
  """The PyTorch peer of each model in its own process (peer.main says why), with tx's step
  timed again right before and right after it, so that tx/peer compares the same minutes: a
  shared host's speed drifts by tens of percent over the minutes since the train section."""
  if not importlib.util.find_spec('torch'):
    return {'unavailable': 'torch is not installed'}
  # JAX (imported there through specs) stays on the CPU: on a GPU its first op would
  # preallocate most of the device's memory under torch.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = {'rows': [], 'dtype': p['peer_dtype']}
  for spec in p['specs']:
    timer = timers.get(spec.name) or step_time.step_timer(spec, p['peer_dtype'])
    runs = [('tx', False), ('tx', True)] if p['compile_peer'] else [('tx', False)]
    if jax.default_backend() == 'gpu' and spec.kind == 'ViT':
      runs.append(('timm', True))  # timm's VisionTransformer under torch.compile
    for impl, compiled in runs:
      row = dict(model=spec.name, dtype=p['peer_dtype'], compiled=compiled, impl=impl)
      tx_before = timer(p['repeats'])
      try:  # a failed peer is reported, not fatal: tx's numbers stand on their own.
        row.update(run_module('experiments.bench.peer', f'--spec={spec.name}',
                              f'--compile={compiled}', f'--impl={impl}',
                              f'--dtype={p["peer_dtype"]}', f'--repeats={p["repeats"]}',
                              '--warmup=2', env=env))
      except RuntimeError as e:
        row['error'] = str(e)
        log(f'torch {impl} {spec.name} failed: {e}')
      row['tx_adjacent'] = step_time.around(tx_before, timer(p['repeats']), spec.batch)
      if 'error' not in row:
        log(f'torch {impl}{" compile" if compiled else " eager"} {spec.name}: '
            f'{row["step_s_median"] * 1e3:.1f} ms/step (tx around it: '
            f'{row["tx_adjacent"]["median_s"] * 1e3:.1f} ms/step)')
      out['rows'].append(row)
  return out


def _attention(p: dict, timers, log) -> list[dict]:
  batch, heads, head_dim = p['attention_shape']
  dtype = jnp.bfloat16 if jax.default_backend() == 'gpu' else jnp.float32
  return attention_kernels.bench(p['lengths'], batch=batch, heads=heads, head_dim=head_dim,
                                 dtype=dtype, repeats=p['repeats'], log=log)


def _parallel(p: dict, timers, log) -> dict:
  """experiments.bench.pmap_vs_jit in a subprocess, with 8 simulated devices on a CPU host."""
  env = dict(os.environ)
  if jax.default_backend() == 'cpu':
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={SIMULATED_DEVICES}').strip()
  r = run_module('experiments.bench.pmap_vs_jit', f'--spec={p["parallel_spec"]}',
                 f'--repeats={p["repeats"]}', env=env)
  log(f'parallel: pmap {r["pmap"]["median_s"] * 1e3:.1f} ms, '
      f'jit {r["jit"]["median_s"] * 1e3:.1f} ms per step')
  return r


def _vectorized(p: dict, timers, log) -> dict:
  spec = p['vectorized_spec']
  r = dict(step_time.time_vectorized(spec, p['members'], repeats=p['repeats']), model=spec.name)
  log(f'vectorized: {r["speedup"]:.2f}x sequential')
  return r


def _data(p: dict, train_rows, log) -> dict:
  """The image pipeline's images/s, and the workers needed by the step rate of each ViT row
  of this run's train section (if it ran) and of ViT-B/16 on an H100."""
  return data_rate.bench(**p['data'], train_rows=train_rows, log=log)


def main(argv):
  del argv
  # On a GPU the PyTorch peer's processes share the device with this one: JAX must not take
  # 75% of its memory up front (read when JAX first touches the device, which is below).
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  f = flags.FLAGS
  sections = tuple(s for s in f.sections.split(',') if s)
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown or (f.quick and f.tiny):
    raise app.UsageError(f'--sections={f.sections!r}; allowed: {", ".join(SECTIONS)}'
                         if unknown else '--quick and --tiny exclude each other')
  results = run('tiny' if f.tiny else 'quick' if f.quick else 'full', f.workdir, sections)
  print(results['markdown'])
  written = sorted(n for n in os.listdir(f.workdir)
                   if n.startswith(('bench.', 'attention.', 'throughput.')))
  print(f'wrote {", ".join(written)} in {f.workdir} ({results["wall_s"]:.0f} s)')


if __name__ == '__main__':
  flags.DEFINE_bool('quick', False, 'Fewer models, lengths and repeats: ≤ 10 minutes on 2 CPU cores.')
  flags.DEFINE_bool('tiny', False, 'Toy shapes, one repeat: the end-to-end test (about a minute).')
  flags.DEFINE_string('workdir', 'runs/bench', 'Directory for bench.json, bench.md and the plots.')
  flags.DEFINE_alias('out', 'workdir')
  flags.DEFINE_string('sections', ','.join(SECTIONS), 'Comma-separated sections to run.')
  app.run(exit_on_interrupt(main, lambda: 'the sections measured so far are in '
                            f'{flags.FLAGS.workdir}/bench.json'))
