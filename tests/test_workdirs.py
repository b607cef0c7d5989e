"""What a workdir guarantees: one writer at a time (a lock), the config it was trained with
(never rewritten; changes refused unless allowed, then recorded), sweeps that check what they
skip, checkpoints/ entries tx did not write left alone, a full disk reported at once, and
library noise kept out of the console."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

from experiments import workdir as workdir_lib
from experiments.checkpoints import Checkpoints
from experiments.metrics import read_metrics
from experiments.sweep import grid
from experiments.train import train_and_evaluate
from tests.test_runner import ROOT, TINY_MODEL, tiny_config
from tests.test_vectorized import PAUSE


def files(directory) -> dict:
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = open(path, 'rb').read()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished tiny run (4 steps, checkpoints at 2 and 4) to copy."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  train_and_evaluate(tiny_config('vit', steps=4, checkpoint_every=2), str(workdir))
  return workdir


def copy_of(trained, tmp_path):
  shutil.copytree(trained, tmp_path / 'run')
  return tmp_path / 'run'


# --- the lock --------------------------------------------------------------------------------

HELD = """
from configs import vit

def get_config(arg=None):
  c = vit.get_config('quick')
  c.model.update({model})
  c.update(dict(total_steps=6, eval_every=2, checkpoint_every=2, log_every=1, batch_size=16,
                eval_batch_size=64))
  c.evals.hold = dict(type='pausing.pause', at='eval', ready='EVAL_READY', release='GO')
  return c
"""


def test_a_second_process_on_a_workdir_gets_one_line_naming_the_first(tmp_path):
  """The first run is held at its first eval; a second one on the same workdir is refused
  (exit 2) naming pid, host and start; the first then finishes alone, and its lock is gone."""
  (tmp_path / 'pausing').mkdir()
  (tmp_path / 'pausing' / '__init__.py').write_text('')
  (tmp_path / 'pausing' / 'pause.py').write_text(textwrap.dedent(PAUSE))
  (tmp_path / 'held.py').write_text(HELD.format(model=TINY_MODEL))
  ready, go, workdir = tmp_path / 'ready', tmp_path / 'go', tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{tmp_path}', EVAL_READY=str(ready),
             GO=str(go))
  command = [sys.executable, '-m', 'experiments.run', f'--config={tmp_path}/held.py',
             f'--workdir={workdir}']
  first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 120
    while not ready.exists():
      assert first.poll() is None and time.time() < deadline, first.stdout.read()
      time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
  finally:
    go.touch()
  out = first.communicate(timeout=120)[0]
  assert first.returncode == 0, out[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith('error:')]
  assert second.returncode == 2 and len(errors) == 1, second.stderr
  assert errors[0].startswith(f'error: {workdir} is in use by pid {first.pid} on host '
                              f'{socket.gethostname()} (started '), second.stderr
  assert 'Traceback' not in second.stderr + out
  assert not (workdir / 'lock.json').exists()
  train = [r['step'] for r in read_metrics(str(workdir)) if r['split'] == 'train']
  assert train == [1, 2, 3, 4, 5, 6]  # each written once, by the first process only.


def _lock(directory, **holder):
  directory.mkdir(exist_ok=True)
  (directory / 'lock.json').write_text(json.dumps(holder))


def test_a_lock_is_taken_over_only_from_a_process_that_is_gone(tmp_path, capsys):
  host, me = socket.gethostname(), workdir_lib._me()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  stale = [dict(me, pid=int(dead)),  # exited
           dict(me, pid=os.getppid(), process_start='1'),  # pid reused by a later process
           dict(me, boot_id='another boot')]  # the host rebooted
  for i, holder in enumerate(stale):
    _lock(tmp_path / f'd{i}', **holder)
    with workdir_lib.locked([str(tmp_path / f'd{i}')]):
      assert json.loads((tmp_path / f'd{i}' / 'lock.json').read_text())['pid'] == os.getpid()
    assert 'which is no longer running; taking the lock over' in capsys.readouterr().err
    assert not (tmp_path / f'd{i}' / 'lock.json').exists()
  parent = workdir_lib._process_start(os.getppid())
  _lock(tmp_path / 'live', **dict(me, pid=os.getppid(), process_start=parent))
  _lock(tmp_path / 'remote', **dict(me, host='elsewhere'))
  with pytest.raises(ValueError, match=rf'live is in use by pid {os.getppid()} on host {host} '
                     r'\(started .*\): wait for it to finish or stop it$'):
    with workdir_lib.locked([str(tmp_path / 'live')]):
      pass
  with pytest.raises(ValueError, match=r'remote is in use by pid \d+ on host elsewhere .* if it '
                     r'is gone, delete .*remote/lock.json \(or wait: a lock from another host is '
                     r'taken over once untouched for 15 minutes\)'):
    with workdir_lib.locked([str(tmp_path / 'remote')]):
      pass
  old = os.path.getmtime(tmp_path / 'remote' / 'lock.json') - workdir_lib.STALE_S
  os.utime(tmp_path / 'remote' / 'lock.json', (old, old))  # its holder stopped touching it.
  with workdir_lib.locked([str(tmp_path / 'remote')]):
    assert 'which is no longer running; taking the lock over' in capsys.readouterr().err


def test_the_lock_is_touched_while_held_and_goes_on_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_S', 0.05)
  with workdir_lib.locked([str(tmp_path / 'held')]):
    os.utime(tmp_path / 'held' / 'lock.json', (1, 1))
    time.sleep(0.5)
    assert os.path.getmtime(tmp_path / 'held' / 'lock.json') > 1
  with pytest.raises(RuntimeError):
    with workdir_lib.locked([str(tmp_path / 'new')]):
      assert (tmp_path / 'new' / 'lock.json').exists()
      raise RuntimeError
  assert not (tmp_path / 'new').exists()


# --- the config it was trained with ----------------------------------------------------------

def test_a_changed_config_is_refused_before_anything_is_written(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = files(workdir)
  for change in (dict(total_steps=6), dict(seed=1), dict(data=dict(augment=0))):
    config = tiny_config('vit', steps=4, checkpoint_every=2)
    config.update_from_flattened_dict(workdir_lib.flat(change))
    field = next(iter(workdir_lib.flat(change)))
    with pytest.raises(ValueError, match=rf'was trained with another config: {field} .* resume '
                       rf'with --allow_config_change={field} to record the change'):
      train_and_evaluate(config, str(workdir))
    assert files(workdir) == before


def test_an_allowed_change_is_recorded_with_its_step(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  config_json = (workdir / 'config.json').read_bytes()
  config = tiny_config('vit', steps=6, eval_every=4, checkpoint_every=2, log_every=1)  # log_every: free
  config.optimizer.lr = 0.002
  summary, _ = train_and_evaluate(config, str(workdir),
                                  allow_config_change=['total_steps', 'optimizer'])
  assert summary['steps'] == 6 and (workdir / 'config.json').read_bytes() == config_json
  changed = {'log_every': [2, 1], 'optimizer.lr': [0.0014, 0.002], 'total_steps': [4, 6]}
  (entry,) = workdir_lib.changes(str(workdir))
  assert (entry['step'], entry['changed']) == (4, changed)
  assert [r for r in read_metrics(str(workdir)) if r['split'] == 'config'] == [
      {'step': 4, 'split': 'config', 'changed': changed}]
  assert workdir_lib.recorded(str(workdir)) == workdir_lib.as_json(config)
  train_and_evaluate(config, str(workdir))  # the recorded config now: no change, no flag.
  assert len(workdir_lib.changes(str(workdir))) == 1
  shutil.rmtree(workdir / 'checkpoints')  # nothing trained is left: a fresh start, recorded anew.
  train_and_evaluate(config, str(workdir))
  assert workdir_lib.changes(str(workdir)) == [] and json.loads(
      (workdir / 'config.json').read_text()) == workdir_lib.as_json(config)
  with pytest.raises(ValueError, match='--allow_config_change=optimiser: not a config field'):
    workdir_lib.check_allow_flag(['optimiser'], config)


def test_a_workdir_that_is_not_a_run_is_refused_with_nothing_written(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match=r"holds notes.txt but no config.json: it is not a run "
                     'directory; use a new or empty one'):
    train_and_evaluate(tiny_config('vit'), str(tmp_path))
  with pytest.raises(ValueError, match='is a file; give a directory'):
    train_and_evaluate(tiny_config('vit'), str(tmp_path / 'notes.txt'))
  assert os.listdir(tmp_path) == ['notes.txt']


# --- sweeps check what they skip -------------------------------------------------------------

def test_a_sweep_skips_only_a_parsing_summary_of_its_own_config(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  config = tiny_config('vit', steps=4, checkpoint_every=2)
  assert workdir_lib.finished_summary(str(workdir), config)['steps'] == 4
  other = tiny_config('vit', steps=4, checkpoint_every=2, seed=3)
  with pytest.raises(ValueError, match=r'run holds a finished run of another config \(seed 0 -> '
                     r'3\); move it away, use a new --workdir, or resume it with '
                     '--allow_config_change=seed'):
    workdir_lib.finished_summary(str(workdir), other)
  assert workdir_lib.finished_summary(str(workdir), other, allowed=['seed']) is None  # resumed.
  (workdir / 'summary.json').write_text('')
  assert workdir_lib.finished_summary(str(workdir), config) is None
  assert 'summary.json is not JSON (empty file)' in capsys.readouterr().err
  summary, _ = train_and_evaluate(config, str(workdir))  # resumed at its end: summary again.
  assert workdir_lib.finished_summary(str(workdir), config) == summary


def test_a_sweep_refuses_a_point_folder_holding_another_run(trained, tmp_path):
  """Before training anything: the folder of point seed=0 holds a run of seed 0 with another
  d_ff, so it is not that point's finished run."""
  config = tiny_config('vit', steps=4, checkpoint_every=2)
  config.model.d_ff = 64
  module = types.SimpleNamespace(get_config=lambda arg: config,
                                 sweep=lambda add, arg: [add(seed=s) for s in (0, 1)])
  shutil.copytree(trained, tmp_path / 'sweep' / 'seed=0')
  with pytest.raises(ValueError, match=r'seed=0 holds a finished run of another config '
                     r'\(model.d_ff 32 -> 64\)'):
    grid.run_all(module, None, grid.expand(module, None), str(tmp_path / 'sweep'))
  assert sorted(os.listdir(tmp_path / 'sweep')) == ['seed=0']


def test_a_damaged_config_json_is_one_line_naming_it(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  (workdir / 'config.json').write_text('')
  with pytest.raises(ValueError, match=r'run/config.json is not JSON \(empty file\)'):
    train_and_evaluate(tiny_config('vit', steps=4, checkpoint_every=2), str(workdir))


# --- checkpoints/ entries tx did not write ---------------------------------------------------

def test_entries_tx_did_not_write_are_left_alone_and_not_counted(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  ckpts = workdir / 'checkpoints'
  (ckpts / '100').mkdir()
  (ckpts / '100' / 'x').write_text('')
  os.symlink(ckpts / '4', ckpts / '99')
  (ckpts / 'README').write_text('')
  config = tiny_config('vit', steps=8, eval_every=4, checkpoint_every=2)
  train_and_evaluate(config, str(workdir), allow_config_change=['total_steps'])
  err = capsys.readouterr().err
  assert ('holds 100 (not a step folder), 99 (a link), README (a file), which tx did not write: '
          'left alone and not counted as checkpoints') in err
  kept = Checkpoints(str(workdir)).steps()
  assert kept[-2:] == [6, 8] and len(kept) <= 3  # keep=2 of its own, and the best one.
  assert set(os.listdir(ckpts)) == {'100', '99', 'README', *map(str, kept)}
  os.symlink(ckpts / '8', ckpts / '10')  # a step this run would save: refused, nothing written.
  before = files(workdir)
  with pytest.raises(ValueError, match=r'checkpoints/10 is not a checkpoint tx wrote \(a link\) '
                     'and this run may save step 10 there; move it out of checkpoints/'):
    train_and_evaluate(tiny_config('vit', steps=12, eval_every=4, checkpoint_every=2), str(workdir),
                       allow_config_change=['total_steps'])
  assert files(workdir) == before


# --- the console: tx's lines only; a full disk stops the run ---------------------------------

def _resume(workdir, *flags, limit=None):
  """`experiments.run` resuming the tiny run in a subprocess, optionally with a file-size limit
  (writes past it fail as on a full disk) and without the shared compilation cache (whose
  files the limit would refuse)."""
  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  env = {k: v for k, v in os.environ.items() if limit is None or 'COMPILATION_CACHE' not in k}
  return subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/vit.py:quick',
       *[f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()], '--config.batch_size=16',
       '--config.eval_batch_size=64', '--config.log_every=2', '--config.eval_every=4',
       '--config.checkpoint_every=2', f'--workdir={workdir}', *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      preexec_fn=preexec if limit else None)


def test_library_noise_goes_to_library_log(trained, tmp_path):
  """A damaged newest checkpoint makes tensorstore's callbacks print 'Event loop is closed'
  tracebacks, and saves without metrics make orbax warn: the console shows tx's lines only."""
  workdir = copy_of(trained, tmp_path)
  data = workdir / 'checkpoints' / '4' / 'state' / 'ocdbt.process_0' / 'd'
  for f in data.iterdir():
    f.write_bytes(os.urandom(100))
  run = _resume(workdir, '--config.total_steps=8', '--allow_config_change=total_steps')
  console = run.stdout + run.stderr
  assert run.returncode == 0, console[-3000:]
  assert 'warning: checkpoint step 4 is unusable' in run.stderr
  assert 'Resumed from step 2' in run.stdout and 'total_steps 4 -> 8' in run.stdout
  assert [line for line in run.stderr.splitlines() if line] == [
      line for line in run.stderr.splitlines() if line.startswith('warning: checkpoint step 4')]
  assert 'tracked_metric' in (workdir / 'library.log').read_text()


def test_a_full_disk_stops_the_run_at_the_failed_save(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  run = _resume(workdir, '--config.total_steps=120', '--config.eval_every=60',
                '--allow_config_change=total_steps,eval_every', '--config.log_every=100',
                '--config.checkpoint_every=60',  # fails at 60; the next save is the last.
                limit=12_000)  # past metrics and meta; short of the state's files.
  assert run.returncode == 2 and 'Traceback' not in run.stdout, (run.stdout + run.stderr)[-3000:]
  (line,) = [line for line in run.stderr.splitlines() if line]
  assert line.startswith(f'error: saving a checkpoint in {workdir}/checkpoints failed: ') and (
      line.endswith('its newest complete checkpoint is step 4')), line
  stopped = int(line.split('the run stopped at step ')[1].split(';')[0])
  assert 60 < stopped < 120  # at once, not at the next save.
  assert max(r['step'] for r in read_metrics(str(workdir))) <= stopped
  # Step 4 is intact; step 2 may have gone to retention when the save of 60 began, as it would
  # have after that save.
  assert Checkpoints(str(workdir)).steps()[-1] == 4
  config = tiny_config('vit', steps=120, eval_every=60, checkpoint_every=60, log_every=100)
  summary, _ = train_and_evaluate(config, str(workdir), stop_after=1)  # intact: it resumes.
  assert summary['steps'] == 5
