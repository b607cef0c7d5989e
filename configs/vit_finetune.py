"""Fine-tunes a pretrained ViT: sklearn's digits (default) or a local CIFAR-10/100 directory.

  python -m experiments.run --config=configs/vit_finetune.py:init_from=SOURCE
  python -m experiments.run --config=configs/vit_finetune.py:init_from=SOURCE,data_dir=DIR

SOURCE: anything tx.pretrained.load reads (a Hugging Face or timm directory, a vit_jax .npz,
a Hub id) or a tx workdir (WORKDIR or WORKDIR@STEP). The architecture is the checkpoint's:
config.model holds only what a fine-tune chooses (dropout, dtype, ...); the head is
re-initialised for the data's classes, the position table resampled to the data's patch grid,
the checkpoint's normalisation folded into the patch embedding, and an RGB kernel summed for
grey digits (experiments/init_from.py; docs/training.md#fine-tuning-configinit_from). The
images keep their size (digits 8×8, CIFAR 32×32), which must divide by the patch size.
Without init_from the model would be tx.ViT's defaults (ViT-B/16), which 8×8 digits do not fit.

Measured here on a random-init Hugging Face ViT (no weights can be downloaded on these
machines), saved with transformers: 4 layers, d_model 64, 4 heads, d_ff 128, patch 2, for
16×16 RGB images, 1,000 classes, with a default ViTImageProcessor (mean = std = 0.5):

  python -c "import torch, transformers as t; torch.manual_seed(0); d = '/tmp/vit-random'; \
    t.ViTForImageClassification(t.ViTConfig(hidden_size=64, num_hidden_layers=4, \
    num_attention_heads=4, intermediate_size=128, image_size=16, patch_size=2, \
    num_labels=1000)).save_pretrained(d); t.ViTImageProcessor().save_pretrained(d)"
  python -m experiments.run --config=configs/vit_finetune.py:init_from=/tmp/vit-random

Expected (2-core CPU, measured 2026-12-06, JAX 0.10.2; 37 s wall, start-up and compile included,
80-101 s when the CPU is shared): test accuracy 0.442, loss 1.63. That is the fine-tune
learning rate (1e-4) on random weights, which have nothing to keep: with
--config.optimizer.lr=1e-3 the same command reaches 0.969 (36 s), as configs/vit.py does from
tx's own init. The line it starts with says what was loaded and adapted:

  init_from /tmp/vit-random (pretrained): ViT, 4 layers, d_model 64, 4 heads, d_ff 128,
  patch 2; its normalisation (x − mean (0.5, 0.5, 0.5)) / std (0.5, 0.5, 0.5) folded into the
  patch embedding; patch kernel summed over its 3 channels for 1-channel images (= the image
  repeated); head re-initialised (10 classes; the checkpoint: 1000 classes); pos_embedding
  resampled from an 8x8 to a 4x4 patch grid, 1 prefix row kept

A real checkpoint (downloaded from the Hub once; CIFAR-10's 32×32 images make a 2×2 grid of
16-pixel patches, the 14×14 table resampled to it; use an accelerator and bfloat16):

  CIFAR=/data/cifar-10-batches-py  # the download's folder
  python -m experiments.run \
    --config=configs/vit_finetune.py:init_from=google/vit-base-patch16-224,data_dir=$CIFAR \
    --config.model.dtype=bfloat16

Not measured (no download here).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from='', data_dir='', quick=False)
  c = common.training(batch_size=64, total_steps=1500, log_every=100, eval_every=500,
                      checkpoint_every=500, init_from=arg.init_from)
  # AdamW with a short warmup and a small peak: a fine-tune moves the weights a little.
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  if arg.data_dir:
    c.update(dict(batch_size=256, total_steps=2500))
    c.data = ml_collections.ConfigDict(dict(name='cifar', dir=arg.data_dir, augment=2))
  else:
    c.data = ml_collections.ConfigDict(dict(name='digits', augment=1))
  # The architecture comes from config.init_from; these are the fields a fine-tune chooses.
  c.model = ml_collections.ConfigDict(dict(
      name='ViT', dropout=0.0, attention_dropout=0.0, beta_scale=1.0, dtype='float32',
      implementation='xla', remat=False, remat_policy='nothing', scan_layers=False))
  if arg.quick:
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 100, 100, 100, 25
  return c
