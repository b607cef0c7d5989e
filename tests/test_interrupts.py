"""Ctrl-C in the commands that read a run (one line, exit code 130, nothing half-written), inspect's
cap and progress lines, readers racing a running job's retention, and one-line config errors."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from matplotlib import figure

from experiments import cli, steps
from experiments.checkpoints import Checkpoints, CorruptCheckpoint
from experiments.inspect import inspection
from experiments.metrics import save_figure
from experiments.restore import load_run
from experiments.sweep import charts
from tests.test_runner import ROOT, tiny_config


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A tiny seq2seq run's workdir as readers see it: config.json and checkpoints at steps 2 and
  4 (of the initial parameters: these tests need no training), a test set of 200 examples."""
  workdir = tmp_path_factory.mktemp('seq2seq')
  config = tiny_config('seq2seq')
  (workdir / 'config.json').write_text(config.to_json(indent=2))
  run = steps.setup(config)
  state = jax.device_get(steps.init_state(run))
  ckpt = Checkpoints(str(workdir), best_metric=config.best_metric, best_mode=config.best_mode)
  for step in (2, 4):
    ckpt.save(step, state.replace(step=np.int32(step)), {})
  ckpt.wait()
  ckpt.close()
  return str(workdir)


# A shell starts background jobs with SIGINT ignored, and their children inherit that: this
# gives Python the default SIGINT back before it runs the command, as in a terminal.
WITH_CTRL_C = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
               'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])')


def interrupt(args, ready) -> tuple[subprocess.CompletedProcess, list[str]]:
  """Starts `python *args`, reads its stdout until a line for which `ready` is true, sends
  SIGINT, and returns (the finished process, the stdout lines)."""
  proc = subprocess.Popen([sys.executable, '-c', WITH_CTRL_C, *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if ready(line):
      proc.send_signal(signal.SIGINT)
      break
  out, err = proc.communicate(timeout=120)
  assert lines and ready(lines[-1]), f'never ready: {"".join(lines)}{out}{err[-2000:]}'
  return subprocess.CompletedProcess(args, proc.returncode, ''.join(lines) + out, err), lines


def assert_one_line(done, message: str):
  assert done.returncode == 130, done.stderr[-2000:]
  assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
  assert done.stderr.startswith('interrupted (Ctrl-C): ') and message in done.stderr


def test_ctrl_c_in_inspect_leaves_no_folder_and_examples_are_capped(trained_run, tmp_path):
  out = tmp_path / 'inspect'
  done, lines = interrupt(['-m', 'experiments.inspect', f'--workdir={trained_run}', f'--out={out}',
                           '--examples=100000'],
                          lambda line: line.startswith('example 2/'))
  assert lines[0] == '--examples=100000: the test set has 200; drawing 200\n'
  assert lines[1:] == ['example 1/200: attention_example0.png\n',
                       'example 2/200: attention_example1.png\n']
  assert_one_line(done, f'nothing was written to {out}')
  assert os.listdir(tmp_path) == []  # neither the output folder nor its temporary sibling.


def test_an_interrupted_inspect_keeps_the_earlier_output(trained_run, tmp_path, monkeypatch):
  out = tmp_path / 'inspect'
  out.mkdir()
  (out / 'inspection.json').write_text('earlier')
  saved = []

  def save_until_ctrl_c(fig, path):
    saved.append(path)
    if len(saved) == 2:
      raise KeyboardInterrupt
    save_figure(fig, path)

  monkeypatch.setattr(inspection, 'save_figure', save_until_ctrl_c)
  with pytest.raises(KeyboardInterrupt):
    inspection.inspect_run(trained_run, str(out), examples=3, stat_examples=8)
  assert os.listdir(tmp_path) == ['inspect'] and os.listdir(out) == ['inspection.json']
  assert (out / 'inspection.json').read_text() == 'earlier'
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match="holds 'notes.txt', which inspect does not write"):
    inspection.inspect_run(trained_run, str(out))


# experiments.generate run as a program, with tx.generate replaced by a stand-in that says it
# started and then blocks: the Ctrl-C lands in the middle of generating.
GENERATE_THEN_WAIT = """
import runpy, time, tx
def generating(*args, **kwargs):
  print('generating', flush=True)
  time.sleep(120)
tx.generate = generating
runpy.run_module('experiments.generate', run_name='__main__', alter_sys=True)
"""


def test_ctrl_c_in_generate_is_one_line(trained_run):
  done, _ = interrupt(['-c', GENERATE_THEN_WAIT, f'--workdir={trained_run}', '--source=3 1 4'],
                      lambda line: line == 'generating\n')
  assert_one_line(done, 'generate writes no files')


def test_ctrl_c_while_plotting_a_sweep(tmp_path, monkeypatch, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'split': 'train', 'loss': 1.0 / s}) + '\n' for s in (1, 2)))

  def ctrl_c_halfway(fig, path, **kwargs):
    with open(path, 'wb') as f:
      f.write(b'\x89PNG half')
    raise KeyboardInterrupt

  monkeypatch.setattr(figure.Figure, 'savefig', ctrl_c_halfway)
  rows = [{'seed': 0, 'workdir': str(run)}]
  main = cli.exit_on_interrupt(lambda argv: charts.plot_sweep(rows, ['seed'], str(tmp_path)),
                               'the finished runs are kept')
  with pytest.raises(SystemExit) as stopped:
    main(['sweep'])
  assert stopped.value.code == 130
  assert capsys.readouterr().err == 'interrupted (Ctrl-C): the finished runs are kept\n'
  assert os.listdir(tmp_path) == ['run']  # no learning_curves.png, whole or partial.


def retention_races(monkeypatch, checkpoints):
  """The first restore finds its step gone: meanwhile the job saved a step 4 later (here: a
  copy) and its retention deleted the one being read."""
  restore = Checkpoints.restore

  def racing(self, like, step=None):
    if not racing.done:
      racing.done = True
      shutil.copytree(checkpoints / str(step), checkpoints / str(step + 4))
      shutil.rmtree(checkpoints / str(step))
    return restore(self, like, step)

  racing.done = False
  monkeypatch.setattr(Checkpoints, 'restore', racing)


def test_a_step_deleted_while_read_is_not_corrupt(trained_run, tmp_path, monkeypatch):
  workdir = shutil.copytree(trained_run, tmp_path / 'run')
  retention_races(monkeypatch, workdir / 'checkpoints')
  _, _, step = load_run(str(workdir))  # lists [2, 4], reads 4; 4 is gone and 8 is new.
  assert step == 8
  retention_races(monkeypatch, workdir / 'checkpoints')
  with pytest.raises(ValueError, match=r"--step=2: the running job's retention deleted checkpoint "
                                       r"step 2 .* now at steps \[6, 8\]$"):
    load_run(str(workdir), 2)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['6', '8']
  (workdir / 'checkpoints' / '8' / 'meta' / 'metadata').write_text('{')
  with pytest.raises(CorruptCheckpoint, match='step 8'):  # still there: corrupt, left in place.
    load_run(str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['6', '8']


def test_readers_leave_a_save_in_progress_alone(trained_run, tmp_path):
  workdir = shutil.copytree(trained_run, tmp_path / 'run')
  saving = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1234567'  # the job's next save.
  shutil.copytree(workdir / 'checkpoints' / '4', saving)
  os.remove(saving / 'commit_success.txt')
  assert load_run(str(workdir))[2] == 4
  assert saving.is_dir()


@pytest.mark.parametrize('text, why', [('', 'is not JSON (empty file)'),
                                       ('{"model": ', 'is not JSON (Expecting value at line 1'),
                                       ('[]', 'holds a JSON list')])
def test_a_broken_config_json_is_one_line_naming_it(tmp_path, text, why):
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ValueError) as error:
    load_run(str(tmp_path))
  assert str(error.value).startswith(f'{tmp_path / "config.json"} {why}')
  assert '\n' not in str(error.value)


def test_a_missing_config_file_is_one_line(capsys):
  values = flags.FlagValues()
  flags.DEFINE_string('config', None, 'A config file[:arg].', flag_values=values)
  for argv in (['run', '--config=configs/nope.py:quick'], ['run', '--config', 'configs/nope.py']):
    with pytest.raises(SystemExit) as stopped:
      cli.check_config_file(argv, values)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == 'error: --config=configs/nope.py: no such file\n'
  cli.check_config_file(['run', '--config=configs/vit.py:quick', '--config.seed=1'], values)
  cli.check_config_file(['inspect', '--config=nope.py'], flags.FlagValues())  # not its flag.
  # experiments.run's flags parse through cli.parse_flags, which checks the file first.
  done = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/nope.py'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert (done.returncode, done.stderr) == (2, 'error: --config=configs/nope.py: no such file\n')
