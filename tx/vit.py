"""Vision Transformer (Dosovitskiy et al., 2021) and its named variants.

image [batch, H, W, C] → p×p patches (a linear map of each patch) → [CLS] + patch
tokens + posemb → pre-LN encoder → CLS token or mean pooling → linear head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tx.layers import hparams
from tx.models import POOLS, Encoder, ModelHParams
from tx.posemb import sincos_2d, sinusoidal_1d
from tx.validate import check_choice

VIT_POSEMBS = ('learn', 'sincos2d', 'sinusoidal', 'rope', 'none')

# name: (d_model, num_layers, d_ff, num_heads), Table 1 of the ViT paper and Steiner et al.
VARIANTS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
}


class PatchEmbedding(nn.Module):
  """Non-overlapping p×p patches, each mapped linearly to d_model: [..., H, W, C] → [..., N, D].

    out[..., i·(W/p) + j, d] = b[d] + Σ_{u,v,c} x[..., i·p + u, j·p + v, c] · kernel[u, v, c, d]

  which is a stride-p, p×p, VALID convolution (`nn.Conv`'s parameters, names and init, so
  checkpoints of either load), computed as a reshape and one matrix product: XLA's CPU
  backward pass of that convolution costs about 10% of a ViT train step, the product under 1%.
  """
  features: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, (h, w, c) = self.patch_size, images.shape[-3:]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    patches = images.reshape(images.shape[:-3] + (h // p, p, w // p, p, c)).astype(self.dtype)
    x = jnp.einsum('...iujvc,uvcd->...ijd', patches, kernel.astype(self.dtype))
    x = x + bias.astype(self.dtype)
    return x.reshape(x.shape[:-3] + ((h // p) * (w // p), self.features))


class ViT(ModelHParams, kw_only=True):
  """ViT classifier. Defaults are ViT-B/16 shapes; see `vit_variant` for named ones.

  posemb:
    'learn'     a trained table over [CLS] + patches, N(0, 0.02) init (as vit_jax);
                a different image size needs `tx.resample_posemb` of the table.
    'sincos2d'  fixed 2-D sin-cos over the patch grid (CLS gets none; big_vision).
    'sinusoidal' fixed 1-D sinusoid over the row-major patch index.
    'rope'      rotary on q, k over the token index ([CLS] at 0).
    'none'      no position information: a bag of patches.
  pool: 'cls' (a learned [CLS] token) or 'mean' (global average pooling).
  """
  num_classes: int
  patch_size: int = 16
  pool: str = 'cls'
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  d_ff: int = 3072
  posemb: str = 'learn'
  norm: str = 'pre'
  activation: str = 'gelu'

  @nn.compact
  def __call__(self, images, *, deterministic: bool = True):
    check_choice('posemb', self.posemb, VIT_POSEMBS)
    check_choice('pool', self.pool, POOLS)
    p = self.patch_size
    height, width = images.shape[-3], images.shape[-2]
    if height % p or width % p:
      raise ValueError(f'image size {height}x{width} is not divisible by patch_size={p}')
    x = PatchEmbedding(self.d_model, p, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='embedding')(images)
    gh, gw = height // p, width // p
    if self.posemb == 'sincos2d':
      x = x + sincos_2d(gh, gw, self.d_model).astype(x.dtype)
    elif self.posemb == 'sinusoidal':
      x = x + sinusoidal_1d(gh * gw, self.d_model).astype(x.dtype)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.d_model), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), x.shape[:-2] + (1, self.d_model)),
                           x], axis=-2)
    if self.posemb == 'learn':
      x = x + self._learned_posemb(x.shape[-2])[0].astype(x.dtype)
    encoder_args = dict(hparams(self, ModelHParams), posemb='rope' if self.posemb == 'rope'
                        else 'none', num_positions=x.shape[-2])
    x = Encoder(**encoder_args, name='encoder')(x, deterministic=deterministic)
    pooled = x[..., 0, :] if self.pool == 'cls' else x.mean(axis=-2)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    param_dtype=self.param_dtype, name='head')(pooled).astype(jnp.float32)

  def _learned_posemb(self, length: int):
    if self.has_variable('params', 'pos_embedding'):
      rows = self.get_variable('params', 'pos_embedding').shape[1]
      if rows != length:
        raise ValueError(f'{length} tokens do not fit the learned posemb table of {rows} rows; '
                         'resize it with tx.resample_posemb for a new image size')
    return self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                      (1, length, self.d_model), self.param_dtype)


def vit_variant(name: str, **kwargs) -> ViT:
  """A named ViT such as 'Ti/16', 'S/16', 'B/16' or 'L/16' ('<size>/<patch size>')."""
  size, _, patch = name.partition('/')
  if size not in VARIANTS or not patch.isdigit():
    raise ValueError(f'variant={name!r}; allowed: <size>/<patch> with size in '
                     f'{", ".join(VARIANTS)}, e.g. "B/16"')
  d_model, num_layers, d_ff, num_heads = VARIANTS[size]
  return ViT(**dict(dict(d_model=d_model, num_layers=num_layers, d_ff=d_ff,
                         num_heads=num_heads, patch_size=int(patch)), **kwargs))
