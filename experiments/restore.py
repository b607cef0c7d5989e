"""A finished or interrupted run, back from its workdir: the config, the data, the model and
the parameters of a checkpoint (for experiments.inspect and experiments.generate)."""

from __future__ import annotations

import contextlib
import json
import os

import ml_collections

from experiments import steps
from experiments.checkpoints import Checkpoints

# Config fields that have another name now, as config.json files written earlier spell them.
RENAMED = {('model', 'max_len'): 'num_positions', ('data', 'min_len'): 'min_length',
           ('data', 'max_len'): 'max_length', ('data', 'test_max_len'): 'extrapolate_max_length'}


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
    values = json.load(f)
  for (section, old), new in RENAMED.items():
    if old in values.get(section, {}):
      values[section][new] = values[section].pop(old)
  config = ml_collections.ConfigDict(values)
  run = steps.setup(config)
  ckpt = Checkpoints(workdir, best_metric=config.best_metric, best_mode=config.best_mode)
  with contextlib.closing(ckpt):
    saved = ckpt.steps()
    if not saved:
      raise ValueError(f'--workdir={workdir!r} has no checkpoint saved yet')
    step = saved[-1] if step is None else step
    if step not in saved:
      raise ValueError(f'--step={step}; the checkpoints of {workdir!r} are at steps {saved}')
    state, _ = ckpt.restore(steps.init_state(run), step)
  return run, state.params, step
