"""experiments.generate on a tiny trained run, its one-line errors, and the decoding bench."""

import subprocess
import sys

import numpy as np
import pytest

from experiments import generate
from experiments.train import train_and_evaluate
from experiments.bench import kv_cache as bench
from experiments.data import symbol_names
from tests.test_runner import ROOT, tiny_config


@pytest.fixture(scope='module')
def seq2seq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('seq2seq'))
  train_and_evaluate(tiny_config('seq2seq', steps=4), workdir)
  return workdir


def test_greedy_sample_and_beam_from_a_seq2seq_run(seq2seq_run):
  (greedy,) = generate.generate_text(seq2seq_run, source='3 1 4')
  assert greedy.startswith('3 1 4 </s> → ')
  samples = generate.generate_text(seq2seq_run, source='314', method='sample', num_samples=3,
                                   temperature=2.0, seed=5)
  assert len(samples) == 3 and samples == generate.generate_text(
      seq2seq_run, source='314', method='sample', num_samples=3, temperature=2.0, seed=5)
  beams = generate.generate_text(seq2seq_run, source='3 1 4', method='beam', beam_size=3)
  scores = [float(b.rsplit('(score ', 1)[1].rstrip(')')) for b in beams]
  assert len(beams) == 3 and scores == sorted(scores, reverse=True)
  with pytest.raises(ValueError, match='seq2seq run: give --source'):
    generate.generate_text(seq2seq_run, prompt='abc')


def test_encoding_prompts_and_sources():
  np.testing.assert_array_equal(generate.encode_prompt('ba', 'abc'), [[1, 0]])
  with pytest.raises(ValueError, match="characters the model never saw: 'z'"):
    generate.encode_prompt('abz', 'abc')
  names = symbol_names('reverse', 13)
  np.testing.assert_array_equal(generate.encode_source('3 1 4', names), [[6, 4, 7, 2]])
  np.testing.assert_array_equal(generate.encode_source('314', names), [[6, 4, 7, 2]])
  with pytest.raises(ValueError, match=r"unknown symbols \['x'\]"):
    generate.encode_source('3 x', names)
  plus = symbol_names('addition', 14)
  np.testing.assert_array_equal(generate.encode_source('1+2', plus), [[4, 13, 5, 2]])


def test_generate_command_line(seq2seq_run):
  run = lambda *args: subprocess.run([sys.executable, '-m', 'experiments.generate', *args],
                                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  done = run(f'--workdir={seq2seq_run}', '--source=2 7', '--method=beam', '--beam_size=2')
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.count('2 7 </s> → ') == 2 and '--- beam 2 ---' in done.stdout
  for args, message in (([f'--workdir={seq2seq_run}', '--source=2 q'], "unknown symbols ['q']"),
                        ([f'--workdir={seq2seq_run}', '--prompt=hi'], 'give --source'),
                        ([f'--workdir={seq2seq_run}', '--source=1', '--method=nucleus'],
                         'method')):
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_decoding_bench_runs():
  (row,) = bench.bench([32], batch=1, repeats=1)
  assert row['cached']['ms_per_token'] > 0 and row['recompute']['ms_per_token'] > 0
  assert '| 32 | 1 |' in bench.markdown([row])
