"""Training and evaluation from a config: optax, pmap or jit, orbax checkpoints, resume.

Data flows one way: config → data → model → train step → metrics/checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import analysis
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import parallel as parallel_lib
from experiments import tasks
from experiments.checkpoints import Checkpoints
from experiments.preemption import Preempted, catch_stop_signals

SCHEDULES = ('cosine', 'rsqrt', 'constant')


@flax.struct.dataclass
class TrainState:
  step: Any  # int32 scalar
  params: Any
  opt_state: Any
  rng: Any  # raw uint32 PRNG key data, so that checkpoints hold plain arrays.


def make_schedule(config, total_steps: int):
  """'cosine': linear warmup to lr, then cosine decay to 0 (Loshchilov & Hutter).
  'rsqrt': lr · min(s/warmup, sqrt(warmup/s)), the inverse-square-root schedule of
  Vaswani et al. (their d_model^-0.5 · warmup^-0.5 is folded into lr).
  'constant': warmup, then lr."""
  o = config.optimizer
  warmup = o.warmup_steps
  if o.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={o.schedule!r}; allowed: '
                     f'{", ".join(map(repr, SCHEDULES))}')
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1))
  if o.schedule == 'rsqrt':
    def rsqrt(step):
      s = jnp.maximum(step, 1).astype(jnp.float32)
      return o.lr * jnp.minimum(s / max(warmup, 1), jnp.sqrt(max(warmup, 1) / s))
    return rsqrt
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                               optax.constant_schedule(o.lr)], [warmup])


def make_optimizer(config, schedule):
  """Global-norm clipping, then AdamW; weight decay on matrices only (not biases, norms, β)."""
  o = config.optimizer
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)


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

  def accumulate(carry, inputs):
    i, mb = inputs
    grad_fn = jax.grad(lambda p: _scaled(loss_fn(p, mb, jax.random.fold_in(rng, i)), scale),
                       has_aux=True)
    grads, sums = grad_fn(state.params)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.tree.map(jnp.zeros_like, (state.params, _metric_shapes(loss_fn, state.params, micro)))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    sums = jax.lax.psum(sums, axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(tasks.summarize(sums), grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params), learning_rate=schedule(state.step))
  return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def _scaled(loss_and_sums, scale):
  loss, sums = loss_and_sums
  return loss * scale, sums


def _metric_shapes(loss_fn, params, micro):
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: loss_fn(params, first, jax.random.key_data(jax.random.key(0)))[1])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def eval_step(params, batch, *, eval_fn, axis_name=None):
  sums = eval_fn(params, batch)
  return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


@dataclasses.dataclass
class Run:
  """Everything a training run is built from, derived from the config."""
  config: Any
  dataset: data_lib.Dataset
  task: str
  model: Any
  total_steps: int
  schedule: Any
  optimizer: Any


def setup(config) -> Run:
  """The run a config describes; the config is assumed valid (experiments.config_check)."""
  dataset = tasks.load_dataset(config)
  task = tasks.TASK_OF_MODEL.get(config.model.name, 'classify')
  model = tasks.build_model(config, dataset.info)
  n = len(dataset.train['targets'])
  steps_per_epoch = n // config.batch_size
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch
  if total_steps <= 0:
    raise ValueError(f'config.total_steps={config.total_steps} and config.num_epochs='
                     f'{config.num_epochs}: set one of them > 0')
  schedule = make_schedule(config, total_steps)
  return Run(config, dataset, task, model, total_steps, schedule, make_optimizer(config, schedule))


def loss_fns(run: Run, model=None):
  """(loss_fn, eval_fn, count_fn) of `model` (default run.model) on the run's task."""
  info, c, model = run.dataset.info, run.config, model or run.model
  common = dict(label_smoothing=c.label_smoothing, bos_id=info.get('bos_id', data_lib.BOS),
                pad_id=info.get('pad_id', data_lib.PAD))

  def loss_fn(params, batch, rng):
    return tasks.loss_and_metrics(run.task, model, params, batch,
                                  rng=jax.random.wrap_key_data(rng), train=True, **common)

  def eval_fn(params, batch):  # the true cross-entropy: no label smoothing at eval.
    return tasks.loss_and_metrics(run.task, model, params, batch,
                                  **dict(common, label_smoothing=0.0))[1]

  def count_fn(batch):
    return tasks.loss_weights(run.task, batch, common['pad_id']).sum()

  return loss_fn, eval_fn, count_fn


def init_state(run: Run, seed=None, model=None) -> TrainState:
  """Fresh state from `seed` (default config.seed; may be traced) for `model` (default run.model)."""
  model = model or run.model
  rng = jax.random.key(run.config.seed if seed is None else seed)
  init_rng, train_rng = jax.random.split(rng)
  sample = {k: v[:1] for k, v in run.dataset.train.items()}
  params = jax.jit(model.init)(init_rng, *tasks.init_args(run.task, sample))['params']
  return TrainState(jnp.zeros((), jnp.int32), params, run.optimizer.init(params),
                    jax.random.key_data(train_rng))


def train_batch(run: Run, step: int) -> dict:
  """This process's rows of the global batch for `step` (stateless: the position is the step)."""
  c = run.config
  idx = data_lib.batch_indices(len(run.dataset.train['targets']), c.batch_size, step, c.seed,
                               jax.process_index(), jax.process_count())
  batch = {k: v[idx] for k, v in run.dataset.train.items()}
  shift = c.data.get('augment', 0)
  if shift:  # drawn for the global batch, then sliced: the same shifts on 1 host or many.
    offsets = data_lib.shift_offsets(np.random.default_rng([c.seed, step, 1]), c.batch_size, shift)
    start = jax.process_index() * len(idx)
    batch['inputs'] = data_lib.shift_images(batch['inputs'], offsets[start:start + len(idx)], shift)
  batch['weight'] = np.ones(len(idx), np.float32)
  return batch


def eval_batches(run: Run, batch_size: int):
  """The test set in global batches of `batch_size`, padded with weight-0 rows; this process's rows."""
  test = run.dataset.test
  n = len(test['targets'])
  padded = -(-n // batch_size) * batch_size
  pid, per = jax.process_index(), batch_size // jax.process_count()
  for start in range(0, padded, batch_size):
    rows = np.arange(start + pid * per, start + (pid + 1) * per)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    batch = {k: v[rows] for k, v in test.items()}
    batch['weight'] = valid.astype(np.float32)
    yield batch


def evaluate(run: Run, runner, state, batch_size: int) -> dict:
  total = None  # summed on device, fetched once.
  for batch in eval_batches(run, batch_size):
    sums = runner.eval_step(state, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return eval_metrics_of(run.task, tasks.summarize(runner.fetch(total)))


def eval_metrics_of(task: str, means: dict) -> dict:
  """Host floats from summarized eval sums, with bits per character for language models."""
  out = {k: float(v) for k, v in means.items()}
  if task == 'lm':
    out['bits_per_char'] = out['loss'] / math.log(2)
  return out


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None):
  """Trains, evaluates, checkpoints; resumes from the workdir's newest readable checkpoint.

  Every step's loss and gradient norm are checked one step late (no stall): a non-finite one
  raises FloatingPointError naming the step and the metric, and nothing diverged is saved.
  SIGTERM/SIGINT: the current step is saved and `Preempted` is raised (experiments.run exits
  with 128 + the signal number); the same command resumes.
  stop_after: stop (without saving) after this many steps of this call, as a crash would;
    for tests of resume. config.debug_nans: JAX's NaN checking (jax_debug_nans), which
    re-runs a failing program op by op and names the first op that made a NaN; slow.
  Returns (summary dict, host TrainState).
  """
  with jax.debug_nans(bool(config.get('debug_nans', False))):  # for this run only.
    return _train_and_evaluate(config, workdir, stop_after)


def _train_and_evaluate(config, workdir: str, stop_after: int | None):
  start_time = time.time()
  run = setup(config)
  devices = parallel_lib.select_devices(config.num_devices)
  parallel_lib.check_batch('batch_size', config.batch_size, len(devices), config.grad_accum_steps)
  eval_batch = config.eval_batch_size or config.batch_size
  parallel_lib.check_batch('eval_batch_size', eval_batch, len(devices), 1)
  loss_fn, eval_fn, count_fn = loss_fns(run)
  step_fn = functools.partial(train_step, loss_fn=loss_fn, count_fn=count_fn,
                              optimizer=run.optimizer, schedule=run.schedule,
                              accum_steps=config.grad_accum_steps)
  runner = parallel_lib.make_runner(config.parallel, devices, step_fn,
                                    functools.partial(eval_step, eval_fn=eval_fn))
  os.makedirs(workdir, exist_ok=True)
  if metrics_lib.is_writer():
    with open(os.path.join(workdir, 'config.json.tmp'), 'w') as f:
      f.write(config.to_json(indent=2))
    os.replace(os.path.join(workdir, 'config.json.tmp'), os.path.join(workdir, 'config.json'))
  ckpt = Checkpoints(workdir, config.keep_checkpoints, config.best_metric, config.best_mode)
  state = init_state(run)
  history = {'best': None, 'evals_since_best': 0, 'stopped_early': False}
  try:
    restored = ckpt.restore_latest(state)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, meta = restored
    history = meta['history']
    print(f'Resumed from step {int(state.step)} in {workdir}', flush=True)
  first_step = int(state.step)
  last_step = first_step if history['stopped_early'] else run.total_steps
  writer = metrics_lib.MetricsWriter(workdir, config.tensorboard, drop_after=first_step)
  progress = metrics_lib.Progress(run.total_steps, config.batch_size, first_step)
  last_saved = first_step

  def save(step, metrics, eval_metrics):
    nonlocal last_saved
    check_finite(runner.fetch(metrics), step, last_good=last_saved)  # never save a diverged state.
    meta = {'config': config.to_dict(), 'data': {'seed': config.seed, 'position': step},
            'history': history, 'metrics': eval_metrics}
    ckpt.save(step, runner.fetch(dstate), json.loads(json.dumps(meta, default=str)),
              eval_metrics)
    last_saved = step

  dstate = runner.put_state(state)
  pending, eval_metrics, unchecked = None, {}, None
  try:
    with catch_stop_signals() as stop:
      for step in range(first_step, last_step):
        dstate, metrics = runner.train_step(dstate, train_batch(run, step))
        if unchecked is not None:  # the previous step's, while this one runs.
          check_finite(runner.fetch(unchecked[1]), unchecked[0], last_good=last_saved)
        if pending is not None:  # fetched one step late, so the host never stalls the device.
          _log_train(writer, progress, *pending, runner)
          pending = None
        done = step + 1
        unchecked = (done, {k: metrics[k] for k in ('loss', 'grad_norm', 'param_norm')})
        last = done == run.total_steps
        if done % config.log_every == 0 or last:
          pending = (done, metrics)
        if done % config.eval_every == 0 or last:
          if pending is not None:
            _log_train(writer, progress, *pending, runner)
            pending = None
          eval_metrics = evaluate(run, runner, dstate, eval_batch)
          writer.write(done, 'eval', eval_metrics)
          print(f'eval @ {done}: ' + '  '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()),
                flush=True)
          update_history(history, eval_metrics, config)
          save(done, metrics, eval_metrics)
        elif done % config.checkpoint_every == 0:
          save(done, metrics, None)
        if history['stopped_early']:
          print(f'Early stopping at step {done}: no {config.best_metric} improvement in '
                f'{config.early_stopping_patience} evals', flush=True)
          break
        if stop_after is not None and done - first_step >= stop_after:
          break
        if stop.should_stop(done):
          if pending is not None:
            _log_train(writer, progress, *pending, runner)
          if last_saved != done:
            save(done, metrics, None)
          ckpt.wait()
          raise Preempted(f'{stop.name}: saved step {done} of {run.total_steps} in '
                          f'{ckpt.directory}; run the same command again to resume',
                          stop.signum)
    if unchecked is not None:
      check_finite(runner.fetch(unchecked[1]), unchecked[0], last_good=last_saved)
    if pending is not None:
      _log_train(writer, progress, *pending, runner)
    if first_step == last_step:  # the run had already finished: report it again.
      eval_metrics = evaluate(run, runner, dstate, eval_batch)
  finally:  # saves in flight are finished even when the run stops on an error.
    ckpt.wait()
    ckpt.close()
    writer.close()
  final = runner.fetch(dstate)
  summary = {f'eval/{k}': v for k, v in eval_metrics.items()}
  summary.update(steps=int(final.step), total_steps=run.total_steps,
                 early_stopped=history['stopped_early'],
                 best={config.best_metric: history['best']})
  if stop_after is None:
    summary.update(analysis.final_analysis(run, final.params))
    summary['wall_time_s'] = round(time.time() - start_time, 1)
    write_summary(workdir, summary)
  return summary, final


def write_summary(workdir: str, summary: dict):
  """summary.json (the sweep reads it; its presence marks the run finished) and the curves PNG."""
  if not metrics_lib.is_writer():
    return
  for key in ('eval/exact_match_long', 'eval/attention_entropy'):
    if key in summary:
      print(f'{key[5:]}: {summary[key]:.4f}', flush=True)
  if 'extrapolation_note' in summary:
    print(summary['extrapolation_note'], flush=True)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  metrics_lib.plot_learning_curves(workdir)


def check_finite(host_metrics: dict, step: int, where: str = '', last_good: int | None = None):
  """FloatingPointError naming the step and the first non-finite metric among loss, grad_norm
  and param_norm (those present), and the last good checkpoint when known."""
  for name in ('loss', 'grad_norm', 'param_norm'):
    if name in host_metrics and not math.isfinite(float(host_metrics[name])):
      kept = ('' if last_good is None else
              f'; the last checkpoint, step {last_good}, is kept' if last_good else
              '; nothing was saved')
      raise FloatingPointError(f'{where}{name}={float(host_metrics[name])} at step {step}: the run '
                               f'diverged{kept}; lower config.optimizer.lr, enable '
                               'config.optimizer.grad_clip, or find the first NaN with '
                               '--config.debug_nans=True')


def _log_train(writer, progress, step, metrics, runner):
  host = {k: float(v) for k, v in runner.fetch(metrics).items()}
  writer.write(step, 'train', host)
  progress.show(step, host)


def update_history(history: dict, eval_metrics: dict, config):
  """Tracks the best eval metric and sets history['stopped_early'] when patience runs out."""
  if config.best_metric not in eval_metrics:
    raise ValueError(f'config.best_metric={config.best_metric!r} is not an eval metric; '
                     f'allowed: {", ".join(map(repr, eval_metrics))}')
  value = eval_metrics[config.best_metric]
  better = (history['best'] is None or
            (value > history['best'] if config.best_mode == 'max' else value < history['best']))
  if better:
    history['best'], history['evals_since_best'] = value, 0
  else:
    history['evals_since_best'] += 1
  patience = config.early_stopping_patience
  history['stopped_early'] = bool(patience) and history['evals_since_best'] >= patience
