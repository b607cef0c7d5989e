"""experiments.run: configs, smoke runs, pmap/jit agreement, resume, CLI errors."""

import importlib
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments.train import train_and_evaluate
from experiments.checkpoints import Checkpoints
from experiments.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(num_layers=1, d_model=16, num_heads=2, d_ff=32)


def tiny_config(name, arg='quick', steps=4, **overrides):
  c = importlib.import_module(f'configs.{name}').get_config(arg)
  c.model.update(TINY_MODEL)
  c.update(dict(total_steps=steps, num_epochs=0, eval_every=steps, log_every=2,
                checkpoint_every=steps, batch_size=16, eval_batch_size=64))
  c.update(overrides)
  return c


def parse(*argv):
  values = flags.FlagValues()  # the overrides are found in sys_argv when the flag is defined.
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=['run', *argv])
  values(['run', *argv])
  return values.config


def test_config_variants_and_overrides():
  c = parse('--config=configs/vit.py:posemb=sincos2d,beta_scale=0.5,learn_beta',
            '--config.total_steps=7', '--config.model.dropout=0.2', '--config.parallel=pmap')
  assert (c.model.posemb, c.model.beta_scale, c.model.learn_beta) == ('sincos2d', 0.5, True)
  assert (c.total_steps, c.model.dropout, c.parallel) == (7, 0.2, 'pmap')
  for key in ('seed', 'batch_size', 'total_steps', 'parallel'):
    assert key in c
  assert {'posemb', 'beta_scale', 'learn_beta'} <= set(c.model)
  with pytest.raises(AttributeError, match='Did you mean "total_steps"'):  # locked config.
    parse('--config=configs/vit.py', '--config.total_step=7')
  with pytest.raises(flags.Error, match="config argument 'posmb'; allowed:"):
    parse('--config=configs/vit.py:posmb=learn')


@pytest.mark.parametrize('name', ['vit', 'mnist1d', 'seq2seq', 'lm'])
def test_smoke_run_writes_the_workdir(name, tmp_path):
  summary, state = train_and_evaluate(tiny_config(name), str(tmp_path))
  assert int(state.step) == 4 and summary['steps'] == 4
  for f in ('config.json', 'metrics.jsonl', 'summary.json', 'learning_curves.png'):
    assert (tmp_path / f).exists(), f
  with open(tmp_path / 'summary.json') as f:
    written = json.load(f)
  assert np.isfinite(written['eval/loss']) and 'wall_time_s' in written
  splits = [r['split'] for r in read_metrics(str(tmp_path))]
  assert splits.count('train') == 2 and splits.count('eval') == 1
  assert Checkpoints(str(tmp_path)).latest_step() == 4


def _train_trajectory(tmp_path, tag, **overrides):
  """Per-step loss and gradient norm over 20 steps of a tiny ViT (short warmup, so it moves)."""
  config = tiny_config('vit', steps=20, log_every=1, batch_size=64, **overrides)
  config.optimizer.update(dict(lr=3e-3, warmup_steps=2))  # independent of the config's defaults.
  workdir = str(tmp_path / tag)
  train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if r['split'] == 'train']
  return np.array([[r['loss'], r['grad_norm']] for r in records])


def test_single_device_pmap_jit_and_accumulation_agree(tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices.
  single = _train_trajectory(tmp_path, 'one', parallel='jit', num_devices=1)
  assert len(single) == 20 and single[-1, 0] < single[0, 0] - 0.05  # it trains.
  runs = {'pmap8': dict(parallel='pmap'), 'jit8': dict(parallel='jit'),
          'pmap8_accum4': dict(parallel='pmap', grad_accum_steps=4),
          'jit8_accum2': dict(parallel='jit', grad_accum_steps=2)}
  for tag, overrides in runs.items():
    # Loss and gradient norm: a gradient off by a constant factor shows in the latter.
    np.testing.assert_allclose(_train_trajectory(tmp_path, tag, **overrides), single, rtol=1e-4,
                               err_msg=tag)


@pytest.mark.parametrize('parallel', ['jit', 'pmap'])
def test_resume_ends_with_the_same_parameters(tmp_path, parallel):
  config = tiny_config('vit', steps=20, checkpoint_every=10, eval_every=20, parallel=parallel)
  config.model.dropout = 0.1  # so that the restored RNG matters.
  _, straight = train_and_evaluate(config, str(tmp_path / 'straight'))
  interrupted = str(tmp_path / 'interrupted')
  _, partial = train_and_evaluate(config, interrupted, stop_after=15)  # "preempted".
  assert int(partial.step) == 15 and Checkpoints(interrupted).latest_step() == 10
  _, resumed = train_and_evaluate(config, interrupted)  # same command again.
  assert int(resumed.step) == 20
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)


def test_best_checkpoint_survives_a_resume(tmp_path):
  # The highest eval loss is the first one (step 2), so best_mode='max' marks it best.
  config = tiny_config('vit', steps=12, eval_every=2, checkpoint_every=2, keep_checkpoints=1,
                       best_metric='loss', best_mode='max')
  config.optimizer.warmup_steps = 1
  train_and_evaluate(config, str(tmp_path), stop_after=7)
  assert sorted(Checkpoints(str(tmp_path)).manager.all_steps()) == [2, 6]
  train_and_evaluate(config, str(tmp_path))
  assert sorted(Checkpoints(str(tmp_path)).manager.all_steps()) == [2, 12]
  steps = [(r['step'], r['split']) for r in read_metrics(str(tmp_path))]
  assert len(steps) == len(set(steps))  # no duplicate records after the resume.


def test_early_stopping_and_rerunning_a_stopped_run(tmp_path):
  config = tiny_config('vit', steps=40, eval_every=5, early_stopping_patience=2)
  config.optimizer.lr = 0.0  # nothing improves after the first eval.
  summary, state = train_and_evaluate(config, str(tmp_path))
  assert summary['early_stopped'] and int(state.step) == 15
  summary, state = train_and_evaluate(config, str(tmp_path))  # the same command again.
  assert summary['early_stopped'] and int(state.step) == 15 and 'eval/accuracy' in summary


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(ValueError, match='config.batch_size=12 is not divisible by the 8 devices'):
    train_and_evaluate(tiny_config('vit', batch_size=12), str(tmp_path))
  with pytest.raises(ValueError, match='config.eval_batch_size=60 is not divisible'):
    train_and_evaluate(tiny_config('vit', eval_batch_size=60), str(tmp_path))


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  bad = [
      ('--config=configs/vit.py:quick', '--config.parallel=pjit'),
      ('--config=configs/vit.py:quick', '--config.total_step=3'),
      ('--config=configs/vit.py:quick', '--config.model.posemb=learned'),
      ('--config=configs/vit.py:posmb=learn',),
  ]
  expected = ["config.parallel='pjit'", 'Did you mean "total_steps"', "posemb='learned'",
              "'posmb'"]
  for args, needle in zip(bad, expected):
    out = run_cli(*args, f'--workdir={tmp_path / "w"}')
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith('error:')]
    assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr[-2000:]
    assert 'Traceback' not in out.stderr
  out = run_cli('--config=configs/vit.py:quick', '--config.parallel=pjit', '--verbose',
                f'--workdir={tmp_path / "w"}')
  assert out.returncode == 2 and 'Traceback' in out.stderr


def test_tensorboard_event_files(tmp_path):
  train_and_evaluate(tiny_config('vit', tensorboard=True), str(tmp_path))
  events = os.listdir(tmp_path / 'tensorboard')
  assert any(f.startswith('events.out.tfevents') for f in events)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_also_across_a_sigterm_and_resume(tmp_path):
  """jax.distributed with 2 CPU processes × 4 devices reproduces 1 process × 8 devices. One
  process gets SIGTERM mid-run: both stop at the same step (JAX's preemption sync point) and
  save it; the rerun of both resumes from it (restored on the host, then placed on the mesh)."""
  steps = 60
  flags_ = ['--config=configs/vit.py:quick', f'--config.total_steps={steps}', '--config.log_every=1',
            f'--config.eval_every={steps}', f'--config.checkpoint_every={steps}',
            '--config.batch_size=64', '--config.optimizer.warmup_steps=2']
  flags_ += [f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()]

  def launch():
    port, procs = _free_port(), []
    for pid in range(2):
      env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
                 JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                 JAX_PROCESS_ID=str(pid), JAX_PLATFORMS='cpu')
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'experiments.run', *flags_, f'--workdir={tmp_path / "multi"}'],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs

  procs = launch()
  for line in procs[0].stdout:
    if line.startswith('step ') and int(line.split()[1].split('/')[0]) >= 20:
      break
  procs[1].send_signal(signal.SIGTERM)  # the notice reaches one process only.
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  saved = [line for out in outs for line in out.splitlines() if line.startswith('SIGTERM: saved')]
  assert len(saved) == 2 and saved[0] == saved[1]  # the same step in both processes.
  assert not (tmp_path / 'multi' / 'lock.json').exists()  # process 0's, released on the signal.
  procs = launch()
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert all('Resumed from step' in out for out in outs)
  single = run_cli(*flags_, f'--workdir={tmp_path / "single"}')
  assert single.returncode == 0, single.stderr[-3000:]
  losses = lambda d: [r['loss'] for r in read_metrics(str(tmp_path / d)) if r['split'] == 'train']
  evals = lambda d: [r for r in read_metrics(str(tmp_path / d)) if r['split'] == 'eval']
  assert len(losses('multi')) == steps  # written once, by process 0, across the resume.
  assert losses('single')[-1] < losses('single')[0] - 1e-3  # training moved.
  # Same math; only the order of the cross-process (gloo) reductions differs.
  np.testing.assert_allclose(losses('multi'), losses('single'), rtol=1e-5)
  (multi_eval,), (single_eval,) = evals('multi'), evals('single')
  for key in ('accuracy', 'loss'):
    assert multi_eval[key] == pytest.approx(single_eval[key], rel=1e-5)
