"""experiments.lessons.conv_imitation: heads set on the kernel's offsets attend there and make
the window's attention full rank; the --quick command trains, lowers the error and writes its
files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lessons import conv_imitation as C


def test_heads_on_the_offsets_cover_the_window():
  model = C.ConvImitator((5, 5), heads=9, head_dim=2, features=2)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))['params']
  offsets = np.array([[r, c] for r in (-1, 0, 1) for c in (-1, 0, 1)], np.float32)
  params['centres'] = jnp.asarray(offsets)
  params['log_alpha'] = jnp.full(9, np.log(1000.0))
  for name in ('query', 'key'):  # no content logits: attention is positional only.
    params['attention'][name] = jax.tree.map(jnp.zeros_like, params['attention'][name])
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
  centres, window = jax.jit(lambda p: C.head_statistics(model, p, x, 3))(params)
  np.testing.assert_allclose(centres, offsets, atol=1e-6)
  window = np.asarray(window)
  np.testing.assert_allclose(window, np.eye(9), atol=1e-6)
  assert C.window_rank(window) == 9 and C.covered_offsets(offsets, 3) == 9
  assert C.covered_offsets([[0.4, 0.0], [0.1, -0.2], [2.0, 0.0]], 3) == 1
  assert C.window_rank(np.ones((9, 9))) == 1
  np.testing.assert_allclose(C.mean_std([1.0, 2.0, 4.0]), [7 / 3, np.std([1, 2, 4], ddof=1)])
  # Taps 1 … 9 (energies 1 … 81): four heads keep 6² … 9², losing 1 + 4 + … + 25 = 55 of 285 + 1.
  taps = np.arange(1.0, 10.0).reshape(3, 3, 1, 1)
  assert np.isclose(C.one_tap_per_head_error(taps, np.ones(1), 4), 55 / 286)
  assert C.one_tap_per_head_error(taps, np.ones(1), 9) == 0


def test_quick_end_to_end(tmp_path):
  lines = []
  results = C.run(str(tmp_path), quick=True, seeds=2, log=lines.append)
  for name in ('results.json', 'results.md', 'conv_imitation_centres.png',
               'conv_imitation_loss.png'):
    assert os.path.getsize(tmp_path / name) > 0
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['seeds'] == [0, 1] and saved['config']['heads'] == 9
  assert lines[0].startswith('step     0') and 'steps/s' in lines[-1]
  first, last = (np.asarray(h['relative_error']) for h in (saved['history'][0],
                                                          saved['history'][-1]))
  assert np.all(first > 0.8) and np.all(last < 0.6 * first)  # it learns the convolution.
  for run in saved['runs']:
    assert 0 <= run['covered'] <= 9 and 1 <= run['window_rank'] <= 9
  errors = [r['relative_error'] for r in saved['runs']]
  np.testing.assert_allclose(results['relative_error'], [np.mean(errors), np.std(errors, ddof=1)])
