"""Datasets held in memory as NumPy arrays: digits, MNIST-1D, seq2seq, character LM, CIFAR.

Nothing is downloaded. Every dataset is a `Dataset` of train/test arrays keyed by name
('inputs', 'targets', ...); its batches are a pure function of (seed, step)
(experiments/data/sampling.py).
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np

from experiments.data import sampling
from tx.validate import check_choice

# Token ids shared by the algorithmic seq2seq tasks.
PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3


@dataclasses.dataclass
class Dataset:
  train: dict  # name -> np.ndarray with a leading example axis.
  test: dict
  info: dict  # num_classes / vocab_size / ... as the model needs them.
  extrapolate: dict | None = None  # longer test sequences (seq2seq), evaluated by length.

  # What every dataset offers the trainer (experiments/data/image_dataset.py has the same).
  held_in_memory = True  # its batches are gathered on demand, not made ahead in a thread.
  @property
  def num_train(self) -> int:
    return len(self.train['targets'])

  @property
  def num_test(self) -> int:
    return len(self.test['targets'])

  def sample(self, n: int = 1) -> dict:
    """The first n training examples, unaugmented: their shapes build and trace the model."""
    return {k: v[:n] for k, v in self.train.items()}

  def test_examples(self, n: int) -> dict:
    return {k: v[:n] for k, v in self.test.items()}

  def train_batch(self, config, step: int, process=(0, 1)) -> dict:
    """Process (p, P)'s rows of the global batch for `step`, shifted by up to
    config.data.augment pixels, with a weight of 1 per example."""
    c = config
    idx = sampling.batch_indices(self.num_train, c.batch_size, step, c.seed, *process)
    batch = {k: v[idx] for k, v in self.train.items()}
    shift = c.data.get('augment', 0)
    if shift:  # drawn for the global batch, then sliced: the same shifts on 1 host or many.
      offsets = shift_offsets(np.random.default_rng([c.seed, step, 1]), c.batch_size, shift)
      start = process[0] * len(idx)
      batch['inputs'] = shift_images(batch['inputs'], offsets[start:start + len(idx)], shift)
    return batch | {'weight': np.ones(len(idx), np.float32)}

  def eval_batch(self, batch_size: int, index: int, process=(0, 1)) -> dict:
    """Process (p, P)'s rows of test batch `index` (global batches of batch_size, the last
    one padded with weight-0 rows)."""
    rows, valid = sampling.eval_rows(self.num_test, batch_size, index, *process)
    return {k: v[rows] for k, v in self.test.items()} | {'weight': valid.astype(np.float32)}


def digits(test_size: int = 360, split_seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), pixels in [0, 1],
  shape [N, 8, 8, 1]. The test split is fixed: the last `test_size` examples of
  permutation(default_rng(split_seed)), 1,437 / 360 by default."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(split_seed).permutation(len(y))
  tr, te = order[:-test_size], order[-test_size:]
  return Dataset({'inputs': x[tr], 'targets': y[tr]}, {'inputs': x[te], 'targets': y[te]},
                 {'num_classes': 10})


def mnist1d(patch_size: int = 1, shuffle: bool = False, patch_overlap: int = 0,
            validation: int = 0, shift: int = 0, scale: float = 0.0, shear: float = 0.0,
            noise: float = 0.0) -> Dataset:
  """MNIST-1D (Greydanus, 2020) from `mnist1d.data.make_dataset` with its default arguments
  (4,000 train / 1,000 test sequences of length 40, 10 classes); never its download.

  patch_size p groups the 40 samples into 40/p tokens; patch_overlap o widens each token by o
  samples on each side (`mnist1d_tokens`: p + 2·o features), which makes the model's linear
  input projection a Conv1D of kernel p + 2·o and stride p. shuffle=True is the package's
  shuffled-sequence variant: one fixed permutation of the 40 positions for every example,
  applied before the tokens are cut, which destroys spatial structure.
  validation=N holds out the last N training examples and evaluates on them instead of the
  test set (for choosing hyper-parameters without the test set).
  shift, scale, shear, noise: every training example of every step is transformed as the
  generator transforms its templates (`mnist1d_transform`), before the permutation; 0 is off.
  """
  from mnist1d.data import get_dataset_args, make_dataset
  if 40 % patch_size:
    raise ValueError(f'data.patch_size={patch_size}; MNIST-1D has length 40, so it must divide 40')
  if not 0 <= validation < 4000:
    raise ValueError(f'data.validation={validation}; allowed: 0 (evaluate on the test set) to '
                     '3999 training examples held out')
  if not 0 <= shift < 40:
    raise ValueError(f'data.shift={shift}; allowed: 0 to 39 samples of circular shift')
  args = get_dataset_args()
  args.shuffle_seq = False
  d = make_dataset(args)
  # The package's shuffled variant draws its permutation next from the global RNG that
  # make_dataset seeded; its normalization ignores the order, so this is the same data.
  order = np.random.permutation(40) if shuffle else np.arange(40)
  x, y = d['x'].astype(np.float32), d['y'].astype(np.int32)
  x_test, y_test = d['x_test'].astype(np.float32), d['y_test'].astype(np.int32)
  if validation:
    x, x_test, y, y_test = x[:-validation], x[-validation:], y[:-validation], y[-validation:]
  tokens = lambda signals: mnist1d_tokens(signals[:, order], patch_size, patch_overlap)
  return Mnist1dDataset({'inputs': tokens(x), 'targets': y},
                        {'inputs': tokens(x_test), 'targets': y_test}, {'num_classes': 10},
                        signals=x, order=order, patch=(patch_size, patch_overlap),
                        augment=(shift, scale, shear, noise))


def mnist1d_tokens(signals, patch_size: int, overlap: int = 0):
  """[N, L] signals -> [N, L/p, p + 2·o] tokens (p = patch_size, o = overlap): token t is
  samples [t·p − o, (t + 1)·p + o) of the signal zero-padded by o on each side; o = 0 gives
  the L/p disjoint patches."""
  padded = np.pad(signals, ((0, 0), (overlap, overlap)))
  starts = np.arange(0, signals.shape[1], patch_size)
  return padded[:, starts[:, None] + np.arange(patch_size + 2 * overlap)]


def mnist1d_transform(x, k, a, b, z, scale: float, shear: float, noise: float):
  """The generator's transformations of a template, applied to signals x [n, L]:
  x'_i = roll(x_i, k_i)·(1 + scale·a_i) − shear·b_i·ramp + noise·z_i, ramp = linspace(−½, ½, L):
  a circular translation by k_i samples, an amplitude scale, a shear (a linear ramp) and
  iid Gaussian noise; a_i, b_i ~ U(−½, ½) and z_i ~ N(0, I) are drawn by the caller."""
  n, length = x.shape
  rolled = x[np.arange(n)[:, None], (np.arange(length) - k[:, None]) % length]
  ramp = np.linspace(-0.5, 0.5, length, dtype=np.float32)
  return (rolled * (1 + scale * a[:, None]) - shear * b[:, None] * ramp
          + noise * z).astype(np.float32)


@dataclasses.dataclass
class Mnist1dDataset(Dataset):
  """MNIST-1D whose training batches are made from the 40-sample signals: transformed
  (`mnist1d_transform` with k_i uniform in {−shift, ..., shift}, drawn with a_i, b_i, z_i
  from default_rng([seed, step, 2]) for the global batch, so the same on one host or many),
  permuted by `order`, then cut into tokens."""
  signals: np.ndarray | None = None  # [N, 40] training signals, before the permutation.
  order: np.ndarray | None = None  # position j of a sequence is sample order[j].
  patch: tuple = (1, 0)  # (patch_size, patch_overlap) of the tokens.
  augment: tuple = (0, 0.0, 0.0, 0.0)  # (shift, scale, shear, noise).

  def train_batch(self, config, step: int, process=(0, 1)) -> dict:
    if not any(self.augment):  # the transformation is the identity: the tokens are made.
      return super().train_batch(config, step, process)
    c, (shift, scale, shear, noise) = config, self.augment
    idx = sampling.batch_indices(self.num_train, c.batch_size, step, c.seed, *process)
    rng = np.random.default_rng([c.seed, step, 2])
    draws = (rng.integers(-shift, shift + 1, c.batch_size), rng.uniform(-0.5, 0.5, c.batch_size),
             rng.uniform(-0.5, 0.5, c.batch_size),
             rng.standard_normal((c.batch_size, 40), np.float32))
    rows = slice(process[0] * len(idx), (process[0] + 1) * len(idx))
    x = mnist1d_transform(self.signals[idx], *(d[rows] for d in draws), scale, shear, noise)
    return {'inputs': mnist1d_tokens(x[:, self.order], *self.patch),
            'targets': self.train['targets'][idx], 'weight': np.ones(len(idx), np.float32)}


SEQ2SEQ_TASKS = ('copy', 'reverse', 'sort', 'addition')


def symbol_names(task: str, vocab_size: int) -> dict[int, str]:
  """Token id → name in the seq2seq vocabulary: '' for <pad>, '<s>', '</s>', then the symbols
  as digits (and '+' in addition; 's10', 's11', ... beyond ten symbols)."""
  return {PAD: '', BOS: '<s>', EOS: '</s>'} | {
      FIRST_SYMBOL + i: '0123456789+'[i] if task == 'addition' else str(i) if i < 10 else f's{i}'
      for i in range(vocab_size - FIRST_SYMBOL)}


def _seq2seq_example(task, rng, length, num_symbols):
  if task == 'addition':  # "a+b" -> digits of the sum; length = digits of each operand.
    # Uniform over the numbers of `length` digits, drawn digit by digit (any length: no int64).
    number = lambda: int(''.join(str(d) for d in [rng.integers(1 if length > 1 else 0, 10),
                                                   *rng.integers(0, 10, length - 1)]))
    a, b = number(), number()
    ids = lambda text: [FIRST_SYMBOL + '0123456789+'.index(c) for c in text]
    return ids(f'{a}+{b}'), ids(str(a + b))
  x = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + num_symbols, length)
  out = {'copy': x, 'reverse': x[::-1], 'sort': np.sort(x)}[task]
  return list(x), list(out)


def seq2seq(task: str = 'reverse', train_size: int = 10000, test_size: int = 1000,
            min_length: int = 1, max_length: int = 10, extrapolate_max_length: int | None = None,
            num_symbols: int = 10, seed: int = 0) -> Dataset:
  """Algorithmic sequence-to-sequence tasks: copy, reverse, sort, addition.
  Sources are symbols (ids from FIRST_SYMBOL) followed by <eos>; targets end in <eos>; both
  are padded with <pad>. 'length' is the number of symbols (for 'addition', the digits of each
  operand). Train and test lengths are uniform in [min_length, max_length], padded to one width
  (info['width'] positions: the longest sequence's symbols and <eos>). With
  extrapolate_max_length > max_length, `extrapolate` holds test_size more examples with lengths
  in (max_length, extrapolate_max_length], padded to their own, larger width: they measure
  length extrapolation, which a learned posemb table sized for training cannot even run on.
  """
  check_choice('data.task', task, SEQ2SEQ_TASKS)
  rng = np.random.default_rng(seed)

  def examples(n, lo, hi):
    lengths = rng.integers(lo, hi + 1, n)
    return [_seq2seq_example(task, rng, int(t), num_symbols) for t in lengths], lengths

  def pad(pairs, lengths, width):
    src = np.full((len(pairs), width), PAD, np.int32)
    tgt = np.full((len(pairs), width), PAD, np.int32)
    for i, (s, t) in enumerate(pairs):
      src[i, :len(s) + 1] = s + [EOS]
      tgt[i, :len(t) + 1] = t + [EOS]
    return {'inputs': src, 'targets': tgt, 'length': lengths.astype(np.int32)}

  def width(*parts):  # symbols + <eos>, over sources and targets.
    return max(len(x) for pairs in parts for pair in pairs for x in pair) + 1

  train, test = (examples(train_size, min_length, max_length),
                 examples(test_size, min_length, max_length))
  w = width(train[0], test[0])
  extrapolate = None
  if (extrapolate_max_length or 0) > max_length:
    long = examples(test_size, max_length + 1, extrapolate_max_length)
    extrapolate = pad(*long, width(long[0]))
  vocab = FIRST_SYMBOL + (11 if task == 'addition' else num_symbols)
  return Dataset(pad(*train, w), pad(*test, w),
                 {'vocab_size': vocab, 'pad_id': PAD, 'bos_id': BOS, 'eos_id': EOS, 'width': w},
                 extrapolate)


def _read_text(path: str) -> str:
  """The text of the UTF-8 file `path`, newlines made '\\n' (as open() in text mode). Bytes that
  are not UTF-8 raise a ValueError naming the first one: a binary file is refused, not learned
  as U+FFFD replacement characters."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'data.path={path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset '
                     f'{e.start}); give a text file') from None
  return text.replace('\r\n', '\n').replace('\r', '\n')


def pydoc_text() -> str:
  """The default text of the language models: the English text of Python's documentation topics
  (`pydoc_data.topics`, ~465k characters, shipped with CPython), topics in sorted order joined
  by blank lines."""
  from pydoc_data.topics import topics
  return '\n\n'.join(topics[k] for k in sorted(topics))


def char_lm(path: str | None = None, seq_len: int = 128, test_fraction: float = 0.1) -> Dataset:
  """Character-level language modelling on a local UTF-8 text file (default: the English text of
  Python's documentation topics, `pydoc_data`, ~465k characters, which ships with CPython).
  The text is split by position: the last `test_fraction` is the test set. Examples are
  windows of seq_len + 1 characters (inputs = first seq_len, targets = shifted by one); train
  windows start every seq_len // 2 characters, test windows tile.
  """
  if path:
    if not os.path.isfile(path):
      raise ValueError(f'data.path={path!r} is not a readable file')
    text = _read_text(path)
  else:
    text = pydoc_text()
  chars = sorted(set(text))
  ids = np.searchsorted(np.array(chars), np.array(list(text))).astype(np.int32)
  cut = int(len(ids) * (1 - test_fraction))
  if cut < seq_len + 1 or len(ids) - cut < seq_len + 1:
    raise ValueError(f'data.path has {len(ids)} characters: too short for seq_len={seq_len}')

  def windows(arr, stride):
    w = np.stack([arr[s:s + seq_len + 1] for s in range(0, len(arr) - seq_len, stride)])
    return {'inputs': w[:, :-1], 'targets': w[:, 1:]}

  return Dataset(windows(ids[:cut], seq_len // 2), windows(ids[cut:], seq_len),
                 {'vocab_size': len(chars), 'chars': ''.join(chars)})


def _latin1(text: str, encoding: str) -> bytes:
  """_codecs.encode as a pickle of protocol 0-2 calls it to rebuild bytes: latin-1 only."""
  if encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'it encodes bytes as {encoding!r}, not latin1')
  return text.encode('latin1')


def _pickled_data_globals() -> dict:
  """(module, name) -> object, for the globals that pickles of NumPy arrays and bytes refer to,
  as NumPy 1 (numpy.core) and NumPy 2 (numpy._core) name them, in protocols 0 to 5. Each one
  builds data and calls nothing else: ndarray and dtype are the array and its element type;
  _reconstruct(ndarray, shape, dtype) makes an empty array that the pickle then fills;
  scalar(dtype, bytes) is a NumPy scalar; _frombuffer(buf, dtype, shape, order) is an array
  over in-band bytes (protocol 5); in protocols 0-2, bytes() is b'' and
  _codecs.encode(text, 'latin1') any other bytes (restricted here to latin-1)."""
  if np.lib.NumpyVersion(np.__version__) >= '2.0.0':
    from numpy._core import multiarray, numeric
  else:
    from numpy.core import multiarray, numeric
  allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
             ('builtins', 'bytes'): bytes, ('__builtin__', 'bytes'): bytes,
             ('_codecs', 'encode'): _latin1}
  for core in ('numpy.core', 'numpy._core'):
    allowed |= {(f'{core}.multiarray', '_reconstruct'): multiarray._reconstruct,
                (f'{core}.multiarray', 'scalar'): multiarray.scalar,
                (f'{core}.numeric', '_frombuffer'): numeric._frombuffer}
  return allowed


class _DataUnpickler(pickle.Unpickler):
  """Unpickles plain data only: dicts, lists, bytes, numbers and NumPy arrays, whichever
  protocol and NumPy version wrote them. Any other global (the way a pickle runs code) is
  refused, so loading a data file executes nothing."""

  ALLOWED = _pickled_data_globals()

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'it refers to {module}.{name}, which a data file does not '
                                   'need; refusing to load it')
    return self.ALLOWED[(module, name)]


def cifar(dir: str) -> Dataset:  # noqa: A002 (the config key is data.dir)
  """CIFAR-10 or CIFAR-100 from a local dir in the standard python-pickle format, read by
  an unpickler that accepts plain data and NumPy arrays only (`_DataUnpickler`).
  CIFAR-10: data_batch_1..5 and test_batch; CIFAR-100: train and test (fine labels). Images
  become float32 [N, 32, 32, 3] in [0, 1].
  """
  if not dir or not os.path.isdir(dir):
    raise ValueError(f'data.dir={dir!r} is not a directory; point it at an extracted '
                     'cifar-10-batches-py or cifar-100-python folder')

  def load(names, label_key):
    xs, ys = [], []
    for name in names:
      try:
        with open(os.path.join(dir, name), 'rb') as f:
          d = _DataUnpickler(f, encoding='bytes').load()
        xs.append(np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], np.int32))
      except Exception as e:  # noqa: BLE001 (any damage: one line naming the file)
        raise ValueError(f'data.dir={dir!r}: {name} is not a CIFAR batch '
                         f'({type(e).__name__}: {e})'.replace('\n', ' ')) from None
    return {'inputs': np.concatenate(xs).astype(np.float32) / 255.0, 'targets': np.concatenate(ys)}

  files = set(os.listdir(dir))
  if 'test_batch' in files:
    train_names = sorted(f for f in files if f.startswith('data_batch_'))
    train, test, classes = load(train_names, b'labels'), load(['test_batch'], b'labels'), 10
  elif {'train', 'test'} <= files:
    train, test, classes = load(['train'], b'fine_labels'), load(['test'], b'fine_labels'), 100
  else:
    raise ValueError(f'data.dir={dir!r} holds neither CIFAR-10 (data_batch_*, test_batch) '
                     'nor CIFAR-100 (train, test) pickles')
  return Dataset(train, test, {'num_classes': classes})


def shift_offsets(rng: np.random.Generator, n: int, max_shift: int):
  """n random (dy, dx) crops offsets in [0, 2·max_shift] for `shift_images`."""
  return rng.integers(0, 2 * max_shift + 1, (n, 2))


def shift_images(images, offsets, max_shift: int):
  """Translates image i [N, H, W, C] by offsets[i] - max_shift pixels (zero fill): a cheap
  augmentation. Draw the offsets for the global batch, so they do not depend on the host."""
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  return np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
