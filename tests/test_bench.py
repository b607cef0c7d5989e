"""The benchmark suite: the analytic FLOP count against XLA's own count, the data section's
workers-needed arithmetic, and a tiny run of `python -m experiments.bench` end to end."""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

from experiments.bench import __main__ as bench
from experiments import steps, tasks
from experiments.bench import data_rate, flops, report, specs, step_time

# Small enough to compile in a second, wide enough that matrix products dominate.
COUNTED = [specs.Spec('v', 'ViT', num_layers=2, d_model=128, num_heads=4, d_ff=512, batch=2,
                      image_size=16, patch_size=4),
           specs.Spec('e', 'EncoderDecoder', num_layers=2, d_model=128, num_heads=4, d_ff=512,
                      batch=2, seq_len=32, vocab_size=64),
           specs.Spec('l', 'DecoderLM', num_layers=2, d_model=128, num_heads=4, d_ff=512,
                      batch=2, seq_len=32, vocab_size=64)]


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('spec', COUNTED, ids=lambda s: s.kind)
def test_analytic_flops_match_xla_cost_analysis(spec):
  """XLA counts every product (2 FLOPs per multiply-add) plus the elementwise ops we leave out,
  so its count is a little above ours: within 5% for the forward pass, and the train step
  (forward + backward + AdamW) within 3-3.6x the forward."""
  model = specs.tx_model(spec)
  args = tasks.model_inputs(spec.task, specs.synthetic_batch(spec))
  variables = model.init(jax.random.key(0), *args)
  forward = spec.batch * flops.forward_per_example(spec)
  assert 1.0 <= _xla_flops(model.apply, variables, *args) / forward <= 1.05
  run = step_time.run_of(spec, model)
  step = _xla_flops(steps.step_functions(run)[0], steps.init_state(run, 0),
                    specs.synthetic_batch(spec))
  assert flops.train_step(spec) == 3 * forward
  assert 1.0 <= step / flops.train_step(spec) <= 1.2


def test_tiny_benchmark_end_to_end(tmp_path):
  results = bench.run('tiny', str(tmp_path), log=lambda *_: None)
  saved = json.loads((tmp_path / 'bench.json').read_text())
  assert set(bench.SECTIONS) <= set(saved) and saved['environment']['jax'] == jax.__version__
  assert all(m['flop_per_s'] == max(m['measured']) > 0 and len(m['measured']) == 2
             for m in saved['matmul'])  # measured before and after the models
  trained = {(r['model'], r['dtype']) for r in saved['train']}
  assert trained == {(s.name, d) for s in bench.plan('tiny', 'cpu')['specs']
                     for d in ('float32', 'bfloat16')}
  assert all(r['median_s'] > 0 and r['flop_per_s'] > 0 for r in saved['train'])
  assert {r['implementation'] for r in saved['attention']} == {'xla', 'fused'}
  assert saved['parallel']['devices'] == bench.SIMULATED_DEVICES
  assert saved['parallel']['pmap']['median_s'] > 0 and saved['parallel']['jit']['median_s'] > 0
  assert saved['vectorized']['members'] == 2 and saved['vectorized']['speedup'] > 0
  data = saved['data']
  assert data['train_view']['images_per_s'] > 0 and data['eval_view']['images_per_s'] > 0
  assert [r['workers'] for r in data['pipeline']] == [1]
  assert all(r['images_per_s'] > 0 for r in data['pipeline'])
  assert data['per_worker_images_per_s'] == data['train_view']['images_per_s']
  # The ViT rows of this run's train section, then the H100 reference.
  assert [t['images_per_s'] for t in data['targets']] == [
      r['examples_per_s'] for r in saved['train'] if r['model'].startswith('vit')] + [
          data_rate.H100_VIT_B16['images_per_s']]
  assert all(t['workers_needed'] == math.ceil(t['images_per_s'] / data['per_worker_images_per_s'])
             for t in data['targets'])
  assert data['image']['format'] == 'JPEG' and data['cpu_count'] == os.cpu_count()
  table = (tmp_path / 'bench.md').read_text()
  for heading in ('| matmul |', '| model | dtype |', '| T | ours ms |', '| runner |',
                  'member-steps/s', '| pipeline.train_feed | 1 worker |',
                  '| target | images/s | workers needed |'):
    assert heading in table
  if 'rows' in results['peer']:  # torch installed: the ratio tx/peer is reported per model
    assert {r['model'] for r in saved['peer']['rows']} == {s.name for s in
                                                           bench.plan('tiny', 'cpu')['specs']}
    # --tiny skips torch.compile (14-22 s a model here); tx/eager is a ratio on every row.
    fp32_rows = [line for line in table.splitlines() if '| float32 |' in line and 'tiny' in line]
    assert len(fp32_rows) == len(bench.plan('tiny', 'cpu')['specs'])
    assert all(line.count('x |') == 1 for line in fp32_rows)
    assert all(r['tx_adjacent']['median_s'] > 0 and r['tx_adjacent']['after_s']
               for r in saved['peer']['rows'])
  for png in ('attention.png', 'throughput.png'):
    assert os.path.getsize(tmp_path / png) > 10_000


def test_workers_needed_is_the_ceiling_of_target_over_the_rate_of_one_worker():
  assert data_rate.workers_needed(2078, 587) == 4  # 3.54 workers: the fourth makes up the rest
  assert data_rate.workers_needed(1000, 500) == 2  # an exact multiple needs no extra worker
  assert data_rate.workers_needed(1, 500) == 1
  # docs/performance.md: tx's bf16 ViT-B/16 step on one H100, batch 128, 61.6 ms.
  assert data_rate.H100_VIT_B16['images_per_s'] == pytest.approx(2078, abs=0.5)
  rows = [dict(model='vit-a', dtype='float32', examples_per_s=50.0),
          dict(model='lm-b', dtype='float32', examples_per_s=9.0)]
  assert [t['images_per_s'] for t in data_rate.targets(rows)] == [50.0, 2077.9]
  assert [t['images_per_s'] for t in data_rate.targets(None)] == [2077.9]


def test_ratio_to_the_peer_uses_the_tx_timing_taken_next_to_it():
  env = dict(device_kind='cpu', backend='cpu', cpu='x', cpu_count=2, jax='0', flax='0',
             optax='0', python='3')
  train_row = dict(model='m', dtype='float32', batch=8, median_s=0.08, examples_per_s=100.0,
                   flop_per_s=1e9)
  peer_row = dict(model='m', dtype='float32', compiled=False, impl='tx', examples_per_s=25.0,
                  tx_adjacent={'median_s': 0.16, 'examples_per_s': 50.0})
  results = {'environment': env, 'mode': 'full', 'train': [train_row],
             'peer': {'dtype': 'float32', 'rows': [peer_row]}}
  row = next(line for line in report.markdown(results).splitlines() if line.startswith('| m |'))
  assert '| 2.00x |' in row and '4.00x' not in row  # 50/25, not the train section's 100/25
  del peer_row['tx_adjacent']  # results saved before the adjacent timing existed
  row = next(line for line in report.markdown(results).splitlines() if line.startswith('| m |'))
  assert '| 4.00x |' in row


def test_tx_timed_around_the_peer_cancels_a_linear_drift():
  before = {'median_s': 0.1, 'times_s': [0.1]}
  after = {'median_s': 0.3, 'times_s': [0.3]}  # the host slowed down steadily meanwhile
  t = step_time.around(before, after, batch=8)
  assert t['median_s'] == pytest.approx(0.2) and t['examples_per_s'] == pytest.approx(40)


def test_gpu_script_runs_every_part_in_toy_sizes(tmp_path):
  """python -m experiments.bench.gpu --tiny: every part, each tx row in its own process."""
  from experiments.bench import gpu
  results = gpu.run(str(tmp_path), tiny=True, log=lambda *_: None)
  saved = json.loads((tmp_path / 'gpu.json').read_text())
  assert saved['skipped'] == [] and saved['matmul']['flop_per_s'] > 0
  rows = saved['variants']
  assert [r['variant'] for r in rows] == [v[0] for v in gpu.VARIANTS[:2]]
  assert [r['pad_tokens_to'] for r in rows] == [1, 8]
  assert all(r['median_s'] > 0 and 0 < r['mfu'] < 1 for r in rows)
  assert saved['sweep']['members'] == 2 and saved['sweep']['speedup'] > 0
  assert {r['implementation'] for r in saved['attention']} == {'xla', 'fused'}
  if importlib.util.find_spec('torch'):
    assert saved['peers'][0]['step_s_median'] > 0
  remat = saved['remat']
  assert [(r['variant'], r['remat']) for r in remat] == [
      (f'pad_tokens_to=8, remat={policy}', policy) for policy in gpu.REMAT_RUNS[:1]]
  assert all(r['median_s'] > 0 and r['peak_bytes'] > 0 for r in remat)
  parts = {r['part'] for r in saved['profile']['parts']}
  assert {'ffn/hidden', 'self_attention/query', 'outside the model'} <= parts
  assert saved['profile']['total_ms'] > 0 and os.path.exists(saved['profile']['trace'])
  table = (tmp_path / 'gpu.md').read_text()
  assert '| vit-tiny | pad_tokens_to=8 |' in table and results['wall_s'] > 0
  assert '| vit-tiny | pad_tokens_to=8, remat=nothing |' in table and '| ffn/hidden |' in table
  late = gpu.run(str(tmp_path / 'late'), tiny=True, budget_s=0, log=lambda *_: None)
  assert late['skipped'] == ['variants', 'vits', 'peers', 'sweep', 'attention', 'profile',
                             'remat']


def test_ops_compute_the_same_values_in_jax_and_pytorch():
  """experiments.bench.ops times what it says: each op's outputs agree across frameworks."""
  pytest.importorskip('torch')
  from experiments.bench import ops
  dims = dict(n=32, d=16, f=24, b=2, h=2, t=8, dh=4)
  jax_ops, torch_ops = ops.run_ops('jax', dims, repeats=1), ops.run_ops('torch', dims, repeats=1)
  assert list(jax_ops) == list(torch_ops) and len(jax_ops) == 8
  for name, result in jax_ops.items():
    assert result['median_ms'] > 0
    for mine, theirs in zip(result['outputs'], torch_ops[name]['outputs'], strict=True):
      np.testing.assert_allclose(mine, theirs, rtol=2e-4, atol=2e-5, err_msg=name)


def test_profile_names_the_pass_and_the_part_of_an_op():
  """experiments.bench.profile reads JAX's op_name metadata: block_i and jit scopes left out,
  the last two names kept, transpose(jvp(...)) the backward pass."""
  from experiments.bench import profile
  body = 'jit(train_step)/while/body/closed_call/'
  ffn = 'encoder/block_1/block_1.ffn_sublayer/block_1.sublayer/block_1.ffn/ffn/output/dot_general'
  assert profile.part_of(body + 'transpose(jvp(ViT))/' + ffn) == ('backward', 'ffn/output')
  assert profile.part_of(body + 'jvp(ViT)/' + ffn) == ('forward', 'ffn/output')
  query = 'jvp(DecoderLM)/decoder/block_0/block_0.sublayer/self_attention/query/add_any'
  assert profile.part_of(query) == ('forward', 'self_attention/query')
  clip = 'transpose(jvp(ViT))/encoder/block_0/self_attention/jit(clip)/max'
  assert profile.part_of(clip) == ('backward', 'encoder/self_attention')
  assert profile.part_of('jit(train_step)/add') == (profile.OUTSIDE, profile.OUTSIDE)


def test_xla_flag_sets_alternate_with_the_baseline_and_are_divided_by_it(tmp_path, monkeypatch):
  """experiments.bench.xla_flags: per round every flag set once, none first; the ratio is the
  median over rounds over the baseline's; a flag XLA refuses is a row with its error."""
  from experiments.bench import xla_flags
  calls = []

  def fake_run_module(module, *args, env):
    flag = env['XLA_FLAGS'].split()[-1] if env['XLA_FLAGS'] else ''
    calls.append(flag)
    if flag == '--bad':
      raise RuntimeError('python -m experiments.bench.step_time failed: unknown flag --bad')
    base = {'': 0.010, '--fast': 0.008}[flag]
    return {'median_s': base * (1 + 0.1 * (len(calls) > 3))}  # the host slows in round 2

  monkeypatch.setattr(xla_flags, 'run_module', fake_run_module)
  monkeypatch.setenv('XLA_FLAGS', '')
  rows = xla_flags.run(['vit-tiny'], ['--fast', '--bad'], rounds=2, repeats=1,
                       dtype='float32', out=str(tmp_path), log=lambda *_: None)
  assert calls == ['', '--fast', '--bad'] * 2
  by = {r['flags']: r for r in rows}
  assert by['--fast']['ratio'] == pytest.approx(0.8) and by['']['ratio'] == 1.0
  assert 'unknown flag' in by['--bad']['error'] and 'median_s' not in by['--bad']
  assert json.loads((tmp_path / 'xla_flags.json').read_text()) == rows
  table = xla_flags.markdown(rows)
  assert '| vit-tiny | `--fast` | 8.4 | 8.0, 8.8 | 0.80 |' in table and 'failed' in table
