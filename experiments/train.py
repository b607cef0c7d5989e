"""The training loop: one loop for a single run and for a vectorized group of runs.

A run reads top to bottom: build it from the config, restore each member from its workdir
(or initialise it), then step. On one schedule, small named actions run between steps:
check the previous step (one step late, so the host never stalls the device), log it,
evaluate and checkpoint, stop early; SIGTERM or SIGINT saves the current step and stops.
At the end come the end-of-run evaluators and summary.json.

A member is one run: its config, workdir, metrics writer, checkpoints and history. A plain
run is one member under the jit or pmap runner; `experiments.sweep --vectorize` trains runs
that differ only in seed and model.beta_scale as the members of one vmapped program, and
each gets everything a plain run has: its own checkpoints (best one kept), early stopping,
the per-step finite check, the preemption save. A member that diverges or stops early is
frozen (its last good checkpoint kept, its summary written at the end) while the others go
on; the program keeps its size, so the others compute what they would have computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax

from experiments.data import pipeline
from experiments import evaluators as evaluators_lib
from experiments import init_from
from experiments import metrics as metrics_lib
from experiments import runners, steps
from experiments import workdir as workdir_lib
from experiments.checkpoints import Checkpoints, SaveFailed
from experiments.preemption import Preempted, catch_stop_signals

FINITE = ('loss', 'grad_norm', 'param_norm')  # checked after every step
MAY_DIFFER = ('seed', 'model.beta_scale')  # within a vectorized group


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       allow_config_change=()):
  """Trains, evaluates and checkpoints one run; resumes from the workdir's newest readable
  checkpoint. Returns (summary, final host TrainState). A diverged run raises
  FloatingPointError naming the step and the metric, after its summary.json says so.

  allow_config_change: the config fields (or sections) a resume may change from the config
  the run was trained with; any other difference is refused (experiments.workdir).

  stop_after: stop (without saving) after this many steps, as a crash would; for tests of
  resume. config.debug_nans: JAX's NaN checking (jax_debug_nans), which re-runs a failing
  program op by op and names the first op that made a NaN; slow.
  """
  (summary,), (state,) = train([config], [workdir], stop_after=stop_after,
                              allow_config_change=allow_config_change)
  if 'diverged' in summary:
    raise FloatingPointError(summary['diverged'])
  return summary, state


def train(configs, workdirs, *, vectorize: bool = False, stop_after: int | None = None,
          allow_config_change=()):
  """Trains one config (the runner its config.parallel names), or with `vectorize` several
  that differ only in MAY_DIFFER as one vmapped program. Returns (summaries, final host
  states), one per member. Group members that finished (a summary.json of their config) are
  left as they are (they only keep the program's size). Each workdir is locked while it
  trains, and nothing is written to it before its config and checkpoints were accepted."""
  # With config.init_from, config.model takes the checkpoint's architecture (or, resuming, the
  # workdir's): config.json and every checkpoint record the whole model.
  configs = [init_from.resolve(c, w) for c, w in zip(configs, workdirs)]
  if vectorize:
    check_group(configs)
  elif len(configs) != 1:
    raise ValueError(f'{len(configs)} configs: train several together with vectorize=True')
  for w in workdirs:
    workdir_lib.check_usable(w)
  with workdir_lib.locked(workdirs), jax.debug_nans(bool(configs[0].get('debug_nans', False))):
    loop = _Loop(configs, workdirs, vectorize, tuple(allow_config_change))
    try:
      result = loop.train(stop_after)
    except BaseException:
      with contextlib.suppress(Exception):  # the error that stopped the run is the one to show.
        loop.close()
      raise
    loop.close()  # saves in flight are finished.
    return result


def check_group(configs):
  """Raises ValueError unless the configs differ only in MAY_DIFFER and can run as one program."""
  flat = lambda c: {k: v for k, v in flax.traverse_util.flatten_dict(c.to_dict(), sep='.').items()
                    if k not in MAY_DIFFER}
  a = flat(configs[0])
  for c in configs[1:]:
    b = flat(c)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
      raise ValueError(f'--vectorize: runs differ in {", ".join(diff)}; only '
                       f'{", ".join(MAY_DIFFER)} may differ within one program')
  if configs[0].model.get('learn_beta') and any(c.model.beta_scale <= 0 for c in configs):
    raise ValueError('beta_scale=0 with learn_beta=True; a learned β starts from '
                     'beta_scale/sqrt(d_head) and must be > 0')
  if jax.process_count() > 1:
    raise ValueError('--vectorize runs on one process; run multi-host jobs one at a time')


@dataclasses.dataclass
class Member:
  """One run of the loop and what the loop keeps for it."""
  config: Any
  workdir: str
  status: str = 'training'  # 'training' | 'done' (finished or stopped early) | 'diverged' | 'passive'
  checkpoints: Any = None
  writer: Any = None
  history: dict = dataclasses.field(default_factory=lambda: fresh_history())
  last_saved: int = 0
  diverged: dict = dataclasses.field(default_factory=dict)  # its summary, once it diverged
  frozen: Any = None  # the host state it stopped with, while the others go on
  finished: dict | None = None  # a passive member's summary
  changed: dict = dataclasses.field(default_factory=dict)  # config changes since its checkpoint

  @property
  def active(self) -> bool:
    return self.status == 'training'


def fresh_history() -> dict:
  """A member's record of its evals, saved in every checkpoint: the best value of
  config.best_metric, evals since it, whether patience ran out, and the last eval."""
  return {'best': None, 'evals_since_best': 0, 'stopped_early': False, 'last_eval': {}}


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action runs after `step`: every `every` steps and at the last one."""
  return step == total or bool(every) and step % every == 0


class _Loop:
  """The state of one call of `train`; its methods are the loop's named actions."""

  def __init__(self, configs, workdirs, vectorize: bool, allow_config_change: tuple = ()):
    self.start_time = time.time()
    self.config = c = configs[0]
    self.run = steps.setup(c)
    devices = runners.select_devices(c.num_devices)
    if not vectorize:
      runners.check_batch('batch_size', c.batch_size, len(devices), c.grad_accum_steps)
      runners.check_batch('eval_batch_size', c.eval_batch_size or c.batch_size, len(devices), 1)
    self.vectorized = vectorize
    self.betas = [x.model.beta_scale for x in configs]
    self.runner = runners.make_runner('vmap' if vectorize else c.parallel, devices, self.run,
                                      self.betas)
    self.evaluators = evaluators_lib.configured(c)
    self.allow_config_change = allow_config_change
    self.members = []
    for x, w in zip(configs, workdirs):
      finished = (workdir_lib.finished_summary(w, x, allow_config_change) if vectorize
                  else None)
      self.members.append(Member(x, w, 'training' if finished is None else 'passive',
                                 finished=finished))

  # --- the story of a run ------------------------------------------------------------------

  def train(self, stop_after):
    c, total = self.config, self.run.total_steps
    state, first = self.restore()
    self.progress = metrics_lib.Progress(total, c.batch_size * len(self.members), first)
    last = None  # (step, metrics) of the step not yet checked and logged
    last_step = total if self.any_active() else first
    with catch_stop_signals() as stop, pipeline.train_feed(
        self.run.dataset, [m.config for m in self.members], first, last_step,
        c.data.get('workers', 0), self.runner.put) as feed:
      for step in range(first, last_step):
        state, metrics = self.runner.step(state, next(feed))
        self.settle(last)  # the previous step's, while this one runs.
        done, last = step + 1, (step + 1, metrics)
        self.check_saves(done)
        if itstime(done, c.eval_every, total) or itstime(done, c.checkpoint_every, total):
          self.settle(last)  # nothing diverged is evaluated or saved.
          last = None
          evaluated = itstime(done, c.eval_every, total)
          if evaluated:
            self.evaluate(state, done)
          self.save(state, done, evaluated)
        if not self.any_active() or (stop_after is not None and done - first >= stop_after):
          break
        if stop.should_stop(done):
          self.preempt(state, done, last, stop)
      self.settle(last)
      finals = self.final_states(state)
      if stop_after is not None:
        return [self.summary(m, s) for m, s in zip(self.members, finals)], finals
      if any(not m.history['last_eval'] for m in self.members if m.status in ('training', 'done')):
        self.evaluate(state, None)  # restored from a checkpoint that holds no eval.
      ends = self.end_of_run(state, stop)
      summaries = [self.summary(m, s, e) for m, s, e in zip(self.members, finals, ends)]
      for m, summary in zip(self.members, summaries):
        if m.status in ('training', 'done'):  # a diverged one's was written when it diverged.
          write_summary(m.workdir, summary)
    return summaries, finals

  # --- the named actions ---------------------------------------------------------------------

  def restore(self):
    """(device state, first step): each member from its newest readable checkpoint, or fresh."""
    fresh = self.runner.init(self.run, [m.config.seed for m in self.members])
    states = list(fresh)
    for i, m in enumerate(self.members):
      if m.status == 'passive':
        continue
      c = m.config
      m.checkpoints = Checkpoints(m.workdir, c.keep_checkpoints, c.best_metric, c.best_mode)
      if m.checkpoints.steps():  # checked before anything is written.
        m.changed = workdir_lib.differences(workdir_lib.recorded(m.workdir),
                                            workdir_lib.as_json(c))
        workdir_lib.check_allowed(m.changed, self.allow_config_change, m.workdir)
      restored = m.checkpoints.restore_latest(fresh[i])
      if restored is not None:
        states[i], meta = restored
        m.history.update(meta['history'])
        m.last_saved = int(states[i].step)
      elif c.get('init_from'):  # only a first start reads it.
        states[i] = init_from.initial_state(self.run, states[i])
    first = self._align(states, fresh)
    for m in self.members:
      if m.status != 'passive':
        self._check_foreign(m)  # the last check before anything is written.
    for i, m in enumerate(self.members):
      if m.status == 'passive':
        continue
      if m.last_saved:
        print(f'Resumed from step {m.last_saved} in {m.workdir}', flush=True)
      if m.history['stopped_early'] or m.last_saved >= self.run.total_steps:
        m.status, m.frozen = 'done', states[i]
      m.writer = metrics_lib.MetricsWriter(m.workdir, m.config.tensorboard, drop_after=m.last_saved)
      if metrics_lib.is_writer():
        self._record_config(m)
    return self.runner.put_state(states), first

  def _check_foreign(self, m: Member):
    """Warns of entries in checkpoints/ that tx did not write (left alone, never counted as
    checkpoints); refuses one named like a step this run may save."""
    foreign = m.checkpoints.foreign()
    if not foreign:
      return
    clash = [name for name in foreign
             if name.isdigit() and m.last_saved < int(name) <= self.run.total_steps]
    if clash:
      raise ValueError(f'{m.checkpoints.directory}/{clash[0]} is not a checkpoint tx wrote '
                       f'({foreign[clash[0]]}) and this run may save step {clash[0]} there; '
                       'move it out of checkpoints/')
    print(f'warning: {m.checkpoints.directory} holds ' +
          ', '.join(f'{name} ({why})' for name, why in foreign.items()) +
          ', which tx did not write: left alone and not counted as checkpoints',
          file=sys.stderr, flush=True)

  def _record_config(self, m: Member):
    """config.json for a run that starts from nothing; for a resume, the allowed changes (in
    config_changes.json and as a metrics.jsonl record at the step they take effect)."""
    if not m.last_saved:
      workdir_lib.start_record(m.workdir, m.config)
    elif m.changed:
      workdir_lib.record_change(m.workdir, m.last_saved, m.changed)
      m.writer.write(m.last_saved, 'config', {'changed': m.changed})
      print(f'{m.workdir}: config changed at step {m.last_saved}: '
            f'{workdir_lib.describe(m.changed)}', flush=True)

  def _align(self, states, fresh) -> int:
    """The step the training members continue from. They were saved together, but a kill
    between their saves can leave them one checkpoint apart: all go back to the older one.
    Members further apart (or some never saved) were not one program: nothing is deleted."""
    training = [i for i, m in enumerate(self.members) if m.status == 'training' and
                not m.history['stopped_early'] and m.last_saved < self.run.total_steps]
    saved = [self.members[i].last_saved for i in training]
    first = min(saved, default=0)
    for i in training:
      m = self.members[i]
      if m.last_saved == first:
        continue
      if (not first or m.last_saved - first > self.config.checkpoint_every
          or first not in m.checkpoints.steps()):
        raise ValueError(f'--vectorize: the runs of this group were saved at steps {saved}, '
                         'not one checkpoint apart; nothing was deleted; run them without '
                         '--vectorize to continue each from its own checkpoint')
      states[i], meta = m.checkpoints.restore(fresh[i], first)
      m.history.update(meta['history'])
      m.checkpoints.delete_after(first)  # those steps are trained and saved again.
      m.last_saved = first
    return first

  def settle(self, last):
    """Checks a step's metrics (the caller's `last`, or None) and logs them when it is time."""
    if last is None:
      return
    step, metrics = last
    log = itstime(step, self.config.log_every, self.run.total_steps)
    hosts = self.runner.fetch(metrics if log else {k: metrics[k] for k in FINITE})
    self.check(step, hosts)
    if log:
      self.log(step, [{k: float(v) for k, v in h.items()} for h in hosts])

  def check(self, step: int, hosts: list[dict]):
    """Marks every training member whose loss, gradient or parameter norm is not finite."""
    for m, host in zip(self.members, hosts):
      bad = [name for name in FINITE if not math.isfinite(float(host[name]))]
      if m.active and bad:
        kept = (f'the last checkpoint, step {m.last_saved}, is kept' if m.last_saved else
                'nothing was saved')
        message = (f'{bad[0]}={float(host[bad[0]])} at step {step}: the run diverged; {kept}; '
                   'lower config.optimizer.lr, enable config.optimizer.grad_clip, or find the '
                   'first NaN with --config.debug_nans=True')
        m.status, m.diverged = 'diverged', {
            'diverged': message, 'diverged_at_step': step, 'steps': m.last_saved,
            'total_steps': self.run.total_steps,
            'wall_time_s': round(time.time() - self.start_time, 1)}
        # Written now: a rerun of its group must find it finished, whatever stops this one.
        write_summary(m.workdir, m.diverged)
        if self.vectorized:
          print(f'{m.workdir}: {message}', flush=True)

  def log(self, step: int, hosts: list[dict]):
    shown = [h for m, h in zip(self.members, hosts) if m.active]
    for m, host in zip(self.members, hosts):
      if m.active:
        m.writer.write(step, 'train', host)
    if shown:  # a group shows the mean loss of its training members.
      self.progress.show(step, {'loss': sum(h['loss'] for h in shown) / len(shown),
                                'learning_rate': shown[0]['learning_rate']})

  def evaluate(self, state, step: int | None):
    """The evaluators with at='eval'; with a step, each training member records its results,
    updates its best metric, and may stop early."""
    context = evaluators_lib.Context(self.run, self.betas, self.runner, state)
    results = [{} for _ in self.members]
    for ev in self.evaluators:
      if ev.at == 'eval':
        for r, out in zip(results, ev.evaluate(context)):
          r.update(out)
    for m, r in zip(self.members, results):
      if step is None:
        m.history['last_eval'] = m.history['last_eval'] or r
      elif m.active:
        m.writer.write(step, 'eval', r)
        update_history(m.history, r, m.config)
    if step is not None:
      self._print_eval(step, [r for m, r in zip(self.members, results) if m.active])

  def _print_eval(self, step: int, results: list[dict]):
    if len(results) == 1 and not self.vectorized:
      print(f'eval @ {step}: ' + '  '.join(f'{k} {v:.4f}' for k, v in results[0].items()
                                          if isinstance(v, float)), flush=True)
    elif results:
      values = [r[self.config.best_metric] for r in results]
      print(f'eval @ {step}: {self.config.best_metric} mean {sum(values) / len(values):.4f}, '
            f'min {min(values):.4f}, max {max(values):.4f} over {len(values)} runs', flush=True)

  def save(self, state, step: int, evaluated: bool):
    """Checkpoints every training member at `step` (the caller checked them first); a member
    whose patience ran out is then stopped early."""
    hosts = None
    for i, m in enumerate(self.members):
      if not m.active:
        continue
      hosts = hosts or self.runner.fetch(state)
      c = m.config
      if m.last_saved != step:
        eval_metrics = m.history['last_eval'] if evaluated else None
        meta = {'config': c.to_dict(), 'data': {'seed': c.seed, 'position': step},
                'history': m.history, 'metrics': eval_metrics}
        try:
          m.checkpoints.save(step, hosts[i], json.loads(json.dumps(meta, default=str)),
                             eval_metrics)
        except SaveFailed as e:
          raise SaveFailed(m.checkpoints.directory, e, step, self._newest(m)) from e
        m.last_saved = step
      if m.history['stopped_early']:
        print(f'{m.workdir + ": " if self.vectorized else ""}Early stopping at step {step}: no '
              f'{c.best_metric} improvement in {c.early_stopping_patience} evals', flush=True)
        m.status, m.frozen = 'done', hosts[i]

  def check_saves(self, step: int):
    """A failed asynchronous save (a full disk, say) stops the run at once; the newest
    complete checkpoint is intact (retention may have removed older ones, as after a save)."""
    for m in self.members:
      if m.checkpoints is not None:
        try:
          m.checkpoints.check_saves()
        except SaveFailed as e:
          raise SaveFailed(m.checkpoints.directory, e, step, self._newest(m)) from e

  @staticmethod
  def _newest(m: Member) -> int | None:
    with contextlib.suppress(Exception):  # the disk that failed the save may fail this too.
      return max(m.checkpoints.complete_steps(), default=None)
    return None

  def preempt(self, state, step: int, last, stop):
    """SIGTERM/SIGINT: checks and saves the current step of every training member, waits for
    the saves, and raises Preempted (exit code 128 + the signal)."""
    self.settle(last)
    self.save(state, step, evaluated=False)
    self.close_saves()
    raise Preempted(f'{stop.name}: saved step {step} of {self.run.total_steps} in '
                    f'{self._where()}; run the same command again to resume', stop.signum)

  def end_of_run(self, state, stop) -> list[dict]:
    """The evaluators with at='end', per member; a signal between them stops the run after
    its last checkpoint (training was complete), and the same command finishes the job."""
    frozen = {i: m.frozen for i, m in enumerate(self.members) if m.frozen is not None}
    context = evaluators_lib.Context(self.run, self.betas, self.runner, state, frozen)
    ends = [{} for _ in self.members]
    self.close_saves()  # from here on, a signal has nothing to save and stops the run at once.
    stop.immediate = (f'training had finished (saved in {self._where()}); run the same command '
                      'again for the end-of-run evaluation')
    if stop.signum is not None:
      raise Preempted(f'{stop.name}: {stop.immediate}', stop.signum)
    if not any(m.status in ('training', 'done') for m in self.members):
      return ends
    for ev in self.evaluators:
      if ev.at == 'end':
        for e, out in zip(ends, ev.evaluate(context)):
          e.update(out)
    return ends

  def summary(self, m: Member, state, ends: dict | None = None) -> dict:
    """What summary.json records of a member."""
    if m.status == 'diverged':
      return m.diverged
    if m.status == 'passive':  # finished before this call.
      return m.finished
    out = {f'eval/{k}': v for k, v in m.history['last_eval'].items()}
    out.update(steps=int(state.step), total_steps=self.run.total_steps,
               early_stopped=m.history['stopped_early'],
               best={m.config.best_metric: m.history['best']})
    if ends is not None:
      out.update(ends)
      out['wall_time_s'] = round(time.time() - self.start_time, 1)
      if self.vectorized:
        out['vectorized_with'] = len(self.members)
    return out

  # --- small utilities ---------------------------------------------------------------------

  def any_active(self) -> bool:
    return any(m.active for m in self.members)

  def final_states(self, state) -> list:
    return [m.frozen if m.frozen is not None else s
            for m, s in zip(self.members, self.runner.fetch(state))]

  def _where(self) -> str:
    dirs = ([m.checkpoints.directory for m in self.members if m.checkpoints is not None]
            or [m.workdir for m in self.members])  # every member had finished before.
    return dirs[0] if len(dirs) == 1 else f'{len(dirs)} workdirs ({dirs[0]}, ...)'

  def close_saves(self):
    """Waits for every member's saves (all of them, also after one failed), then raises the
    first failure."""
    failures = []
    for m in self.members:
      if m.checkpoints is not None:
        try:
          m.checkpoints.wait()
        except SaveFailed as e:
          failures.append(e)
    if failures:
      raise failures[0]

  def close(self):
    try:
      self.close_saves()
    finally:
      for m in self.members:
        if m.checkpoints is not None:
          with contextlib.suppress(SaveFailed):  # raised by close_saves already.
            m.checkpoints.close()
        if m.writer is not None:
          m.writer.close()


def update_history(history: dict, eval_metrics: dict, config):
  """Records the eval, tracks the best eval metric, and sets history['stopped_early'] when
  patience runs out."""
  if config.best_metric not in eval_metrics:
    raise ValueError(f'config.best_metric={config.best_metric!r} is not an eval metric; '
                     f'allowed: {", ".join(map(repr, eval_metrics))}')
  history['last_eval'] = eval_metrics
  value = eval_metrics[config.best_metric]
  better = (history['best'] is None or
            (value > history['best'] if config.best_mode == 'max' else value < history['best']))
  if better:
    history['best'], history['evals_since_best'] = value, 0
  else:
    history['evals_since_best'] += 1
  patience = config.early_stopping_patience
  history['stopped_early'] = bool(patience) and history['evals_since_best'] >= patience


def write_summary(workdir: str, summary: dict):
  """summary.json (the sweep reads it; its presence marks the run finished) and the curves PNG."""
  if metrics_lib.is_writer():
    path = os.path.join(workdir, 'summary.json')
    metrics_lib.write_atomically(path, json.dumps(summary, indent=2))
    metrics_lib.plot_learning_curves(workdir)
