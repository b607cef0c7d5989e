"""Train-step throughput of tx models and the matmul rate that MFU is measured against.

The step is the trainer's own `experiments.trainer.train_step` (forward, backward,
global-norm clipping, AdamW with decay on matrices, the metrics it logs) on one device,
under `jax.jit` with the state donated, as `experiments.run` runs it. The batch is placed
on the device once, as the PyTorch peer's is.

  achieved FLOP/s = flops.train_step(spec) / median step time
  MFU             = achieved FLOP/s / matmul FLOP/s
  matmul FLOP/s   = max over n of 2·n³ / the fastest timed n×n by n×n product, same device
                    and dtype, measured before and after the models (the faster kept)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from configs import common
from experiments import data as data_lib
from experiments import tasks, trainer
from experiments.bench import flops, specs
from experiments.bench.timing import measure
from experiments.tasks import DTYPES


def optimizer():
  """(optimizer, schedule): configs/common.py's AdamW at a constant learning rate."""
  config = common.training()
  schedule = optax.constant_schedule(config.optimizer.lr)
  return trainer.make_optimizer(config, schedule), schedule


def step_fn(spec: specs.Spec, model):
  """The trainer's train_step(state, batch) -> (state, metrics) for `model` on spec's task."""
  opt, schedule = optimizer()

  def loss_fn(params, batch, rng):
    return tasks.loss_and_metrics(spec.task, model, params, batch, rng=jax.random.wrap_key_data(rng),
                                  train=True, bos_id=data_lib.BOS, pad_id=data_lib.PAD)

  return functools.partial(trainer.train_step, loss_fn=loss_fn, schedule=schedule, optimizer=opt,
                           count_fn=lambda b: tasks.loss_weights(spec.task, b, data_lib.PAD).sum(),
                           accum_steps=1)


def init_state(spec: specs.Spec, model, seed=0) -> trainer.TrainState:
  """Parameters and AdamW state of `model` from `seed` (may be traced, for vmap)."""
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  batch = specs.synthetic_batch(dataclasses.replace(spec, batch=1))
  params = model.init(init_rng, *specs.model_inputs(spec, batch))['params']
  return trainer.TrainState(jnp.zeros((), jnp.int32), params, optimizer()[0].init(params),
                            jax.random.key_data(train_rng))


def stepper(step, state, batch):
  """run() -> (state, metrics): one call of step(state, batch), each call's state fed to the
  next (so a donated state is never reused)."""
  carry = {'state': state}

  def run():
    carry['state'], metrics = step(carry['state'], batch)
    return carry['state'], metrics

  return run


def time_steps(step, state, batch, *, repeats: int, warmup: int = 2) -> dict:
  """Times step(state, batch) -> (state, metrics), feeding each call's state to the next."""
  return measure(stepper(step, state, batch), repeats=repeats, warmup=warmup)


def step_timer(spec: specs.Spec, dtype: str = 'float32', **model_overrides):
  """Compiles the tx train step of `spec` once and returns timer(repeats, warmup=2) -> dict:
  median seconds per step, examples/s and achieved FLOP/s. Each call times more steps of
  the same training run, so a model can be timed again later (next to its peer) without
  compiling again."""
  model = specs.tx_model(spec, DTYPES[dtype], **model_overrides)
  run = stepper(jax.jit(step_fn(spec, model), donate_argnums=(0,)),
                jax.jit(functools.partial(init_state, spec, model))(),
                jax.device_put(specs.synthetic_batch(spec)))

  def timer(repeats: int, warmup: int = 2) -> dict:
    t = measure(run, repeats=repeats, warmup=warmup)
    return dict(t, examples_per_s=spec.batch / t['median_s'],
                flops_per_step=flops.train_step(spec),
                flop_per_s=flops.train_step(spec) / t['median_s'])

  return timer


def around(before: dict, after: dict, batch: int) -> dict:
  """One tx timing from two taken before and after another measurement (the peer's):
  median_s is the mean of their medians, which cancels a host speed drifting linearly
  between them."""
  median = (before['median_s'] + after['median_s']) / 2
  return {'median_s': median, 'examples_per_s': batch / median,
          'before_s': before['times_s'], 'after_s': after['times_s']}


def time_vectorized(spec: specs.Spec, members: int, *, repeats: int = 5) -> dict:
  """`members` runs differing in β (model.beta_scale), as `experiments.sweep --vectorize`
  trains them: one jit(vmap(step)) call per step, against one jitted step per member per
  step. Returns member-steps/s of both and their ratio (> 1: vectorising is faster)."""
  base = specs.tx_model(spec)
  betas = jnp.linspace(0.5, 2.0, members)

  def member_step(state, batch, beta):
    return step_fn(spec, base.clone(beta_scale=beta))(state, batch)

  def member_init(seed, beta):
    return init_state(spec, base.clone(beta_scale=beta), seed)

  batch = jax.device_put(specs.synthetic_batch(spec))
  seeds = jnp.arange(members)
  states = jax.jit(jax.vmap(member_init))(seeds, betas)
  vmapped = jax.jit(jax.vmap(member_step, in_axes=(0, None, 0)), donate_argnums=(0,))
  together = time_steps(lambda s, b: vmapped(s, b, betas), states, batch, repeats=repeats)

  single = jax.jit(member_step, donate_argnums=(0,))
  member_betas = list(betas)  # sliced once, not inside the timed loop
  states = [jax.jit(member_init)(i, beta) for i, beta in enumerate(member_betas)]

  def one_step_of_each(states, batch):
    out = [single(s, batch, beta) for s, beta in zip(states, member_betas)]
    return [s for s, _ in out], [m for _, m in out]

  apart = time_steps(one_step_of_each, states, batch, repeats=repeats)
  rate = lambda t: members / t['median_s']
  return {'members': members, 'vectorized': together, 'sequential': apart,
          'vectorized_member_steps_per_s': rate(together),
          'sequential_member_steps_per_s': rate(apart),
          'speedup': apart['median_s'] / together['median_s']}


def matmul_rate(dtype: str = 'float32', sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
  """The best FLOP/s of n×n by n×n products in `dtype` over `sizes` and over the timed calls
  (2·n³ FLOPs each): the device's attainable matmul rate, which MFU divides by. The best is
  taken, not the median, because a size that falls off a cache cliff, or calls that land in
  a slow minute of a shared host, would lower the rate and so flatter MFU (a --quick run whose
  medians read 170 GFLOP/s on a host that reaches 350–430 reported 85–95% MFU)."""
  rows = []
  for n in sizes:
    a = jax.random.normal(jax.random.key(1), (n, n), DTYPES[dtype])
    b = jax.random.normal(jax.random.key(2), (n, n), DTYPES[dtype])
    product = jax.jit(jnp.matmul)
    t = measure(lambda: product(a, b), repeats=repeats, warmup=2)
    rows.append(dict(t, n=n, flop_per_s=2 * n ** 3 / min(t['times_s'])))
  best = max(rows, key=lambda r: r['flop_per_s'])
  return {'dtype': dtype, 'n': best['n'], 'flop_per_s': best['flop_per_s'], 'sizes': rows}


def best_rate(*measurements: dict) -> dict:
  """Of several matmul_rate results for one dtype (say, before and after the models were
  timed), the fastest, with every measurement's rate kept under 'measured'."""
  best = max(measurements, key=lambda m: m['flop_per_s'])
  return dict(best, measured=[m['flop_per_s'] for m in measurements])
