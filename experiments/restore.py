"""A finished or interrupted run, back from its workdir: the config, the data, the model and
the parameters of a checkpoint (for experiments.inspect and experiments.generate)."""

from __future__ import annotations

import json
import os

import ml_collections

from experiments import trainer
from experiments.checkpoints import Checkpoints


def load_run(workdir: str, step: int | None = None):
  """(run, params, step) from workdir/config.json and the checkpoint at `step` (default: the
  latest). Errors name the workdir and what is missing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'--workdir={workdir!r} has no config.json; point it at a run directory '
                     'written by experiments.run')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'--workdir={workdir!r} has no checkpoints/ yet; it needs a saved step')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = trainer.setup(config)
  ckpt = Checkpoints(workdir, best_metric=config.best_metric, best_mode=config.best_mode)
  try:
    steps = ckpt.steps()
    if not steps:
      raise ValueError(f'--workdir={workdir!r} has no checkpoint saved yet')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'--step={step}; the checkpoints of {workdir!r} are at steps {steps}')
    state, _ = ckpt.restore(trainer.init_state(run), step)
  finally:
    ckpt.close()
  return run, state.params, step
