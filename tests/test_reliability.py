"""Preemption, crashes, corrupted checkpoints, divergence, and restoring into the wrong model.

The signal tests send real signals to real `python -m experiments.run` processes (8 simulated
CPU devices, inherited from conftest) and compare final parameters bit for bit with an
uninterrupted run of the same command.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import steps
from experiments.train import train_and_evaluate
from experiments.checkpoints import Checkpoints
from experiments.metrics import read_metrics
from experiments.restore import load_run
from tests.test_runner import ROOT, TINY_MODEL, parse, tiny_config

STEPS = 300
FLAGS = ['--config=configs/vit.py:quick', f'--config.total_steps={STEPS}', '--config.log_every=1',
         f'--config.eval_every={STEPS}', '--config.checkpoint_every=40', '--config.batch_size=16',
         '--config.model.dropout=0.1']  # dropout: the restored RNG must matter.
FLAGS += [f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()]


def start(workdir, *extra):
  """The command in a subprocess. Its JAX compilation cache is its own (in the workdir's
  parent): a process killed while writing a cache entry must not leave the file half-written
  in the cache that the rest of the test run shares."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(Path(workdir).parent / 'jax-cache'))
  return subprocess.Popen([sys.executable, '-m', 'experiments.run', *FLAGS, *extra,
                           f'--workdir={workdir}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, step: int) -> str:
  """Reads the progress lines until `step` was reached; returns what was read."""
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith('step ') and int(line.split()[1].split('/')[0]) >= step:
      return ''.join(seen)
  raise AssertionError('the run ended before step %d:\n%s' % (step, ''.join(seen)[-3000:]))


def finish(workdir, *extra) -> str:
  proc = start(workdir, *extra)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  return out


def final_params(workdir):
  _, params, step = load_run(str(workdir))
  assert step == STEPS
  return params


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The parameters of the same command run in-process, uninterrupted."""
  _, state = train_and_evaluate(parse(*FLAGS), str(tmp_path_factory.mktemp('straight')))
  assert int(state.step) == STEPS
  return state.params


def latest_step(workdir):
  ckpt = Checkpoints(str(workdir))
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def assert_bitwise_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _interrupt(workdir, signum, at_step, resumed_from=None) -> int:
  """Runs the command until `at_step`, sends `signum`; checks the exit and returns the saved step."""
  proc = start(workdir)
  out = wait_for_step(proc, at_step)
  assert resumed_from is None or f'Resumed from step {resumed_from}' in out, out[-2000:]
  proc.send_signal(signum)
  out += proc.communicate(timeout=120)[0]
  assert proc.returncode == 128 + signum, out[-3000:]
  assert 'Traceback' not in out
  saved = latest_step(workdir)
  assert at_step <= saved < STEPS and saved % 40, out[-2000:]  # the current step, not a periodic one.
  assert f'{signal.Signals(signum).name}: saved step {saved} of {STEPS}' in out
  return saved


def test_sigterm_and_sigint_save_the_current_step_and_reruns_resume_bitwise(tmp_path, straight):
  saved = _interrupt(tmp_path, signal.SIGTERM, 55)  # between the checkpoints at 40 and 80.
  saved = _interrupt(tmp_path, signal.SIGINT, 150, resumed_from=saved)
  assert f'Resumed from step {saved}' in finish(tmp_path)
  assert_bitwise_equal(final_params(tmp_path), straight)
  steps = [r['step'] for r in read_metrics(str(tmp_path)) if r['split'] == 'train']
  assert steps == list(range(1, STEPS + 1))  # each step logged once across the three processes.


def test_sigkill_at_random_moments_resumes_from_the_last_complete_checkpoint(tmp_path, straight):
  """Saves every 2 steps, so most kills land while an (asynchronous) save is being written.
  Each rerun must resume from the newest complete checkpoint; the last one finishes."""
  rng = random.Random(0)
  extra = ['--config.checkpoint_every=2']
  before = None
  for kill_at in sorted(rng.sample(range(20, STEPS - 20), 3)):
    proc = start(tmp_path, *extra)
    out = wait_for_step(proc, kill_at)
    assert before is None or f'Resumed from step {before}' in out, out[-2000:]
    time.sleep(rng.uniform(0, 0.05))
    proc.kill()
    proc.communicate(timeout=60)
    before = latest_step(tmp_path)
    # Progress lines lag the device by a step and a save may still be in flight.
    assert before is not None and kill_at - 6 <= before <= STEPS
  assert f'Resumed from step {before}' in finish(tmp_path, *extra)
  assert_bitwise_equal(final_params(tmp_path), straight)


def _corrupt_array_data(step_dir, how):
  """Damages every array data file (tensorstore's ocdbt .../d/<hash>): cut in half, or 64
  bytes inverted in place (same size, different content)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state')) for f in fs
           if os.path.basename(d) == 'd']
  assert files
  for path in files:
    data = bytearray(open(path, 'rb').read())
    if how == 'truncate':
      data = data[:len(data) // 2]
    else:
      for i in range(len(data) // 3, min(len(data), len(data) // 3 + 64)):
        data[i] ^= 0xFF
    open(path, 'wb').write(bytes(data))


CORRUPTED = tiny_config('vit', steps=12, checkpoint_every=4, eval_every=12, keep_checkpoints=3)


@pytest.fixture(scope='module')
def straight_12(tmp_path_factory):
  return train_and_evaluate(CORRUPTED, str(tmp_path_factory.mktemp('straight12')))[1]


@pytest.mark.parametrize('how', ['truncate', 'flip', 'record', 'crc'])
def test_a_corrupted_checkpoint_is_skipped_and_never_loaded(tmp_path, how, capfd, straight_12):
  config = CORRUPTED
  workdir = tmp_path / 'run'
  train_and_evaluate(config, str(workdir), stop_after=9)  # saved 4 and 8.
  step_dir = workdir / 'checkpoints' / '8'
  if how == 'record':
    (step_dir / 'meta' / 'metadata').write_text('{"config": ')  # the JSON record, cut.
  elif how == 'crc':  # arrays that read but are not the saved ones, as the record tells.
    record = json.loads((step_dir / 'meta' / 'metadata').read_text())
    record['state']['crc32'] ^= 1
    (step_dir / 'meta' / 'metadata').write_text(json.dumps(record))
  else:
    _corrupt_array_data(step_dir, how)
  capfd.readouterr()
  _, resumed = train_and_evaluate(config, str(workdir))
  out, err = capfd.readouterr()
  assert 'warning: checkpoint step 8 is unusable' in err and 'Resumed from step 4' in out
  assert (workdir / 'checkpoints_corrupt' / '8').is_dir()  # kept aside, not deleted.
  assert_bitwise_equal(resumed.params, straight_12.params)
  assert latest_step(workdir) == 12


def test_divergence_names_the_step_and_metric_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config('vit', steps=40, checkpoint_every=1, eval_every=40)
  config.optimizer.update(lr=1e12, grad_clip=0.0, warmup_steps=0, schedule='constant')
  with pytest.raises(FloatingPointError, match=r'(loss|grad_norm)=(nan|inf) at step (\d+): the '
                     r'run diverged; the last checkpoint, step \d+, is kept') as e:
    train_and_evaluate(config, str(tmp_path))
  bad_step = int(str(e.value).split(' at step ')[1].split(':')[0])
  ckpt = Checkpoints(str(tmp_path))
  assert ckpt.latest_step() == bad_step - 1
  state, _ = ckpt.restore(steps.init_state(steps.setup(config)))
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_debug_nans_is_turned_on_for_the_run(tmp_path):
  config = tiny_config('vit', steps=40, checkpoint_every=40, eval_every=40, debug_nans=True)
  config.optimizer.update(lr=1e12, grad_clip=0.0, warmup_steps=0, schedule='constant')
  # JAX's own message: tx's per-step check would say 'loss=nan at step'.
  with pytest.raises(FloatingPointError, match=r'invalid value \(nan\) encountered'):
    train_and_evaluate(config, str(tmp_path))
  assert not jax.config.jax_debug_nans  # off again after the run.


def test_restoring_into_another_shape_names_the_parameter(tmp_path):
  """Another model is refused as a config change; allowed, the checkpoint names the first
  parameter that does not fit. Either way nothing in the workdir changes."""
  config = tiny_config('vit', steps=2)
  train_and_evaluate(config, str(tmp_path))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  config.model.d_ff = 64
  with pytest.raises(ValueError, match=r'was trained with another config: model.d_ff 32 -> 64; '
                     r'resume with --allow_config_change=model.d_ff'):
    train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match=r"checkpoint step 2 in .* does not fit the model: "
                     r"\.params\['encoder'\]\['block_0'\]\['ffn'\]\['hidden'\]\['bias'\] is "
                     r"\(32,\) float32 there and \(64,\) float32 in the model"):
    train_and_evaluate(config, str(tmp_path), allow_config_change=['model.d_ff'])
  assert latest_step(tmp_path) == 2  # nothing moved or deleted,
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # or written.


def test_the_same_seed_gives_identical_metrics(tmp_path):
  config = tiny_config('vit', steps=6, log_every=1, eval_every=3)
  records = []
  for name in ('a', 'b'):
    train_and_evaluate(config, str(tmp_path / name))
    records.append([{k: v for k, v in r.items() if k != 'time'}
                    for r in read_metrics(str(tmp_path / name))])
  assert records[0] == records[1] and len(records[0]) == 8
