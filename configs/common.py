"""Shared pieces of the configs: `:key=value` argument parsing and the default training fields."""

import ml_collections


def parse_arg(arg, **defaults):
  """'posemb=sincos2d,beta_scale=0.5' -> ConfigDict over `defaults`, typed like each default.

  A bare key means True (`:quick`). Unknown keys raise a ValueError naming the allowed ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config argument {key!r}; allowed: {", ".join(sorted(defaults))}')
    default = defaults[key]
    if isinstance(default, bool):
      booleans = {'': True, 'true': True, '1': True, 'false': False, '0': False}
      if value.lower() not in booleans:
        raise ValueError(f'config argument {key}={value!r}; allowed: true, false (or bare {key})')
      value = booleans[value.lower()]
    else:
      try:
        value = type(default)(value)
      except ValueError:
        raise ValueError(f'config argument {key}={value!r}; it must be a '
                         f'{type(default).__name__}, e.g. {key}={default}') from None
    out[key] = value
  return out


def training(**overrides) -> ml_collections.ConfigDict:
  """The fields every run has (experiments/config_check.py requires exactly these)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128  # global, over all devices and hosts.
  c.eval_batch_size = 0  # 0: same as batch_size.
  c.total_steps = 0  # 0: num_epochs × (train examples // batch_size).
  c.num_epochs = 0
  c.parallel = 'jit'  # 'jit' (Mesh + NamedSharding) or 'pmap'.
  c.num_devices = 0  # 0: all devices.
  c.distributed = False  # jax.distributed.initialize() for multi-host runs.
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 2  # the last N, plus the best by best_metric.
  c.best_metric = 'accuracy'
  c.best_mode = 'max'
  c.early_stopping_patience = 0  # evals without improvement; 0 = off.
  c.tensorboard = False
  c.debug_nans = False  # jax_debug_nans: find the op that made the first NaN (slow).
  # A checkpoint or tx workdir whose weights the first step starts from; '' = random init
  # (experiments/init_from.py).
  c.init_from = ''
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule='cosine', warmup_steps=100, b1=0.9, b2=0.999, weight_decay=1e-4,
      grad_clip=1.0, mu_dtype=''))  # mu_dtype: Adam's first moment; '' = the params' dtype.
  # Evaluators (experiments/evaluators/): at='eval' runs at every eval step, 'end' after training.
  c.evals = ml_collections.ConfigDict(dict(
      test=dict(type='task_metrics', at='eval'),
      attention_entropy=dict(type='attention_entropy', at='end', examples=256)))
  for key, value in overrides.items():
    c[key] = value
  return c


def image_data(name: str = 'folder', **overrides) -> ml_collections.ConfigDict:
  """config.data for labelled images on disk (experiments/data/image_dataset.py, docs/data.md).

  name: 'folder' (DIR/train/<class>/*.jpg, DIR/val/...), 'tfds' (a `tfds build
  --file_format=array_record` folder) or 'parquet' (Hub-style shards); dir: where.
  image_size: the side of the square model input; 0 reads it from the images.
  crop: 'inception' (random-resized crop of area >= min_scale), 'shift' (pad by `shift`
  pixels and crop back) or 'none'; flip: random horizontal flips; eval_crop: the evaluation
  view's centred fraction of the shorter side (0.875: resize 256, crop 224); mixup: the
  Beta(α, α) of mixup (0: off). skip_corrupt: an undecodable image gets weight 0 and a
  warning instead of stopping the run. eval_split: '' takes val, validation or test.
  image_key, label_key: the columns (tfds, parquet). workers: grain worker processes that
  make batches (0: a thread of the trainer).
  """
  d = ml_collections.ConfigDict(dict(
      name=name, dir='', image_size=0, crop='inception', min_scale=0.08, shift=0, flip=True,
      eval_crop=0.875, mixup=0.0, skip_corrupt=False, train_split='train', eval_split='',
      image_key='image', label_key='label', workers=0))
  d.update(overrides)
  return d


def make_quick(c, steps: int = 60):
  """Shrinks a config in place to a smoke run: a 1-layer, 16-wide model and `steps` steps."""
  c.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32)
  c.update(dict(total_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=20))


def ablation_arg(arg):
  """The arguments every ablation config takes: quick, seeds, steps (0: 1,000, or 60 with
  quick), parsed once."""
  if isinstance(arg, ml_collections.ConfigDict):
    return arg
  return parse_arg(arg, quick=False, seeds=3, steps=0)


def ablation_config(base, arg):
  """An ablation's base run: `base` (a config module) shortened to `steps`, or made quick."""
  arg = ablation_arg(arg)
  c = base.get_config()
  c.update(dict(total_steps=arg.steps or 1000, eval_every=500, checkpoint_every=500))
  if arg.quick:
    make_quick(c, arg.steps or 60)
  return c


def ablation_seeds(arg):
  """Seeds 0..seeds-1; 2 with `quick` (enough for a mean ± std)."""
  arg = ablation_arg(arg)
  return range(2 if arg.quick else arg.seeds)
