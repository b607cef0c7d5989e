"""Evaluators: what a run measures besides its training loss, chosen in the config.

  config.evals.<name> = dict(type='<module>', at='eval' | 'end', **options)

type     a module of this package (experiments/evaluators/<type>.py), or the dotted path of
         any importable module
at       'eval': at every eval step (config.eval_every) and at the last step. Its metrics
         are written to metrics.jsonl (records with split 'eval'), to summary.json as
         'eval/<metric>' (the last eval's), and can be config.best_metric.
         'end': once, after training. Its entries go into summary.json as they are.
options  keyword arguments of the module's `evaluate`.

A module defines
  evaluate(context, **options) -> list[dict]    one dict per member of the run (Context)
and, to name the metrics config.best_metric may choose from, optionally
  metric_names(task) -> tuple[str, ...]
The training loop imports no evaluator by name: it runs whatever config.evals lists.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any

import jax
import numpy as np

WHEN = ('eval', 'end')


def available() -> tuple[str, ...]:
  """The evaluator modules of this package."""
  here = os.path.dirname(os.path.abspath(__file__))
  return tuple(sorted(name[:-3] for name in os.listdir(here)
                      if name.endswith('.py') and not name.startswith('_')))


def module_of(type_name: str):
  """The module that `type` names: one of `available()`, or a dotted module path."""
  if '.' not in type_name and type_name not in available():
    raise ValueError(f'type={type_name!r}; allowed: {", ".join(map(repr, available()))}, or '
                     'the dotted path of a module that defines evaluate(context, **options)')
  try:
    return importlib.import_module(type_name if '.' in type_name else f'{__name__}.{type_name}')
  except ImportError as e:
    raise ValueError(f'type={type_name!r} does not import ({type(e).__name__}: {e})') from e


@dataclasses.dataclass(frozen=True)
class Evaluator:
  at: str  # 'eval' | 'end'
  evaluate: Any  # evaluate(context) -> list[dict], the options bound


def configured(config) -> list[Evaluator]:
  """The evaluators config.evals lists, in its order."""
  out = []
  for spec in config.get('evals', {}).values():
    options = dict(spec)
    module, at = module_of(options.pop('type')), options.pop('at', 'end')
    out.append(Evaluator(at, functools.partial(module.evaluate, **options)))
  return out


@dataclasses.dataclass
class Context:
  """What an evaluator sees of a run: its members share `run` (dataset, task, model) and differ
  in seed and β scale (one member unless the run is a vectorized group)."""
  run: Any  # experiments.steps.Run
  betas: list  # each member's model.beta_scale
  runner: Any  # experiments.runners: eval_step(state, batch), fetch(tree)
  state: Any  # the train state on the devices
  frozen: dict = dataclasses.field(default_factory=dict)  # member -> host state to use instead

  def params(self):
    """Host parameters with a leading member axis (also for a single run)."""
    states = [self.frozen.get(i, s) for i, s in enumerate(self.runner.fetch(self.state))]
    return jax.tree.map(lambda *xs: np.stack(xs), *[s.params for s in states])
