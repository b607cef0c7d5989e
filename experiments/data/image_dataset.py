"""Labelled images on disk as a dataset: a source per split, and the train and eval views.

  folder   DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg          (sources.ImageFolder)
  tfds     a `tfds build --file_format=array_record` output folder      (sources.TfdsSource)
  parquet  Hub-style parquet shards with an image and a label column    (sources.ParquetSource)

Images are read and augmented when a batch is made (in grain's worker processes), never all
at once. The number of classes comes from the data; so does the image size when
data.image_size is 0 (the sampled images must then all have one square size).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from experiments.data import images, sampling, sources
from tx.validate import check_choice


@dataclasses.dataclass(frozen=True)
class Views:
  """How examples are turned into pixels (experiments/data/images.py)."""
  size: int
  crop: str = 'inception'
  min_scale: float = 0.08
  shift: int = 0
  flip: bool = True
  eval_crop: float = 0.875
  mixup: float = 0.0
  skip_corrupt: bool = False


@dataclasses.dataclass
class ImageDataset:
  train_source: Any
  test_source: Any
  info: dict
  views: Views
  held_in_memory = False  # its batches are read and decoded ahead, in a thread or workers.

  @property
  def num_train(self) -> int:
    return len(self.train_source)

  @property
  def num_test(self) -> int:
    return len(self.test_source)

  def _batch(self, source, indices, view) -> dict:
    """{'inputs', 'targets', 'weight'} of source[indices], view(record) giving the pixels;
    with skip_corrupt a damaged image becomes zeros with weight 0 (and a warning)."""
    size = self.views.size
    inputs = np.zeros((len(indices), size, size, 3), np.float32)
    targets = np.zeros(len(indices), np.int32)
    weight = np.ones(len(indices), np.float32)
    for j, i in enumerate(indices):
      record = source[int(i)]
      targets[j] = record['label']
      try:
        inputs[j] = view(j, record)
      except images.CorruptImage as e:
        if not self.views.skip_corrupt:
          raise
        weight[j] = 0.0
        _skipped.add(record['name'])
        print(f'warning: skipped {e.name}: not a readable image ({e.reason}); '
              f'{len(_skipped)} skipped in this process', file=sys.stderr, flush=True)
    return {'inputs': inputs, 'targets': targets, 'weight': weight}

  def _eval_view(self, j, record):
    return images.eval_image(record['image'], record['name'], self.views.size,
                             self.views.eval_crop)

  def sample(self, n: int = 1) -> dict:
    """The first n training images in the evaluation view: their shapes build the model."""
    return self._batch(self.train_source, range(min(n, self.num_train)), self._eval_view)

  def test_examples(self, n: int) -> dict:
    return self._batch(self.test_source, range(min(n, self.num_test)), self._eval_view)

  def train_batch(self, config, step: int, process=(0, 1)) -> dict:
    """Process (p, P)'s rows of the global batch for `step`, each augmented with a generator
    seeded by (seed, step, global row), so independent of the workers and hosts."""
    c, v = config, self.views
    p, count = process
    idx = sampling.batch_indices(self.num_train, c.batch_size, step, c.seed, p, count)
    first_row = p * len(idx)

    def view(j, record):
      rng = np.random.default_rng([c.seed, step, first_row + j])
      return images.train_image(record['image'], record['name'], rng, v.size, v.crop,
                                v.min_scale, v.shift, v.flip)

    batch = self._batch(self.train_source, idx, view)
    if v.mixup:
      batch = images.mixup(batch, np.random.default_rng([c.seed, step, p, 2]), v.mixup)
    return batch

  def eval_batch(self, batch_size: int, index: int, process=(0, 1)) -> dict:
    rows, valid = sampling.eval_rows(self.num_test, batch_size, index, *process)
    batch = self._batch(self.test_source, rows, self._eval_view)
    return batch | {'weight': batch['weight'] * valid}


_skipped: set = set()  # names of the corrupt images this process skipped.


def native_size(source, probes: int = 8) -> int:
  """The side of the source's images, read from `probes` examples spread over it; a
  ValueError if they are not all one square size (a CorruptImage if one does not decode)."""
  sizes = {}
  for i in np.linspace(0, len(source) - 1, min(probes, len(source))).astype(int):
    record = source[int(i)]
    sizes.setdefault(images.decode(record['image'], record['name']).size, record['name'])
  if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
    found = ', '.join(f'{w}×{h} ({name})' for (w, h), name in list(sizes.items())[:2])
    raise ValueError(f'data.image_size=0 takes the size from the images, but they are {found}; '
                     'set --config.data.image_size')
  return next(iter(sizes))[0]


def _dataset(root: str, train, test, image_size: int, crop: str, min_scale: float, shift: int,
             flip: bool, eval_crop: float, mixup: float, skip_corrupt: bool) -> ImageDataset:
  check_choice('data.crop', crop, images.CROPS)
  if not 0 < min_scale <= 1:
    raise ValueError(f'data.min_scale={min_scale}; it must be in (0, 1]')
  if not 0 < eval_crop <= 1:
    raise ValueError(f'data.eval_crop={eval_crop}; it must be in (0, 1]')
  if mixup < 0:
    raise ValueError(f'data.mixup={mixup}; it is the Beta(α, α) parameter: 0 (off) or > 0')
  names = list(train.class_names)
  if names and test.class_names and list(test.class_names) != names:
    raise ValueError(f'data.dir={root!r}: the evaluation split has other classes than the '
                     f'training split '
                     f'({len(test.class_names)} against {len(names)})')
  num_classes = len(names) or int(train.labels().max()) + 1
  size = image_size or native_size(train)
  views = Views(size, crop, min_scale, shift, flip, eval_crop, mixup, skip_corrupt)
  return ImageDataset(train, test, {'num_classes': num_classes, 'class_names': names}, views)


def _splits(kind, root: str, train_split: str, eval_split: str):
  available = kind.splits(root)
  if train_split not in available:
    raise ValueError(f'data.dir={root!r} has no training split {train_split!r}; it has '
                     f'{", ".join(sorted(available)) or "none"}')
  return train_split, sources.eval_split_of(available, eval_split, f'data.dir={root!r}')


def image_folder(dir: str = '', image_size: int = 0, crop: str = 'inception',  # noqa: A002
                 min_scale: float = 0.08, shift: int = 0, flip: bool = True,
                 eval_crop: float = 0.875, mixup: float = 0.0, skip_corrupt: bool = False,
                 train_split: str = 'train', eval_split: str = '', image_key: str = 'image',
                 label_key: str = 'label') -> ImageDataset:
  """An ImageNet-layout folder: DIR/train/<class>/*.jpg|png and DIR/val/<class>/...
  (or validation/, test/); the classes are the sorted training sub-folders. image_key and
  label_key name columns of tfds and parquet data; they are accepted here, so that a config
  switches between the three with data.name alone."""
  train_split, eval_split = _splits(sources.ImageFolder, dir, train_split, eval_split)
  train = sources.ImageFolder(dir, train_split)
  test = sources.ImageFolder(dir, eval_split, train.class_names)
  return _dataset(dir, train, test, image_size, crop, min_scale, shift, flip, eval_crop, mixup,
                  skip_corrupt)


def tfds(dir: str = '', image_size: int = 0, crop: str = 'inception',  # noqa: A002
         min_scale: float = 0.08, shift: int = 0, flip: bool = True, eval_crop: float = 0.875,
         mixup: float = 0.0, skip_corrupt: bool = False, train_split: str = 'train',
         eval_split: str = '', image_key: str = 'image', label_key: str = 'label') -> ImageDataset:
  """A TFDS dataset prepared as ArrayRecord (imagenet2012, cifar10, ...), read without
  TensorFlow; classes from its ClassLabel feature."""
  train_split, eval_split = _splits(sources.TfdsSource, dir, train_split, eval_split)
  train = sources.TfdsSource(dir, train_split, image_key, label_key)
  test = sources.TfdsSource(dir, eval_split, image_key, label_key)
  return _dataset(dir, train, test, image_size, crop, min_scale, shift, flip, eval_crop, mixup,
                  skip_corrupt)


def parquet(dir: str = '', image_size: int = 0, crop: str = 'inception',  # noqa: A002
            min_scale: float = 0.08, shift: int = 0, flip: bool = True, eval_crop: float = 0.875,
            mixup: float = 0.0, skip_corrupt: bool = False, train_split: str = 'train',
            eval_split: str = '', image_key: str = 'image', label_key: str = 'label'
            ) -> ImageDataset:
  """Parquet shards as the Hub stores image datasets; classes from the Hub's ClassLabel
  metadata, else the largest training label + 1."""
  train_split, eval_split = _splits(sources.ParquetSource, dir, train_split, eval_split)
  train = sources.ParquetSource(dir, train_split, image_key, label_key)
  test = sources.ParquetSource(dir, eval_split, image_key, label_key)
  return _dataset(dir, train, test, image_size, crop, min_scale, shift, flip, eval_crop, mixup,
                  skip_corrupt)
