"""What a config builds for training, and the pure, jittable steps that train and evaluate it.

  Run         the dataset, model, task, schedule and optimizer of a config
  TrainState  step, params, optimizer state and the training RNG
  train_step  one optimizer step (micro-batches, devices), returning the logged metrics
  evaluate    the metric sums of one eval batch (step_functions)

The runners (experiments/runners.py) place these under jit, pmap or vmap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from experiments import data as data_lib
from experiments import tasks
from experiments.optimizer import make_optimizer, make_schedule


@dataclasses.dataclass
class Run:
  """Everything a training run is built from, derived from the config."""
  config: Any
  dataset: Any  # data_lib.Dataset, or image_dataset.ImageDataset for images on disk
  task: str
  model: Any
  total_steps: int
  schedule: Any
  optimizer: Any

  def model_for(self, beta_scale=None):
    """The model with another β scale (a traced one inside a vmapped group), or as configured."""
    return self.model if beta_scale is None else self.model.clone(beta_scale=beta_scale)


def setup(config) -> Run:
  """The run a config describes; the config is assumed valid (experiments.config_check)."""
  dataset = tasks.load_dataset(config)
  task = tasks.TASK_OF_MODEL.get(config.model.name, 'classify')
  model = tasks.build_model(config, dataset.info)
  steps_per_epoch = dataset.num_train // config.batch_size
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch
  if total_steps <= 0:
    raise ValueError(f'config.total_steps={config.total_steps} and config.num_epochs='
                     f'{config.num_epochs}: set one of them > 0')
  schedule = make_schedule(config, total_steps)
  return Run(config, dataset, task, model, total_steps, schedule, make_optimizer(config, schedule))


@flax.struct.dataclass
class TrainState:
  step: Any  # int32 scalar
  params: Any
  opt_state: Any
  rng: Any  # raw uint32 PRNG key data, so that checkpoints hold plain arrays.


def init_state(run: Run, seed=None, beta_scale=None) -> TrainState:
  """Fresh state from `seed` (default config.seed; may be traced) for run.model_for(beta_scale)."""
  model = run.model_for(beta_scale)
  rng = jax.random.key(run.config.seed if seed is None else seed)
  init_rng, train_rng = jax.random.split(rng)
  sample = run.dataset.sample(1)
  params = jax.jit(model.init)(init_rng, *tasks.model_inputs(run.task, sample))['params']
  return TrainState(jnp.zeros((), jnp.int32), params, run.optimizer.init(params),
                    jax.random.key_data(train_rng))


def step_functions(run: Run, beta_scale=None):
  """(train(state, batch, axis_name=None), evaluate(params, batch, axis_name=None)) of
  run.model_for(beta_scale) on the run's task: the two functions every runner compiles.
  evaluate returns the metric sums of one batch, summed over devices, of the true
  cross-entropy (no label smoothing)."""
  model, info, c = run.model_for(beta_scale), run.dataset.info, run.config
  ids = dict(bos_id=info.get('bos_id', data_lib.BOS), pad_id=info.get('pad_id', data_lib.PAD))

  def loss_fn(params, batch, rng):
    return tasks.loss_and_metrics(run.task, model, params, batch, train=True,
                                  rng=jax.random.wrap_key_data(rng),
                                  label_smoothing=c.label_smoothing, **ids)

  def evaluate(params, batch, axis_name=None):
    sums = tasks.loss_and_metrics(run.task, model, params, batch, **ids)[1]
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

  count_fn = lambda batch: tasks.loss_weights(run.task, batch, ids['pad_id']).sum()
  return (functools.partial(train_step, loss_fn=loss_fn, count_fn=count_fn,
                            optimizer=run.optimizer, schedule=run.schedule,
                            accum_steps=c.grad_accum_steps), evaluate)


def train_step(state, batch, *, loss_fn, count_fn, optimizer, schedule, accum_steps,
               axis_name=None):
  """One optimizer step on a (per-device) batch, split into `accum_steps` micro-batches.

  The loss is Σ token losses / (global token count), so micro-batches and devices
  add up to exactly the full-batch mean: each device scales its sum by
  devices / global count and gradients are `pmean`ed over `axis_name`.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  count = count_fn(batch)  # this device's examples or target tokens.
  devices = 1
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    count = jax.lax.psum(count, axis_name)
    devices = jax.lax.psum(1, axis_name)
  scale = devices / jnp.maximum(count, 1.0)
  # Micro-batch i takes rows i, i + accum, ...: every device's shard contributes to each
  # micro-batch, so a batch sharded over devices needs no all-gather under jit.
  micro = jax.tree.map(lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)

  def scaled_loss(params, mb, rng):
    loss, sums = loss_fn(params, mb, rng)
    return loss * scale, sums

  def accumulate(carry, inputs):
    i, mb = inputs
    grads, sums = jax.grad(scaled_loss, has_aux=True)(state.params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  first = jax.tree.map(lambda x: x[0], micro)
  sums_shape = jax.eval_shape(lambda: loss_fn(state.params, first, state.rng)[1])
  zeros = jax.tree.map(jnp.zeros_like, (state.params, sums_shape))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    sums = jax.lax.psum(sums, axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(tasks.summarize(sums), grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params), learning_rate=schedule(state.step))
  return TrainState(state.step + 1, params, opt_state, state.rng), metrics
