"""Random-access sources of labelled images on disk, in the three layouts real datasets come in.

  ImageFolder   DIR/train/<class>/*.jpg|png and DIR/val/<class>/... (torchvision's ImageFolder,
                the ImageNet layout); classes are the sorted sub-folder names.
  TfdsSource    a dataset as `tfds build --file_format=array_record` writes it (dataset_info.json,
                features.json, <name>-<split>.array_record-*), read by tensorflow_datasets'
                data source, which needs no TensorFlow.
  ParquetSource parquet shards as the Hugging Face Hub stores datasets (DIR/data/train-*.parquet
                or DIR/train/*.parquet) with an image column ({'bytes': ...} or bytes) and a label.

Each source has len(), and source[i] = {'image': encoded bytes or a uint8 array, 'label': int,
'name': where the example came from}; `class_names` lists the labels. Sources are picklable
and open their files lazily, so grain's worker processes each open their own.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
EVAL_SPLITS = ('val', 'validation', 'test')  # the first that exists, unless data.eval_split.


def _check_dir(path: str, what: str):
  if not path:
    raise ValueError(f'data.dir is empty; set --config.data.dir to {what}')
  if not os.path.isdir(path):
    raise ValueError(f'data.dir={path!r} is not a directory; point it at {what}')


def eval_split_of(available, eval_split: str, where: str) -> str:
  """data.eval_split if given (and present), else the first of val, validation, test."""
  if eval_split:
    if eval_split not in available:
      raise ValueError(f'data.eval_split={eval_split!r} is not in {where}; it has '
                       f'{", ".join(sorted(available)) or "no splits"}')
    return eval_split
  for name in EVAL_SPLITS:
    if name in available:
      return name
  raise ValueError(f'{where} has no evaluation split ({", ".join(EVAL_SPLITS)}); it has '
                   f'{", ".join(sorted(available)) or "nothing"}; set data.eval_split')


class ImageFolder:
  """The image files of DIR/<split>/<class>/, sorted by class then file name."""

  def __init__(self, root: str, split: str, class_names=None):
    _check_dir(root, 'a folder holding train/<class>/*.jpg and val/<class>/*.jpg')
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
      raise ValueError(f'data.dir={root!r} has no {split}/ folder; expected '
                       f'{split}/<class>/<image>.jpg')
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not found:
      raise ValueError(f'data.dir={root!r}: {split}/ has no class folders; expected '
                       f'{split}/<class>/<image>.jpg')
    if class_names is not None and found != list(class_names):
      only_train = sorted(set(class_names) - set(found))
      only_here = sorted(set(found) - set(class_names))
      raise ValueError(f'data.dir={root!r}: {split}/ has other classes than the training split: '
                       f'{len(only_train)} only in training ({", ".join(only_train[:3])}), '
                       f'{len(only_here)} only here ({", ".join(only_here[:3])})')
    self.class_names = found
    self.files, labels = [], []
    for label, name in enumerate(found):
      with os.scandir(os.path.join(folder, name)) as entries:
        images = sorted(e.name for e in entries
                        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
      self.files += [os.path.join(folder, name, f) for f in images]
      labels += [label] * len(images)
    if not self.files:
      raise ValueError(f'data.dir={root!r}: {split}/ holds no {"/".join(IMAGE_EXTENSIONS)} images '
                       f'in its {len(found)} class folders')
    self.labels = np.asarray(labels, np.int32)

  @staticmethod
  def splits(root: str) -> list[str]:
    _check_dir(root, 'a folder holding train/<class>/*.jpg and val/<class>/*.jpg')
    return [e.name for e in os.scandir(root) if e.is_dir()]

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    with open(self.files[i], 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[i]), 'name': self.files[i]}


def _tfds_directory(root: str) -> str:
  """The folder holding dataset_info.json: root itself, or the one folder below it that does."""
  _check_dir(root, 'the folder `tfds build` wrote (…/<dataset>/<version>, with dataset_info.json)')
  if os.path.isfile(os.path.join(root, 'dataset_info.json')):
    return root
  found = sorted(os.path.dirname(p) for depth in ('*', '*/*')
                 for p in glob.glob(os.path.join(root, depth, 'dataset_info.json')))
  if len(found) != 1:
    raise ValueError(f'data.dir={root!r} holds ' +
                     (f'{len(found)} TFDS datasets ({", ".join(found[:3])}); point it at one'
                      if found else 'no dataset_info.json (nor one or two folders below it); '
                      'point it at the folder `tfds build --file_format=array_record` wrote'))
  return found[0]


class TfdsSource:
  """One split of a TFDS dataset in ArrayRecord files, images left encoded (decoded later, in
  the transform, so that a worker decodes once and at the size it needs)."""

  def __init__(self, root: str, split: str, image_key: str = 'image', label_key: str = 'label'):
    self.directory = _tfds_directory(root)
    self.split, self.image_key, self.label_key = split, image_key, label_key
    builder = self._builder()
    info = builder.info
    if info.file_format is None or info.file_format.value != 'array_record':
      raise ValueError(f'{self.directory} holds {getattr(info.file_format, "value", "unknown")} '
                       'files; tx reads ArrayRecord (tfds build --file_format=array_record)')
    if split not in info.splits:
      raise ValueError(f'data.dir={root!r} has no split {split!r}; it has '
                       f'{", ".join(info.splits)}')
    features = info.features
    for field, key in (('image_key', image_key), ('label_key', label_key)):
      if key not in features:
        raise ValueError(f'data.{field}={key!r} is not a feature of {self.directory}; it has '
                         f'{", ".join(features)}')
    self.class_names = list(getattr(features[label_key], 'names', None) or [])
    self.length = info.splits[split].num_examples
    self._source = None

  def _builder(self):
    import tensorflow_datasets as tfds  # imported only for TFDS data: it is a large package.
    return tfds.builder_from_directory(self.directory)

  @staticmethod
  def splits(root: str) -> list[str]:
    import tensorflow_datasets as tfds
    return list(tfds.builder_from_directory(_tfds_directory(root)).info.splits)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_source'} | {'_source': None}

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    if self._source is None:
      import tensorflow_datasets as tfds
      self._source = self._builder().as_data_source(
          split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()})
    record = self._source[int(i)]
    return {'image': record[self.image_key], 'label': int(record[self.label_key]),
            'name': f'{self.directory} {self.split}[{int(i)}]'}


def _split_of(path: str, root: str) -> str:
  """The split a parquet shard belongs to: the part of its name before the first '-' (the
  Hub's data/train-00000-of-00004.parquet), else its name at the top of root (train.parquet),
  else its folder's name (the Hub's parquet conversion: plain_text/train/0000.parquet)."""
  stem = os.path.basename(path)[:-len('.parquet')]
  if '-' in stem:
    return stem.split('-')[0]
  folder = os.path.dirname(path)
  return stem if os.path.samefile(folder, root) else os.path.basename(folder)


def _parquet_shards(root: str) -> list[str]:
  _check_dir(root, 'a folder of parquet shards (data/train-*.parquet, …)')
  return sorted(glob.glob(os.path.join(root, '**', '*.parquet'), recursive=True))


def parquet_files(root: str, split: str) -> list[str]:
  """The parquet shards of `split` under root (at any depth), sorted: see _split_of."""
  return [p for p in _parquet_shards(root) if _split_of(p, root) == split]


def parquet_splits(root: str) -> list[str]:
  """The split names of the parquet shards under root."""
  return sorted({_split_of(p, root) for p in _parquet_shards(root)})


def _hub_class_names(schema, label_key: str) -> list[str]:
  """Label names from the Hub's schema metadata ({'info': {'features': {label: {names}}}})."""
  raw = (schema.metadata or {}).get(b'huggingface')
  if not raw:
    return []
  feature = json.loads(raw).get('info', {}).get('features', {}).get(label_key, {})
  return list(feature.get('names', []))


class ParquetSource:
  """The rows of a split's parquet shards, read with pyarrow into memory as Arrow buffers
  (about the shards' size); a dataset larger than memory belongs in ArrayRecord or a folder."""

  def __init__(self, root: str, split: str, image_key: str = 'image', label_key: str = 'label'):
    self.files = parquet_files(root, split)
    if not self.files:
      raise ValueError(f'data.dir={root!r} has no parquet shards for split {split!r} '
                       f'({split}-*.parquet or {split}/*.parquet)')
    self.split, self.image_key, self.label_key = split, image_key, label_key
    import pyarrow.parquet as pq
    schema = pq.read_schema(self.files[0])
    for field, key in (('image_key', image_key), ('label_key', label_key)):
      if key not in schema.names:
        raise ValueError(f'data.{field}={key!r} is not a column of {self.files[0]}; it has '
                         f'{", ".join(schema.names)}')
    self.lengths = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
    self.class_names = _hub_class_names(schema, label_key)
    self._table = None

  @staticmethod
  def splits(root: str) -> list[str]:
    return parquet_splits(root)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_table'} | {'_table': None}

  def __len__(self):
    return sum(self.lengths)

  def labels(self) -> np.ndarray:
    """Every label of the split, without reading the images."""
    import pyarrow.parquet as pq
    return np.concatenate([pq.read_table(f, columns=[self.label_key])[self.label_key]
                           .to_numpy() for f in self.files]).astype(np.int32)

  def __getitem__(self, i):
    if self._table is None:
      import pyarrow as pa
      import pyarrow.parquet as pq
      self._table = pa.concat_tables(
          pq.read_table(f, columns=[self.image_key, self.label_key], memory_map=True)
          for f in self.files).combine_chunks()
    row = self._table.slice(int(i), 1).to_pylist()[0]
    image = row[self.image_key]
    if isinstance(image, dict):  # the Hub's Image feature: {'bytes': ..., 'path': ...}
      image = image.get('bytes')
    return {'image': image, 'label': int(row[self.label_key]),
            'name': f'{self.files[0] if len(self.files) == 1 else os.path.dirname(self.files[0])}'
                    f' {self.split}[{int(i)}]'}
