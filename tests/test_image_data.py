"""Images on disk: an image folder, a TFDS ArrayRecord build and Hub-style parquet shards of the
same pictures give the same batches; batches are a pure function of (seed, step) through grain;
processes read disjoint rows; bad data gives one line; a run trains end to end from each."""

import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import tasks
from experiments.config_check import check_config
from experiments.data import image_dataset, images, pipeline
from experiments.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['ant', 'bee', 'cat']
SIZE = 12


def _pictures(split: str, per_class: int, seed: int):
  """(class, file name, encoded bytes) in ImageFolder order; one JPEG per split."""
  rng = np.random.default_rng(seed)
  out = []
  for label, name in enumerate(CLASSES):
    for i in range(per_class):
      pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
      kind = 'JPEG' if (label, i) == (1, 0) else 'PNG'
      buf = io.BytesIO()
      Image.fromarray(pixels).save(buf, kind)
      out.append((label, f'{i:02d}.{kind.lower().replace("jpeg", "jpg")}', buf.getvalue()))
  return out


SPLITS = {'train': _pictures('train', 8, 0), 'validation': _pictures('validation', 2, 1)}


def write_folder(root):
  for split, pictures in SPLITS.items():
    for label, name, data in pictures:
      folder = os.path.join(root, split, CLASSES[label])
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(data)
  return str(root)


def write_tfds(root):
  """The files `tfds build --file_format=array_record` writes, made without TensorFlow:
  features.json, dataset_info.json and tf.train.Example records in ArrayRecord shards."""
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from tensorflow_datasets.proto import tf_example_pb2
  folder = os.path.join(root, 'toy', '1.0.0')
  os.makedirs(folder)
  tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3)),
                              'label': tfds.features.ClassLabel(names=CLASSES)}
                             ).save_config(folder)
  splits = []
  for split, pictures in SPLITS.items():
    shards = np.array_split(np.arange(len(pictures)), 2)
    for k, rows in enumerate(shards):
      writer = ArrayRecordWriter(
          os.path.join(folder, f'toy-{split}.array_record-{k:05d}-of-{len(shards):05d}'),
          'group_size:1')
      for r in rows:
        example = tf_example_pb2.Example()
        example.features.feature['image'].bytes_list.value.append(pictures[r][2])
        example.features.feature['label'].int64_list.value.append(pictures[r][0])
        writer.write(example.SerializeToString())
      writer.close()
    splits.append({'name': split, 'shardLengths': [str(len(r)) for r in shards],
                   'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'})
  with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
    json.dump({'name': 'toy', 'version': '1.0.0', 'fileFormat': 'array_record',
               'splits': splits}, f)
  return str(root)


def write_parquet(root):
  """Shards as datasets.push_to_hub writes them: data/<split>-0000k-of-0000n.parquet, an
  image struct {bytes, path}, and the ClassLabel names in the schema's metadata."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(os.path.join(root, 'data'))
  meta = {'info': {'features': {'image': {'_type': 'Image'},
                                'label': {'_type': 'ClassLabel', 'names': CLASSES}}}}
  for split, pictures in SPLITS.items():
    for k, rows in enumerate(np.array_split(np.arange(len(pictures)), 2)):
      table = pa.table({
          'image': [{'bytes': pictures[r][2], 'path': pictures[r][1]} for r in rows],
          'label': pa.array([pictures[r][0] for r in rows], pa.int64())})
      table = table.replace_schema_metadata({'huggingface': json.dumps(meta)})
      pq.write_table(table, os.path.join(root, 'data', f'{split}-{k:05d}-of-00002.parquet'),
                     row_group_size=4)
  return str(root)


WRITERS = {'folder': write_folder, 'tfds': write_tfds, 'parquet': write_parquet}


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp('images')
  return {name: write(base / name) for name, write in WRITERS.items()}


def config(name, root, **data):
  from configs import vit
  c = vit.get_config('data=folder,quick')
  c.data.update(dict(name=name, dir=root, image_size=8, min_scale=0.25) | data)
  c.model.update(dict(patch_size=4))
  c.update(dict(batch_size=8, eval_batch_size=8, total_steps=5, eval_every=5,
                checkpoint_every=2, log_every=5))  # 3 steps an epoch (24 images, batch 8).
  c.optimizer.update(dict(lr=1e-2, warmup_steps=1))
  del c.evals['attention_entropy']  # tested elsewhere; each run here compiles less.
  return c


def test_every_format_gives_the_same_examples_in_the_same_order(data_dirs):
  sets = {name: tasks.load_dataset(config(name, root, mixup=0.4))
          for name, root in data_dirs.items()}
  for name, d in sets.items():
    assert (d.num_train, d.num_test, d.info) == (24, 6, {'num_classes': 3,
                                                          'class_names': CLASSES}), name
  assert 'tensorflow' not in sys.modules  # TFDS data is read without TensorFlow.
  c = config('folder', '')
  reference = sets['folder']
  for step in range(5):  # crosses the epoch boundary (3 steps of 8 per epoch).
    want = reference.train_batch(c, step)
    assert want['inputs'].shape == (8, 8, 8, 3) and want['inputs'].dtype == np.float32
    for name in ('tfds', 'parquet'):
      got = sets[name].train_batch(c, step)
      assert got.keys() == want.keys() == {'inputs', 'targets', 'weight', 'mix', 'mix_targets'}
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{name} {key} {step}')
  for index in range(2):
    want = reference.eval_batch(4, index)
    for name in ('tfds', 'parquet'):
      for key, value in sets[name].eval_batch(4, index).items():
        np.testing.assert_array_equal(value, want[key])
  np.testing.assert_array_equal(reference.eval_batch(4, 1)['weight'], [1, 1, 0, 0])
  # The labels are those of the files: sorted classes, class-major order.
  epoch = np.concatenate([reference.train_batch(c, s)['targets'] for s in range(3)])
  assert sorted(epoch) == [0] * 8 + [1] * 8 + [2] * 8


def test_batches_resume_mid_epoch_and_do_not_depend_on_the_workers(data_dirs):
  d = tasks.load_dataset(config('folder', data_dirs['folder']))
  c = config('folder', '')
  with pipeline.train_feed(d, [c], 0, 7) as feed:
    whole = [batch for (batch,) in feed]
  with pipeline.train_feed(d, [c], 4, 7) as feed:
    resumed = [batch for (batch,) in feed]
  with pipeline.train_feed(d, [c], 4, 7, workers=2) as feed:
    in_workers = [batch for (batch,) in feed]
  assert len(whole) == 7 and len(resumed) == len(in_workers) == 3
  for a, b, w in zip(whole[4:], resumed, in_workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], w[key])
  assert not np.array_equal(whole[0]['inputs'], whole[3]['inputs'])  # a new epoch's order.


def test_two_processes_read_disjoint_rows_that_make_the_global_batch(data_dirs, monkeypatch):
  d = tasks.load_dataset(config('folder', data_dirs['folder'], mixup=0.0))
  c = config('folder', '')
  full = d.train_batch(c, 4)
  parts = [d.train_batch(c, 4, (p, 2)) for p in range(2)]
  for key in full:  # each row's augmentation is seeded by its global row: the same pixels.
    np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), full[key])
  for index in range(2):
    whole, halves = d.eval_batch(4, index), [d.eval_batch(4, index, (p, 2)) for p in range(2)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([x[key] for x in halves]), whole[key])
  # The pipeline asks the trainer's jax which process it is, never a worker's (always (0, 1)).
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with pipeline.train_feed(d, [c], 4, 5, workers=1) as feed:
    (batch,), = list(feed)
  for key in full:
    np.testing.assert_array_equal(batch[key], parts[1][key])


@pytest.mark.parametrize('layout, error', [
    ('missing', r"^config\.data\.dir='.*/nowhere' is not a directory; point it at a folder"),
    ('empty', r"^config\.data\.dir='.*' has no training split 'train'; it has none$"),
    ('no_classes', r"^config\.data\.dir='.*/data': train/ has no class folders; expected "
                   r"train/<class>/<image>\.jpg$"),
    ('other_classes', r"^config\.data\.dir='.*/data': validation/ has other classes than the "
                      r"training split: 1 only in training \(cat\), 1 only here \(cow\)$"),
    ('no_images', r"^config\.data\.dir='.*/data': train/ holds no \.jpg/\.jpeg/\.png images in "
                  r"its 3 class folders$"),
])
def test_a_bad_image_folder_is_one_line_naming_the_path(tmp_path, layout, error):
  root = tmp_path / 'data'
  if layout != 'missing':
    root.mkdir()
  if layout == 'no_classes':
    (root / 'train').mkdir()
    (root / 'validation').mkdir()
  if layout in ('other_classes', 'no_images'):
    for split in ('train', 'validation'):
      for name in CLASSES if split == 'train' or layout == 'no_images' else ['ant', 'bee', 'cow']:
        (root / split / name).mkdir(parents=True)
        if layout == 'other_classes':
          Image.new('RGB', (8, 8)).save(root / split / name / 'a.png')
  path = str(tmp_path / 'nowhere') if layout == 'missing' else str(root)
  with pytest.raises(ValueError, match=error) as e:
    check_config(config('folder', path))
  assert '\n' not in str(e.value)


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, capsys):
  root = write_folder(tmp_path / 'data')
  bad = os.path.join(root, 'train', 'bee', '03.png')
  with open(bad, 'wb') as f:
    f.write(b'not a png')
  c = config('folder', root)
  d = tasks.load_dataset(c)
  steps = range(3)  # one epoch: the bad file is in one of its batches.
  with pytest.raises(images.CorruptImage, match=rf'^{bad}: not a readable image \(PIL knows no '
                                                 r'image format of these bytes\); set --config'
                     ) as e:
    for step in steps:
      d.train_batch(c, step)
  # Raised in a grain worker process, it reaches the trainer as itself, for its one line.
  assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)
  c.data.skip_corrupt = True
  skipping = tasks.load_dataset(c)
  batches = [skipping.train_batch(c, step) for step in steps]
  weights = np.concatenate([b['weight'] for b in batches])
  assert weights.sum() == 23
  assert f'warning: skipped {bad}: not a readable image' in capsys.readouterr().err


def test_image_size_is_read_from_the_images_or_refused_when_they_differ(tmp_path, data_dirs):
  d = tasks.load_dataset(config('parquet', data_dirs['parquet'], image_size=0))
  assert d.sample(1)['inputs'].shape == (1, SIZE, SIZE, 3)
  root = write_folder(tmp_path / 'data')
  Image.new('RGB', (20, 10)).save(os.path.join(root, 'train', 'cat', '07.png'))  # probed: last.
  with pytest.raises(ValueError, match=r'^data\.image_size=0 takes the size from the images, '
                                       r'but they are 12×12 \(.*\), 20×10 \(.*07\.png\); set'):
    tasks.load_dataset(config('folder', root, image_size=0))


def test_inception_box_draws_within_the_image_area_and_ratio_ranges():
  rng = np.random.default_rng(0)
  for _ in range(300):
    w, h = (int(v) for v in rng.integers(4, 300, 2))
    left, top, right, bottom = images.inception_box(w, h, rng, 0.08)
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    bw, bh = right - left, bottom - top
    if (bw, bh) != (w, h) and min(w, h) > 40:  # a drawn box (not the fallback), unrounded:
      assert 0.08 * 0.9 <= bw * bh / (w * h) <= 1.0
      assert 3 / 4 * 0.9 <= bw / bh <= 4 / 3 * 1.1
  # A 1×10 strip fits no box of ratio [3/4, 4/3] with most of its area: the centre square.
  assert images.inception_box(10, 1, np.random.default_rng(0), 0.9) == (4, 0, 5, 1)


def test_eval_view_is_the_centred_crop_of_the_shorter_side():
  assert images.centre_box(320, 256, 0.875) == (48.0, 16.0, 272.0, 240.0)  # 224 of 256
  pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, 'PNG')
  np.testing.assert_array_equal(images.eval_image(buf.getvalue(), 'x', 16, 1.0),
                                pixels.astype(np.float32) / 255)
  # The centred 12×12 (0.75 of 16) resized to 8×8.
  want = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR,
                                                   box=(2, 2, 14, 14))) / 255
  np.testing.assert_allclose(images.eval_image(buf.getvalue(), 'x', 8, 0.75), want, atol=1e-6)


def test_mixup_mixes_inputs_and_the_loss_with_one_lambda():
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.normal(size=(4, 2, 2, 3)).astype(np.float32),
           'targets': np.array([0, 1, 2, 1], np.int32), 'weight': np.ones(4, np.float32)}
  mixed = images.mixup(batch, np.random.default_rng(1), 0.2)
  lam = float(mixed['mix'][0])
  np.testing.assert_allclose(mixed['inputs'], lam * batch['inputs'] + (1 - lam) *
                             batch['inputs'][[3, 0, 1, 2]], rtol=1e-6)
  np.testing.assert_array_equal(mixed['mix_targets'], [1, 0, 1, 2])
  logits = rng.normal(size=(4, 3))
  loss = tasks._cross_entropy(logits, mixed['targets'], mixed['weight'], 0.0,
                              (mixed['mix'], mixed['mix_targets']))[0]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = lambda y: -log_p[np.arange(4), y]
  want = (lam * ce(batch['targets']) + (1 - lam) * ce(mixed['mix_targets'])).sum()
  assert math.isclose(float(loss), want, rel_tol=1e-5)


def test_a_run_trains_the_same_from_each_format_and_across_a_resume(data_dirs, tmp_path):
  summaries = {}
  for name, root in data_dirs.items():
    summary, _ = train_and_evaluate(config(name, root), str(tmp_path / name))
    summaries[name] = {k: summary[k] for k in ('eval/accuracy', 'eval/loss', 'steps')}
  # Stopped after step 3 without saving, resumed from the checkpoint of step 2 (mid-epoch).
  train_and_evaluate(config('folder', data_dirs['folder']), str(tmp_path / 'resumed'),
                     stop_after=3)
  summary, _ = train_and_evaluate(config('folder', data_dirs['folder']), str(tmp_path / 'resumed'))
  summaries['resumed'] = {k: summary[k] for k in ('eval/accuracy', 'eval/loss', 'steps')}
  assert summaries['tfds'] == summaries['folder'] == summaries['parquet'] == summaries['resumed']
  assert summaries['folder']['steps'] == 5
  assert abs(summaries['folder']['eval/loss'] - math.log(3)) > 1e-3  # it trained.


def test_a_missing_data_dir_stops_the_cli_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/vit.py:data=folder',
       f'--config.data.dir={tmp_path / "nowhere"}', f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: config.data.dir='{tmp_path / 'nowhere'}' is not a directory; point it at a "
      'folder holding train/<class>/*.jpg and val/<class>/*.jpg']
  assert not workdir.exists()


def test_the_imagenet_config_is_big_visions_vit_s16_recipe():
  from configs import vit
  c = vit.get_config('data=imagenet,variant=S/16')
  o = c.optimizer
  assert (c.batch_size, c.num_epochs, o.lr, o.warmup_steps, o.schedule, o.grad_clip) == (
      1024, 90, 1e-3, 10_000, 'cosine', 1.0)
  assert math.isclose(o.weight_decay * o.lr, 1e-4)  # big_vision's wd is not scaled by the lr.
  m = c.model
  assert (m.posemb, m.pool, m.pooler, m.patch_size, m.d_model, m.num_layers, m.num_heads) == (
      'sincos2d', 'mean', True, 16, 384, 12, 6)
  d = c.data
  assert (d.name, d.image_size, d.min_scale, d.flip, d.mixup, d.eval_crop) == (
      'tfds', 224, 0.05, True, 0.2, 0.875)
  model = tasks.build_model(c, {'num_classes': 1000})
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
  # Counted by hand: patches 16·16·3·384 + 384; 12 blocks of 2 LayerNorms (4·384), attention
  # (4·384² + 4·384) and MLP (2·384·1536 + 1536 + 384); final LN; tanh pre-logits (384² + 384);
  # head (384·1000 + 1000). No [CLS] and no position table (sincos2d is computed).
  block = 4 * 384 + 4 * 384 ** 2 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384
  want = 16 * 16 * 3 * 384 + 384 + 12 * block + 2 * 384 + 384 ** 2 + 384 + 384 * 1000 + 1000
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == want
  assert vit.get_config('data=folder,variant=B/16').model.d_model == 768
  with pytest.raises(ValueError, match=r"^config argument data='imagenet1k'; allowed: 'digits'"):
    vit.get_config('data=imagenet1k')


@pytest.mark.parametrize('name', ['folder', 'tfds', 'parquet'])
def test_the_cifar_config_reads_each_format(data_dirs, name):
  from configs import cifar
  c = cifar.get_config(f'data={name},quick')
  c.data.update(dict(dir=data_dirs[name], workers=0))
  c.update(dict(batch_size=8, eval_batch_size=8))
  check_config(c)  # the data read, its batch traced through the model.
  d = tasks.load_dataset(c)
  assert d.sample(1)['inputs'].shape == (1, 32, 32, 3) and d.info['num_classes'] == 3
  with pytest.raises(ValueError, match=r"^config argument data='hub'; allowed: 'pickle', "):
    cifar.get_config('data=hub')


def test_ctrl_c_with_worker_processes_saves_and_prints_no_worker_tracebacks(data_dirs, tmp_path):
  from tests.test_interrupts import WITH_CTRL_C
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-c', WITH_CTRL_C, '-m', 'experiments.run',
       '--config=configs/vit.py:data=folder,quick', f'--config.data.dir={data_dirs["folder"]}',
       '--config.data.image_size=8', '--config.batch_size=8', '--config.total_steps=100000',
       '--config.log_every=5', '--config.data.workers=1', f'--workdir={workdir}'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  for line in proc.stdout:
    if line.startswith('step '):  # training: Ctrl-C reaches the trainer and its workers.
      os.killpg(proc.pid, signal.SIGINT)
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert 'SIGINT: saved step' in out
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
