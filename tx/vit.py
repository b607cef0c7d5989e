"""Vision Transformer (Dosovitskiy et al., 2021) and its named variants.

image [batch, H, W, C] → p×p patches (a linear map of each patch) → [CLS] + extra tokens +
patch tokens + posemb → pre-LN encoder → CLS token or mean pooling → linear head.
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

  Tokens, in order: [CLS] (with `class_token`), `extra_tokens` learned tokens, the N patches:

    z_0 = [cls; e_1 … e_n; x_1 E … x_N E] + P,     z_L = Encoder(z_0)
    h = z_L[0] (pool='cls')   or   h = (1/N) Σ_i z_L[prefix + i] (pool='mean', patches only)
    h ← LN(h) with fc_norm,   h ← tanh(W_p h + b_p) with pooler,   logits = W h + b

  where prefix = [CLS] + extra tokens, and with `posemb_prefix=False` P covers only the
  patches (the table is added to them before the prefix tokens are prepended).

  posemb:
    'learn'     a trained table over [CLS] + extra tokens + patches (or the patches only,
                posemb_prefix=False), N(0, 0.02) init (as vit_jax); a different image size
                needs `tx.resample_posemb` of the table (num_prefix_tokens = its prefix rows).
    'sincos2d'  fixed 2-D sin-cos over the patch grid (prefix tokens get none; big_vision).
    'sinusoidal' fixed 1-D sinusoid over the row-major patch index.
    'rope'      rotary on q, k over the token index ([CLS] at 0, extra tokens next).
    'none'      no position information: a bag of patches.
  pool: 'cls' (the learned [CLS] token's output) or 'mean' (global average pooling of the
    patch tokens; prefix tokens are left out, as in timm).
  class_token: whether a [CLS] token (param 'cls' [1, 1, d_model]) leads the sequence; None
    means pool == 'cls'. True with pool='mean' is timm's class token pooled by average.
  extra_tokens: that many learned tokens right after [CLS] (param 'extra_tokens'
    [1, n, d_model]): timm's register tokens (Darcet et al., 2024), DeiT's distillation token.
  posemb_prefix: whether the learned table has rows for the prefix tokens (True, vit_jax and
    HF) or only for the patches (False: timm's no_embed_class, big_vision).
  fc_norm: the final LayerNorm is applied to the pooled vector h (param 'fc_norm') instead
    of to every token at the end of the encoder, which then has none unless `final_norm`
    says so (timm's fc_norm, its default with global_pool='avg').
  pooler: h goes through tanh(W_p h + b_p), a Dense d_model → d_model named 'pooler' (HF
    ViTModel's pooler, vit_jax's pre_logits).
  num_classes: the head's outputs; 0 means no head: the model returns h [batch..., d_model]
    (timm's num_classes=0, features for a linear probe).
  pad_tokens_to: the encoder's sequence is padded with zero tokens at its end to a multiple
    of this (1: none), and the pad keys are masked out through the attention's key_lengths.
    Real tokens see exactly what they see unpadded (logits and gradients equal to rounding);
    the pad rows are dropped before pooling. It exists for the fused kernel: ViT at 224 with
    [CLS] has 197 tokens, an odd length cuDNN's backward pass rejects (`tx.fused_is_valid`),
    while 200 (pad_tokens_to=8) runs on cuDNN. Sown attention weights then cover the padded
    length.
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
  class_token: bool | None = None
  extra_tokens: int = 0
  posemb_prefix: bool = True
  fc_norm: bool = False
  pooler: bool = False
  pad_tokens_to: int = 1

  @nn.compact
  def __call__(self, images, *, deterministic: bool = True):
    check_choice('posemb', self.posemb, VIT_POSEMBS)
    check_choice('pool', self.pool, POOLS)
    class_token = self.has_class_token
    if self.pool == 'cls' and not class_token:
      raise ValueError("class_token=False with pool='cls'; pool='cls' reads the [CLS] token: "
                       "use class_token=True (or None), or pool='mean'")
    if self.num_classes < 0:
      raise ValueError(f'num_classes={self.num_classes}; it must be >= 0 (0: no head, the '
                       'pooled vector is the output)')
    if self.extra_tokens < 0:
      raise ValueError(f'extra_tokens={self.extra_tokens}; it must be >= 0')
    if not isinstance(self.pad_tokens_to, int) or self.pad_tokens_to < 1:
      raise ValueError(f'pad_tokens_to={self.pad_tokens_to!r}; it must be an integer >= 1 '
                       '(1: no padding)')
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
    elif self.posemb == 'learn' and not self.posemb_prefix:
      x = x + self._learned_posemb(x.shape[-2], 0)[0].astype(x.dtype)
    prefix = []
    if class_token:
      prefix.append(self.param('cls', nn.initializers.zeros, (1, 1, self.d_model),
                               self.param_dtype))
    if self.extra_tokens:
      # Random, not zero: tokens that start equal and share a position stay equal.
      prefix.append(self.param('extra_tokens', nn.initializers.normal(stddev=0.02),
                               (1, self.extra_tokens, self.d_model), self.param_dtype))
    num_prefix = int(class_token) + self.extra_tokens
    if prefix:
      tokens = jnp.concatenate(prefix, axis=1).astype(x.dtype)[0]
      x = jnp.concatenate([jnp.broadcast_to(tokens, x.shape[:-2] + tokens.shape), x], axis=-2)
    if self.posemb == 'learn' and self.posemb_prefix:
      x = x + self._learned_posemb(x.shape[-2], num_prefix)[0].astype(x.dtype)
    # fc_norm moves the default final LayerNorm from every token to the pooled vector.
    final_norm = self.final_norm
    if final_norm is None:
      final_norm = self.norm == 'pre' and not self.fc_norm
    length = x.shape[-2]
    padded = -(-length // self.pad_tokens_to) * self.pad_tokens_to
    key_lengths = None
    if padded > length:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padded - length), (0, 0)])
      key_lengths = jnp.asarray(length, jnp.int32)
    encoder_args = dict(hparams(self, ModelHParams), posemb='rope' if self.posemb == 'rope'
                        else 'none', num_positions=padded, final_norm=final_norm)
    x = Encoder(**encoder_args, name='encoder')(x, key_lengths=key_lengths,
                                                deterministic=deterministic)
    pooled = x[..., 0, :] if self.pool == 'cls' else x[..., num_prefix:length, :].mean(axis=-2)
    if self.fc_norm:
      pooled = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                            param_dtype=self.param_dtype, name='fc_norm')(pooled)
    if self.pooler:
      pooled = jnp.tanh(nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name='pooler')(pooled))
    if not self.num_classes:
      return pooled
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    param_dtype=self.param_dtype, name='head')(pooled).astype(jnp.float32)

  @property
  def has_class_token(self) -> bool:
    """Whether a [CLS] token leads the sequence: class_token, by default when pool == 'cls'."""
    return self.pool == 'cls' if self.class_token is None else self.class_token

  def _learned_posemb(self, length: int, num_prefix: int):
    if self.has_variable('params', 'pos_embedding'):
      rows = self.get_variable('params', 'pos_embedding').shape[1]
      if rows != length:
        raise ValueError(f'{length} tokens do not fit the learned posemb table of {rows} rows; '
                         'resize it with tx.resample_posemb(table, new_grid, '
                         f'num_prefix_tokens={num_prefix}) for a new image size')
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
