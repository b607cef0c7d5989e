"""Fine-tuning: a run whose first step starts from a checkpoint's weights (config.init_from).

  python -m experiments.run --config=configs/vit_finetune.py:init_from=SOURCE
  python -m experiments.run --config=configs/vit.py --config.init_from=runs/vit-20261122-101010

SOURCE is a pretrained checkpoint (anything `tx.pretrained.load` reads: a Hugging Face or timm
directory, a state-dict file, a vit_jax .npz, a Hub id) or a tx workdir (a run of
experiments.run: its newest checkpoint, or WORKDIR@STEP for the checkpoint of that step).

The architecture is the checkpoint's (`resolve`). Every model field the checkpoint defines is
written into config.model, so that config.json records the whole model, except the FINETUNE
fields, which the config chooses (num_classes: the config's, else the dataset's). A field
that config.model sets itself must equal the checkpoint's: anything else is a one-line error.

The parameters (`adapt_params`) are the checkpoint's, cast to param_dtype, except:
  - the head, when its shape differs (another number of classes) or the checkpoint has none:
    the model's own init (zeros for ViT);
  - ViT's learned position table, for another patch grid: `tx.resample_posemb` to the data's
    grid (H/p × W/p), its prefix rows ([CLS]) kept as they are;
  - ViT's patch embedding, for a pretrained checkpoint with a recorded normalisation
    x̂ = (s·x − μ_c)/σ_c of its pixels (s = rescale · 255: tx's image data is in [0, 1]):
    folded into the embedding, which is linear, so that it takes tx's pixels as they are,

      kernel'[u, v, c, d] = kernel[u, v, c, d] · s / σ_c
      bias'[d]            = bias[d] − Σ_{u,v,c} kernel[u, v, c, d] · μ_c / σ_c

    (μ and σ are for the kernel's C channels, or one value for all; else an error; with no
    normalisation recorded, tx's pixels go in as they are, and the start line says so)
  - and for 1-channel data (digits) and a C-channel checkpoint, the kernel summed over its
    channels: kernel''[u, v, 0, d] = Σ_c kernel'[u, v, c, d], which computes exactly what the
    checkpoint computes on the grey image repeated C times.
Every other parameter must have the model's shape: else a one-line error naming the first one
and both shapes. Images keep the dataset's size; it must divide by the checkpoint's patch size.

Only a workdir's first start reads SOURCE: a resume continues from the workdir's own
checkpoint, with the architecture of its config.json. init_from is recorded in config.json,
so a resume with another one (or none) is a config change (refused unless allowed; it changes
nothing: the architecture stays the recorded one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import re
import weakref
from typing import Any

import flax
import jax
import numpy as np

import tx
from experiments import tasks
from experiments import workdir as workdir_lib

# Model fields a fine-tune chooses; every other one is the checkpoint's.
FINETUNE = ('num_classes', 'dropout', 'attention_dropout', 'beta_scale', 'dtype', 'param_dtype',
            'implementation', 'remat', 'remat_policy', 'scan_layers')
NOT_CONFIG = ('parent', 'name', 'attention_fn')  # module fields no config holds.


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What config.init_from (`source`) holds: a tx module, its params (NumPy), what it is
  (`origin`), and the normalisation its images were given ((scale, mean, std) per channel;
  None: none known)."""
  model: Any
  params: Any
  origin: str
  normalisation: tuple | None = None
  source: str = ''


def resumes(workdir: str | None) -> bool:
  """Whether a run in `workdir` continues from a checkpoint of its own (then SOURCE is unread)."""
  return bool(workdir) and bool(_saved_steps(workdir))


def _saved_steps(workdir: str) -> list[int]:
  """The steps of the checkpoint folders tx wrote in WORKDIR/checkpoints, oldest first."""
  from experiments.checkpoints import is_step_folder  # orbax: only when asked.
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and is_step_folder(os.path.join(directory, name)))


def resolve(config, workdir: str | None = None):
  """`config` with config.model completed by the architecture of config.init_from (a copy; the
  config itself when there is nothing to complete). A field config.model sets to another
  value than the checkpoint's is a ValueError naming it and both values. For a run that
  resumes in `workdir` and was started from a checkpoint, the missing fields come from its
  config.json instead, whatever init_from says now (empty, or another one allowed by
  --allow_config_change=init_from), and SOURCE is not read (the resume's own config check
  compares the fields both have)."""
  source = config.get('init_from')
  if resumes(workdir):
    has_record = os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG))
    recorded = workdir_lib.recorded(workdir) if source or has_record else {}
    if not (source or recorded.get('init_from')):
      return config  # never fine-tuned: config.model is the model, as for any resume.
    architecture = recorded.get('model', {})
  elif not source:
    return config
  else:
    checkpoint = load(source)
    name = {cls: n for n, cls in tasks.MODELS.items()}.get(type(checkpoint.model))
    if config.model.get('name') != name:
      raise ValueError(f'config.model.name={config.model.get("name")!r}; config.init_from='
                       f'{source!r} holds a {type(checkpoint.model).__name__}: use {name!r}')
    architecture = model_fields(checkpoint.model)
    for field, value in architecture.items():
      if field in config.model and config.model[field] != value:
        raise ValueError(f'config.model.{field}={config.model[field]!r}; config.init_from='
                         f'{source!r} has {field}={value!r}, and the architecture is the '
                         "checkpoint's: set it to that or leave it out of config.model (as "
                         'configs/vit_finetune.py does)')
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    for field, value in architecture.items():
      if field not in resolved.model and field not in FINETUNE:
        resolved.model[field] = value
  return resolved


def model_fields(model) -> dict:
  """{field: value} of a tx module's architecture: its fields but FINETUNE (JSON values)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.init and f.name not in NOT_CONFIG + FINETUNE}


def load(source: str) -> Checkpoint:
  """The Checkpoint of `source`, read once while its files are unchanged (a run's config check
  and its first step both ask for it). Errors are one ValueError naming config.init_from."""
  try:
    path, step = _split_step(source)
    return dataclasses.replace(_load(path, step, _signature(path)), source=source)
  except Exception as e:  # noqa: BLE001 (the loaders' errors, on one line naming the field)
    text = ' '.join(str(e).split())
    text = text if isinstance(e, ValueError) else f'{type(e).__name__}: {text}'
    raise ValueError(f'config.init_from={source!r}: {text}') from e


def _split_step(source: str) -> tuple[str, int | None]:
  """'WORKDIR@STEP' -> (WORKDIR, STEP) for a tx workdir; anything else -> (source, None).
  ValueError for '@STEP' after anything but a tx workdir (unless `source` itself exists)."""
  path, at, step = source.rpartition('@')
  if not (at and step.isdigit()):
    return source, None
  if _is_workdir(path):
    return path, int(step)
  if os.path.exists(source):
    return source, None
  raise ValueError(f'@STEP is for a tx workdir (a directory with {workdir_lib.CONFIG} and '
                   f'checkpoints/), and {path!r} is not one')


def _is_workdir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, workdir_lib.CONFIG))
          and os.path.isdir(os.path.join(path, 'checkpoints')))


def _signature(path: str) -> tuple:
  """What `path` is now, so that a changed source is read again: for a tx workdir (which may
  be training: its metrics grow, its retention deletes old steps) its config files and the
  names in checkpoints/; else (name, size, mtime) of every file under `path`. A file deleted
  while it is looked at is left out."""
  if _is_workdir(path):
    names = [os.path.join(path, name) for name in (workdir_lib.CONFIG, workdir_lib.CHANGES)]
    with contextlib.suppress(FileNotFoundError):
      return _stats(names) + (tuple(sorted(os.listdir(os.path.join(path, 'checkpoints')))),)
    return _stats(names)
  names = [path] if os.path.isfile(path) else [
      os.path.join(root, f) for root, _, files in sorted(os.walk(path)) for f in sorted(files)]
  return _stats(names)


def _stats(names) -> tuple:
  """(name, size, mtime) of each file of `names` that is still there."""
  out = []
  for name in names:
    try:
      stat = os.stat(name)
    except FileNotFoundError:
      continue  # deleted since it was listed (a checkpoint step going to retention).
    out.append((name, stat.st_size, stat.st_mtime_ns))
  return tuple(out)


@functools.lru_cache(maxsize=1)
def _load(path: str, step: int | None, signature: tuple) -> Checkpoint:
  del signature  # the cache key only.
  if _is_workdir(path):
    return _load_workdir(path, step)
  from tx import pretrained
  model, params = pretrained.load(path)
  normalisation = None
  if isinstance(model, tx.ViT):
    try:
      spec = pretrained.image_preprocessing(path)
      normalisation = (spec.rescale * 255.0, spec.mean, spec.std)
    except ValueError:
      pass  # nothing recorded (e.g. no preprocessor_config.json): pixels go in as they are.
  return Checkpoint(model, params, 'pretrained', normalisation)


def _load_workdir(path: str, step: int | None) -> Checkpoint:
  """The checkpoint at `step` (default: the newest) of the tx workdir `path`. load_run's
  errors name experiments.inspect's flags; here the step is WORKDIR@STEP, so they are
  reworded (those left after the checks below: the running job's retention racing the read)."""
  from experiments.restore import load_run
  saved = _saved_steps(path)
  if not saved:
    raise ValueError(f'{path} has no checkpoint saved yet')
  if step is not None and step not in saved:
    raise ValueError(f'the checkpoints of {path} are at steps {saved}')
  try:
    run, params, step = load_run(path, step)
  except ValueError as e:
    text = str(e).replace(f'--workdir={path!r}', path).replace('give --step', 'give @STEP')
    raise ValueError(re.sub(r'--step=(\d+)', lambda m: f'{path}@{m[1]}', text)) from None
  return Checkpoint(run.model, jax.device_get(params), f'tx workdir, step {step}')


def adapt_params(checkpoint: Checkpoint, fresh, model, image_shape=None):
  """(params, notes): the checkpoint's params in the shapes of `fresh` (the model's freshly
  initialised params, arrays or jax.ShapeDtypeStructs), as the module docstring says; notes
  are short phrases saying what was not taken as it is. `image_shape` (H, W, C) of the data
  for a ViT. ValueError naming the first parameter that does not fit."""
  notes = []
  loaded = tx.unstack_layers(checkpoint.params)
  wanted = _flat(fresh)
  scanned = any(tx.models.STACKED in path for path in wanted)
  loaded = _flat(tx.stack_layers(loaded) if scanned else loaded)
  is_vit = isinstance(model, tx.ViT)
  kernel, bias = ('embedding', 'kernel'), ('embedding', 'bias')
  if is_vit and checkpoint.normalisation and kernel in loaded:
    channels = np.shape(loaded[kernel])[2]
    scale = float(checkpoint.normalisation[0])
    mean, std = (_per_channel(values, name, channels, checkpoint) for name, values
                 in zip(('mean', 'std'), checkpoint.normalisation[1:]))
    if np.any(mean != 0) or np.any(std != 1) or scale != 1:
      k = np.asarray(loaded[kernel], np.float64)
      loaded[kernel] = k * (scale / std)[:, None]  # c is the kernel's axis 2 of [u, v, c, d].
      loaded[bias] = loaded[bias] - np.einsum('uvcd,c->d', k, mean / std)
      pixels = 'x' if scale == 1 else f'{scale:g}·x'
      notes.append(f'its normalisation ({pixels} − mean {_round(mean)}) / std {_round(std)} '
                   'folded into the patch embedding')
  elif is_vit and checkpoint.origin == 'pretrained' and checkpoint.normalisation is None:
    notes.append('no pixel normalisation recorded: [0, 1] pixels taken as they are')
  out = {}
  for path, want in wanted.items():
    name, have = '/'.join(path), loaded.get(path)
    if path[0] == 'head' and (have is None or have.shape != want.shape):
      out[path] = want  # the model's own init.
      if path[-1] == 'kernel':
        before = f'{have.shape[-1]} classes' if have is not None else 'none'
        notes.append(f'head re-initialised ({want.shape[-1]} classes; the checkpoint: {before})')
      continue
    if have is None:
      raise ValueError(f'config.init_from={checkpoint.source!r}: the model has {name}, which '
                       'the checkpoint lacks')
    if is_vit and path == kernel and want.shape[2] == 1 and have.shape[2] > 1:
      notes.append(f'patch kernel summed over its {have.shape[2]} channels for 1-channel images '
                   '(= the image repeated)')
      have = np.asarray(have).sum(axis=2, keepdims=True)
    if is_vit and path == ('pos_embedding',) and image_shape is not None:
      have = _resampled(have, want.shape, model.patch_size, image_shape, notes, checkpoint)
    if have.shape != want.shape:
      raise ValueError(f'config.init_from={checkpoint.source!r}: {name} is {tuple(have.shape)} '
                       f'in the checkpoint and {tuple(want.shape)} in the model; only the head '
                       '(re-initialised) and the position table (resampled) may differ')
    out[path] = np.asarray(have, want.dtype)
  left = sorted(p for p in loaded if p not in wanted and p[0] != 'head')
  if left:
    raise ValueError(f'config.init_from={checkpoint.source!r}: the checkpoint has '
                     f'{"/".join(left[0])}, which the model lacks')
  if scanned:
    notes.append('blocks stacked for scan_layers')
  return flax.traverse_util.unflatten_dict(out), notes


def _per_channel(values, name: str, channels: int, checkpoint) -> np.ndarray:
  """[channels] float64: a normalisation's mean or std per channel of the patch kernel (one
  value: the same for every channel); ValueError when it is for another number of channels."""
  values = np.atleast_1d(np.asarray(values, np.float64))
  if values.size == 1:
    return np.full(channels, values[0])
  if values.size != channels:
    raise ValueError(f'config.init_from={checkpoint.source!r}: its recorded pixel normalisation '
                     f'has {values.size} channels ({name} {_round(values)}) and its patch kernel '
                     f'{channels}; they must agree, or the {name} be one value')
  return values


def _resampled(table, shape, patch_size: int, image_shape, notes: list, checkpoint):
  """The learned table [1, prefix + h·w, D] on the data's patch grid (prefix rows kept); the
  table as it is when it has the model's shape (whatever its grid)."""
  if tuple(table.shape) == tuple(shape):
    return table
  grid = (image_shape[0] // patch_size, image_shape[1] // patch_size)
  prefix = shape[1] - grid[0] * grid[1]
  cells = table.shape[1] - prefix
  side = math.isqrt(max(cells, 0))
  if prefix < 0 or side * side != cells:
    raise ValueError(f'config.init_from={checkpoint.source!r}: pos_embedding has '
                     f'{table.shape[1]} rows, which is not {max(prefix, 0)} prefix rows and a '
                     f'square patch grid; the model needs {tuple(shape)}')
  if (side, side) == grid:
    return table
  kept = f', {prefix} prefix row{"s" * (prefix != 1)} kept' if prefix else ''
  notes.append(f'pos_embedding resampled from {_a(side)} {side}x{side} to {_a(grid[0])} '
               f'{grid[0]}x{grid[1]} patch grid{kept}')
  return np.asarray(tx.resample_posemb(np.asarray(table), grid, prefix, old_grid=(side, side)))


def _a(number: int) -> str:
  """The article before a number read aloud: 'an' where it starts with a vowel sound (8, 11,
  18, 80-89, 800, ...), else 'a'."""
  return 'an' if str(number).startswith('8') or number in (11, 18) else 'a'


def _round(values) -> str:
  return '(' + ', '.join(f'{v:.3g}' for v in values) + ')'


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(dict(tree))


def _image_shape(task: str, inputs):
  return inputs.shape[1:] if task == 'classify' and inputs.ndim == 4 else None


def check_fits(config, model, task: str, dataset, workdir: str | None = None):
  """For experiments.config_check: ValueError unless config.init_from's params fit `model` on
  `dataset` (shapes only: nothing is compiled); nothing to do without init_from or when the
  run resumes in `workdir`."""
  if not config.get('init_from') or resumes(workdir):
    return
  sample = dataset.sample(1)
  fresh = jax.eval_shape(lambda rng: model.init(rng, *tasks.model_inputs(task, sample))['params'],
                         jax.random.key(0))
  adapt_params(load(config.init_from), fresh, model, _image_shape(task, sample['inputs']))
  _check_vocabulary(config, model, dataset)


def _check_vocabulary(config, model, dataset):
  """A language model's tokens must be the checkpoint's: the same vocabulary size."""
  size = dataset.info.get('vocab_size')
  if size is not None and getattr(model, 'vocab_size', size) != size:
    raise ValueError(f'config.init_from={config.init_from!r} has vocab_size={model.vocab_size} '
                     f'and the dataset {size}: the dataset\'s tokens must be the checkpoint\'s')


_announced: weakref.ref | None = None  # the Run whose line was printed (weakly held)


def initial_state(run, state):
  """The fresh TrainState `state` of `run` with the params of run.config.init_from (adapted).
  The optimizer state is the fresh one (it depends on the params' shapes only). One line says
  what was loaded, printed on process 0 and once per run: the members of a vectorized group
  share their run and their source. The source is then dropped from load's cache, which
  holds a whole checkpoint in host memory (a group's next member reads it again)."""
  global _announced
  source = run.config.init_from
  checkpoint = load(source)
  image_shape = _image_shape(run.task, run.dataset.sample(1)['inputs'])
  params, notes = adapt_params(checkpoint, state.params, run.model, image_shape)
  _check_vocabulary(run.config, run.model, run.dataset)
  beta, trained = run.model.beta_scale, getattr(checkpoint.model, 'beta_scale', 1.0)
  if beta != trained:  # a fine-tune chooses its own β (a group: its first member's).
    notes.append(f'beta_scale {beta:g}, the source trained at beta_scale {trained:g}')
  if _announced is None or _announced() is not run:
    _announced = weakref.ref(run)
    if jax.process_index() == 0:
      print(f'init_from {source} ({checkpoint.origin}): {describe(run.model)}'
            + ''.join(f'; {note}' for note in notes), flush=True)
  _load.cache_clear()
  return state.replace(params=params)


def describe(model) -> str:
  """'ViT, 12 layers, d_model 768, 12 heads, d_ff 3072, patch 16'."""
  parts = [type(model).__name__, f'{model.num_layers} layer{"s" * (model.num_layers != 1)}',
           f'd_model {model.d_model}', f'{model.num_heads} heads', f'd_ff {model.d_ff}']
  if isinstance(model, tx.ViT):
    parts.append(f'patch {model.patch_size}')
  return ', '.join(parts)
