"""The PyTorch peer of the benchmark: the tx models of `specs` written again in PyTorch, and
their train step timed in eager mode and under `torch.compile`.

  python -m experiments.bench            # times tx and this peer side by side (CPU or GPU)
  python -m experiments.bench.peer --spec=vit-b16-224 --dtype=bfloat16 --compile  # one number

Without torch every entry point raises a RuntimeError with the one-line reason.

`build_model(spec)` returns an `nn.Module` that computes the same function as
`specs.tx_model(spec)` (the architectures are in specs.py's docstring; each module below names
the tx module it mirrors), with the same parameters under the same names: `load_tx_params`
copies a tx parameter tree in, and tests/test_bench_peer.py checks the logits, the gradients,
and the parameters after two optimizer steps against tx and optax.

The train step (`TrainStep`) is the one tx's trainer runs with `configs/common.py`'s optimizer:
  loss   L = (1/N) Σ_n −log softmax(z_n)[y_n],  mean cross-entropy of the float32 logits z over
         N = the examples (ViT), the non-pad target tokens (EncoderDecoder; pad id 0, as
         `experiments.tasks.loss_weights`) or every target token (DecoderLM); no smoothing.
  clip   g ← g · min(1, 1/‖g‖₂) over all parameters (`clip_grad_norm_(1.0)`; optax's
         clip_by_global_norm, up to torch's +1e-6 in the denominator).
  AdamW  lr 1e-3, β = (0.9, 0.999), ε = 1e-8, decoupled weight decay λ = 1e-4
         (θ ← θ − lr·λ·θ) on the parameters tx decays (`decays`: tx's array has ndim > 1).
bfloat16 runs under `torch.autocast` with float32 parameters (tx: dtype=bfloat16,
param_dtype=float32); the loss is computed from float32 logits in both.

On CUDA, float32 matmuls may use TF32, as XLA's do by default on GPU, so that both frameworks
run float32 at the same precision. `impl='timm'` times a hand-tuned model zoo's ViT instead of
this mirror (`timm_vit`). The tests run on CPU without timm, so the CUDA and timm paths have
none.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import time
import types

import numpy as np
from flax import traverse_util

from experiments import tasks
from experiments.bench import specs as specs_lib
from experiments.data import PAD

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
  _TORCH_ERROR = None
except Exception as e:  # ImportError, or OSError from a broken install.  # noqa: BLE001
  torch = F = None
  nn = types.SimpleNamespace(Module=object)  # so that the classes below still define.
  _TORCH_ERROR = f'torch does not import ({type(e).__name__}: {e})'.splitlines()[0]

LN_EPS = 1e-6  # Flax's LayerNorm default (torch's is 1e-5).
OPTIMIZER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)  # configs/common.py
GRAD_CLIP = 1.0
# Parameters tx stores with ndim > 1 although torch stores them as vectors: the Q, K, V biases
# ([heads, d_head] in tx's DenseGeneral). tx's decay mask (ndim > 1) decays them.
_TX_MATRIX_BIASES = ('query.bias', 'key.bias', 'value.bias')


def _require_torch():
  if _TORCH_ERROR is not None:
    raise RuntimeError(_TORCH_ERROR)


# ------------------------------------------------------------------------------------ modules
class Attention(nn.Module):
  """softmax(q kᵀ/√d_head + mask) v over `num_heads` heads, then W^O (tx.MultiHeadAttention),
  by PyTorch's fused path; a query whose keys are all masked gets 0 in both, on CPU."""

  def __init__(self, d_model: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.query, self.key, self.value, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

  def forward(self, x, memory=None, *, mask=None, causal: bool = False):
    """x [B, T, D]; memory [B, S, D] (cross-attention) or None; mask bool [B, 1, 1, S]."""
    kv = x if memory is None else memory
    split = lambda y: y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, H, T, Dh]
    q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return self.out(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
  """Self-attention, [cross-attention,] FFN, each a residual sublayer with LayerNorm:
  post-LN LN(x + f(x)) or pre-LN x + f(LN(x)) (tx.EncoderBlock / tx.DecoderBlock); the FFN
  is act(x W_1 + b_1) W_2 + b_2 (tx.FeedForward), act ReLU or GELU's tanh approximation
  (`flax.linen.gelu`'s default)."""

  def __init__(self, spec, norm: str, activation: str, cross: bool):
    super().__init__()
    d = spec.d_model
    self.pre = norm == 'pre'
    self.self_attention = Attention(d, spec.num_heads)
    self.self_attention_norm = nn.LayerNorm(d, eps=LN_EPS)
    if cross:
      self.cross_attention = Attention(d, spec.num_heads)
      self.cross_attention_norm = nn.LayerNorm(d, eps=LN_EPS)
    self.ffn = nn.Sequential(collections.OrderedDict(
        hidden=nn.Linear(d, spec.d_ff),
        activation=nn.ReLU() if activation == 'relu' else nn.GELU(approximate='tanh'),
        output=nn.Linear(spec.d_ff, d)))
    self.ffn_norm = nn.LayerNorm(d, eps=LN_EPS)

  def _sublayer(self, x, f, norm):
    return x + f(norm(x)) if self.pre else norm(x + f(x))

  def forward(self, x, *, mask=None, causal=False, memory=None, cross_mask=None):
    x = self._sublayer(x, lambda y: self.self_attention(y, mask=mask, causal=causal),
                       self.self_attention_norm)
    if memory is not None:
      x = self._sublayer(x, lambda y: self.cross_attention(y, memory, mask=cross_mask),
                         self.cross_attention_norm)
    return self._sublayer(x, self.ffn, self.ffn_norm)


class LearnedPosemb(nn.Module):
  """x + P[:T], a trained table of num_positions rows (tx.AddPositionEmbs, posemb='learn')."""

  def __init__(self, num_positions: int, d_model: int):
    super().__init__()
    self.pos_embedding = nn.Parameter(torch.empty(num_positions, d_model))

  def forward(self, x):
    return x + self.pos_embedding[:x.shape[-2]]


class SinusoidalPosemb(nn.Module):
  """x + PE[:T] with PE(pos, 2i) = sin(pos/10000^(2i/d)), PE(pos, 2i+1) = cos(…), interleaved:
  a fixed buffer (not a parameter, not in the state dict), computed as tx.sinusoidal_1d does
  (float32 positions × float32 frequencies)."""

  def __init__(self, num_positions: int, d_model: int):
    super().__init__()
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(num_positions, -1)
    self.register_buffer('table', torch.from_numpy(table[:, :d_model].astype(np.float32)),
                         persistent=False)

  def forward(self, x):
    return x + self.table[:x.shape[-2]].to(x.dtype)


class Stack(nn.Module):
  """[posemb,] N blocks named block_i, [final LayerNorm when pre-LN] (tx.Encoder / tx.Decoder)."""

  def __init__(self, spec, norm, activation, *, posemb=None, cross=False):
    super().__init__()
    self.posemb = posemb or nn.Identity()
    self.num_layers = spec.num_layers
    for i in range(spec.num_layers):  # named as tx names them: block_0, block_1, ...
      self.add_module(f'block_{i}', Block(spec, norm, activation, cross))
    self.final_norm = nn.LayerNorm(spec.d_model, eps=LN_EPS) if norm == 'pre' else nn.Identity()

  def forward(self, x, **kw):
    x = self.posemb(x)
    for i in range(self.num_layers):
      x = getattr(self, f'block_{i}')(x, **kw)
    return self.final_norm(x)


class TokenEmbedding(nn.Module):
  """E[tokens]·√d, and logits = x Eᵀ with the same table (tx.models.TokenEmbedding, tied)."""

  def __init__(self, vocab_size: int, d_model: int):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, d_model)
    self.scale = math.sqrt(d_model)

  def forward(self, tokens):
    return self.embedding(tokens) * self.scale

  def logits(self, x):
    return F.linear(x, self.embedding.weight).float()


class ViT(nn.Module):
  """images [B, C, H, W] → float32 logits [B, classes] (tx.ViT, posemb='learn', pool='cls')."""

  def __init__(self, spec):
    super().__init__()
    d, p = spec.d_model, spec.patch_size
    self.embedding = nn.Conv2d(spec.channels, d, p, stride=p)
    self.cls = nn.Parameter(torch.empty(1, 1, d))
    self.pos_embedding = nn.Parameter(torch.empty(1, spec.tokens, d))
    self.encoder = Stack(spec, 'pre', 'gelu')
    self.head = nn.Linear(d, spec.num_classes)

  def forward(self, images):
    # The patches [B, h·w, D] (row-major) = self.embedding(images).flatten(2).transpose(1, 2),
    # as one product: the convolution's backward pass is slow on the CPU in both frameworks,
    # so both compute the product.
    conv, (b, c, h, w) = self.embedding, images.shape
    p = conv.kernel_size[0]
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, (h // p) * (w // p), c * p * p)  # (c, u, v) as the weight's
    x = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = self.encoder(x + self.pos_embedding)
    return self.head(x[:, 0]).float()


class EncoderDecoder(nn.Module):
  """(source [B, S], decoder input [B, T]) → float32 logits [B, T, V] (tx.EncoderDecoder)."""

  def __init__(self, spec):
    super().__init__()
    self.embed = TokenEmbedding(spec.vocab_size, spec.d_model)
    self.encoder = Stack(spec, 'post', 'relu', posemb=SinusoidalPosemb(spec.seq_len, spec.d_model))
    self.decoder = Stack(spec, 'post', 'relu', posemb=SinusoidalPosemb(spec.seq_len, spec.d_model),
                         cross=True)

  def forward(self, source, decoder_input):
    source_mask = (source != PAD)[:, None, None, :]  # keys: [B, 1, 1, S]
    memory = self.encoder(self.embed(source), mask=source_mask)
    x = self.decoder(self.embed(decoder_input), causal=True, memory=memory,
                     cross_mask=source_mask)
    return self.embed.logits(x)


class DecoderLM(nn.Module):
  """tokens [B, T] → float32 next-token logits [B, T, V] (tx.DecoderLM)."""

  def __init__(self, spec):
    super().__init__()
    self.embed = TokenEmbedding(spec.vocab_size, spec.d_model)
    self.decoder = Stack(spec, 'pre', 'gelu', posemb=LearnedPosemb(spec.seq_len, spec.d_model))

  def forward(self, tokens):
    return self.embed.logits(self.decoder(self.embed(tokens), causal=True))


def _init_like_tx(model):
  """tx's initialisers: Xavier-uniform dense kernels, zero biases, N(0, 1/d) embeddings,
  N(0, 0.02) posemb tables, zero [CLS] and head, LeCun-normal patch convolution."""
  for name, module in model.named_modules():
    if isinstance(module, nn.Linear):
      (nn.init.zeros_ if name == 'head' else nn.init.xavier_uniform_)(module.weight)
      nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
      fan_in = module.weight[0].numel()
      nn.init.trunc_normal_(module.weight, std=fan_in ** -0.5, a=-2 * fan_in ** -0.5,
                            b=2 * fan_in ** -0.5)
      nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)
    elif isinstance(module, LearnedPosemb):
      nn.init.normal_(module.pos_embedding, std=0.02)
  if isinstance(model, ViT):
    nn.init.zeros_(model.cls)
    nn.init.normal_(model.pos_embedding, std=0.02)
  return model


def build_model(spec: specs_lib.Spec, seed: int = 0):
  """The torch peer of `specs.tx_model(spec)`, float32, initialised as tx initialises.

  Build it under `torch.device('meta')` to count parameters without allocating them.
  """
  _require_torch()
  model = {'ViT': ViT, 'EncoderDecoder': EncoderDecoder, 'DecoderLM': DecoderLM}[spec.kind](spec)
  if next(model.parameters()).device.type != 'meta':
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      _init_like_tx(model)
  return model


def num_params(model) -> int:
  """Number of scalar parameters (a tied table counts once)."""
  return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- tx parameters
def _torch_name(path: tuple[str, ...]) -> str:
  """tx path → torch parameter name: the same names, leaves kernel/scale/embedding → weight."""
  leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(path[-1], path[-1])
  return '.'.join(path[:-1] + (leaf,))


def _to_torch_layout(name: str, array: np.ndarray, shape) -> np.ndarray:
  if array.ndim == 4 and name.endswith('weight'):  # Conv kernel [p, p, C, D] → [D, C, p, p]
    return array.transpose(3, 2, 0, 1)
  if name.endswith('weight') and len(shape) == 2 and not name.endswith('embedding.weight'):
    # Dense [in, out], DenseGeneral Q/K/V [D, H, Dh] and out [H, Dh, D] → Linear [out, in].
    return array.reshape(-1, shape[0]).T
  return array.reshape(shape)  # biases ([H, Dh] → [D]), norms, embeddings, cls, posemb.


def load_tx_params(model, flax_params) -> None:
  """Copies a tx parameter tree (`model.init(...)['params']`, or any tree of the same
  structure, e.g. gradients) into the torch `model`, in place.

  Every tx leaf must find its torch parameter with the same number of elements, and every
  torch parameter must be set; otherwise a ValueError names the mismatch. The tree has one
  entry per block (block_0, ...), as `specs.tx_model` builds it: a scan_layers tree ('blocks',
  stacked) needs `tx.models.unstack_layers` first.
  """
  params = dict(model.named_parameters())
  for path, value in traverse_util.flatten_dict(flax_params).items():
    name = _torch_name(path)
    if name not in params:
      raise ValueError(f'tx parameter {"/".join(path)} has no torch counterpart {name!r}')
    target = params.pop(name)
    array = np.asarray(value, np.float32)
    if array.size != target.numel():
      raise ValueError(f'tx parameter {"/".join(path)} has shape {array.shape}; torch {name} '
                       f'has {tuple(target.shape)}')
    with torch.no_grad():
      target.copy_(torch.tensor(_to_torch_layout(name, array, tuple(target.shape))))
  if params:
    raise ValueError(f'torch parameters not set from the tx tree: {", ".join(sorted(params))}')


# ------------------------------------------------------------------------------ train step
def torch_batch(spec: specs_lib.Spec, batch: dict, device='cpu') -> tuple:
  """(model inputs, targets) as tensors from a `specs.synthetic_batch`-style NumPy batch.

  ViT images go from NHWC to NCHW (contiguous) here, once, outside any timed loop; the
  EncoderDecoder's decoder input is tx.shift_right(targets, BOS) (teacher forcing).
  """
  _require_torch()
  args = [np.asarray(a) for a in tasks.model_inputs(spec.task, batch)]
  if spec.kind == 'ViT':
    inputs = (torch.from_numpy(np.ascontiguousarray(args[0].transpose(0, 3, 1, 2))),)
  else:
    inputs = tuple(torch.from_numpy(a.astype(np.int64)) for a in args)
  targets = torch.from_numpy(np.asarray(batch['targets']).astype(np.int64))
  return tuple(t.to(device) for t in inputs), targets.to(device)


def decays(name: str, param) -> bool:
  """Whether tx's optimizer decays this parameter: its tx array has ndim > 1."""
  return param.ndim > 1 or name.endswith(_TX_MATRIX_BIASES)


class TrainStep:
  """One optimizer step: forward (under autocast for bfloat16), loss, backward, global-norm
  clipping to 1, AdamW. `step(inputs, targets)` returns the loss tensor (not synchronised).

  `weight_decay` overrides configs/common.py's 1e-4 (the tests make it visible with 0.5).
  compile=True compiles forward + loss (and, through AOTAutograd, their backward) with
  `torch.compile`, given `compile_options` (default: the inductor backend, default mode); the
  optimizer step is PyTorch's fused AdamW kernel (CPU or CUDA) in both modes.
  """

  def __init__(self, spec, model, *, compile: bool = False, dtype='float32',
               weight_decay: float = OPTIMIZER['weight_decay'], compile_options=None):
    self.spec, self.model = spec, model
    self.bfloat16 = {'float32': False, 'bfloat16': True}[dtype]
    self.device_type = next(model.parameters()).device.type
    named = list(model.named_parameters())
    groups = [{'params': [p for n, p in named if decays(n, p)]},
              {'params': [p for n, p in named if not decays(n, p)], 'weight_decay': 0.0}]
    self.optimizer = torch.optim.AdamW(groups, **dict(OPTIMIZER, weight_decay=weight_decay),
                                       fused=True)
    self.loss = torch.compile(self._loss, **(compile_options or {})) if compile else self._loss

  def _loss(self, inputs, targets):
    """Mean cross-entropy of the float32 logits over the N of the module docstring."""
    with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bfloat16):
      logits = self.model(*inputs).float()
      ignore = PAD if self.spec.kind == 'EncoderDecoder' else -100  # -100: "ignore nothing"
      return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore)

  def __call__(self, inputs, targets):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
    self.optimizer.step()
    return loss.detach()


def timm_vit(spec: specs_lib.Spec):
  """timm's VisionTransformer with the spec's shapes (no test: the tests run without timm).

  Same shapes and parameter count as the mirror up to timm's own choices: fused QKV
  projection, exact (erf) GELU, LayerNorm ε = 1e-6, [CLS] pooling, learned posemb.
  """
  if spec.kind != 'ViT':
    raise ValueError(f"impl='timm' is for ViT specs; got kind={spec.kind!r}")
  try:
    import timm  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001
    raise RuntimeError(f'timm does not import ({type(e).__name__}: {e})') from None
  return timm.create_model(
      'vit_base_patch16_224', pretrained=False, img_size=spec.image_size,
      patch_size=spec.patch_size, in_chans=spec.channels, num_classes=spec.num_classes,
      embed_dim=spec.d_model, depth=spec.num_layers, num_heads=spec.num_heads,
      mlp_ratio=spec.d_ff / spec.d_model, qkv_bias=True, class_token=True, global_pool='token')


def time_train_step(spec: specs_lib.Spec, *, compile: bool = False, dtype='float32',
                    warmup: int = 3, repeats: int = 10, impl: str = 'tx') -> dict:
  """Median wall time of one train step of the peer on `specs.synthetic_batch(spec)`, on CUDA
  if present, of a fresh float32 model: this module's mirror of `specs.tx_model(spec)`
  (impl='tx') or timm's ViT at the spec's size (impl='timm', ViT specs only).

  torch uses as many threads as this process has CPUs (`os.sched_getaffinity`), and CUDA
  TF32. The batch becomes tensors on the device once. `warmup` steps run first (the first one
  compiles under torch.compile) and are timed separately, in first_steps_s; then each of
  `repeats` steps is timed alone, the device synchronised after it. Returns the times, the
  rates (tokens: examples × spec.tokens), the last step's loss and the setup.
  """
  _require_torch()
  if warmup < 1 or repeats < 1:
    raise ValueError(f'warmup={warmup}, repeats={repeats}; both must be >= 1')
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count() or 1)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  cuda = device.type == 'cuda'
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  model = {'tx': build_model, 'timm': timm_vit}[impl](spec)
  step = TrainStep(spec, model.to(device), compile=compile, dtype=dtype)
  inputs, targets = torch_batch(spec, specs_lib.synthetic_batch(spec), device)
  sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

  def timed():
    sync()
    start = time.perf_counter()
    loss = step(inputs, targets)
    sync()
    return time.perf_counter() - start, loss

  calls = [timed() for _ in range(warmup + repeats)]
  first, times = [t for t, _ in calls[:warmup]], [t for t, _ in calls[warmup:]]
  median = statistics.median(times)
  return {'step_s_median': median, 'examples_per_s': spec.batch / median,
          'tokens_per_s': spec.batch * spec.tokens / median, 'times_s': times,
          'first_steps_s': first, 'first_step_s': first[0], 'final_loss': float(calls[-1][1]),
          'torch': torch.__version__, 'threads': torch.get_num_threads(),
          'device': str(device), 'dtype': dtype, 'compile': compile, 'impl': impl,
          'tf32': cuda or None}


def main(argv):
  """One measurement as one JSON line. `experiments.bench` runs each in its own process:
  torch's and XLA's thread pools spin-wait after their work, so in one process each slows
  the other (docs/performance.md: torch's vit-digits step took 2.3 s next to JAX, 22 ms alone)."""
  del argv
  f = flags.FLAGS
  result = time_train_step(specs_lib.by_name(f.spec), compile=f.compile, dtype=f.dtype,
                           warmup=f.warmup, repeats=f.repeats, impl=f.impl)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('spec', 'vit-digits', 'A model of experiments/bench/specs.py.')
  flags.DEFINE_bool('compile', False, 'torch.compile the train step.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (autocast).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps first (the first compiles).')
  flags.DEFINE_integer('repeats', 10, 'Timed steps (median reported).')
  flags.DEFINE_enum('impl', 'tx', ['tx', 'timm'], "The mirror of tx's model, or timm's ViT (GPU).")
  app.run(main)
