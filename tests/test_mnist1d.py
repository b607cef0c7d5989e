"""MNIST-1D: overlapping token windows, the shuffled variant, the validation split, the
per-step transformations of the training examples, and a point of the seeds sweep trained."""

import os

import ml_collections
import numpy as np
import pytest

from experiments import data, tasks
from experiments.sweep import grid
from experiments.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def held_out():
  return data.mnist1d(patch_size=1, validation=500)


@pytest.fixture(scope='module')
def shuffled_point():
  """The quick seeds sweep's shuffled point: its config and (cached) dataset."""
  module, arg = grid.load(os.path.join(ROOT, 'configs/ablations/mnist1d_seeds.py:quick,steps=2'))
  points = grid.expand(module, arg)
  assert sorted((p['data.shuffle'], p['seed']) for p in points) == [
      (False, 0), (False, 1), (True, 0), (True, 1)]
  config = grid.configure(module.get_config(arg), points[-1])
  assert config.data.shuffle and config.data.patch_overlap == 2 and config.total_steps == 2
  return config, tasks.load_dataset(config)


def test_tokens_are_the_windows_counted_by_hand():
  x = np.arange(1, 41, dtype=np.float32)[None]  # sample i holds i + 1; 0 is padding.
  disjoint = data.memory.mnist1d_tokens(x, 4)
  np.testing.assert_array_equal(disjoint, x.reshape(1, 10, 4))
  overlap = data.memory.mnist1d_tokens(x, 4, 2)  # 2 more samples on each side.
  assert overlap.shape == (1, 10, 8)
  np.testing.assert_array_equal(overlap[0, 0], [0, 0, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(overlap[0, 4], [15, 16, 17, 18, 19, 20, 21, 22])
  np.testing.assert_array_equal(overlap[0, 9], [35, 36, 37, 38, 39, 40, 0, 0])
  with pytest.raises(ValueError, match=r'data.shift=40; allowed: 0 to 39'):
    data.mnist1d(shift=40)


def test_shuffled_is_the_packages_variant_and_validation_holds_out_train(held_out,
                                                                         shuffled_point):
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.shuffle_seq = True
  ref = make_dataset(args)  # the package's own shuffled sequences.
  shuffled = shuffled_point[1]  # tokens of 4 samples and 2 more on each side.
  np.testing.assert_allclose(shuffled.train['inputs'][..., 2:6].reshape(4000, 40), ref['x'],
                             atol=1e-6)
  np.testing.assert_allclose(shuffled.test['inputs'][..., 2:6].reshape(1000, 40), ref['x_test'],
                             atol=1e-6)
  np.testing.assert_allclose(shuffled.signals[:, shuffled.order], ref['x'], atol=1e-6)
  # validation=500: the first 3,500 training examples train, the last 500 are evaluated.
  assert held_out.num_train == 3500 and held_out.num_test == 500
  np.testing.assert_array_equal(held_out.signals, shuffled.signals[:3500])
  np.testing.assert_array_equal(held_out.test['inputs'][..., 0], shuffled.signals[3500:])
  np.testing.assert_array_equal(held_out.test['targets'], ref['y'][3500:])


def test_train_batches_are_the_generators_transformations(held_out):
  config = ml_collections.ConfigDict(dict(batch_size=64, seed=3, data={}))
  plain = held_out
  rows = data.batch_indices(3500, 64, 7, 3)
  source = plain.signals[rows].astype(np.float64)
  np.testing.assert_array_equal(plain.train_batch(config, 7)['inputs'][..., 0], source)

  def batch(**augment):
    d = data.memory.Mnist1dDataset(plain.train, plain.test, plain.info, signals=plain.signals,
                                   order=plain.order, patch=(1, 0),
                                   augment=tuple(augment.get(k, 0) for k in
                                                 ('shift', 'scale', 'shear', 'noise')))
    return d.train_batch(config, 7)['inputs'][..., 0].astype(np.float64)

  # Shift: each row is its source rolled circularly by some k in [-3, 3], not all by 0.
  shifted = batch(shift=3)
  ks = [[k for k in range(-3, 4) if np.allclose(np.roll(s, k), x)] for s, x in
        zip(source, shifted)]
  assert all(len(k) == 1 for k in ks) and len({k[0] for k in ks}) > 3
  # Scale: each row is its source times one factor in [0.8, 1.2].
  ratio = batch(scale=0.4) / source
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones(40), rtol=1e-5)
  assert 0.8 <= ratio.min() and ratio.max() <= 1.2 and ratio.std() > 0.05
  # Shear: each row minus its source is a line through 0 at the middle, slope in [-1, 1].
  diff = batch(shear=2.0) - source
  slope = np.polyfit(np.linspace(-0.5, 0.5, 40), diff.T, 1)
  np.testing.assert_allclose(diff, np.outer(slope[0], np.linspace(-0.5, 0.5, 40)), atol=1e-5)
  assert np.abs(slope[0]).max() <= 1.0 and np.abs(slope[1]).max() < 1e-5
  # Noise: iid with the given standard deviation.
  assert abs((batch(noise=0.1) - source).std() - 0.1) < 0.01
  # All four together: the same for the global batch as for two hosts' halves.
  both = dict(shift=5, scale=0.4, shear=2.0, noise=0.1)
  d = data.memory.Mnist1dDataset(plain.train, plain.test, plain.info, signals=plain.signals,
                                 order=plain.order, patch=(4, 2), augment=tuple(both.values()))
  full = d.train_batch(config, 7)['inputs']
  halves = [d.train_batch(config, 7, (p, 2))['inputs'] for p in (0, 1)]
  np.testing.assert_array_equal(full, np.concatenate(halves))
  np.testing.assert_array_equal(full, d.train_batch(config, 7)['inputs'])
  assert full.shape == (64, 10, 8) and not np.allclose(full, d.train_batch(config, 8)['inputs'])


def test_seeds_sweep_quick_point_trains_end_to_end(shuffled_point, tmp_path):
  """The shuffled point of the quick sweep (overlapping tokens, rope, the transformations,
  the permutation) trains and evaluates."""
  summary, state = train_and_evaluate(shuffled_point[0], str(tmp_path))
  assert int(state.step) == 2 and 0.0 <= summary['eval/accuracy'] <= 1.0
  assert np.isfinite(summary['eval/loss'])
