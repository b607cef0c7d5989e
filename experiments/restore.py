"""A finished or interrupted run, back from its workdir: the config, the data, the model and
the parameters of a checkpoint (for experiments.inspect and experiments.generate).

A reader may run beside the training job that writes the workdir: that job's retention can
delete the step being read. Readers never move or delete anything, and a step that vanished
while being read is not called corrupt (see `_restore`)."""

from __future__ import annotations

import contextlib
import os
import time

from experiments import steps
from experiments import workdir as workdir_lib
from experiments.checkpoints import Checkpoints, CorruptCheckpoint

TRIES = 5  # steps tried in turn when the running job's retention deletes each one being read
DELETE_WAIT_S = 2.0  # how long a step that is being deleted may take to vanish


def load_run(workdir: str, step: int | None = None):
  """(run, params, step) from the config the workdir's run trains with (config.json and its
  recorded changes) and the checkpoint at `step` (default: the latest). Errors name the
  workdir and what is missing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'--workdir={workdir!r} has no config.json; point it at a run directory '
                     'written by experiments.run')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'--workdir={workdir!r} has no checkpoints/ yet; it needs a saved step')
  config = workdir_lib.recorded_config(workdir, step)
  run = steps.setup(config)
  ckpt = Checkpoints(workdir, best_metric=config.best_metric, best_mode=config.best_mode,
                     reader=True)
  with contextlib.closing(ckpt):
    step, state = _restore(ckpt, run, workdir, step)
  return run, state.params, step


def _restore(ckpt: Checkpoints, run, workdir: str, step: int | None):
  """(step, state) of checkpoint `step` (default: the newest). When the read fails because the
  running job's retention deleted the step meanwhile, the then-newest step is read instead
  (default), or a ValueError says so (`step` given); a step still there is CorruptCheckpoint."""
  for _ in range(TRIES):
    saved = ckpt.steps()
    if not saved:
      raise ValueError(f'--workdir={workdir!r} has no checkpoint saved yet')
    chosen = saved[-1] if step is None else step
    if chosen not in saved:
      raise ValueError(f'--step={step}; the checkpoints of {workdir!r} are at steps {saved}')
    try:
      state, _ = ckpt.restore(steps.init_state(run), chosen)
      return chosen, state
    except CorruptCheckpoint:
      if not _deleted(ckpt, chosen):
        raise
      if step is not None:
        raise ValueError(f'--step={step}: the running job\'s retention deleted checkpoint step '
                         f'{step} of {workdir!r} while it was read; the checkpoints are now at '
                         f'steps {ckpt.steps()}') from None
  raise ValueError(f'the running job\'s retention deleted {TRIES} checkpoints of {workdir!r} in '
                   'turn while each was read; try again, or give --step')


def _deleted(ckpt: Checkpoints, step: int) -> bool:
  """Whether checkpoint `step` is gone: its folder is missing, or vanishes within DELETE_WAIT_S
  while a newer step exists (orbax deletes a step's files, then its folder, only after saving a
  newer one). Reloads the list of steps."""
  folder = os.path.join(ckpt.directory, str(step))
  ckpt.manager.reload()
  deadline = time.monotonic() + (DELETE_WAIT_S if max(ckpt.steps(), default=step) > step else 0)
  while os.path.isdir(folder) and time.monotonic() < deadline:
    time.sleep(0.05)
  ckpt.manager.reload()
  return not os.path.isdir(folder)
