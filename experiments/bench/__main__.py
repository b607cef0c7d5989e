"""The benchmark suite: python -m experiments.bench [--quick] [--workdir=DIR] [--sections=...]

Sections (all by default, in this order):
  matmul      the n×n matmul rate in float32 and bfloat16: the peak MFU is measured against
              (the fastest call, measured before and again after the train section)
  train       tx train-step throughput per model (specs.py: ViT at several sizes,
              EncoderDecoder, DecoderLM), float32 and bfloat16, with analytic FLOP/s and MFU
  peer        the same models, shapes, optimizer and batch in PyTorch, eager and
              torch.compile (peer.py), and the ratio tx/peer, tx's step timed again right
              before and after each peer run so that a drifting host speed cannot skew it
  attention   ours against the fused implementation, T = 128 … 8192: time and peak memory
  parallel    pmap against jit on 8 devices (8 simulated CPU devices on a CPU host)
  vectorized  a vmapped sweep of 8 members against one run after another

Models: CPU hosts time specs.CPU_SPECS; GPU hosts specs.GPU_SPECS (ViT-Ti/S/B/16 at 224).
--quick (≤ 10 minutes on a 2-core CPU) times fewer models, lengths and repeats; --tiny
runs everything on toy shapes in about a minute (the end-to-end test). Every number is a
median over repeats after a warm-up, with the device blocked on (timing.py).

Writes WORKDIR/bench.json (every measurement, the environment, the command), WORKDIR/bench.md
(the tables printed), WORKDIR/attention.png and WORKDIR/throughput.png (--out is the older
spelling of --workdir).
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

from experiments.bench import attention_kernels, plots, report, specs, step_time
from experiments.bench.timing import environment

SECTIONS = ('matmul', 'train', 'peer', 'attention', 'parallel', 'vectorized')
SIMULATED_DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(mode: str, backend: str) -> dict:
  """What each mode measures: models, dtypes, matmul sizes, attention lengths, repeats."""
  gpu = backend == 'gpu'
  full = specs.GPU_SPECS if gpu else specs.CPU_SPECS
  common = dict(dtypes=('float32', 'bfloat16'), parallel_spec='vit-digits',
                vectorized_spec=specs.CPU_SPECS[0], members=8, compile_peer=True,
                matmul_sizes=(4096, 8192, 16384) if gpu else (512, 1024, 2048),
                attention_shape=(4, 16, 64) if gpu else (1, 4, 64),  # batch, heads, head dim
                peer_dtype='bfloat16' if gpu else 'float32')  # the dtype of each target
  if mode == 'tiny':
    # The ViT only: the test suite's time budget (tests/test_bench_peer.py tests every
    # kind's peer, and tests/test_bench.py the FLOP count of every kind).
    return dict(common, specs=specs.TINY_SPECS[:1], matmul_sizes=(128, 256), lengths=(64, 128),
                attention_shape=(1, 2, 16), repeats=1, parallel_spec='vit-tiny',
                vectorized_spec=specs.TINY_SPECS[0], members=2, compile_peer=False)
  if mode == 'quick':
    return dict(common, specs=full[:2] + full[3:], lengths=(128, 512, 2048), repeats=3)
  return dict(common, specs=full, lengths=(128, 256, 512, 1024, 2048, 4096, 8192), repeats=5)


def run_module(module: str, *args: str, env: dict | None = None) -> dict:
  """`python -m module *args` in a fresh process; returns the JSON of its last output line."""
  done = subprocess.run([sys.executable, '-m', module, *args], env=env or dict(os.environ),
                        capture_output=True, text=True, cwd=ROOT)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'python -m {module} {" ".join(args)} failed: {last}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def run_parallel(spec_name: str, repeats: int) -> dict:
  """experiments.bench.pmap_vs_jit in a subprocess; on a CPU host with 8 simulated devices."""
  env = dict(os.environ)
  if jax.default_backend() == 'cpu':
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={SIMULATED_DEVICES}').strip()
  return run_module('experiments.bench.pmap_vs_jit', f'--spec={spec_name}', f'--repeats={repeats}',
                    env=env)


def save(results: dict, out: str) -> str:
  """Writes bench.json, bench.md and the plots of what has been measured so far; returns
  the markdown. Called after every section, so that a run stopped part-way keeps its numbers."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'bench.json'), 'w') as f:
    json.dump(results, f, indent=1)
  text = report.markdown(results)
  with open(os.path.join(out, 'bench.md'), 'w') as f:
    f.write(text + '\n')
  plots.draw(results, out)
  return text


def run(mode: str, out: str, sections=SECTIONS, log=print) -> dict:
  """Runs the sections of `mode` ('tiny' | 'quick' | 'full'); writes and returns the results
  (with the markdown report under 'markdown')."""
  start = time.time()
  p = plan(mode, jax.default_backend())
  results = {'mode': mode, 'command': ' '.join(sys.argv), 'environment': environment(),
             'sections': list(sections)}
  timers = {}  # spec name -> its compiled tx step in the peer's dtype, timed again by 'peer'
  if 'matmul' in sections or 'train' in sections:  # MFU needs the matmul rate
    results['matmul'] = _matmul(p, log)
  save(results, out)
  if 'train' in sections:
    results['train'] = _train(p, 'peer' in sections, timers, log)
    # Measured again after the models: the faster of the two is the rate MFU divides by.
    results['matmul'] = [step_time.best_rate(before, after) for before, after in
                         zip(results['matmul'], _matmul(p, log, 'again'))]
  save(results, out)
  if 'peer' in sections:
    results['peer'] = _peer(p, timers, log)
  save(results, out)
  if 'attention' in sections:
    batch, heads, head_dim = p['attention_shape']
    dtype = jnp.bfloat16 if jax.default_backend() == 'gpu' else jnp.float32
    results['attention'] = attention_kernels.bench(
        p['lengths'], batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
        repeats=p['repeats'], log=log)
  save(results, out)
  if 'parallel' in sections:
    results['parallel'] = run_parallel(p['parallel_spec'], p['repeats'])
    log(f'parallel: pmap {results["parallel"]["pmap"]["median_s"] * 1e3:.1f} ms, '
        f'jit {results["parallel"]["jit"]["median_s"] * 1e3:.1f} ms per step')
  save(results, out)
  if 'vectorized' in sections:
    results['vectorized'] = dict(step_time.time_vectorized(p['vectorized_spec'], p['members'],
                                                           repeats=p['repeats']),
                                 model=p['vectorized_spec'].name)
    log(f'vectorized: {results["vectorized"]["speedup"]:.2f}x sequential')
  results['wall_s'] = round(time.time() - start, 1)
  results['markdown'] = save(results, out)
  return results


def _matmul(p: dict, log, when: str = '') -> list[dict]:
  rates = [step_time.matmul_rate(d, p['matmul_sizes'], p['repeats'] + 2) for d in p['dtypes']]
  for m in rates:
    log(f'matmul {m["dtype"]} n={m["n"]}{" " + when if when else ""}: '
        f'{m["flop_per_s"] / 1e9:.1f} GFLOP/s')
  return rates


def _train(p: dict, keep_for_peer: bool, timers: dict, log) -> list[dict]:
  """The tx train step of every model and dtype; the peer's dtype's timers are kept."""
  rows = []
  for spec in p['specs']:
    for dtype in p['dtypes']:
      timer = step_time.step_timer(spec, dtype)
      r = timer(p['repeats'])
      if dtype == p['peer_dtype'] and keep_for_peer:
        timers[spec.name] = timer
      rows.append(dict(r, model=spec.name, dtype=dtype, batch=spec.batch))
      log(f'tx {spec.name} {dtype}: {r["median_s"] * 1e3:.1f} ms/step, '
          f'{r["examples_per_s"]:.1f} examples/s')
  return rows


def _peer(p: dict, timers: dict, log) -> dict:
  """The PyTorch peer of each model, each in its own process (see peer.main; this one never
  imports torch), with tx's step timed again right before and right after it: the ratio
  compares timings from the same minutes, not the train section's, which a host's drifting
  speed (tens of percent over minutes on a shared 2-core VM) can leave far behind."""
  if not importlib.util.find_spec('torch'):
    return {'unavailable': 'torch is not installed'}
  # JAX (imported there through specs) stays on the CPU: on a GPU its first op would
  # preallocate most of the device's memory under torch.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = {'rows': [], 'dtype': p['peer_dtype']}
  for spec in p['specs']:
    runs = [('tx', False), ('tx', True)] if p['compile_peer'] else [('tx', False)]
    if jax.default_backend() == 'gpu' and spec.kind == 'ViT':
      runs.append(('timm', True))  # timm's VisionTransformer under torch.compile
    for impl, compiled in runs:
      row = dict(model=spec.name, dtype=p['peer_dtype'], compiled=compiled, impl=impl)
      if spec.name not in timers:
        timers[spec.name] = step_time.step_timer(spec, p['peer_dtype'])
      tx_before = timers[spec.name](p['repeats'])
      try:  # a failed peer is reported, not fatal: tx's numbers stand on their own.
        row.update(run_module('experiments.bench.peer', f'--spec={spec.name}',
                              f'--compile={compiled}', f'--impl={impl}',
                              f'--dtype={p["peer_dtype"]}', f'--repeats={p["repeats"]}',
                              '--warmup=2', env=env))
      except RuntimeError as e:
        row['error'] = str(e)
        log(f'torch {impl} {spec.name} failed: {e}')
      row['tx_adjacent'] = step_time.around(tx_before, timers[spec.name](p['repeats']),
                                            spec.batch)
      if 'error' not in row:
        log(f'torch {impl}{" compile" if compiled else " eager"} {spec.name}: '
            f'{row["step_s_median"] * 1e3:.1f} ms/step (tx around it: '
            f'{row["tx_adjacent"]["median_s"] * 1e3:.1f} ms/step)')
      out['rows'].append(row)
  return out


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
  written = sorted(n for n in os.listdir(f.workdir) if n.startswith(('bench.', 'attention.',
                                                                      'throughput.')))
  print(f'wrote {", ".join(written)} in {f.workdir} ({results["wall_s"]:.0f} s)')


if __name__ == '__main__':
  flags.DEFINE_bool('quick', False, 'Fewer models, lengths and repeats: ≤ 10 minutes on 2 CPU cores.')
  flags.DEFINE_bool('tiny', False, 'Toy shapes, one repeat: the end-to-end test (about a minute).')
  flags.DEFINE_string('workdir', 'runs/bench', 'Directory for bench.json, bench.md and the plots.')
  flags.DEFINE_alias('out', 'workdir')
  flags.DEFINE_string('sections', ','.join(SECTIONS), 'Comma-separated sections to run.')
  app.run(main)
