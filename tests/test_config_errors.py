"""Bad configs and data files: one line naming the field, exit code 2, nothing written to disk."""

import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags

from experiments.train import train_and_evaluate
from experiments.cli import describe, unknown_override
from experiments.config_check import check_config
from test_runner import ROOT, parse, tiny_config


def config_with(name, **fields):
  """A tiny valid config with dotted fields ('model.num_heads') set to any value: built from a
  dict, as a config file would, so that a wrong type is not refused by ConfigDict itself."""
  d = tiny_config(name).to_dict()
  for path, value in fields.items():
    *sections, key = path.split('.')
    node = d
    for section in sections:
      node = node[section]
    node[key] = value
  return ml_collections.ConfigDict(d)


def error_of(config) -> str:
  with pytest.raises(ValueError) as info:
    check_config(config)
  return str(info.value)


@pytest.mark.parametrize('name,fields,expected', [
    ('vit', {'model.num_heads': 3},
     'config.model.num_heads=3: d_model=16 (qkv_features or the input width) is not divisible '
     'by num_heads=3'),
    ('vit', {'batch_size': 12}, 'config.batch_size=12 is not divisible by the 8 devices'),
    ('vit', {'eval_batch_size': 60}, 'config.eval_batch_size=60 is not divisible by the 8 devices'),
    ('vit', {'grad_accum_steps': 3}, 'config.grad_accum_steps=3 does not divide the per-device '
     'batch of 2'),
    ('vit', {'num_devices': 9}, 'config.num_devices=9, but only 8 devices exist'),
    ('vit', {'model.patch_size': 3},
     'config.model.patch_size=3: image size 8x8 is not divisible by patch_size=3'),
    ('lm', {'model.posemb': 'learn', 'model.num_positions': 32},
     'config.model.num_positions=32: sequence length 128 exceeds the learned posemb table '
     '(num_positions=32)'),
    ('mnist1d', {'data.patch_size': 2, 'model.posemb': 'learn'},  # 21 rows do not fit 11.
     'config.model.num_positions=11: sequence length 21 exceeds the learned posemb table'),
    ('mnist1d', {'model.posemb': 'sincos2d'},
     "config.model.posemb='sincos2d'; allowed: 'learn', 'sinusoidal', 'rope', 'none'"),
    ('vit', {'model.score': 'bilinear'},
     "config.model.score='bilinear'; allowed: 'dot', 'general', 'additive', 'cosine', 'location'"),
    ('vit', {'parallel': 'pjit'}, "config.parallel='pjit'; allowed: 'pmap', 'jit'"),
    ('vit', {'model.beta_scale': -0.5}, 'config.model.beta_scale=-0.5; it must be >= 0'),
    ('vit', {'model.learn_beta': True, 'model.beta_scale': 0.0},
     'config.model.learn_beta=True: beta_scale=0 with learn_beta=True'),
    ('vit', {'model.posemb': 'rope', 'model.d_model': 12, 'model.num_heads': 4},
     "config.model.posemb='rope': rope needs an even head dim; got D=3"),
    ('vit', {'best_mode': 'mx'}, "config.best_mode='mx'; allowed: 'max', 'min'"),
    ('vit', {'best_metric': 'exact_match'},
     "config.best_metric='exact_match'; allowed: 'accuracy', 'loss'"),
    ('vit', {'optimizer.schedule': 'linear'},
     "config.optimizer.schedule='linear'; allowed: 'cosine', 'rsqrt', 'constant'"),
    ('vit', {'optimizer.lr': 0.0}, 'config.optimizer.lr=0.0; it must be > 0'),
    ('vit', {'optimizer.b2': 1.0}, 'config.optimizer.b2=1.0; allowed: 0 <= value < 1'),
    ('vit', {'label_smoothing': 1.0}, 'config.label_smoothing=1.0; allowed: 0 <= value < 1'),
    ('vit', {'model.dropout': float('nan')},
     'config.model.dropout=nan; it must be a finite number'),
    ('vit', {'total_steps': 0}, 'config.total_steps=0; set it or config.num_epochs > 0'),
    ('vit', {'batch_size': 2048}, 'config.batch_size=2048; it must be at most the 1437 training'),
    ('seq2seq', {'data.min_length': 5, 'data.max_length': 3},
     'config.data.min_length=5; it must be <= config.data.max_length=3'),
    ('vit', {'evals.test.type': 'confusion'},
     "config.evals.test.type='confusion'; allowed: 'attention_entropy', 'bits_by_length', 'exact_match_by_length',"),
    ('vit', {'evals.test.at': 'start'}, "config.evals.test.at='start'; allowed: 'eval', 'end'"),
    ('vit', {'evals.test.at': 'end'},
     "config.best_metric='accuracy'; allowed: (none: no evaluator with at='eval' names one)"),
    ('vit', {'evals.attention_entropy.layers': 2},
     'config.evals.attention_entropy.layers=2; unknown field; allowed: at, examples, type'),
    ('vit', {'evals.attention_entropy.examples': 0},
     'config.evals.attention_entropy.examples=0; it must be a positive integer'),
    ('seq2seq', {'evals.exact_match_by_length.batch_size': 2.5},
     'config.evals.exact_match_by_length.batch_size=2.5; it must be an integer'),
    ('seq2seq', {'data.task': 'rotate'}, "config.data.task='rotate'; allowed: 'copy', 'reverse'"),
    ('mnist1d', {'data.augment': 1},
     'config.data.augment=1; only images held in memory [N, H, W, C]'),
    ('mnist1d', {'data.patch_size': 3}, 'config.data.patch_size=3; MNIST-1D has length 40'),
    ('vit', {'data.name': 'imagenet'}, "config.data.name='imagenet'; allowed: 'digits', 'mnist1d'"),
    ('vit', {'model.name': 'GPT'}, "config.model.name='GPT'; allowed: 'ViT', 'EncoderClassifier'"),
    ('vit', {'model.dtype': 'int8'}, "config.model.dtype='int8'; allowed: 'float32', 'bfloat16'"),
    ('vit', {'model.d_model': '16'}, "config.model.d_model='16'; it must be an integer"),
    ('vit', {'model.num_heads': 2.0}, 'config.model.num_heads=2.0; it must be an integer'),
    ('vit', {'seed': True}, 'config.seed=True; it must be an integer'),
    ('vit', {'model.remat': 'yes'}, "config.model.remat='yes'; it must be True or False"),
    ('vit', {'optimizer': 0.1}, 'config.optimizer=0.1; it must be a ConfigDict with fields b1,'),
    ('vit', {'model.heads': 4}, 'config.model.heads=4; unknown field; allowed: activation,'),
    ('vit', {'data.size': 8}, 'config.data.size=8; unknown field; allowed: augment, name, '
     'split_seed, test_size'),
    ('vit', {'total_step': 3}, 'config.total_step=3; unknown field; allowed: batch_size,'),
])
def test_each_rule_names_field_value_and_what_is_allowed(name, fields, expected):
  message = error_of(config_with(name, **fields))
  assert message.startswith(expected) and '\n' not in message, message


def test_evaluator_option_ranges_go_by_type_whatever_the_name():
  config = tiny_config('vit')
  config.evals.ent = dict(type='attention_entropy', at='end', examples=0)
  assert error_of(config).startswith('config.evals.ent.examples=0; it must be a positive integer')


def test_missing_field():
  config = tiny_config('vit')
  del config['parallel']
  assert error_of(config).startswith('config.parallel is missing;')


def test_locked_config_refuses_unknown_keys_and_wrong_types_in_one_line():
  """--config.KEY=VALUE overrides meet ml_collections' locked, type-safe config; the CLI
  (experiments.cli.parse_flags) prints these lines."""
  with pytest.raises(AttributeError):
    parse('--config=configs/vit.py:quick', '--config.model.heads=4')
  line = unknown_override(tiny_config('vit'), ['run', '--config.total_steps=5',
                                               '--config.model.heads=4'])
  assert line.startswith("config.model.heads='4'; unknown field; allowed in config.model: "
                         'attention_dropout, beta_scale, d_ff, d_model, dropout,'), line
  assert unknown_override(tiny_config('vit'), ['run', '--config.total_steps=5']) is None
  for override, expected in [
      ('--config.batch_size=big', "flag --config.batch_size=big: invalid literal for int()"),
      ('--config.model.num_heads=2.5', "flag --config.model.num_heads=2.5: invalid literal"),
      ('--config.optimizer.lr=fast', "flag --config.optimizer.lr=fast: could not convert")]:
    with pytest.raises(flags.Error) as info:
      parse('--config=configs/vit.py:quick', override)
    line = describe(info.value)
    assert line.startswith(expected) and '\n' not in line, line


def _write(directory, files):
  directory.mkdir()
  for name, content in files.items():
    (directory / name).write_bytes(content)
  return str(directory)


def test_missing_and_malformed_data_files(tmp_path):
  config = config_with('cifar', **{'data.dir': str(tmp_path / 'nowhere')})
  assert error_of(config).startswith(f"config.data.dir='{tmp_path}/nowhere' is not a directory")
  cases = {  # what the folder holds -> in the error after "config.data.dir='...'"
      'empty': ({}, 'holds neither CIFAR-10'),
      'garbage': ({'data_batch_1': b'not a pickle', 'test_batch': b'\x80\x04junk'},
                  'UnpicklingError'),
      'other_pickle': ({'data_batch_1': pickle.dumps({b'x': 1}), 'test_batch': pickle.dumps([])},
                       'KeyError'),
      'wrong_shape': ({name: pickle.dumps({b'data': np.zeros((2, 5), np.uint8), b'labels': [0, 1]})
                       for name in ('data_batch_1', 'test_batch')}, 'cannot reshape'),
  }
  for tag, (files, expected) in cases.items():
    path = _write(tmp_path / tag, files)
    message = error_of(config_with('cifar', **{'data.dir': path}))
    assert message.startswith(f'config.data.dir={path!r}') and expected in message, message
    assert '\n' not in message
  good = {name: pickle.dumps({b'data': np.zeros((16, 3072), np.uint8), b'labels': [0] * 16})
          for name in ('data_batch_1', 'test_batch')}
  check_config(config_with('cifar', **{'data.dir': _write(tmp_path / 'good', good)}))
  message = error_of(config_with('lm', **{'data.path': str(tmp_path)}))
  assert message == f'config.data.path={str(tmp_path)!r} is not a readable file'


@pytest.mark.parametrize('name', ['vit', 'mnist1d', 'seq2seq', 'lm'])
def test_valid_configs_pass(name):
  check_config(tiny_config(name))


def run_cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path):
  config = f'--config={ROOT}/configs/vit.py:quick'
  out = run_cli(config, '--config.model.num_heads=3', f'--workdir={tmp_path / "w"}', cwd=ROOT)
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert errors == ['error: config.model.num_heads=3: d_model=64 (qkv_features or the input '
                    'width) is not divisible by num_heads=3'], out.stderr[-2000:]
  assert not (tmp_path / 'w').exists()
  # --verbose shows the traceback; without --workdir, no runs/<name>-<time>/ is created.
  out = run_cli(config, '--config.model.num_heads=3', '--verbose', cwd=tmp_path)
  assert out.returncode == 2 and 'Traceback' in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith('error: config.model.num_heads=3')
  assert os.listdir(tmp_path) == []


def test_a_failed_run_does_not_break_the_next_one_in_its_workdir(tmp_path):
  workdir = str(tmp_path / 'w')
  bad = tiny_config('vit', steps=2, eval_every=2, checkpoint_every=2, num_devices=1)
  bad.model.num_heads = 3
  with pytest.raises(ValueError, match='num_heads=3'):
    check_config(bad)
  assert not os.path.exists(workdir)
  with pytest.raises(ValueError, match='num_heads=3'):  # the trainer alone fails after writing.
    train_and_evaluate(bad, workdir)
  good = tiny_config('vit', steps=2, eval_every=2, checkpoint_every=2, num_devices=1)
  summary, _ = train_and_evaluate(good, workdir)
  assert summary['steps'] == 2


# ---- fuzz: random invalid configs ---------------------------------------------------------

NULLABLE = {'data.path', 'data.extrapolate_max_length', 'model.implementation'}  # None is valid there.
ZERO_INVALID = {'batch_size', 'grad_accum_steps', 'log_every', 'eval_every', 'checkpoint_every',
                'keep_checkpoints', 'total_steps', 'optimizer.lr', 'data.patch_size',
                'data.train_size', 'data.test_size', 'data.min_length', 'data.max_length',
                'data.num_symbols', 'data.seq_len', 'data.test_fraction', 'model.num_layers',
                'model.d_model', 'model.num_heads', 'model.patch_size',
                'model.num_positions', 'evals.attention_entropy.examples'}
TOO_LARGE = {'label_smoothing': 1.0, 'optimizer.b1': 1.0, 'optimizer.b2': 1.5, 'num_devices': 9,
             'model.dropout': 1.0, 'model.attention_dropout': 1.5, 'data.test_fraction': 1.0,
             'optimizer.lr': float('inf'), 'model.beta_scale': float('nan')}
CHOICES = {'parallel', 'best_mode', 'best_metric', 'optimizer.schedule', 'data.name', 'data.task',
           'model.name', 'model.posemb', 'model.score', 'model.norm', 'model.activation',
           'model.pool', 'model.implementation', 'model.dtype', 'evals.test.type',
           'evals.test.at', 'evals.attention_entropy.type'}
PAIRS = {  # inconsistent values; every one is invalid on its own base config.
    'all': [{'batch_size': 12}, {'eval_batch_size': 60}, {'grad_accum_steps': 3},
            {'batch_size': 100000}, {'total_steps': 0, 'num_epochs': 0}, {'model.num_heads': 5},
            {'model.d_model': 17}, {'model.learn_beta': True, 'model.beta_scale': 0.0},
            {'model.posemb': 'rope', 'model.d_model': 12, 'model.num_heads': 4}],
    'vit': [{'model.patch_size': 3},
            {'model.posemb': 'sincos2d', 'model.d_model': 18, 'model.num_heads': 2}],
    'mnist1d': [{'data.patch_size': 3}, {'data.patch_size': 2, 'model.posemb': 'learn'},
                {'model.posemb': 'sincos2d'},
                {'data.augment': 1}],
    'seq2seq': [{'data.min_length': 5, 'data.max_length': 3}, {'data.augment': 2},
                {'model.posemb': 'learn', 'model.num_positions': 4}],
    'lm': [{'model.posemb': 'learn', 'model.num_positions': 64}, {'data.augment': 1},
           {'data.path': '/nonexistent/corpus.txt'}],
}


def _fields(d, prefix=''):
  for key, value in d.items():
    if isinstance(value, dict):
      yield from _fields(value, f'{prefix}{key}.')
    else:
      yield prefix + key, value


def _mutation(rng, name, fields: dict) -> dict:
  """One random invalid change: {dotted field: value}, or {'-field': None} to delete one."""
  pick = lambda options: options[rng.integers(len(options))]
  numbers = [f for f, v in fields.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
  kind = pick(['type', 'negative', 'zero', 'large', 'choice', 'pair', 'unknown', 'missing'])
  if kind == 'type':
    field = pick(sorted(fields))
    value = fields[field]
    wrong = (['yes', 1, [True]] if isinstance(value, bool) else
             ['8', 2.5, [1], True] if isinstance(value, int) else
             ['0.1', [0.1], False] if isinstance(value, float) else [3, ['a'], True, 0.5])
    if field not in NULLABLE:
      wrong.append(None)
    return {field: pick(wrong)}
  if kind == 'negative':
    field = pick(numbers)
    return {field: -1 if isinstance(fields[field], int) else -0.5}
  if kind == 'zero':
    field = pick(sorted(ZERO_INVALID & set(fields)))
    return {field: 0 if isinstance(fields[field], int) else 0.0}
  if kind == 'large':
    field = pick(sorted(set(TOO_LARGE) & set(fields)))
    return {field: TOO_LARGE[field]}
  if kind == 'choice':
    return {pick(sorted(CHOICES & set(fields))): 'bogus'}
  if kind == 'pair':
    return dict(pick(PAIRS['all'] + PAIRS[name]))
  if kind == 'unknown':
    return {pick(['bogus', 'optimizer.bogus', 'data.bogus', 'model.bogus', 'evals.test.bogus']): 1}
  return {'-' + pick([f for f in fields if '.' not in f]): None}


def _apply(d, mutation):
  for path, value in mutation.items():
    *sections, key = path.lstrip('-').split('.')
    node = d
    for section in sections:
      node = node[section]
    if path.startswith('-'):
      node.pop(key, None)
    else:
      node[key] = value


def test_fuzz_invalid_configs_fail_in_one_line_and_write_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rng = np.random.default_rng(8)
  bases = {name: tiny_config(name).to_dict() for name in ('vit', 'mnist1d', 'seq2seq', 'lm')}
  failures, kinds = [], set()
  for i in range(240):
    name = list(bases)[i % len(bases)]
    d = ml_collections.ConfigDict(bases[name]).to_dict()  # a deep copy.
    mutations = []
    for _ in range(rng.integers(1, 4)):
      mutations.append(_mutation(rng, name, dict(_fields(d))))
      _apply(d, mutations[-1])
    try:
      check_config(ml_collections.ConfigDict(d))
      failures.append((name, mutations, 'accepted'))
    except ValueError as e:
      message = str(e)
      kinds.add(message.split('=')[0].split(';')[0])
      if not message.startswith('config.') or '\n' in message:
        failures.append((name, mutations, message))
    except Exception as e:  # noqa: BLE001 (any other exception is the failure being tested)
      failures.append((name, mutations, f'{type(e).__name__}: {e}'))
  assert not failures, '\n'.join(map(str, failures[:10]))
  assert len(kinds) > 30, kinds  # the errors came from many different fields.
  assert os.listdir(tmp_path) == []
