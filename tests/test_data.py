"""Datasets and the batch sampler: determinism, per-host slices, task correctness, CIFAR format."""

import codecs
import io
import os
import pickle
import struct

import numpy as np
import pytest

from experiments import data
from experiments.config_check import check_config
from experiments.train import train_and_evaluate
from test_runner import tiny_config

PINNED_DIGITS_TEST_LABELS = [0, 8, 8, 9, 8, 3, 7, 5, 0, 6, 6, 3]
PINNED_DIGITS_TEST_COUNTS = [39, 37, 47, 28, 42, 32, 37, 27, 30, 41]


def test_batches_are_a_pure_function_of_seed_and_step():
  a = data.batch_indices(100, 10, step=13, seed=0)
  np.testing.assert_array_equal(a, data.batch_indices(100, 10, step=13, seed=0))
  assert not np.array_equal(a, data.batch_indices(100, 10, step=13, seed=1))
  epoch = np.concatenate([data.batch_indices(100, 10, s, seed=0) for s in range(10)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(100))  # each example once per epoch.


def test_hosts_load_disjoint_slices_of_the_global_batch():
  full = data.batch_indices(100, 16, step=3, seed=0)
  parts = [data.batch_indices(100, 16, step=3, seed=0, process_index=p, process_count=4)
           for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)


@pytest.mark.parametrize('task', data.SEQ2SEQ_TASKS)
def test_seq2seq_tasks(task):
  d = data.seq2seq(task, train_size=50, test_size=20, max_length=5, extrapolate_max_length=9, seed=3)
  assert d.train['inputs'].shape[1] == d.test['inputs'].shape[1] == d.info['width']
  assert d.extrapolate['inputs'].shape[1] > d.info['width']
  for split, lo, hi in ((d.train, 1, 5), (d.test, 1, 5), (d.extrapolate, 6, 9)):
    for src, tgt, n in zip(split['inputs'], split['targets'], split['length']):
      s = list(src[:list(src).index(data.EOS)])
      t = list(tgt[:list(tgt).index(data.EOS)])
      assert data.PAD not in s + t and data.BOS not in s + t
      assert all(x == data.PAD for x in src[len(s) + 1:])
      digits = lambda xs: int(''.join(str(x - data.FIRST_SYMBOL) for x in xs))
      if task == 'addition':
        plus = s.index(data.FIRST_SYMBOL + 10)
        assert digits(t) == digits(s[:plus]) + digits(s[plus + 1:])
        length = max(plus, len(s) - plus - 1)
      else:
        expect = {'copy': s, 'reverse': s[::-1], 'sort': sorted(s)}[task]
        assert t == expect
        length = len(s)
      assert lo <= length <= hi and length == n


def test_addition_with_operands_longer_than_int64():
  d = data.seq2seq('addition', train_size=5, test_size=5, max_length=10, extrapolate_max_length=20, seed=1)
  digits = lambda xs: int(''.join(str(x - data.FIRST_SYMBOL) for x in xs))
  for src, tgt, n in zip(d.extrapolate['inputs'], d.extrapolate['targets'], d.extrapolate['length']):
    s, t = list(src[:list(src).index(data.EOS)]), list(tgt[:list(tgt).index(data.EOS)])
    plus = s.index(data.FIRST_SYMBOL + 10)
    assert plus == len(s) - plus - 1 == n > 10  # both operands have exactly n digits
    assert digits(t) == digits(s[:plus]) + digits(s[plus + 1:])


def test_mnist1d_patches_and_shuffle():
  plain = data.mnist1d(patch_size=4)
  assert plain.train['inputs'].shape == (4000, 10, 4) and plain.test['inputs'].shape == (1000, 10, 4)
  flat = plain.train['inputs'].reshape(4000, 40)
  shuffled = data.mnist1d(shuffle=True).train['inputs'].reshape(4000, 40)
  # One fixed permutation of the 40 positions, the same for every example.
  perm = [int(np.flatnonzero(np.all(np.isclose(flat, shuffled[:, [j]]), axis=0))[0])
          for j in range(40)]
  assert sorted(perm) == list(range(40)) and perm != list(range(40))
  np.testing.assert_allclose(shuffled, flat[:, perm], atol=1e-6)


def test_digits_split_is_the_documented_one():
  d = data.digits()
  assert d.train['inputs'].shape == (1437, 8, 8, 1) and d.test['inputs'].shape == (360, 8, 8, 1)
  assert d.train['inputs'].max() <= 1.0
  # Pinned: the first test labels and the class counts of the seed-0 split in the docs.
  np.testing.assert_array_equal(d.test['targets'][:12], PINNED_DIGITS_TEST_LABELS)
  np.testing.assert_array_equal(np.bincount(d.test['targets']), PINNED_DIGITS_TEST_COUNTS)


def test_random_shift_moves_pixels():
  img = np.zeros((1, 5, 5, 1), np.float32)
  img[0, 2, 2] = 1
  offsets = data.shift_offsets(np.random.default_rng(0), 50, 1)
  out = data.shift_images(np.repeat(img, 50, 0), offsets, 1)
  ys, xs = np.nonzero(out[..., 0].sum(0))
  assert set(ys) == {1, 2, 3} and set(xs) == {1, 2, 3} and out.sum() == 50


def _write_cifar(directory, files, label_key, num_classes, n=24):
  rng = np.random.default_rng(0)
  for name in files:
    batch = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: list(rng.integers(0, num_classes, n))}
    with open(directory / name, 'wb') as f:
      pickle.dump(batch, f)


def test_cifar10_and_cifar100_fixtures(tmp_path):
  c10 = tmp_path / 'cifar-10-batches-py'
  c10.mkdir()
  _write_cifar(c10, ['data_batch_1', 'data_batch_2', 'test_batch'], b'labels', 10)
  d = data.cifar(str(c10))
  assert d.train['inputs'].shape == (48, 32, 32, 3) and d.info['num_classes'] == 10
  with open(c10 / 'test_batch', 'rb') as f:
    raw = pickle.load(f)
  # Channel-major rows [R(1024) G(1024) B(1024)] become HWC pixels.
  np.testing.assert_allclose(d.test['inputs'][0, 0, 1], raw[b'data'][0, [1, 1025, 2049]] / 255.0)
  c100 = tmp_path / 'cifar-100-python'
  c100.mkdir()
  _write_cifar(c100, ['train', 'test'], b'fine_labels', 100)
  assert data.cifar(str(c100)).info['num_classes'] == 100
  config = tiny_config('cifar', steps=2, eval_every=2, checkpoint_every=2)
  config.data.dir = str(c10)
  summary, _ = train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 2


def test_missing_cifar_directory_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"data.dir='.*nowhere' is not a directory"):
    data.cifar(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='holds neither CIFAR-10'):
    data.cifar(str(tmp_path))


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


def test_cifar_files_are_read_without_running_code_and_damage_is_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c10 = tmp_path / 'c10'
  c10.mkdir()
  _write_cifar(c10, ['data_batch_1'], b'labels', 10)
  with open(c10 / 'test_batch', 'wb') as f:
    pickle.dump({b'data': _RunsCode(), b'labels': [0]}, f)
  with pytest.raises(ValueError, match=r"test_batch is not a CIFAR batch .*refers to "
                     r"(posix|os)\.system, which a data file does not need"):
    data.cifar(str(c10))
  assert not (tmp_path / 'pwned').exists()
  (c10 / 'test_batch').write_bytes(b'not a pickle at all')
  with pytest.raises(ValueError, match=r"data.dir='.*c10': test_batch is not a CIFAR batch") as e:
    data.cifar(str(c10))
  assert '\n' not in str(e.value)


class _Calls:
  """Pickles as a call of fn(*args): what a malicious pickle does on load."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize('protocol', [2, 5])
@pytest.mark.parametrize('payload, refusal', [
    (_Calls(os.system, 'touch pwned'), r'refers to (posix|os)\.system'),
    (_Calls(eval, "open('pwned', 'w')"), r'refers to (__builtin__|builtins)\.eval'),
    (_Calls(np.ndarray.tofile, np.zeros(1), 'pwned'), r'refers to (__builtin__|builtins)\.getattr'),
    (_Calls(codecs.encode, 'pwned', 'rot13'), r"encodes bytes as 'rot13', not latin1"),
], ids=['os.system', 'eval', 'getattr', 'codecs-rot13'])
def test_cifar_pickles_that_call_anything_are_refused(tmp_path, monkeypatch, protocol, payload,
                                                      refusal):
  monkeypatch.chdir(tmp_path)
  _write_cifar(tmp_path, ['data_batch_1'], b'labels', 10)
  with open(tmp_path / 'test_batch', 'wb') as f:
    pickle.dump({b'data': payload, b'labels': [0]}, f, protocol=protocol)
  with pytest.raises(ValueError, match=r'test_batch is not a CIFAR batch .*' + refusal):
    data.cifar(str(tmp_path))
  assert not (tmp_path / 'pwned').exists()


class _Python2Pickler(pickle._Pickler):
  """Writes bytes and (ASCII) str as Python 2 wrote its str, SHORT_BINSTRING / BINSTRING, as
  in the files of the CIFAR download (Python 2, protocol 2, NumPy 1)."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_str(self, obj):
    obj = obj.encode('ascii') if isinstance(obj, str) else obj
    head = (pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
            else pickle.BINSTRING + struct.pack('<i', len(obj)))
    self.write(head + obj)

  dispatch[bytes] = dispatch[str] = save_str


def _cifar_pickle(batch: dict, style) -> bytes:
  """batch pickled with protocol `style`, or as the CIFAR download was ('python2-numpy1')."""
  if style != 'python2-numpy1':
    return pickle.dumps(batch, protocol=style)
  f = io.BytesIO()
  _Python2Pickler(f, protocol=2).dump(batch)
  return f.getvalue().replace(b'numpy._core.', b'numpy.core.')  # NumPy 1's module names.


@pytest.mark.parametrize('style', [0, 1, 2, 3, 4, 5, 'python2-numpy1'])
def test_cifar_batches_load_from_every_pickle_protocol(tmp_path, style):
  rng = np.random.default_rng(0)
  batches = {name: {b'batch_label': name.encode(), b'filenames': [b'%d.png' % i for i in range(20)],
                    b'data': rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                    b'labels': [int(y) for y in rng.integers(0, 10, 20)]}
             for name in ('data_batch_1', 'data_batch_2', 'test_batch')}
  batches['test_batch'][b'labels'] = list(rng.integers(0, 10, 20))  # NumPy scalars too.
  for name, batch in batches.items():
    (tmp_path / name).write_bytes(_cifar_pickle(batch, style))
  d = data.cifar(str(tmp_path))
  images = lambda *names: np.concatenate([batches[n][b'data'] for n in names]).reshape(
      -1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
  labels = lambda *names: np.concatenate([batches[n][b'labels'] for n in names])
  np.testing.assert_array_equal(d.train['inputs'], images('data_batch_1', 'data_batch_2'))
  np.testing.assert_array_equal(d.train['targets'], labels('data_batch_1', 'data_batch_2'))
  np.testing.assert_array_equal(d.test['inputs'], images('test_batch'))
  np.testing.assert_array_equal(d.test['targets'], labels('test_batch'))


def test_char_lm_reads_utf8_text_and_refuses_other_bytes(tmp_path):
  text = tmp_path / 'text.txt'
  text.write_bytes('naïve café, 世界 ✓\r\n'.encode() * 40)
  d = data.char_lm(str(text), seq_len=16)
  assert set(d.info['chars']) == set('naïve café, 世界 ✓\n')  # newlines made \n.
  png = tmp_path / 'x.png'
  png.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 8)
  with pytest.raises(ValueError) as e:
    data.char_lm(str(png), seq_len=16)
  assert str(e.value) == (f"data.path='{png}' is not UTF-8 text (byte 0x89 at offset 0); "
                          'give a text file')
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('plain ascii, then café'.encode('latin1') * 100)
  with pytest.raises(ValueError, match=r'is not UTF-8 text \(byte 0xe9 at offset 21\)'):
    data.char_lm(str(latin1), seq_len=16)
  config = tiny_config('lm')
  config.data.path = str(png)
  with pytest.raises(ValueError) as e:
    check_config(config)
  assert str(e.value) == (f"config.data.path='{png}' is not UTF-8 text (byte 0x89 at offset 0); "
                          'give a text file')
