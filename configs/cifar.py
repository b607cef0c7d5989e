"""ViT on CIFAR-10 or CIFAR-100 from a local copy: the python-pickle download, an image
folder, a TFDS ArrayRecord build or the Hub's parquet shards.

  python -m experiments.run --config=configs/cifar.py --config.data.dir=/data/cifar-10-batches-py
  python -m experiments.run --config=configs/cifar.py:data=folder --config.data.dir=/data/cifar10
  python -m experiments.run --config=configs/cifar.py:data=tfds \
      --config.data.dir=~/tensorflow_datasets/cifar10/3.0.2
  python -m experiments.run --config=configs/cifar.py:data=parquet \
      --config.data.dir=/data/hub/cifar10 --config.data.image_key=img

Nothing is downloaded. data=pickle (the default): an extracted `cifar-10-batches-py`
(data_batch_1..5, test_batch) or `cifar-100-python` (train, test) folder, held in memory.
data=folder: train/<class>/*.png and test/<class>/*.png; data=tfds: the folder `tfds build
cifar10 --file_format=array_record` writes; data=parquet: the shards of the Hub's
uoft-cs/cifar10 (its image column is `img`) or cifar100 (`img`, and
--config.data.label_key=fine_label). These three read images from disk in grain's workers
(docs/data.md) with the same augmentation as the pickles' path: ±2-pixel shifts, no flips,
the whole 32×32 image for evaluation. The number of classes is read from the data.
ViT-Ti-like width, patch size 4 (64 patches + CLS).

Expected: not measured here (no CIFAR copy on the CPU machines, and a useful
run needs an accelerator); the tests run it on a generated fixture.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, posemb='learn', beta_scale=1.0, learn_beta=False, score='dot',
                         pool='cls', data='pickle', quick=False)
  if arg.data not in ('pickle', 'folder', 'tfds', 'parquet'):
    raise ValueError(f"config argument data={arg.data!r}; allowed: 'pickle', 'folder', 'tfds', "
                     "'parquet'")
  c = common.training(batch_size=256, num_epochs=30, log_every=50, eval_every=1000,
                      checkpoint_every=1000, label_smoothing=0.1)
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.05
  if arg.data == 'pickle':
    c.data = ml_collections.ConfigDict(dict(name='cifar', dir='', augment=2))
  else:
    c.data = common.image_data(arg.data, image_size=32, crop='shift', shift=2, flip=False,
                               eval_crop=1.0, workers=4)
  c.model = ml_collections.ConfigDict(dict(
      name='ViT', patch_size=4, num_layers=6, d_model=192, num_heads=3, d_ff=768,
      posemb=arg.posemb, pool=arg.pool, beta_scale=arg.beta_scale, learn_beta=arg.learn_beta,
      score=arg.score, implementation='xla', dropout=0.0, attention_dropout=0.0,
      dtype='float32', remat=False, remat_policy='nothing', scan_layers=False))
  if arg.quick:
    c.num_epochs, c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 0, 20, 20, 20, 10
  return c
