"""Train-step throughput of tx models and the matmul rate that MFU is measured against.

The step is the trainer's own (`experiments.steps.train_step`: forward, backward,
global-norm clipping, AdamW with decay on matrices, the metrics it logs) on one device,
under `jax.jit` with the state donated, as `experiments.run` runs it. The batch is placed
on the device once, as the PyTorch peer's is.

  achieved FLOP/s = flops.train_step(spec) / median step time
  MFU             = achieved FLOP/s / matmul FLOP/s
  matmul FLOP/s   = max over n of 2·n³ / the fastest timed n×n by n×n product, same device
                    and dtype, measured before and after the models (the faster kept)

  python -m experiments.bench.step_time --spec=NAME [--dtype=...] [--pad=N] [--mu_dtype=...]
      [--remat=POLICY]

times one spec's step in a process of its own and prints it as one JSON line: how
experiments.bench.gpu and experiments.bench.xla_flags time a variant with its own XLA flags.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import optax

from configs import common
from experiments import data as data_lib
from experiments import steps
from experiments.optimizer import make_optimizer
from experiments.bench import flops, specs
from experiments.bench.timing import measure, peak_bytes
from experiments.runners import VmapRunner
from experiments.tasks import DTYPES


def run_of(spec: specs.Spec, model, mu_dtype: str = '') -> steps.Run:
  """The trainer's Run for `model` on spec's task: configs/common.py's AdamW at a constant
  learning rate (its first moment in `mu_dtype`, '' = float32), and one synthetic example to
  initialise from."""
  config = common.training()
  config.optimizer.mu_dtype = mu_dtype
  schedule = optax.constant_schedule(config.optimizer.lr)
  sample = specs.synthetic_batch(dataclasses.replace(spec, batch=1))
  dataset = data_lib.Dataset(sample, {}, {'bos_id': data_lib.BOS, 'pad_id': data_lib.PAD})
  return steps.Run(config, dataset, spec.task, model, 1, schedule, make_optimizer(config, schedule))


def stepper(step, state, batch):
  """run() -> (state, metrics): one call of step(state, batch), each call's state fed to the
  next (so a donated state is never reused)."""
  carry = {'state': state}

  def run():
    carry['state'], metrics = step(carry['state'], batch)
    return carry['state'], metrics

  return run


def compiled_step(spec: specs.Spec, dtype: str = 'float32', mu_dtype: str = ''):
  """(the compiled, state-donating train step of `spec`, run() -> one more step of it, the
  seconds that tracing and compiling took)."""
  run = run_of(spec, specs.tx_model(spec, DTYPES[dtype]), mu_dtype)
  state, batch = steps.init_state(run, 0), jax.device_put(specs.synthetic_batch(spec))
  start = time.perf_counter()
  compiled = jax.jit(steps.step_functions(run)[0], donate_argnums=(0,)).lower(
      state, batch).compile()
  return compiled, stepper(compiled, state, batch), time.perf_counter() - start


def spec_of(name: str, pad: int = 1, remat: str = '') -> specs.Spec:
  """The spec called `name`, a ViT's tokens padded to a multiple of pad, remat a policy."""
  return dataclasses.replace(specs.by_name(name), pad_tokens_to=pad, remat=remat)


def step_timer(spec: specs.Spec, dtype: str = 'float32', mu_dtype: str = ''):
  """Compiles the tx train step of `spec` once and returns timer(repeats) -> dict: median
  seconds per step after 2 warm-up steps, examples/s, achieved FLOP/s, the seconds that
  tracing and compiling took, and the step's peak memory (`timing.peak_bytes`: XLA's buffer
  assignment of the state, the batch and the step's temporaries; None where the backend does
  not say). Each call times more steps of the same run, so a model is timed again next to
  its peer without compiling."""
  compiled, next_step, compile_s = compiled_step(spec, dtype, mu_dtype)
  peak = peak_bytes(compiled)
  flop = flops.train_step(spec)

  def timer(repeats: int) -> dict:
    t = measure(next_step, repeats=repeats, warmup=2)
    return dict(t, examples_per_s=spec.batch / t['median_s'], flops_per_step=flop,
                flop_per_s=flop / t['median_s'], compile_s=compile_s, peak_bytes=peak)

  return timer


def around(before: dict, after: dict, batch: int) -> dict:
  """One tx timing from two taken before and after another measurement (the peer's):
  median_s is the mean of their medians, which cancels a host speed drifting linearly
  between them."""
  median = (before['median_s'] + after['median_s']) / 2
  return {'median_s': median, 'examples_per_s': batch / median,
          'before_s': before['times_s'], 'after_s': after['times_s']}


def time_vectorized(spec: specs.Spec, members: int, *, repeats: int = 5) -> dict:
  """`members` runs differing in seed and β (model.beta_scale), as `experiments.sweep
  --vectorize` trains them (experiments.runners.VmapRunner: one jit(vmap(step)) call per
  step over stacked states and batches), against one jitted step per member per step.
  Returns member-steps/s of both and their ratio (> 1: vectorising is faster)."""
  run = run_of(spec, specs.tx_model(spec))
  betas = [float(b) for b in jnp.linspace(0.5, 2.0, members)]
  batch = specs.synthetic_batch(spec)
  vmapped = VmapRunner(run, betas)
  states = vmapped.put_state(vmapped.init(run, range(members)))
  together = measure(stepper(vmapped.step, states, vmapped.put([batch] * members)),
                     repeats=repeats, warmup=2)

  # One program for every member, β traced as in the vmapped step (not one compile per β).
  single = jax.jit(lambda s, b, beta: steps.step_functions(run, beta)[0](s, b),
                   donate_argnums=(0,))
  member_betas = [jnp.float32(beta) for beta in betas]  # made once, not in the timed loop.
  states = [steps.init_state(run, i, beta) for i, beta in enumerate(betas)]
  device_batch = jax.device_put(batch)

  def one_step_of_each(states, batch):
    out = [single(s, batch, beta) for s, beta in zip(states, member_betas)]
    return [s for s, _ in out], [m for _, m in out]

  apart = measure(stepper(one_step_of_each, states, device_batch), repeats=repeats, warmup=2)
  rate = lambda t: members / t['median_s']
  return {'members': members, 'vectorized': together, 'sequential': apart,
          'vectorized_member_steps_per_s': rate(together),
          'sequential_member_steps_per_s': rate(apart),
          'speedup': apart['median_s'] / together['median_s']}


def matmul_rate(dtype: str = 'float32', sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
  """The best FLOP/s of n×n by n×n products in `dtype` over `sizes` and over the timed calls
  (2·n³ FLOPs each): the device's attainable matmul rate, which MFU divides by. The best is
  taken, not the median, because a size that falls off a cache cliff, or calls that land in
  a slow minute of a shared host, would lower the rate and so flatter MFU."""
  product = jax.jit(jnp.matmul)
  rows = []
  for n in sizes:
    a = jax.random.normal(jax.random.key(1), (n, n), DTYPES[dtype])
    b = jax.random.normal(jax.random.key(2), (n, n), DTYPES[dtype])
    t = measure(lambda: product(a, b), repeats=repeats, warmup=2)
    rows.append(dict(t, n=n, flop_per_s=2 * n ** 3 / min(t['times_s'])))
  best = max(rows, key=lambda r: r['flop_per_s'])
  return {'dtype': dtype, 'n': best['n'], 'flop_per_s': best['flop_per_s'], 'sizes': rows}


def best_rate(*measurements: dict) -> dict:
  """Of several matmul_rate results for one dtype (say, before and after the models were
  timed), the fastest, with every measurement's rate kept under 'measured'."""
  best = max(measurements, key=lambda m: m['flop_per_s'])
  return dict(best, measured=[m['flop_per_s'] for m in measurements])


def time_step(spec_name: str, dtype: str = 'float32', pad: int = 1, mu_dtype: str = '',
              repeats: int = 10, remat: str = '') -> dict:
  """step_timer's timing of one spec (a ViT with pad_tokens_to=pad; remat: a remat policy or
  '' for none); its first_s is the first step (the program was compiled before it)."""
  return step_timer(spec_of(spec_name, pad, remat), dtype, mu_dtype)(repeats)


def main(argv):
  del argv
  f = flags.FLAGS
  print(json.dumps(time_step(f.spec, f.dtype, f.pad, f.mu_dtype, f.repeats, f.remat)),
        flush=True)


def define_step_flags(flags):
  """The absl flags that name one tx train step: --spec, --dtype, --pad, --mu_dtype, --remat."""
  flags.DEFINE_string('spec', 'vit-digits', 'A model of experiments/bench/specs.py.')
  flags.DEFINE_string('dtype', 'float32', 'Compute dtype: float32 or bfloat16.')
  flags.DEFINE_integer('pad', 1, "A ViT's pad_tokens_to.")
  flags.DEFINE_string('mu_dtype', '', "optimizer.mu_dtype: '' or bfloat16.")
  flags.DEFINE_string('remat', '', "A model.remat_policy to recompute blocks with; '': no remat.")


if __name__ == '__main__':
  from absl import app, flags
  define_step_flags(flags)
  flags.DEFINE_integer('repeats', 10, 'Timed steps (the median is reported).')
  app.run(main)
