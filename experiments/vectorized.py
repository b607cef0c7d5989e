"""Runs that differ only in β (model.beta_scale) or seed, trained together as one compiled
program: `jax.vmap` over a stack of train states (`experiments.sweep --vectorize`).

Each member keeps its own seed, so its own init, dropout stream and batch
order: it computes what `trainer.train_and_evaluate` computes alone, up to
float rounding (tests/test_vectorized.py checks 1e-4), and writes the same
files into its own workdir (config.json, metrics.jsonl, summary.json, a final
checkpoint). β is traced: the model is rebuilt inside the vmapped step with
the member's beta_scale. `learn_beta` changes the parameter tree, so learned-β
and fixed-β runs form separate groups. The stacked state is checkpointed in
the group's own directory, so an interrupted group resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import analysis
from experiments import metrics as metrics_lib
from experiments import tasks
from experiments import trainer
from experiments.checkpoints import Checkpoints

MAY_DIFFER = ('seed', 'model.beta_scale')


def _fields(config) -> dict:
  """{'dotted.path': value} of every config field except those in MAY_DIFFER."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v for k, v in flat.items() if k not in MAY_DIFFER}


def check_group(configs):
  """Raises ValueError unless the configs differ only in MAY_DIFFER and can run as one program."""
  a = _fields(configs[0])
  for c in configs[1:]:
    b = _fields(c)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
      raise ValueError(f'--vectorize: runs differ in {", ".join(diff)}; only '
                       f'{", ".join(MAY_DIFFER)} may differ within one program')
  c = configs[0]
  if c.early_stopping_patience:
    raise ValueError(f'config.early_stopping_patience={c.early_stopping_patience}: '
                     '--vectorize trains every member to the end; set it to 0')
  if c.model.get('learn_beta') and any(x.model.beta_scale <= 0 for x in configs):
    raise ValueError('beta_scale=0 with learn_beta=True; a learned β starts from '
                     'beta_scale/sqrt(d_head) and must be > 0')
  if jax.process_count() > 1:
    raise ValueError('--vectorize runs on one process; run multi-host jobs one at a time')


def train_group(configs, workdirs, groupdir: str, *, stop_after: int | None = None):
  """Trains every (config, workdir) pair in one vmapped program; returns their summaries.

  stop_after: stop (without saving) after this many steps, as a preemption would,
    and return None; for tests of resume.
  """
  start_time = time.time()
  check_group(configs)
  run = trainer.setup(configs[0])  # data, model, optimizer: the same for every member.
  members = [dataclasses.replace(run, config=c) for c in configs]
  c = run.config
  k = len(configs)
  seeds = jnp.asarray([m.config.seed for m in members], jnp.int32)
  betas = jnp.asarray([m.config.model.beta_scale for m in members], jnp.float32)
  with_beta = lambda beta: run.model.clone(beta_scale=beta)

  def member_step(state, batch, beta):
    loss_fn, _, count_fn = trainer.loss_fns(run, with_beta(beta))
    return trainer.train_step(state, batch, loss_fn=loss_fn, count_fn=count_fn,
                              optimizer=run.optimizer, schedule=run.schedule,
                              accum_steps=c.grad_accum_steps)

  def member_eval(params, batch, beta):
    return trainer.eval_step(params, batch, eval_fn=trainer.loss_fns(run, with_beta(beta))[1])

  step_fn = jax.jit(jax.vmap(member_step), donate_argnums=(0,))
  eval_fn = jax.jit(jax.vmap(member_eval, in_axes=(0, None, 0)))
  state = jax.jit(jax.vmap(lambda s, b: trainer.init_state(run, s, with_beta(b))))(seeds, betas)

  ckpt = Checkpoints(groupdir, keep=1, best_metric='')
  histories = [{'best': None, 'evals_since_best': 0, 'stopped_early': False} for _ in range(k)]
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    histories = meta['histories']
    print(f'Resumed {k} runs from step {int(state.step[0])} in {groupdir}', flush=True)
  first_step = int(state.step[0])
  for m, workdir in zip(members, workdirs):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(m.config.to_json(indent=2))
  writers = [metrics_lib.MetricsWriter(w, c.tensorboard, drop_after=first_step) for w in workdirs]
  progress = metrics_lib.Progress(run.total_steps, c.batch_size * k, first_step)

  def batches(step):  # members with the same seed share their batch.
    by_seed = {}
    return jax.tree.map(lambda *xs: np.stack(xs), *[
        by_seed.setdefault(m.config.seed, trainer.train_batch(m, step)) for m in members])

  def evaluate(state):
    total = None
    for batch in trainer.eval_batches(run, c.eval_batch_size or c.batch_size):
      sums = eval_fn(state.params, batch, betas)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    means = jax.device_get(tasks.summarize(total))
    return [trainer.eval_metrics_of(run.task, {name: v[i] for name, v in means.items()})
            for i in range(k)]

  eval_metrics = [{}] * k
  try:
    for step in range(first_step, run.total_steps):
      state, metrics = step_fn(state, batches(step), betas)
      done = step + 1
      last = done == run.total_steps
      if done % c.log_every == 0 or last:
        host = jax.device_get(metrics)
        for i, writer in enumerate(writers):
          row = {name: float(v[i]) for name, v in host.items()}
          trainer.check_finite(row, done, f'{workdirs[i]}: ')
          writer.write(done, 'train', row)
        progress.show(done, {'loss': float(np.mean(host['loss'])),
                             'learning_rate': float(host['learning_rate'][0])})
      if done % c.eval_every == 0 or last:
        eval_metrics = evaluate(state)
        for writer, em, history in zip(writers, eval_metrics, histories):
          writer.write(done, 'eval', em)
          trainer.update_history(history, em, c)
        values = np.array([em[c.best_metric] for em in eval_metrics])
        print(f'eval @ {done}: {c.best_metric} mean {values.mean():.4f}, min {values.min():.4f}, '
              f'max {values.max():.4f} over {k} runs', flush=True)
      if done % c.checkpoint_every == 0 or done % c.eval_every == 0 or last:
        host = jax.device_get(metrics)  # never checkpoint a diverged member.
        for i in range(k):
          trainer.check_finite({n: v[i] for n, v in host.items()}, done, f'{workdirs[i]}: ')
        ckpt.save(done, jax.device_get(state), {'histories': histories})
      if stop_after is not None and done - first_step >= stop_after:
        return None
    if first_step == run.total_steps:
      eval_metrics = evaluate(state)
  finally:
    ckpt.wait()
    ckpt.close()
    for writer in writers:
      writer.close()
  return _finish(members, workdirs, jax.device_get(state), eval_metrics, histories, start_time)


def _finish(members, workdirs, state, eval_metrics, histories, start_time) -> list[dict]:
  """Per member: a final checkpoint and summary.json, as a sequential run leaves them."""
  summaries = []
  analyses = analysis.final_analysis(members[0], state.params,
                                     [m.config.model.beta_scale for m in members])
  wall = round(time.time() - start_time, 1)
  for i, (m, workdir) in enumerate(zip(members, workdirs)):
    c = m.config
    member = jax.tree.map(lambda x: x[i], state)
    ckpt = Checkpoints(workdir, c.keep_checkpoints, c.best_metric, c.best_mode)
    meta = {'config': c.to_dict(), 'data': {'seed': c.seed, 'position': int(member.step)},
            'history': histories[i],
            'metrics': eval_metrics[i]}
    ckpt.save(int(member.step), member, json.loads(json.dumps(meta, default=str)),
              eval_metrics[i])
    ckpt.wait()
    ckpt.close()
    summary = {f'eval/{name}': v for name, v in eval_metrics[i].items()}
    summary.update(steps=int(member.step), total_steps=m.total_steps, early_stopped=False,
                   best={c.best_metric: histories[i]['best']})
    summary.update(analyses[i])
    summary.update(wall_time_s=wall, vectorized_with=len(members))
    trainer.write_summary(workdir, summary)
    summaries.append(summary)
  return summaries
