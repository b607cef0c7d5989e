"""experiments.inspect end to end: a tiny run, then inspect, then real PNGs of the expected size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

import tx

from experiments.inspect import head_stats, inspection, streams
from experiments.train import train_and_evaluate
from tests.test_runner import ROOT, tiny_config

DPI = 100


def _check_png(path, width_in, height_in):
  """The PNG exists, has the figure's size in pixels, and is not blank (many colours, contrast)."""
  pixels = mpimg.imread(path)
  assert pixels.shape[:2] == (round(height_in * DPI), round(width_in * DPI)), path
  rgb = pixels[..., :3].reshape(-1, 3)
  assert rgb.std() > 0.05, f'{path} is (nearly) blank'
  assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20, f'{path} has too few colours'


@pytest.fixture(scope='module')
def vit_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('vit'))
  train_and_evaluate(tiny_config('vit', steps=6), workdir)
  return workdir


def test_inspect_a_vit_run(vit_run, tmp_path):
  paths = inspection.inspect_run(vit_run, str(tmp_path), examples=2, stat_examples=32)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['attention_example0.png', 'attention_example1.png', 'head_statistics.png',
                   'inspection.json', 'offset_profiles.png', 'position_content.png',
                   'rollout.png']
  # tiny_config: 1 layer of 2 heads, 2.3-inch panels (+0.6 for the titles).
  _check_png(tmp_path / 'attention_example0.png', 2 * 2.3 + 0.6, 2.3 + 0.6)
  _check_png(tmp_path / 'rollout.png', 2.6 * 2, 5.4)
  _check_png(tmp_path / 'head_statistics.png', 10.0, 4.2)
  _check_png(tmp_path / 'position_content.png', 8.0, 4.2)
  _check_png(tmp_path / 'offset_profiles.png', 2 * 2.2 + 0.6, 2.2 + 0.6)
  with open(tmp_path / 'inspection.json') as f:
    record = json.load(f)
  assert record['step'] == 6 and record['stat_examples'] == 32
  (layer,) = record['layers'].values()
  assert len(layer['entropy']) == 2 and all(0 < e <= np.log(17) + 1e-5 for e in layer['entropy'])
  shares = np.array([layer['relative'], layer['absolute'], layer['content']])
  np.testing.assert_allclose(shares.sum(0), 1.0, rtol=1e-9)
  assert all(d > 0 for d in layer['mean_distance'])


def test_inspect_a_seq2seq_run_shows_cross_attention(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_config('seq2seq', steps=4), workdir)
  out = tmp_path / 'inspect'
  inspection.inspect_run(workdir, str(out), examples=3, stat_examples=16)
  # 1 encoder block, 1 decoder block: enc self, dec self, dec cross (in call order), 2 heads.
  _check_png(out / 'attention_example0.png', 2 * 2.3 + 0.6, 3 * 2.3 + 0.6)
  _check_png(out / 'cross_attention.png', 3.0 + 0.6, 3 * 3.0 + 0.6)
  with open(out / 'inspection.json') as f:
    record = json.load(f)
  assert list(record['layers']) == ['encoder/block_0/self_attention',
                                    'decoder/block_0/self_attention',
                                    'decoder/block_0/cross_attention']
  assert 'mean_distance' not in record['layers']['decoder/block_0/cross_attention']
  (mass,) = record['alignment_mass'].values()  # reverse: the mass on the mirrored source token.
  assert 0.0 < mass < 1.0


def test_inspect_a_language_model_run_crops_causal_heatmaps(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_config('lm', steps=4), workdir)
  out = tmp_path / 'inspect'
  inspection.inspect_run(workdir, str(out), examples=1, stat_examples=8, max_tokens=32)
  panel = 0.11 * 32  # 128 tokens cropped to 32: causal, so the crop is exact.
  _check_png(out / 'attention_example0.png', 2 * panel + 0.6, panel + 0.6)
  with open(out / 'inspection.json') as f:
    (layer,) = json.load(f)['layers'].values()
  # Causal: only offsets k - q <= 0 carry attention, and the mean distance is below uniform's.
  assert max(o[0] for o, _ in layer['offset_profile']) == 0
  assert all(0 <= d < 127 / 2 for d in layer['mean_distance'])


CROSS = tx.AttentionLayer(('decoder', 'block_0', 'cross_attention'))


def _layer(path, weights):
  stream = streams.Stream([[]] * len(weights), np.ones(weights.shape[:1] + weights.shape[-1:], bool),
                          np.arange(weights.shape[-1])[:, None], np.zeros(weights.shape[-1], bool))
  return streams.Layer(path, weights, stream, stream)


def test_alignment_mass_is_one_for_the_exact_alignment():
  lengths = np.array([3, 1])
  eye = np.zeros((2, 2, 4, 4))  # [N, H, output positions, source positions]; </s> at n.
  mirror = np.zeros((2, 2, 4, 4))
  for i, n in enumerate(lengths):
    for j in range(n + 1):
      eye[i, :, j, j] = 1.0
      mirror[i, :, j, n - 1 - j if j < n else n] = 1.0
  for task, right, wrong in (('copy', eye, mirror), ('reverse', mirror, eye)):
    got = head_stats.alignment_mass(task, [_layer(CROSS, right)], lengths)
    assert got == {'decoder/block_0/cross_attention': 1.0}
    got = head_stats.alignment_mass(task, [_layer(CROSS, wrong)], lengths)
    assert got['decoder/block_0/cross_attention'] < 1.0
  assert head_stats.alignment_mass('sort', [_layer(CROSS, eye)],
                                lengths) == {}


def test_inspect_command_line(vit_run, tmp_path):
  cmd = [sys.executable, '-m', 'experiments.inspect', f'--workdir={vit_run}',
         f'--out={tmp_path}', '--examples=1', '--stat_examples=8']
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'wrote 6 files' in done.stdout and (tmp_path / 'attention_example0.png').exists()
  for bad, message in (([f'--workdir={tmp_path}'], 'has no config.json'),
                       ([f'--workdir={vit_run}', '--step=3'], 'are at steps [6]'),
                       ([f'--workdir={vit_run}', '--examples=0'], '--examples=0')):
    done = subprocess.run([sys.executable, '-m', 'experiments.inspect', *bad], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
