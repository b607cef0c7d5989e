"""Pieces of training against their definitions: schedules, smoothed loss, checkpoint retention."""

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common, vit
from experiments import tasks
from experiments.config_check import check_config
from experiments.optimizer import make_optimizer, make_schedule
from experiments.checkpoints import Checkpoints


def _optimizer_config(schedule, lr=1.0, warmup=100):
  c = ml_collections.ConfigDict()
  c.optimizer = ml_collections.ConfigDict(dict(lr=lr, schedule=schedule, warmup_steps=warmup))
  return c


def test_rsqrt_schedule_is_vaswani():
  """lrate = d^-0.5 · min(s^-0.5, s · warmup^-1.5), with d^-0.5 · warmup^-0.5 folded into lr."""
  d, warmup = 512, 4000
  lr = d ** -0.5 * warmup ** -0.5
  schedule = make_schedule(_optimizer_config('rsqrt', lr, warmup), 100000)
  for s in (1, 100, 3999, 4000, 4001, 20000, 99999):
    paper = d ** -0.5 * min(s ** -0.5, s * warmup ** -1.5)
    np.testing.assert_allclose(float(schedule(s)), paper, rtol=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_zero():
  schedule = make_schedule(_optimizer_config('cosine', 2.0, 10), 110)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 60, 110)],
                             [0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-6)


def test_bfloat16_first_moment_is_stored_in_bfloat16_and_steps_like_float32():
  """optimizer.mu_dtype='bfloat16': m_t in bfloat16, v_t and the parameters float32; the
  updates over 5 steps equal the float32 optimizer's to bfloat16 rounding of m."""
  params = {'w': jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), 'b': jnp.zeros(8)}
  grad = lambda p, t: jax.tree.map(lambda x: jnp.sin(3.0 * x + t) + 0.1, p)
  runs = {}
  for mu_dtype in ('', 'bfloat16'):
    c = common.training()
    c.optimizer.mu_dtype = mu_dtype
    tx_opt = make_optimizer(c, make_schedule(c, 100))
    p, state = params, tx_opt.init(params)
    for t in range(5):
      updates, state = tx_opt.update(grad(p, t), state, p)
      p = optax.apply_updates(p, updates)
    adam = state[1][0]  # clip's state, then adamw's chain: scale_by_adam first.
    runs[mu_dtype] = p, adam
  (p32, adam32), (p16, adam16) = runs[''], runs['bfloat16']
  assert {x.dtype for x in jax.tree.leaves(adam16.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam16.nu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(adam32.mu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), p32, params)
  diff = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), p16, p32)
  assert all(d < 0.01 * m for d, m in zip(jax.tree.leaves(diff), jax.tree.leaves(moved)))
  assert any(d > 0 for d in jax.tree.leaves(diff))


def test_an_unknown_mu_dtype_is_refused():
  c = vit.get_config('quick')
  c.optimizer.mu_dtype = 'float16'
  with pytest.raises(ValueError, match="config.optimizer.mu_dtype='float16'"):
    check_config(c)


def test_label_smoothed_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2])
  weights = np.array([1, 1, 0, 1, 1], np.float32)
  eps = 0.1
  loss, correct, count, _ = tasks._cross_entropy(jnp.asarray(logits), labels, weights, eps)
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  target = np.full((5, 4), eps / 4) + (1 - eps) * np.eye(4)[labels]
  np.testing.assert_allclose(float(loss), (-(target * logp).sum(-1) * weights).sum(), rtol=1e-5)
  assert float(count) == 4 and float(correct) == ((logits.argmax(-1) == labels) * weights).sum()


def test_checkpoints_keep_the_last_n_and_the_best(tmp_path):
  ckpt = Checkpoints(str(tmp_path), keep=2, best_metric='accuracy', best_mode='max')
  state = {'w': np.zeros(3, np.float32)}
  for step, acc in zip(range(1, 6), [0.1, 0.9, 0.2, 0.3, 0.4]):
    ckpt.save(step, {'w': np.full(3, step, np.float32)}, {'step': step}, {'accuracy': acc})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 4, 5]  # best (0.9 at 2), then the last two.
  restored, meta = ckpt.restore(state, step=2)
  np.testing.assert_array_equal(restored['w'], [2, 2, 2])
  assert meta == {'step': 2, 'state': {'arrays': {"['w']": [[3], 'float32']},
                                      'crc32': zlib.crc32(np.full(3, 2, np.float32).tobytes())}}
  ckpt.close()
