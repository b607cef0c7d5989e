"""Validates a whole run config before anything is written to disk or compiled.

`check_config(config)` raises ValueError with one line that names the field, its
value and what is allowed: `config.<field>=<value>; <what is allowed>`.
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
from experiments import evaluators, runners, tasks
from experiments.optimizer import SCHEDULES
from tx.validate import check_choice

BEST_MODES = ('max', 'min')
# Ranges of numeric fields; every other int or float field must be >= 0 (and finite).
AT_LEAST_1 = ('batch_size', 'grad_accum_steps', 'log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints', 'data.patch_size', 'data.train_size', 'data.test_size',
              'data.min_length', 'data.max_length', 'data.extrapolate_max_length',
              'data.num_symbols', 'data.seq_len', 'model.num_layers', 'model.d_model',
              'model.num_heads', 'model.d_ff', 'model.patch_size', 'model.num_positions',
              'model.num_classes', 'model.vocab_size', 'evals.attention_entropy.examples',
              'evals.exact_match_by_length.batch_size')
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


def check_config(config) -> None:
  """Raises a one-line ValueError for the first rule `config` breaks.

  Fields (config.X, config.optimizer.X, config.data.X, config.model.X, config.evals.NAME.X):
  - no unknown fields: the training fields are those of configs/common.py `training()` (all
    required) plus the sections data, model and evals; data takes the arguments of its loader
    (experiments/data.py) plus augment; model takes the fields of its tx model class (but
    attention_fn, a function); each evaluator takes type, at and the keyword arguments of
    its module's evaluate (experiments/evaluators/).
  - types as the defaults or annotations say: an int field takes no float or bool, a float
    field takes an int, a bool takes only True/False; dtype and param_dtype are names.
  - numbers are finite and >= 0; >= 1 for sizes, counts and intervals (AT_LEAST_1); in [0, 1)
    for label_smoothing, optimizer.b1/b2 and the dropout rates; optimizer.lr > 0;
    data.test_fraction in (0, 1).
  - choices: parallel (experiments.runners.PARALLEL), best_mode, optimizer.schedule
    (experiments.optimizer.SCHEDULES), data.name, model.name, model.dtype/param_dtype;
    data.task (the seq2seq loader); model posemb, score, norm, activation, pool,
    implementation (tx); evals.NAME.type (a module of experiments/evaluators/ or a dotted
    module path) and evals.NAME.at ('eval' or 'end').
  Consistency:
  - total_steps or num_epochs > 0; tensorboard=True needs tensorboardX installed.
  - num_devices <= the devices there are; batch_size divisible by the device count and the
    per-device batch by grad_accum_steps; eval_batch_size (or batch_size) divisible by the
    device count (experiments.runners).
  - data.min_length <= data.max_length; batch_size <= the training examples; data.augment only
    for image data.
  - data files: a missing or unreadable data.dir / data.path, or one whose files are not in
    the loader's format, names that field and the path.
  - the model against one training example, traced with jax.eval_shape (no compile), so
    that tx's own checks name the field: d_model divisible by num_heads, image size by
    patch_size, the sequence length within a learned posemb table (num_positions), an even head
    dim for rope, d_model % 4 for sincos2d, beta_scale >= 0 (> 0 with learn_beta).
  - best_metric is one of the metrics of the evaluators with at='eval'.
  """
  values = config.to_dict()
  for section in ('data', 'model', 'evals'):
    if not isinstance(values.get(section), dict):
      _fail(section, values.get(section), f'it must be a ConfigDict with the {section} fields')
  _check_section('', values, _training_schema(), required=True)
  _check_choice('parallel', config.parallel, runners.PARALLEL)
  _check_choice('best_mode', config.best_mode, BEST_MODES)
  _check_choice('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  if not (config.total_steps or config.num_epochs):
    _fail('total_steps', config.total_steps, 'set it or config.num_epochs > 0')
  if config.tensorboard and importlib.util.find_spec('tensorboardX') is None:
    _fail('tensorboard', True, 'it needs tensorboardX: pip install tensorboardX')
  devices = runners.select_devices(config.num_devices)
  runners.check_batch('batch_size', config.batch_size, len(devices), config.grad_accum_steps)
  runners.check_batch('eval_batch_size', config.eval_batch_size or config.batch_size,
                      len(devices), 1)
  periodic = _check_evals(values['evals'])
  _check_data_and_model(config, values, periodic)


def _check_data_and_model(config, values: dict, periodic: list):
  """The data and model sections, against each other and against best_metric."""
  loader = _named('data', values['data'], tasks.LOADERS)
  _check_section('data.', values['data'], _data_schema(loader))
  data = config.data
  if data.get('min_length', 1) > data.get('max_length', math.inf):
    _fail('data.min_length', data.min_length,
          f'it must be <= config.data.max_length={data.max_length}')
  model_class = _named('model', values['model'], tasks.MODELS)
  _check_section('model.', values['model'], _model_schema(model_class))

  dataset = _load_dataset(config, loader)
  n = len(dataset.train['targets'])
  if config.batch_size > n:
    _fail('batch_size', config.batch_size, f'it must be at most the {n} training examples')
  if data.get('augment') and dataset.train['inputs'].ndim != 4:
    _fail('data.augment', data.augment, 'only images [N, H, W, C] can be shifted; use 0')
  model = tasks.build_model(config, dataset.info)  # checks the dtype names.
  task = tasks.TASK_OF_MODEL[config.model.name]
  _trace(config, model, task, dataset)
  metrics = [name for module in periodic for name in module.metric_names(task)]
  if not metrics:
    _fail('best_metric', config.best_metric,
          "allowed: (none: no evaluator with at='eval' names one)")
  _check_choice('best_metric', config.best_metric, metrics)


def _fail(field: str, value, allowed: str):
  raise ValueError(f'config.{field}={value!r}; {allowed}')


def _check_choice(field: str, value, allowed):
  check_choice(f'config.{field}', value, tuple(allowed))


def _named(section: str, values: dict, known: dict):
  """The loader or model class that config.<section>.name picks."""
  name = values.get('name')
  _check_value(f'{section}.name', name, ('str',))
  _check_choice(f'{section}.name', name, known)
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


def _data_schema(loader) -> dict:
  params = inspect.signature(loader).parameters
  return dict({k: _kinds(p.annotation) for k, p in params.items()}, name=('str',), augment=('int',))


def _model_schema(model_class) -> dict:
  fields = dataclasses.fields(model_class)
  return {f.name: _kinds(f.type) for f in fields
          if f.init and f.name not in ('parent', 'name', 'attention_fn')} | {'name': ('str',)}


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
    _check_choice(f'{field}.at', spec.get('at', 'end'), evaluators.WHEN)
    schema = {k: _kinds(p.annotation) for k, p in
              inspect.signature(module.evaluate).parameters.items() if k != 'context'}
    schema |= {'type': ('str',), 'at': ('str',)}
    _check_section(field + '.', spec, schema)
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


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


def _load_dataset(config, loader):
  """tasks.load_dataset, with the loader's errors turned into one line naming the field."""
  try:
    return tasks.load_dataset(config)
  except Exception as e:
    text = _one_line(e)
    if isinstance(e, ValueError) and text.startswith('config.'):
      raise
    if isinstance(e, ValueError) and text.startswith('data.'):  # the loaders name their argument.
      raise ValueError('config.' + text) from e
    name = config.data.name
    for field in ('dir', 'path'):  # the loaders' file arguments.
      if field in inspect.signature(loader).parameters and config.data.get(field):
        raise ValueError(f'config.data.{field}={config.data[field]!r}: not readable as {name!r} '
                         f'data ({type(e).__name__}: {text})') from e
    raise ValueError(f'config.data (name={name!r}): {type(e).__name__}: {text}') from e


def _trace(config, model, task: str, dataset):
  """Traces init and the eval loss on one training example (jax.eval_shape: nothing is
  compiled), so that tx's checks run and name the field."""
  sample = {k: v[:1] for k, v in dataset.train.items()}
  batch = dict(sample, weight=np.ones(1, np.float32))

  def eval_sums(rng):
    params = model.init(rng, *tasks.model_inputs(task, sample))['params']
    return tasks.loss_and_metrics(task, model, params, batch)[1]

  try:
    jax.eval_shape(eval_sums, jax.random.key(0))
  except Exception as e:
    raise ValueError(_model_error(config.model, e)) from e


def _model_error(model, e: Exception) -> str:
  """tx's message, led by the last config.model field it quotes with its value (`num_heads=3`)."""
  text = _one_line(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {_one_line(e)}'
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
