"""The models the benchmark times: one `Spec` per model and shape, shared by the tx timings,
the analytic FLOP count and the PyTorch peer, so that all three describe the same network.

Architectures (as tx builds them; the peer copies them exactly):
  ViT             patch convolution, [CLS], learned posemb, pre-LN blocks with GELU (tanh
                  approximation), final LayerNorm, linear head on [CLS] (vit_jax's ViT).
  EncoderDecoder  Vaswani et al.: shared token embedding × √d (tied output layer), sinusoidal
                  posemb, post-LN blocks with ReLU; N encoder and N decoder layers.
  DecoderLM       GPT-style: token embedding × √d (tied output layer), learned posemb, pre-LN
                  blocks with GELU, final LayerNorm, causal self-attention.
Every LayerNorm has ε = 1e-6 (Flax's default); attention is softmax(q·k/√d_head) without
dropout; there is no dropout anywhere.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import tx
from experiments.data import PAD
from experiments.tasks import TASK_OF_MODEL

KINDS = ('ViT', 'EncoderDecoder', 'DecoderLM')  # the tx models the benchmark times


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  kind: str  # one of KINDS
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  batch: int
  image_size: int = 0  # ViT: square images of image_size² pixels and `channels` channels
  patch_size: int = 0
  channels: int = 3
  num_classes: int = 10
  seq_len: int = 0  # EncoderDecoder: source and target length; DecoderLM: context length
  vocab_size: int = 0
  pad_tokens_to: int = 1  # ViT: tx pads its tokens to a multiple of this (tx.ViT's field)
  remat: str = ''  # tx recomputes each block in the backward pass keeping this policy; '': off

  @property
  def task(self) -> str:
    return TASK_OF_MODEL[self.kind]

  @property
  def tokens(self) -> int:
    """Sequence length the encoder/decoder stack sees per example (ViT: patches + [CLS])."""
    return (self.image_size // self.patch_size) ** 2 + 1 if self.kind == 'ViT' else self.seq_len


def tx_model(spec: Spec, dtype=jnp.float32):
  """The tx module of `spec`, computing in `dtype` with float32 parameters."""
  common = dict(num_layers=spec.num_layers, d_model=spec.d_model, num_heads=spec.num_heads,
                d_ff=spec.d_ff, dtype=dtype, param_dtype=jnp.float32, remat=bool(spec.remat),
                remat_policy=spec.remat or 'nothing')
  if spec.kind == 'ViT':
    return tx.ViT(**common, num_classes=spec.num_classes, patch_size=spec.patch_size,
                  posemb='learn', pool='cls', norm='pre', activation='gelu',
                  pad_tokens_to=spec.pad_tokens_to)
  common.update(vocab_size=spec.vocab_size, num_positions=spec.seq_len)
  if spec.kind == 'EncoderDecoder':
    return tx.EncoderDecoder(**common, posemb='sinusoidal', norm='post', activation='relu',
                             pad_id=PAD)
  return tx.DecoderLM(**common, posemb='learn', norm='pre', activation='gelu')


def synthetic_batch(spec: Spec, seed: int = 0) -> dict:
  """A random batch in the trainer's format: inputs, targets and weight (NumPy).

  ViT: images [B, H, W, C] float32 in [0, 1) and labels [B]. EncoderDecoder: source and
  target tokens [B, T] in [2, vocab) (no padding, so every position counts). DecoderLM:
  tokens [B, T] and the next tokens as targets.
  """
  rng = np.random.default_rng(seed)
  b = spec.batch
  if spec.kind == 'ViT':
    inputs = rng.random((b, spec.image_size, spec.image_size, spec.channels), np.float32)
    targets = rng.integers(0, spec.num_classes, b).astype(np.int32)
  elif spec.kind == 'EncoderDecoder':
    inputs, targets = rng.integers(2, spec.vocab_size, (2, b, spec.seq_len)).astype(np.int32)
  else:
    stream = rng.integers(0, spec.vocab_size, (b, spec.seq_len + 1)).astype(np.int32)
    inputs, targets = stream[:, :-1], stream[:, 1:]
  return {'inputs': inputs, 'targets': targets, 'weight': np.ones(b, np.float32)}


# CPU sizes: small images and short sequences, from overhead-bound to matmul-bound.
CPU_SPECS = (
    Spec('vit-digits', 'ViT', num_layers=4, d_model=64, num_heads=4, d_ff=128, batch=64,
         image_size=8, patch_size=2, channels=1),  # configs/vit.py
    Spec('vit-c32-d256', 'ViT', num_layers=6, d_model=256, num_heads=4, d_ff=1024, batch=64,
         image_size=32, patch_size=4),
    Spec('vit-c32-d512', 'ViT', num_layers=6, d_model=512, num_heads=8, d_ff=2048, batch=32,
         image_size=32, patch_size=4),
    Spec('encdec-d256', 'EncoderDecoder', num_layers=2, d_model=256, num_heads=4, d_ff=1024,
         batch=32, seq_len=64, vocab_size=512),
    Spec('lm-d256', 'DecoderLM', num_layers=4, d_model=256, num_heads=4, d_ff=1024, batch=16,
         seq_len=128, vocab_size=256),
)

# GPU sizes: ViT-Ti/S/B at 224×224 (Table 1 of the ViT paper), and base-size sequence models.
GPU_SPECS = (
    Spec('vit-ti16-224', 'ViT', num_layers=12, d_model=192, num_heads=3, d_ff=768, batch=256,
         image_size=224, patch_size=16, num_classes=1000),
    Spec('vit-s16-224', 'ViT', num_layers=12, d_model=384, num_heads=6, d_ff=1536, batch=256,
         image_size=224, patch_size=16, num_classes=1000),
    Spec('vit-b16-224', 'ViT', num_layers=12, d_model=768, num_heads=12, d_ff=3072, batch=128,
         image_size=224, patch_size=16, num_classes=1000),
    Spec('encdec-base', 'EncoderDecoder', num_layers=6, d_model=512, num_heads=8, d_ff=2048,
         batch=64, seq_len=256, vocab_size=32000),
    Spec('lm-base', 'DecoderLM', num_layers=12, d_model=768, num_heads=12, d_ff=3072, batch=16,
         seq_len=1024, vocab_size=32000),
)

# Tiny shapes, one model of each kind: the peer's tests; the end-to-end bench test times the ViT.
TINY_SPECS = (
    Spec('vit-tiny', 'ViT', num_layers=2, d_model=32, num_heads=2, d_ff=64, batch=8,
         image_size=8, patch_size=4, channels=1),
    Spec('encdec-tiny', 'EncoderDecoder', num_layers=1, d_model=32, num_heads=2, d_ff=64,
         batch=4, seq_len=8, vocab_size=32),
    Spec('lm-tiny', 'DecoderLM', num_layers=2, d_model=32, num_heads=2, d_ff=64, batch=4,
         seq_len=8, vocab_size=32),
)


def by_name(name: str) -> Spec:
  """The spec called `name` in CPU_SPECS, GPU_SPECS or TINY_SPECS."""
  named = {s.name: s for s in CPU_SPECS + GPU_SPECS + TINY_SPECS}
  if name not in named:
    raise ValueError(f'spec={name!r}; allowed: {", ".join(named)}')
  return named[name]
