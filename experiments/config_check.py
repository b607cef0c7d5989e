"""Validates a whole run config before anything is written to disk or compiled.

`check_config(config)` raises ValueError with one line that names the field, its value and
what is allowed: `config.<field>=<value>; <what is allowed>`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re

import jax
import numpy as np

from configs import common
from experiments import evaluators, init_from, runners, tasks
from experiments.optimizer import MU_DTYPES, SCHEDULES
from tx.validate import check_choice

# Ranges of numeric fields; every other int or float field must be >= 0 (and finite).
AT_LEAST_1 = ('batch_size', 'grad_accum_steps', 'log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints', 'data.patch_size', 'data.train_size', 'data.test_size',
              'data.min_length', 'data.max_length', 'data.extrapolate_max_length',
              'data.num_symbols', 'data.seq_len', 'data.max_distance', 'model.num_layers',
              'model.d_model', 'model.num_heads', 'model.patch_size', 'model.num_positions',
              'model.num_classes', 'model.vocab_size',
              # evaluator options as evals.<type>.<option>, whatever the evaluator's name.
              'evals.attention_entropy.examples', 'evals.exact_match_by_length.batch_size',
              'evals.bits_by_length.max_factor', 'evals.bits_by_length.batch_size')
BELOW_1 = ('label_smoothing', 'optimizer.b1', 'optimizer.b2', 'model.dropout',
           'model.attention_dropout')  # [0, 1)
RANGES = {**{f: (lambda v: v >= 1, 'it must be a positive integer') for f in AT_LEAST_1},
          **{f: (lambda v: 0 <= v < 1, 'allowed: 0 <= value < 1') for f in BELOW_1},
          'optimizer.lr': (lambda v: v > 0, 'it must be > 0'),
          'data.test_fraction': (lambda v: 0 < v < 1, 'allowed: 0 < value < 1'),
          'model.pad_id': (lambda v: True, '')}  # any token id.
KINDS = {'int': int, 'float': (int, float), 'bool': bool, 'str': str, 'None': type(None)}
KIND_NAMES = {'int': 'an integer', 'float': 'a number', 'bool': 'True or False',
              'str': 'a string', 'None': 'None'}


def check_config(config, workdir: str | None = None) -> None:
  """Raises a one-line ValueError for the first rule `config` breaks.

  - Fields: those of configs/common.py training() (all required); data: its loader's arguments
    and augment; model: its tx class's fields; evals.NAME: type, at and its evaluate's options.
  - Values: types as the defaults or annotations say (an int is no float or bool; dtypes are
    names), finite numbers in RANGES (else >= 0), choices by name.
  - Consistency: steps to run; batch sizes that fit the devices; data.min_length <=
    data.max_length; batch_size <= the training examples; augment only for images; readable
    data files; the model traced on one example (jax.eval_shape: no compile), so that tx's own
    checks name the config.model field; best_metric a metric of an evaluator with at='eval'.
  - init_from: config.model completed from the checkpoint, then checked as above; its params
    fit the model (experiments.init_from). A run that resumes in `workdir` does not read it.
  """
  values = config.to_dict()
  for section in ('data', 'model', 'evals'):
    if not isinstance(values.get(section), dict):
      _fail(section, values.get(section), f'it must be a ConfigDict with the {section} fields')
  _check_section('', values, _training_schema(), required=True)
  config = init_from.resolve(config, workdir)  # config.model completed from the checkpoint.
  values = config.to_dict()
  check_choice('config.parallel', config.parallel, runners.PARALLEL)
  check_choice('config.best_mode', config.best_mode, ('max', 'min'))
  check_choice('config.optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  check_choice('config.optimizer.mu_dtype', config.optimizer.mu_dtype, MU_DTYPES)
  if not (config.total_steps or config.num_epochs):
    _fail('total_steps', config.total_steps, 'set it or config.num_epochs > 0')
  if config.tensorboard and importlib.util.find_spec('tensorboardX') is None:
    _fail('tensorboard', True, 'it needs tensorboardX: pip install tensorboardX')
  devices = runners.select_devices(config.num_devices)
  runners.check_batch('batch_size', config.batch_size, len(devices), config.grad_accum_steps)
  runners.check_batch('eval_batch_size', config.eval_batch_size or config.batch_size,
                      len(devices), 1)
  periodic = _check_evals(values['evals'])
  _check_data_and_model(config, values, periodic, workdir)


def _check_data_and_model(config, values: dict, periodic: list, workdir: str | None = None):
  """The data and model sections, against each other and against best_metric."""
  loader = _named('data', values['data'], tasks.LOADERS)
  _check_section('data.', values['data'], _signature_schema(loader, name=('str',),
                                                            augment=('int',), workers=('int',)))
  data = config.data
  if data.get('min_length', 1) > data.get('max_length', math.inf):
    _fail('data.min_length', data.min_length,
          f'it must be <= config.data.max_length={data.max_length}')
  model_class = _named('model', values['model'], tasks.MODELS)
  _check_section('model.', values['model'], {
      f.name: _kinds(f.type) for f in dataclasses.fields(model_class)
      if f.init and f.name not in ('parent', 'name', 'attention_fn')} | {'name': ('str',)})
  dataset = _load_dataset(config)
  n = dataset.num_train
  if config.batch_size > n:
    _fail('batch_size', config.batch_size, f'it must be at most the {n} training examples')
  if data.get('workers', 0) < 0:
    _fail('data.workers', data.workers, 'it must be >= 0 (0: batches are made in the trainer)')
  if data.get('augment') and (not dataset.held_in_memory or
                              dataset.sample(1)['inputs'].ndim != 4):
    _fail('data.augment', data.augment, 'only images held in memory [N, H, W, C] are shifted '
          "by it; use 0 (images on disk: data.crop='shift' and data.shift)")
  model = tasks.build_model(config, dataset.info)  # checks the dtype names.
  task = tasks.TASK_OF_MODEL[config.model.name]
  _trace(config, model, task, dataset)
  init_from.check_fits(config, model, task, dataset, workdir)
  metrics = [name for module in periodic for name in module.metric_names(task)]
  if not metrics:
    _fail('best_metric', config.best_metric,
          "allowed: (none: no evaluator with at='eval' names one)")
  check_choice('config.best_metric', config.best_metric, metrics)


def _fail(field: str, value, allowed: str):
  raise ValueError(f'config.{field}={value!r}; {allowed}')


def _named(section: str, values: dict, known: dict):
  """The loader or model class that config.<section>.name picks."""
  name = values.get('name')
  _check_value(f'{section}.name', name, ('str',))
  check_choice(f'config.{section}.name', name, known)
  return known[name]


def _training_schema() -> dict:
  """{field: kinds or a nested section} from the defaults of configs/common.py training()."""
  def schema(defaults):
    return {k: schema(v) if isinstance(v, dict) else (type(v).__name__,)
            for k, v in defaults.items()}
  return dict(schema(common.training().to_dict()), data={}, model={}, evals={})


def _kinds(annotation) -> tuple:
  """'int | None' -> ('int', 'None'); dtypes are given by name; () for anything else."""
  if annotation == 'Dtype':
    return ('str',)
  text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
  names = tuple(n.strip() for n in text.split('|'))
  return names if all(n in KINDS for n in names) else ()


def _signature_schema(fn, **extra) -> dict:
  """{argument: kinds} of `fn`'s parameters but context, and the `extra` fields."""
  return {k: _kinds(p.annotation) for k, p in inspect.signature(fn).parameters.items()
          if k != 'context'} | extra


def _check_evals(evals: dict) -> list:
  """Each evaluator's type, at and options; returns the modules of those with at='eval'
  that name their metrics (metric_names)."""
  periodic = []
  for name, spec in evals.items():
    field = f'evals.{name}'
    if not isinstance(spec, dict) or 'type' not in spec:
      _fail(field, spec, "it must be a ConfigDict with a type, e.g. dict(type='task_metrics')")
    _check_value(f'{field}.type', spec['type'], ('str',))
    try:
      module = evaluators.module_of(spec['type'])
    except ValueError as e:
      raise ValueError(f'config.{field}.{e}') from None
    check_choice(f'config.{field}.at', spec.get('at', 'end'), evaluators.WHEN)
    _check_section(field + '.', spec, _signature_schema(module.evaluate, type=('str',),
                                                        at=('str',)))
    for key, value in spec.items():  # ranges by evaluator type, whatever its name here.
      ok, allowed = RANGES.get(f'evals.{spec["type"]}.{key}', (lambda v: True, ''))
      if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
        _fail(f'{field}.{key}', value, allowed)
    if spec.get('at', 'end') == 'eval' and hasattr(module, 'metric_names'):
      periodic.append(module)
  return periodic


def _check_section(prefix: str, values: dict, schema: dict, required: bool = False):
  """Unknown (and, if required, missing) fields, then each value's type and range."""
  for key, value in values.items():
    field = prefix + key
    if key not in schema:
      _fail(field, value, f'unknown field; allowed: {", ".join(sorted(schema))}')
    if not isinstance(schema[key], dict):
      _check_value(field, value, schema[key])
    elif schema[key]:  # a section (data and model are checked against their own schemas).
      if not isinstance(value, dict):
        _fail(field, value, f'it must be a ConfigDict with fields {", ".join(sorted(schema[key]))}')
      _check_section(field + '.', value, schema[key], required)
  missing = [key for key in schema if key not in values]
  if required and missing:
    raise ValueError(f'config.{prefix}{missing[0]} is missing; configs/common.py training() '
                     'lists every field a run needs')


def _check_value(field: str, value, kinds: tuple):
  if kinds and not any(isinstance(value, KINDS[k]) and not (isinstance(value, bool) and
                                                           k in ('int', 'float')) for k in kinds):
    _fail(field, value, 'it must be ' + ' or '.join(KIND_NAMES[k] for k in kinds))
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if not math.isfinite(value):
    _fail(field, value, 'it must be a finite number')
  ok, allowed = RANGES.get(field, (lambda v: v >= 0, 'it must be >= 0'))
  if not ok(value):
    _fail(field, value, allowed)


def _load_dataset(config):
  """tasks.load_dataset, with the loader's errors turned into one line naming the field."""
  try:
    return tasks.load_dataset(config)
  except Exception as e:
    text = ' '.join(str(e).split())  # one line.
    if isinstance(e, ValueError) and text.startswith('config.'):
      raise
    if isinstance(e, ValueError) and text.startswith('data.'):  # the loaders name their argument.
      raise ValueError('config.' + text) from e
    name = config.data.name
    for field in ('dir', 'path'):  # the loaders' file arguments (checked as known fields).
      if config.data.get(field):
        raise ValueError(f'config.data.{field}={config.data[field]!r}: not readable as {name!r} '
                         f'data ({type(e).__name__}: {text})') from e
    raise ValueError(f'config.data (name={name!r}): {type(e).__name__}: {text}') from e


def _trace(config, model, task: str, dataset):
  """Traces init and the eval loss on one training example (jax.eval_shape: nothing is
  compiled), so that tx's checks run and name the field."""
  batch = dataset.sample(1) | {'weight': np.ones(1, np.float32)}

  def eval_sums(rng):
    params = model.init(rng, *tasks.model_inputs(task, batch))['params']
    return tasks.loss_and_metrics(task, model, params, batch)[1]

  try:
    jax.eval_shape(eval_sums, jax.random.key(0))
  except Exception as e:
    raise ValueError(_model_error(config.model, e)) from e


def _model_error(model, e: Exception) -> str:
  """tx's message, led by the last config.model field it quotes with its value (`num_heads=3`)."""
  text = ' '.join(str(e).split())  # one line.
  text = text if isinstance(e, ValueError) else f'{type(e).__name__}: {text}'
  quoted = re.findall(r"(\w+)=('[^']*'|[^\s;,)]+)", text)  # name=value pairs in the message.
  named = [k for k, v in quoted if k in model and v in (str(model[k]), repr(model[k]))]
  if not named:  # e.g. 'rope needs an even head dim': the option named by its value.
    named = [k for k, v in model.items() if k != 'name' and isinstance(v, str) and v and
             re.search(rf'\b{re.escape(v)}\b', text)]
  if not named:
    return f'config.model (name={model.name!r}): {text}'
  field = named[-1]
  if text.startswith(f'{field}='):
    return f'config.model.{text}'
  return f'config.model.{field}={model[field]!r}: {text}'
