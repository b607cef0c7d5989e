"""--vectorize: runs that differ in β and seed, trained as one vmapped program by the same loop
as a single run. They equal the sequential runs within 1e-4; an interrupted group (stopped,
SIGTERM during training or during the end-of-run evaluation) resumes as the same program and
ends bitwise equal to an uninterrupted one; a diverging member is marked and the others finish;
early stopping works per member."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from experiments.checkpoints import Checkpoints
from experiments.metrics import read_metrics
from experiments.train import check_group, train
from tests.test_runner import ROOT, tiny_config

MEMBERS = [dict(seed=0, beta_scale=0.5), dict(seed=1, beta_scale=0.5), dict(seed=0, beta_scale=2.0)]


def _config(seed, beta_scale, learn_beta=False, name='vit', steps=12):
  # seq2seq evaluates once (its greedy decoding is the slow part), ViT at steps 6 and 12.
  c = tiny_config(name, steps=steps, num_devices=1, log_every=3,
                  eval_every=steps if name == 'seq2seq' else 6, checkpoint_every=6, seed=seed)
  c.model.update(beta_scale=beta_scale, learn_beta=learn_beta, dropout=0.1)
  if 'exact_match_by_length' in c.evals:  # greedy decoding is slow; teacher forcing stays.
    del c.evals['exact_match_by_length']
  return c


def _final_params(workdir):
  ckpt = Checkpoints(workdir)
  state, _ = ckpt.restore(None)
  ckpt.close()
  return state['params']


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


# ViT with a learned β (its own parameter tree), seq2seq with fixed β (a traced β in every layer).
@pytest.mark.parametrize('name,learn_beta', [('vit', True), ('seq2seq', False)])
def test_vectorized_equals_sequential(tmp_path, name, learn_beta):
  members = MEMBERS if name == 'vit' else MEMBERS[1:]  # seq2seq: 2 runs (its decoding is slow).
  configs = [_config(**m, learn_beta=learn_beta, name=name) for m in members]
  seq_dirs = [str(tmp_path / f'seq{i}') for i in range(len(configs))]
  vec_dirs = [str(tmp_path / f'vec{i}') for i in range(len(configs))]
  for c, d in zip(configs, seq_dirs):
    train([c], [d])
  summaries, _ = train(configs, vec_dirs, vectorize=True)
  for seq, vec, summary in zip(seq_dirs, vec_dirs, summaries):
    a, b = read_metrics(seq), read_metrics(vec)
    assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
    for ra, rb in zip(a, b):
      for key in ('loss', 'grad_norm', 'accuracy', 'exact_match'):
        if key in ra:
          np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key, value in _summary(seq).items():
      if key.startswith('eval/'):
        np.testing.assert_allclose(summary[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # atol 1e-4: the key bias has a zero gradient in exact arithmetic (softmax is shift
    # invariant), so Adam turns rounding noise into steps of ±lr whose sign can differ.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4),
                 _final_params(seq), _final_params(vec))
    assert Checkpoints(vec).latest_step() == 12 and summary['vectorized_with'] == len(configs)
  # Members really differ (different seeds or β), so the comparison above is not vacuous.
  losses = [read_metrics(d)[-2]['loss'] for d in vec_dirs]
  assert len(set(np.round(losses, 6))) == len(losses)


def test_a_stopped_group_resumes_bitwise_also_with_members_a_checkpoint_apart(tmp_path, capfd):
  """Stopped as a crash would, after two members' saves that a kill left one checkpoint apart:
  both go back to the older one, and the group ends as an uninterrupted one, bit for bit."""
  configs = [_config(**m) for m in MEMBERS[:2]]
  for c in configs:
    c.checkpoint_every = 3
  full = [str(tmp_path / f'a{i}') for i in range(2)]
  train(configs, full, vectorize=True)
  dirs = [str(tmp_path / f'b{i}') for i in range(2)]
  train(configs, dirs, vectorize=True, stop_after=10)
  assert [Checkpoints(d).latest_step() for d in dirs] == [9, 9]
  ckpt = Checkpoints(dirs[1])
  ckpt.manager.delete(9)
  ckpt.close()
  capfd.readouterr()
  train(configs, dirs, vectorize=True)
  out, err = capfd.readouterr()
  assert all(f'Resumed from step 6 in {d}' in out for d in dirs) and 'warning' not in err
  for a, b in zip(full, dirs):
    assert read_metrics(a) == read_metrics(b)
    assert ({k: v for k, v in _summary(a).items() if k != 'wall_time_s'} ==
            {k: v for k, v in _summary(b).items() if k != 'wall_time_s'})
    jax.tree.map(np.testing.assert_array_equal, _final_params(a), _final_params(b))


def test_groups_must_differ_only_in_seed_and_beta():
  a, b = _config(0, 1.0), _config(0, 1.0)
  b.model.posemb = 'none'
  with pytest.raises(ValueError, match='runs differ in model.posemb; only seed, model.beta_scale'):
    check_group([a, b])


def test_a_diverging_member_is_marked_and_the_others_finish(tmp_path):
  """An infinite β (which check_config refuses; train() is called directly) makes the attention
  gradients inf · 0 = NaN at the first step. That member's workdir records it, and its partner
  trains on as it would alone."""
  configs = [_config(0, 1.0), _config(0, float('inf'))]
  dirs = [str(tmp_path / 'ok'), str(tmp_path / 'bad')]
  summaries, _ = train(configs, dirs, vectorize=True)
  ok, bad = summaries
  assert 'diverged' not in ok and ok['steps'] == 12 and np.isfinite(ok['eval/loss'])
  assert bad['diverged_at_step'] == 1 and bad['steps'] == 0
  assert 'at step 1: the run diverged; nothing was saved' in bad['diverged']
  assert _summary(dirs[1])['diverged'] == bad['diverged']
  assert Checkpoints(dirs[1]).latest_step() is None and read_metrics(dirs[1]) == []
  alone = str(tmp_path / 'alone')
  train([configs[0]], [alone])
  a, b = read_metrics(alone), read_metrics(dirs[0])
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for ra, rb in zip(a, b):
    for key in ('loss', 'grad_norm', 'accuracy'):
      if key in ra:  # eval records have no grad_norm.
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_group_stopped_after_a_member_diverged_resumes_the_others_bitwise(tmp_path):
  """The diverged member's summary.json is written when it diverges, so a rerun of the stopped
  group keeps it as it is and the others continue from their checkpoint (none is deleted)."""
  configs = [_config(0, 1.0), _config(0, float('inf'))]
  full = [str(tmp_path / 'full_ok'), str(tmp_path / 'full_bad')]
  train(configs, full, vectorize=True)
  dirs = [str(tmp_path / 'ok'), str(tmp_path / 'bad')]
  train(configs, dirs, vectorize=True, stop_after=8)  # a crash after the save at step 6.
  assert 'diverged' in _summary(dirs[1]) and Checkpoints(dirs[0]).latest_step() == 6
  summaries, _ = train(configs, dirs, vectorize=True)
  assert summaries[1]['diverged_at_step'] == 1 and summaries[0]['steps'] == 12
  assert read_metrics(dirs[0]) == read_metrics(full[0])
  assert ({k: v for k, v in _summary(dirs[0]).items() if k != 'wall_time_s'} ==
          {k: v for k, v in _summary(full[0]).items() if k != 'wall_time_s'})


def _delete(workdir, *saved_steps):
  ckpt = Checkpoints(workdir)
  for step in saved_steps:
    ckpt.manager.delete(step)
  ckpt.close()


@pytest.mark.parametrize('case,saved', [('never saved', '6, 0'), ('two apart', '9, 3'),
                                        ('older step pruned', '9, 6')])
def test_members_not_one_checkpoint_apart_are_refused_and_nothing_is_deleted(
    tmp_path, case, saved):
  """Going back to the older member's step would delete the other's newer checkpoints (all of
  them, for a run trained alone and then grouped with a fresh one), or is impossible once that
  step was pruned: the group is refused instead."""
  configs = [_config(0, 0.5), _config(1, 0.5)]
  for c in configs:
    c.update(checkpoint_every=3, keep_checkpoints=4)
  dirs = [str(tmp_path / 'a'), str(tmp_path / 'b')]
  if case == 'never saved':
    train([configs[0]], [dirs[0]], stop_after=7)  # saves 3 and 6
  else:
    train(configs, dirs, vectorize=True, stop_after=10)  # both save 3, 6 and 9
    if case == 'two apart':
      _delete(dirs[1], 9, 6)
    else:
      _delete(dirs[1], 9)
      _delete(dirs[0], 6)
  before = [Checkpoints(d).steps() for d in dirs]
  with pytest.raises(ValueError, match=rf'saved at steps \[{saved}\], not one checkpoint apart; '
                     'nothing was deleted; run them without --vectorize'):
    train(configs, dirs, vectorize=True)
  assert [Checkpoints(d).steps() for d in dirs] == before


STEP_SCORE = """
def metric_names(task):
  return ('score',)


def evaluate(context):
  '''The step for members with β < 1 (better at every eval), 0 for the others (never).'''
  states = context.runner.fetch(context.state)
  return [{'score': float(s.step) if beta < 1 else 0.0} for s, beta in zip(states, context.betas)]
"""


def test_early_stopping_is_per_member(tmp_path, monkeypatch):
  """Patience 2: the member whose score never improves stops at the third eval (step 15) and
  keeps its state; the other trains to the end. A rerun trains neither again."""
  (tmp_path / 'scores').mkdir()
  (tmp_path / 'scores' / '__init__.py').write_text('')
  (tmp_path / 'scores' / 'step.py').write_text(STEP_SCORE)
  monkeypatch.syspath_prepend(str(tmp_path))
  configs = [_config(**m, steps=40) for m in (MEMBERS[0], MEMBERS[2])]  # β 0.5 and 2.0
  for c in configs:
    c.update(eval_every=5, checkpoint_every=5, early_stopping_patience=2, best_metric='score',
             best_mode='max')
    c.evals.score = dict(type='scores.step', at='eval')
    del c.evals['attention_entropy']
  dirs = [str(tmp_path / f'm{i}') for i in range(2)]
  summaries, states = train(configs, dirs, vectorize=True)
  assert [(s['steps'], s['early_stopped']) for s in summaries] == [(40, False), (15, True)]
  assert [int(s.step) for s in states] == [40, 15]
  assert [Checkpoints(d).latest_step() for d in dirs] == [40, 15]
  metrics = [read_metrics(d) for d in dirs]
  assert [m[-1]['step'] for m in metrics] == [40, 15]
  ckpt = Checkpoints(dirs[1])
  saved, _ = ckpt.restore(None)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, saved['params'], states[1].params)
  again, _ = train(configs, dirs, vectorize=True)
  assert [read_metrics(d) for d in dirs] == metrics and [s['steps'] for s in again] == [40, 15]


# --- SIGTERM to a real `python -m experiments.sweep --vectorize` --------------------------------

PAUSE = """
import os, time

def evaluate(context, ready, release):
  '''Holds the run once: if $<ready> names a file not yet written, writes it and waits until
  $<release> exists.'''
  ready_file = os.environ.get(ready)
  if ready_file and not os.path.exists(ready_file):
    open(ready_file, 'w').close()
    while not os.path.exists(os.environ[release]):
      time.sleep(0.05)
  return [{'held': False} for _ in context.betas]
"""
GRID = """
from configs import common, vit

def get_config(arg=None):
  c = common.ablation_config(vit, 'quick')
  c.update(dict(total_steps=20, eval_every=6, checkpoint_every=10, log_every=1))
  c.evals.hold_eval = dict(type='pausing.pause', at='eval', ready='EVAL_READY', release='GO')
  c.evals.hold_end = dict(type='pausing.pause', at='end', ready='END_READY', release='GO')
  return c

def sweep(add, arg=None):
  for beta in (0.5, 2.0):
    for seed in (0, 1):
      add(**{'model.beta_scale': beta, 'seed': seed})
"""


@pytest.fixture(scope='module')
def grid(tmp_path_factory):
  """A 4-member ablation grid with evaluators that can hold a run at its first eval (step 6,
  between the checkpoints at 10 and 20) or at its end."""
  root = tmp_path_factory.mktemp('grid')
  (root / 'pausing').mkdir()
  (root / 'pausing' / '__init__.py').write_text('')
  (root / 'pausing' / 'pause.py').write_text(textwrap.dedent(PAUSE))
  (root / 'grid.py').write_text(textwrap.dedent(GRID))
  return root


def _sweep(grid, workdir, **env):
  """The sweep command in a subprocess; its output goes to workdir.log, read by _output."""
  env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{grid}', **env)
  log = open(f'{workdir}.log', 'w')
  return subprocess.Popen([sys.executable, '-m', 'experiments.sweep', f'--config={grid}/grid.py',
                           f'--workdir={workdir}', '--vectorize'], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, text=True)


def _output(workdir) -> str:
  with open(f'{workdir}.log') as f:
    return f.read()


def _wait(proc, done, timeout=300):
  """Polls until done() or the process ends."""
  start = time.time()
  while not done() and proc.poll() is None:
    assert time.time() - start < timeout
    time.sleep(0.05)


def _results(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return [{k: v for k, v in row.items() if k not in ('wall_time_s', 'workdir')}
            for row in csv.DictReader(f)]


@pytest.fixture(scope='module')
def uninterrupted(grid, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'sweep')
  _sweep(grid, workdir).wait(timeout=300)
  assert 'wrote results.csv' in _output(workdir), _output(workdir)[-3000:]
  for plot in ('accuracy_vs_beta.png', 'entropy_vs_beta.png', 'entropy_by_layer_vs_beta.png'):
    assert os.path.getsize(os.path.join(workdir, plot)) > 10_000, plot
  return _results(workdir)


def _rerun_equals(grid, workdir, uninterrupted, resumed_from):
  os.rename(f'{workdir}.log', f'{workdir}.first.log')
  _sweep(grid, workdir).wait(timeout=300)
  out = _output(workdir)
  assert 'wrote results.csv' in out and '4 runs as one program (4 to finish)' in out, out[-3000:]
  assert out.count(f'Resumed from step {resumed_from} in') == 4, out[-3000:]
  assert _results(workdir) == uninterrupted  # every value but the wall time, bit for bit.


def test_sigterm_during_training_saves_every_member_and_resumes_the_same_group(
    grid, uninterrupted, tmp_path):
  workdir, ready, go = tmp_path / 'sweep', tmp_path / 'ready', tmp_path / 'go'
  proc = _sweep(grid, workdir, EVAL_READY=str(ready), GO=str(go))
  _wait(proc, ready.exists)
  proc.send_signal(signal.SIGTERM)  # while the eval at step 6 holds the run
  _wait(proc, lambda: 'SIGTERM received' in _output(workdir))
  go.touch()
  proc.wait(timeout=120)
  out = _output(workdir)
  assert proc.returncode == 143 and 'Traceback' not in out, out[-3000:]
  saved = {Checkpoints(str(d)).latest_step() for d in workdir.iterdir()
           if (d / 'checkpoints').is_dir()}
  assert saved == {6} and 'SIGTERM: saved step 6 of 20 in 4 workdirs' in out, out
  _rerun_equals(grid, workdir, uninterrupted, resumed_from=6)


def test_sigterm_during_the_end_of_run_evaluation_resumes_the_same_group(
    grid, uninterrupted, tmp_path):
  workdir, ready = tmp_path / 'sweep', tmp_path / 'ready'
  proc = _sweep(grid, workdir, END_READY=str(ready), GO=str(tmp_path / 'never'))
  _wait(proc, ready.exists)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  out = _output(workdir)
  assert proc.returncode == 143 and 'Traceback' not in out, out[-3000:]
  assert 'SIGTERM: training had finished' in out, out[-3000:]
  assert not any((d / 'summary.json').exists() for d in workdir.iterdir())
  _rerun_equals(grid, workdir, uninterrupted, resumed_from=20)


def test_each_member_is_evaluated_with_its_own_parameters():
  """A large shared eval batch (256 × 128 tokens of the character LM): each member's sums equal
  its own single-run evaluation. Broadcasting the batch to the members (vmap in_axes None) made
  XLA:CPU return member 0's loss for every member at this size."""
  from configs import lm
  from experiments import runners, steps
  c = lm.get_config()
  c.model.update(num_layers=1, d_model=32, d_ff=64)
  run = steps.setup(c)
  group = runners.make_runner('vmap', None, run, betas=[1.0, 1.0])
  states = group.init(run, [0, 1])
  batch = run.dataset.eval_batch(256, 0)
  single = runners.make_runner('jit', jax.devices()[:1], run)
  together = group.fetch(group.eval_step(group.put_state(states), batch))
  alone = [single.fetch(single.eval_step(jax.device_put(s), batch))[0] for s in states]
  assert together[0]['loss_sum'] != together[1]['loss_sum']
  for t, a in zip(together, alone):
    for key in a:
      np.testing.assert_allclose(t[key], a[key], rtol=1e-5)
