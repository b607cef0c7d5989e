"""timm Vision Transformers (`timm.models.vision_transformer.VisionTransformer`) in tx.

    model, params = tx.pretrained.timm.load_timm_vit('path/to/vit_base_patch16_224')
    logits = model.apply({'params': params}, images)   # images [batch, H, W, C], normalised

`path` is a directory as timm's Hub upload (`push_to_hf_hub`, `save_for_hf`) writes it:
config.json ('architecture', 'num_classes', 'global_pool', 'pretrained_cfg', maybe 'model_args')
and model.safetensors or pytorch_model.bin; or a single state-dict file (.safetensors, or
.pth/.pt/.bin read by torch).

The architecture comes from the weights: patch size, channels and d_model from
patch_embed.proj.weight [D, C, p, p] (→ kernel [p, p, C, D]), the depth from blocks.i, d_ff
from mlp.fc1, the classes from head (none: num_classes=0, features), [CLS] from cls_token,
register tokens from reg_token (→ tx's extra_tokens), whether the position table covers the
prefix tokens from its rows (N patches: timm's no_embed_class, tx's posemb_prefix=False; prefix
+ N: True), the final norm from norm or fc_norm. The patch grid, hence N, comes from
pretrained_cfg's input_size (or model_args' img_size); a single file does not say it, and its
grid is taken as square. The pooling is config's global_pool ('token' → pool='cls', 'avg' →
'mean', over the patches only); without one, 'avg' where there is no cls_token or there is an
fc_norm (timm's default pairing), else 'token'.

The number of heads is not in the fused qkv: it is `num_heads`, else model_args' num_heads,
else the architecture's (timm's registry, by the size in its name: 'vit_base_patch16_224' →
12, for base's 768 dimensions), where a single file's name counts as the architecture.

timm's blocks are tx's pre-LN blocks: x + proj(attn(norm1(x))), then x + fc2(GELU(fc1(norm2(x)))),
with qkv [3D, D] = [W_q; W_k; W_v] split into query, key and value; LayerNorm ε = 1e-6 and the
exact (erf) GELU, timm's defaults (the tanh GELU for the SigLIP models that use it, or where
model_args says act_layer='gelu_tanh'). What tx does not build (LayerScale, qk-norm, attention
pooling, a norm before the blocks, ...) is one ValueError naming it.
"""

from __future__ import annotations

import importlib
import math
import os
import re

import jax
import numpy as np

from tx.pretrained._convert import (SAME, convert, dense, expected_shapes, fused_qkv, heads_out,
                                   norm, patch_embedding, read_config, read_safetensors)
from tx.vit import ViT

# Size in the architecture name → (d_model, num_heads), from timm's vision_transformer.py.
_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12), 'large': (1024, 16),
          'huge': (1280, 16), 'giant': (1408, 16), 'gigantic': (1664, 16), 'medium': (512, 8),
          'mediumd': (512, 8), 'betwixt': (640, 10), 'little': (320, 5), 'dlittle': (320, 5),
          'xsmall': (256, 4), 'wee': (256, 4), 'pwee': (256, 4), 'dwee': (256, 4),
          'dpwee': (256, 4), 'so150m': (896, 14), 'so150m2': (832, 13), 'so400m': (1152, 16),
          'giantopt': (1536, 16)}
# Registered architectures whose heads differ from their size's.
_HEADS = {'vit_base_patch16_gap_224': 16, 'vit_giant_patch16_gap_224': 16}
# Registered architectures built with act_layer='gelu_tanh'.
_GELU_TANH = {'vit_base_patch32_siglip_gap_256', 'vit_large_patch16_siglip_gap_512',
              'vit_so400m_patch16_siglip_gap_256', 'vit_so400m_patch16_siglip_gap_384',
              'vit_so400m_patch16_siglip_gap_512', 'vit_giantopt_patch16_siglip_gap_256',
              'vit_giantopt_patch16_siglip_gap_384'}
_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_tanh': 'gelu'}
_POOLS = {'token': 'cls', 'avg': 'mean'}

# Weights of the timm variants tx does not build: (name pattern, what they are).
_UNSUPPORTED = [
    (r'\.ls[12]\.gamma$', 'LayerScale (init_values; DeiT-III, DINOv2)'),
    (r'\.attn\.[qk]_norm\.', 'qk-norm (qk_norm=True)'),
    (r'\.attn\.norm\.', 'a norm inside attention (scale_attn_norm=True)'),
    (r'\.mlp\.norm\.', 'a norm inside the MLP (scale_mlp_norm=True)'),
    (r'\.attn\.gate\.', 'gated attention'),
    (r'\.mlp\.fc1_[gx]\.', 'a gated MLP (SwiGLU)'),
    (r'^attn_pool\.', "attention pooling (global_pool='map' or 'prr')"),
    (r'^norm_pre\.', 'a LayerNorm before the blocks (pre_norm=True, CLIP)'),
    (r'^patch_embed\.norm\.', 'a norm in the patch embedding'),
    (r'^patch_embed\.backbone\.', 'a CNN stem (hybrid ViT)'),
    (r'^(dist_token|head_dist\.)', "DeiT's distillation token and head"),
]
# model_args that change what the weights compute: (name, the values tx builds).
_MODEL_ARGS = {'pool_include_prefix': (False,), 'dynamic_img_size': (False,),
               'dynamic_img_pad': (False,), 'norm_layer': (None, 'layernorm'),
               'block_fn': (None,), 'mlp_layer': (None,), 'attn_layer': (None,),
               'embed_layer': (None,), 'pos_embed': ('learn', 'none', '')}


def _read_file(path: str) -> dict:
  """{name: float32 array} of a .safetensors file, or of a torch state-dict file; a
  {'model': ...} or {'state_dict': ...} wrapper and a 'module.' prefix (DataParallel) are
  removed."""
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  try:
    torch = importlib.import_module('torch')
  except ImportError:
    raise ImportError(f'{path!r} is a torch file: reading it needs torch (pip install torch), '
                      'or convert it once to .safetensors') from None
  state = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('model', 'state_dict'):
    if isinstance(state.get(key), dict):
      state = state[key]
  return {k.removeprefix('module.'): v.float().numpy() for k, v in state.items()
          if hasattr(v, 'float')}


def _read(path: str) -> tuple[dict, dict]:
  """(config.json or {}, weights) of a timm directory or state-dict file."""
  if os.path.isfile(path):
    return {}, _read_file(path)
  config = read_config(path, 'a directory as timm writes it (save_for_hf, the Hub) or a '
                       'state-dict file')
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.isfile(os.path.join(path, name)):
      return config, _read_file(os.path.join(path, name))
  raise ValueError(f'{path!r} has neither model.safetensors nor pytorch_model.bin')


def _architecture(path: str, config: dict) -> str:
  """The timm architecture: config's, or a state-dict file's name without its extension."""
  if config:
    return config.get('architecture', '').split('.')[0]
  return os.path.basename(path).split('.')[0].split('-')[0]  # 'arch.tag.safetensors'


def _num_heads(num_heads, model_args: dict, architecture: str, d_model: int, patch: int,
               path: str) -> int:
  """num_heads, else model_args', else the registered architecture's (its size's heads where
  its d_model and patch size are the weights')."""
  if num_heads is None:
    num_heads = model_args.get('num_heads')
  if num_heads is None:
    size = re.match(r'^[a-z0-9]+_([a-z0-9]+)(?:_patch(\d+))?', architecture)
    if (size and size[1] in _SIZES and _SIZES[size[1]][0] == d_model
        and int(size[2] or patch) == patch):
      num_heads = _HEADS.get(architecture, _SIZES[size[1]][1])
  if num_heads is None:
    raise ValueError(f'{path!r}: the number of heads is not in the weights (architecture='
                     f'{architecture!r}, d_model={d_model}); pass num_heads= to '
                     'tx.pretrained.timm.load_timm_vit')
  if d_model % num_heads:
    raise ValueError(f'num_heads={num_heads}; it must divide d_model={d_model}')
  return num_heads


def _activation(model_args: dict, architecture: str) -> str:
  act = model_args.get('act_layer') or ('gelu_tanh' if architecture in _GELU_TANH else 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(f'act_layer={act!r}; tx loads timm ViTs with '
                     f'{", ".join(map(repr, _ACTIVATIONS))}')
  return _ACTIVATIONS[act]


def _pool(config: dict, model_args: dict, weights: dict) -> str:
  global_pool = model_args.get('global_pool', config.get('global_pool'))
  if global_pool is None:
    global_pool = 'avg' if 'cls_token' not in weights or 'fc_norm.weight' in weights else 'token'
  if global_pool not in _POOLS:
    raise ValueError(f'global_pool={global_pool!r}; tx ViTs pool with '
                     f'{", ".join(map(repr, _POOLS))}')
  return _POOLS[global_pool]


def _check_supported(path: str, weights: dict, model_args: dict):
  for pattern, what in _UNSUPPORTED:
    name = next((k for k in sorted(weights) if re.search(pattern, k)), None)
    if name:
      raise ValueError(f'{path!r} has {name}: {what}, which tx ViT does not build')
  for field, allowed in _MODEL_ARGS.items():
    if model_args.get(field, allowed[0]) not in allowed:
      raise ValueError(f'model_args {field}={model_args[field]!r}; tx ViT builds '
                       f'{" or ".join(map(repr, allowed))}')
  for name, what in (('patch_embed.proj.weight', 'the patch embedding: load_timm_vit reads '
                      'timm VisionTransformer checkpoints'),
                     ('patch_embed.proj.bias', 'patch-embedding bias (a bias-free embedding, '
                      "as CLIP's, is not built)"),
                     ('blocks.0.attn.qkv.weight', "a fused qkv (timm's Attention)"),
                     ('blocks.0.mlp.fc1.weight', "an MLP of fc1 and fc2 (timm's Mlp)"),
                     ('blocks.0.attn.qkv.bias', 'qkv bias (qkv_bias=False is not built)'),
                     ('blocks.0.attn.proj.bias', 'attention output bias (proj_bias=False is '
                      'not built)')):
    if name not in weights:
      raise ValueError(f'{path!r} has no {name}: tx needs {what}')


def _grid(config: dict, model_args: dict, rows: int, num_prefix: int, patch: int,
          path: str) -> tuple[tuple[int, int], bool]:
  """((grid height, grid width), whether the table has the prefix rows), from the input size
  when the config gives one, else from a square grid."""
  size = model_args.get('img_size') or config.get('pretrained_cfg', {}).get('input_size', [])[1:]
  if size:
    height, width = (size, size) if isinstance(size, int) else size
    grid = (height // patch, width // patch)
    for prefix_rows in (num_prefix, 0):
      if rows == prefix_rows + grid[0] * grid[1]:
        return grid, prefix_rows > 0 or num_prefix == 0
    raise ValueError(f'{path!r}: pos_embed has {rows} rows, which is neither the {grid[0]}x'
                     f'{grid[1]} patch grid of {height}x{width} images nor it and '
                     f'{num_prefix} prefix tokens')
  fits = [(prefix_rows, math.isqrt(rows - prefix_rows)) for prefix_rows in {num_prefix, 0}
          if rows >= prefix_rows and math.isqrt(rows - prefix_rows) ** 2 == rows - prefix_rows]
  if len(fits) != 1:
    raise ValueError(f'{path!r}: pos_embed has {rows} rows, which does not give one square '
                     f'grid (with or without {num_prefix} prefix tokens); give the directory '
                     'whose config.json holds the input size')
  prefix_rows, side = fits[0]
  return (side, side), prefix_rows > 0 or num_prefix == 0


def _pairs(model: ViT, weights: dict) -> list:
  """(timm name, tx path, to_tx) for every parameter of `model` (loading only: no saver)."""
  d, h = model.d_model, model.num_heads
  pairs = patch_embedding('patch_embed.proj', ('embedding',))
  optional = [('cls_token', [('cls_token', ('cls',), *SAME)]),
              ('reg_token', [('reg_token', ('extra_tokens',), *SAME)]),
              ('pos_embed', [('pos_embed', ('pos_embedding',), *SAME)]),
              ('norm.weight', norm('norm', ('encoder', 'final_norm'))),
              ('fc_norm.weight', norm('fc_norm', ('fc_norm',))),
              ('head.weight', dense('head', ('head',)))]
  for name, its_pairs in optional:
    if name in weights:
      pairs += its_pairs
  for i in range(model.num_layers):
    timm, block = f'blocks.{i}.', ('encoder', f'block_{i}')
    attn = (*block, 'self_attention')
    pairs += [*fused_qkv(f'{timm}attn.qkv', attn, d, h, stacked_on=0),
              *heads_out(f'{timm}attn.proj', (*attn, 'out'), d, h),
              *dense(f'{timm}mlp.fc1', (*block, 'ffn', 'hidden')),
              *dense(f'{timm}mlp.fc2', (*block, 'ffn', 'output')),
              *norm(f'{timm}norm1', (*block, 'self_attention_norm')),
              *norm(f'{timm}norm2', (*block, 'ffn_norm'))]
  return pairs


def load_timm_vit(path: str, num_heads: int | None = None):
  """(tx.ViT, params) of a timm ViT directory or state-dict file; float32 params as NumPy.

  `num_heads` is needed where neither model_args nor the architecture's name (the file's name,
  for a state-dict file) gives it; the images the model takes are pretrained_cfg's input size
  (a file: the square grid its position table fits).
  """
  config, weights = _read(path)
  model_args = config.get('model_args') or {}
  _check_supported(path, weights, model_args)
  d_model, channels, patch, patch_w = weights['patch_embed.proj.weight'].shape
  if patch != patch_w:
    raise ValueError(f'{path!r}: patch_embed.proj.weight is {patch}x{patch_w}; tx ViT '
                     'patches are square')
  qkv_rows = weights['blocks.0.attn.qkv.weight'].shape[0]
  if qkv_rows != 3 * d_model:
    raise ValueError(f'{path!r}: blocks.0.attn.qkv.weight has {qkv_rows} rows; tx attention '
                     f'is d_model wide (3 x {d_model})')
  d_ff = weights['blocks.0.mlp.fc1.weight'].shape[0]
  if weights['blocks.0.mlp.fc2.weight'].shape[1] != d_ff:
    raise ValueError(f'{path!r}: mlp.fc1 has {d_ff} outputs and mlp.fc2 '
                     f'{weights["blocks.0.mlp.fc2.weight"].shape[1]} inputs: a gated MLP '
                     '(SwiGLU), which tx ViT does not build')
  num_layers = 0
  while f'blocks.{num_layers}.norm1.weight' in weights:
    num_layers += 1
  architecture = _architecture(path, config)
  class_token = 'cls_token' in weights
  extra_tokens = weights['reg_token'].shape[1] if 'reg_token' in weights else 0
  pool = _pool(config, model_args, weights)
  if pool == 'cls' and not class_token:
    raise ValueError(f"{path!r}: global_pool='token' with no cls_token")
  if 'pos_embed' in weights:
    (grid_h, grid_w), posemb_prefix = _grid(config, model_args, weights['pos_embed'].shape[1],
                                            int(class_token) + extra_tokens, patch, path)
  else:  # pos_embed='none': any image size; one patch gives the parameter shapes.
    (grid_h, grid_w), posemb_prefix = (1, 1), True
  model = ViT(num_classes=weights['head.weight'].shape[0] if 'head.weight' in weights else 0,
              patch_size=patch, num_layers=num_layers, d_model=d_model,
              num_heads=_num_heads(num_heads, model_args, architecture, d_model, patch, path),
              d_ff=d_ff, posemb='learn' if 'pos_embed' in weights else 'none', pool=pool,
              class_token=class_token, extra_tokens=extra_tokens, posemb_prefix=posemb_prefix,
              fc_norm='fc_norm.weight' in weights, final_norm='norm.weight' in weights,
              norm='pre', activation=_activation(model_args, architecture),
              layer_norm_epsilon=1e-6)
  example = jax.ShapeDtypeStruct((1, grid_h * patch, grid_w * patch, channels), np.float32)
  return model, convert(_pairs(model, weights), weights, expected_shapes(model, example), path)
