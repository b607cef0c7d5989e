"""Ablation: positional encodings on MNIST-1D, plain and shuffled — none, learn, sinusoidal, rope.

  python -m experiments.sweep --config=configs/ablations/posemb_mnist1d.py
  python -m experiments.sweep --config=configs/ablations/posemb_mnist1d.py:quick --vectorize

The base is configs/mnist1d.py's model (EncoderClassifier, 10 tokens of 4
samples + CLS) without its recipe's additions (disjoint patches, no
transformations of the training examples), on a shorter schedule (1,000 steps;
`:steps=N` changes it) so that the grid, 4 posembs × {plain, shuffled} × 3 seeds
= 24 runs, fits in 30 minutes on a 2-core CPU. The shuffled variant applies one fixed
permutation of the 40 positions to every example: a model that reads
positions can still learn it, but locality is gone.
sincos2d is for 2-D grids (ViT) and is not swept here.
"""

from configs import common, mnist1d

POSEMBS = ('none', 'learn', 'sinusoidal', 'rope')
QUICK_POSEMBS = ('none', 'rope')  # `:quick` checks the machinery, not every encoding.


def get_config(arg=None):
  c = common.ablation_config(mnist1d, arg)
  c.data.update(dict(patch_overlap=0, shift=0, scale=0.0, shear=0.0, noise=0.0))
  return c


def sweep(add, arg=None):
  arg = common.ablation_arg(arg)
  for shuffle in (False, True):
    for posemb in QUICK_POSEMBS if arg.quick else POSEMBS:
      for seed in common.ablation_seeds(arg):
        add(**{'data.shuffle': shuffle, 'model.posemb': posemb, 'seed': seed})
