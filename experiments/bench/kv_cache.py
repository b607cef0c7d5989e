"""Per-token cost of KV-cache decoding against recomputing the full forward pass at every step.

  python -m experiments.bench.kv_cache [--lengths=64,256,1024] [--batch=1] [--repeats=3] [--workdir=DIR]

The model is configs/lm.py's DecoderLM (2 layers, d_model 128, 4 heads, rotary, vocabulary
96) with random weights: the cost does not depend on what was learned. Each length L generates
L − 1 tokens greedily after a 1-token prompt, with no <eos>, so every run does the same work.
Both paths are one compiled lax.while_loop (tx.generate); the recompute path runs the model on
the whole preallocated buffer at each step (static shapes), as a fixed-shape program must. The
first call compiles and is not timed; the median of `repeats` timed calls is reported. Writes
a markdown table to stdout and kv_cache.json to --workdir (--out: the older spelling).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

import tx
from experiments.bench.timing import environment, measure
from experiments.cli import exit_on_interrupt
from experiments.metrics import write_atomically


def time_generation(model, params, prompt, length: int, use_cache: bool, repeats: int) -> dict:
  """Compile once, then the median wall time of `repeats` blocked calls."""
  run = lambda: tx.generate(model, params, prompt, max_new_tokens=length - prompt.shape[1],
                            use_cache=use_cache).tokens
  t = measure(run, repeats=repeats)
  return dict(t, ms_per_token=1e3 * t['median_s'] / (length - 1))


def bench(lengths, batch: int, repeats: int) -> list[dict]:
  rows = []
  for length in lengths:
    model = tx.DecoderLM(vocab_size=96, num_layers=2, d_model=128, num_heads=4, d_ff=512,
                         num_positions=length, posemb='rope', norm='pre', activation='gelu')
    prompt = jnp.ones((batch, 1), jnp.int32)
    params = model.init(jax.random.key(0), jnp.ones((1, length), jnp.int32))['params']
    cached = time_generation(model, params, prompt, length, True, repeats)
    recomputed = time_generation(model, params, prompt, length, False, repeats)
    rows.append({'length': length, 'batch': batch, 'cached': cached, 'recompute': recomputed,
                 'speedup': recomputed['ms_per_token'] / cached['ms_per_token']})
    print(f'L={length}: cached {cached["ms_per_token"]:.3f} ms/token, recompute '
          f'{recomputed["ms_per_token"]:.3f} ms/token, {rows[-1]["speedup"]:.1f}x', flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ['| length | batch | cached ms/token | recompute ms/token | speedup |',
           '|---|---|---|---|---|']
  lines += [f'| {r["length"]} | {r["batch"]} | {r["cached"]["ms_per_token"]:.3f} | '
            f'{r["recompute"]["ms_per_token"]:.3f} | {r["speedup"]:.1f}x |' for r in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  lengths = [int(x) for x in f.lengths.split(',')]
  if any(n < 2 for n in lengths) or f.batch < 1 or f.repeats < 1:
    raise app.UsageError('--lengths must be >= 2, --batch and --repeats >= 1')
  rows = bench(lengths, f.batch, f.repeats)
  print(markdown(rows))
  os.makedirs(f.workdir, exist_ok=True)
  path = os.path.join(f.workdir, 'kv_cache.json')
  write_atomically(path, json.dumps({'environment': environment(), 'rows': rows}, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  flags.DEFINE_string('lengths', '64,256,1024', 'Sequence lengths, comma-separated.')
  flags.DEFINE_integer('batch', 1, 'Sequences decoded together.')
  flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement (median reported).')
  flags.DEFINE_string('workdir', 'runs/bench', 'Output directory for kv_cache.json.')
  flags.DEFINE_alias('out', 'workdir')
  app.run(exit_on_interrupt(main, 'nothing was written'))
