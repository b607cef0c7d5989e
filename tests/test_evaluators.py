"""Evaluators from the config: adding one is one file plus a config line; the built-in ones
compute what their docstrings say."""

import json
import textwrap

import jax
import numpy as np
import pytest

import tx
from experiments import evaluators, steps, tasks
from experiments.config_check import check_config
from experiments.data import BOS, PAD
from experiments.metrics import read_metrics
from experiments.train import train_and_evaluate
from tests.test_runner import tiny_config

PARAM_NORM = '''
"""The norm of every member's parameters: ‖θ‖₂ = sqrt(Σ θ²)."""
import numpy as np


def metric_names(task):
  return ('param_norm',)


def evaluate(context, *, scale: float = 1.0):
  params = context.params()  # stacked over members
  squares = sum(np.square(x).reshape(len(x), -1).sum(1) for x in jax_leaves(params))
  return [{'param_norm': scale * float(np.sqrt(s))} for s in squares]


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)
'''


@pytest.fixture
def my_evaluators(tmp_path, monkeypatch):
  (tmp_path / 'my_evals').mkdir()
  (tmp_path / 'my_evals' / '__init__.py').write_text('')
  (tmp_path / 'my_evals' / 'param_norm.py').write_text(textwrap.dedent(PARAM_NORM))
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def test_an_evaluator_is_one_file_and_a_config_line(my_evaluators, tmp_path):
  config = tiny_config('vit', steps=4, eval_every=2)
  config.evals.norm = dict(type='my_evals.param_norm', at='end', scale=2.0)  # the config line
  config.evals.norm_each_eval = dict(type='my_evals.param_norm', at='eval')  # and at every eval
  config.best_metric, config.best_mode = 'param_norm', 'min'
  check_config(config)
  summary, state = train_and_evaluate(config, str(tmp_path / 'run'))
  expected = np.sqrt(sum(np.square(x).sum() for x in jax.tree.leaves(state.params)))
  np.testing.assert_allclose(summary['param_norm'], 2.0 * expected, rtol=1e-5)
  np.testing.assert_allclose(summary['eval/param_norm'], expected, rtol=1e-5)
  evals = [r for r in read_metrics(str(tmp_path / 'run')) if r['split'] == 'eval']
  assert [r['step'] for r in evals if 'param_norm' in r] == [2, 4]
  assert summary['best']['param_norm'] == min(r['param_norm'] for r in evals)
  assert 'eval/accuracy' in summary and 'attention_entropy' in summary  # the defaults still run


def test_evaluator_options_and_types_are_checked(my_evaluators):
  config = tiny_config('vit')
  config.evals.norm = dict(type='my_evals.param_norm', at='end', scales=2.0)
  with pytest.raises(ValueError, match=r'config.evals.norm.scales=2.0; unknown field; allowed: '
                     r'at, scale, type'):
    check_config(config)
  config.evals.norm = dict(type='my_evals.nowhere', at='end')
  with pytest.raises(ValueError, match=r"config.evals.norm.type='my_evals.nowhere' does not "
                     r"import \(ModuleNotFoundError"):
    check_config(config)


def test_the_built_in_evaluators_are_listed():
  assert evaluators.available() == ('attention_entropy', 'bits_by_length',
                                    'exact_match_by_length', 'task_metrics')


@pytest.mark.parametrize('name', ['vit', 'seq2seq', 'lm'])
def test_task_metric_names_are_what_the_task_computes(name):
  """Traced only (jax.eval_shape): the names, not the values, are checked here."""
  run = steps.setup(tiny_config(name))
  batch = {k: v[:2] for k, v in run.dataset.test.items()}
  batch['weight'] = np.ones(2, np.float32)
  sums = jax.eval_shape(lambda: tasks.loss_and_metrics(
      run.task, run.model, steps.init_state(run).params, batch)[1])
  means = {key[:-len('_sum')]: 1.0 for key in sums if key.endswith('_sum')}
  assert set(tasks.eval_metrics_of(run.task, means)) == set(tasks.EVAL_METRICS[run.task])


@pytest.mark.parametrize('parallel,num_devices', [('jit', 0), ('pmap', 0), ('jit', 1)])
def test_task_metrics_equal_one_numpy_pass_over_the_test_set(tmp_path, parallel, num_devices):
  """360 test digits in eval batches of 64, the last one padded with weight-0 rows: the loss
  and accuracy equal a float64 NumPy pass over the whole test set at once, on 8 devices (jit,
  pmap) and on 1."""
  config = tiny_config('vit', steps=2, parallel=parallel, num_devices=num_devices)
  del config.evals['attention_entropy']
  summary, state = train_and_evaluate(config, str(tmp_path))
  test = steps.setup(config).dataset.test
  assert len(test['targets']) % config.eval_batch_size  # a padded last batch is exercised.
  logits = np.asarray(steps.setup(config).model.apply({'params': state.params}, test['inputs']),
                      np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  labels = test['targets']
  np.testing.assert_allclose(summary['eval/loss'], -log_p[np.arange(len(labels)), labels].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(summary['eval/accuracy'], (logits.argmax(-1) == labels).mean(),
                             rtol=1e-6)


@pytest.mark.parametrize('name', ['vit', 'seq2seq'])
def test_attention_entropy_at_beta_zero_is_the_log_of_the_attendable_keys(tmp_path, name):
  """β = 0 makes every attention row uniform over its attendable keys, so a layer's entropy is
  the mean over examples of the mean over real queries of log(keys), counted from the data:
  ViT, all 1 + (8/p)² tokens; seq2seq, the real source tokens (encoder, cross-attention) and
  the t + 1 decoder positions up to query t (causal self-attention)."""
  config = tiny_config(name, steps=1)
  config.model.beta_scale = 0.0
  if 'exact_match_by_length' in config.evals:  # decoding is slow and not what this checks.
    del config.evals['exact_match_by_length']
  summary, _ = train_and_evaluate(config, str(tmp_path))
  examples = config.evals.attention_entropy.examples
  test = {k: v[:examples] for k, v in steps.setup(config).dataset.test.items()}
  if name == 'vit':
    tokens = 1 + (8 // config.model.patch_size) ** 2
    expected = {'encoder/block_0/self_attention': np.log(tokens)}
  else:
    source = np.log((test['inputs'] != PAD).sum(1)).mean()
    lengths = (test['targets'] != PAD).sum(1)
    causal = np.mean([np.log(np.arange(1, n + 1)).mean() for n in lengths])
    expected = {'encoder/block_0/self_attention': source,
                'decoder/block_0/self_attention': causal,
                'decoder/block_0/cross_attention': source}
  assert set(summary['attention_entropy']) == set(expected)
  for layer, value in expected.items():
    np.testing.assert_allclose(summary['attention_entropy'][layer], value, rtol=1e-5, err_msg=layer)
  np.testing.assert_allclose(summary['eval/attention_entropy'], np.mean(list(expected.values())),
                             rtol=1e-5)


def test_decoded_exact_match_equals_teacher_forced_example_by_example(tmp_path):
  """The exact_match_by_length evaluator decodes for real (greedy, KV cache); on a partly
  trained model (some outputs right, some wrong) it agrees with teacher forcing on every
  example."""
  from experiments.evaluators import exact_match_by_length
  config = tiny_config('seq2seq', 'quick,task=copy,max_length=4', steps=150)
  config.data.update(train_size=2000, test_size=200, extrapolate_max_length=None)
  config.optimizer.lr = 3e-3
  _, state = train_and_evaluate(config, str(tmp_path), stop_after=150)
  run = steps.setup(config)
  test = run.dataset.test
  decoded = exact_match_by_length._member(run, run.model, state.params, 250)
  logits = run.model.apply({'params': state.params}, test['inputs'],
                           tx.shift_right(test['targets'], BOS))
  forced = np.asarray(tasks.exact_match(logits.argmax(-1) == test['targets'],
                                        test['targets'] != PAD), np.float64)
  by_length = {int(n): float(forced[test['length'] == n].mean()) for n in np.unique(test['length'])}
  assert {n: decoded['exact_match_by_length'][n] for n in by_length} == by_length  # 1-4 of 1-8
  assert 0.0 < forced.mean() < 1.0, 'the test needs some right and some wrong outputs'
  assert json.loads(json.dumps(decoded))['train_max_length'] == 4
