"""vit_jax and big_vision ViT checkpoints (`.npz`) in and out of tx.

    from tx.pretrained import vit_jax
    model, params = vit_jax.load_vit_jax('ViT-B_16.npz')   # or tx.pretrained.load(path)
    logits = model.apply({'params': params}, images)   # images [batch, H, W, C] in [−1, 1]
    vit_jax.save_vit_jax(model, params, 'out.npz')                       # vit_jax's names
    vit_jax.save_vit_jax(model, params, 'out.npz', layout='big_vision')  # scanned

An `.npz` holds one array per Flax parameter, named by its module path joined with '/'. Both
codes build the same network, x ← x + MHA(LN(x)), x ← x + MLP(LN(x)) with
MLP(y) = Dense_1(gelu(Dense_0(y))), and differ in names and in where the position table sits:

  vit_jax (Dosovitskiy et al.)         big_vision (Beyer et al.), unscanned or scanned
  cls [1, 1, D]                        cls [1, 1, D] ('tok' pooling only)
  Transformer/posembed_input/          pos_embedding [1, N, D] at the top level, added to the
    pos_embedding [1, 1 + N, D],         N patches before [CLS] is prepended (tx
    added to [CLS] + patches             posemb_prefix=False); none with posemb='sincos2d'
  Transformer/encoderblock_i/          Transformer/encoderblock_i/ or, scanned, one
    LayerNorm_0, LayerNorm_2,            Transformer/encoderblock/ whose arrays have a leading
    MultiHeadDotProductAttention_1,      layer axis [L, ...]; LayerNorm_0, LayerNorm_1,
    MlpBlock_3/Dense_0, Dense_1          MultiHeadDotProductAttention_0, MlpBlock_0
  Transformer/encoder_norm, embedding (kernel [p, p, C, D]), pre_logits (tanh Dense), head

vit_jax's names are those of the pre-Linen modules it was trained with (one counter for all
submodules of a block); its loader and big_vision's renumber them per class (Flax's
`convert_pre_linen`), so either code reads either numbering. Attention kernels are stored as
tx keeps them: query, key, value [D, H, D/H] (biases [H, D/H]) and out [H, D/H, D].

Both codes compute GELU as Flax's `nn.gelu`, the tanh approximation (tx activation 'gelu'),
and LayerNorm with Flax's ε = 1e-6. timm's reader of these files (`_load_weights`) fills a
torch model whose GELU is exact (erf) unless built with act_layer='gelu_tanh', so timm's
`vit_*` models converted from these files compute a slightly different function from the
original; a tx model loaded here computes the original.

The architecture is read from the arrays: heads from the query kernel's shape, the patch
size from the embedding kernel, layers by counting blocks, pooling by the presence of 'cls'
('cls', else 'mean'; big_vision's rare pool_type='0', the first patch's output, leaves no
trace in a file and loads as 'mean'), a tanh pooler from 'pre_logits', classes from 'head'
(none: num_classes=0).
Optimizer prefixes ('opt/target/', 'params/') are stripped as timm does; attention pooling
(big_vision's MAPHead), ResNet-hybrid stems and a pre_logits width other than d_model are
one ValueError. A scanned file loads into a tx ViT with scan_layers=True (`tx.unstack_layers`
turns its params into the per-layer layout). Every load checks that the arrays are exactly
the model's (`tx.pretrained._convert.convert`). Files are read with np.load(allow_pickle=False):
an `.npz` holding pickled objects is refused.
"""

from __future__ import annotations

import math
import zipfile

import jax
import numpy as np

from tx.models import STACKED, stack_layers, unstack_layers
from tx.pretrained._convert import SAME, convert, expected_shapes, flatten, unconvert
from tx.validate import check_choice
from tx.vit import ViT

LAYOUTS = ('vit_jax', 'big_vision')
# Prefixes under which training code stored the model (timm strips the same ones).
_PREFIXES = ('opt/target/', 'params/', '')
# The four submodules of a block, by layout: (first LN, attention, second LN, MLP).
_BLOCK_NAMES = {
    'vit_jax': ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'),
    'big_vision': ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                   'MlpBlock_0'),
}
# Where the learned position table may sit: vit_jax's, big_vision's, big_vision's before 2022.
_VIT_JAX_POSEMB, _BIG_VISION_POSEMB = 'Transformer/posembed_input/pos_embedding', 'pos_embedding'
_POSEMB_NAMES = (_VIT_JAX_POSEMB, _BIG_VISION_POSEMB, 'Transformer/pos_embedding')
_SCANNED = 'Transformer/encoderblock/'
_EPSILON = 1e-6  # Flax's nn.LayerNorm default, which both codes use.


def _float32(array: np.ndarray) -> np.ndarray:
  """float32 of a stored array. NumPy has no bfloat16: such arrays come back as 2-byte void
  ('V2'), whose bits are a float32's upper half."""
  if array.dtype == np.dtype('V2'):
    return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return np.asarray(array, np.float32)


def _read(path: str, wanted=None) -> dict:
  """{name without the optimizer prefix: float32 array} of the `.npz` at `path` (only the
  names `wanted` returns True for, when given); arrays outside the model's prefix keep their
  full name, except an optimizer's own state (opt/...), which is dropped."""
  refused = ValueError(f'{path!r} is not an .npz of plain arrays (it holds pickled objects, '
                       'or is no .npz at all); tx reads arrays only (allow_pickle=False)')
  try:
    npz = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except (EOFError, OSError, ValueError, zipfile.BadZipFile):
    raise refused from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path!r} holds one array, not an .npz of named parameters')
  with npz:
    names = npz.files
    prefix = next((p for p in _PREFIXES if f'{p}embedding/kernel' in names), None)
    if prefix is None:
      _no_embedding(path, names)
    arrays = {}
    for name in names:
      if prefix == 'opt/target/' and name.startswith('opt/') and not name.startswith(prefix):
        continue
      name_in_model = name.removeprefix(prefix)
      if wanted is None or wanted(name_in_model):
        try:
          value = npz[name]
        except ValueError:  # an object array, which only pickle can read.
          raise refused from None
        arrays[name_in_model] = _float32(value)
    return arrays


def _no_embedding(path: str, names) -> None:
  """The ValueError for a file with no patch embedding under a known prefix."""
  elsewhere = [n for n in names if n.endswith('embedding/kernel') and 'pos' not in n]
  if elsewhere:
    raise ValueError(f'{path!r} has {elsewhere[0]}: tx reads a ViT stored at the top level or '
                     "under 'opt/target/' or 'params/' (not one tower of a two-tower model)")
  raise ValueError(f'{path!r} has no embedding/kernel (the patch embedding): not a vit_jax or '
                   'big_vision ViT checkpoint')


def _posemb_name(arrays: dict) -> str | None:
  return next((name for name in _POSEMB_NAMES if name in arrays), None)


def _grid_side(rows: int, table: str, prefix: bool, path: str) -> int:
  """The side of the square patch grid that a table of `rows` rows covers (prefix: its first
  row belongs to [CLS])."""
  patches = rows - prefix
  side = math.isqrt(max(patches, 0))
  if side * side != patches or side == 0:
    raise ValueError(f'{table} has {rows} rows in {path!r}: not {"1 + " if prefix else ""}a '
                     'square grid of patches, as vit_jax and big_vision make it')
  return side


def _posemb_prefix(arrays: dict, table: str, path: str) -> tuple[bool, int]:
  """(whether the table has a row for [CLS], the patch grid's side).

  vit_jax's table covers the encoder's input, [CLS] included. big_vision's covers the
  patches; its older files held a [CLS] row too (1 + a square), which big_vision's loader
  adds to cls: tx keeps that row as a prefix row, the same sum.
  """
  rows = arrays[table].shape[1]
  has_cls = 'cls' in arrays
  prefix = has_cls and (table == _VIT_JAX_POSEMB or math.isqrt(rows) ** 2 != rows)
  return prefix, _grid_side(rows, table, prefix, path)


def _layers(arrays: dict, path: str) -> tuple[str, bool, int]:
  """(layout, scanned, number of layers) of the blocks in `arrays`."""
  if f'{_SCANNED}LayerNorm_0/scale' in arrays:
    scanned, first, count = True, _SCANNED, arrays[f'{_SCANNED}LayerNorm_0/scale'].shape[0]
  else:
    count = 0
    while f'Transformer/encoderblock_{count}/LayerNorm_0/scale' in arrays:
      count += 1
    scanned, first = False, 'Transformer/encoderblock_0/'
  if not count:
    raise ValueError(f'{path!r} has no Transformer/encoderblock_0/LayerNorm_0/scale (nor a '
                     'scanned Transformer/encoderblock/): no encoder blocks tx can read')
  for layout, (_, attention, _, _) in _BLOCK_NAMES.items():
    if f'{first}{attention}/query/kernel' in arrays:
      return layout, scanned, count
  raise ValueError(f'{path!r} has no {first}MultiHeadDotProductAttention_1 (vit_jax) or _0 '
                   '(big_vision)/query/kernel: not a ViT encoder block tx knows')


def _refuse_other_architectures(arrays: dict, path: str) -> None:
  if any(name.startswith('MAPHead_0/') or name == 'probe' for name in arrays):
    raise ValueError(f"{path!r} has MAPHead_0: big_vision's attention pooling "
                     "(pool_type='map'), which tx does not build (it pools by [CLS] or the "
                     'mean)')
  if 'conv_root/kernel' in arrays:
    raise ValueError(f'{path!r} has conv_root: a ResNet-hybrid ViT, whose ResNet stem tx does '
                     'not build')


def _model(arrays: dict, path: str) -> tuple[ViT, str, tuple[int, int, int]]:
  """(the tx ViT the arrays describe, their block layout, an example image shape)."""
  _refuse_other_architectures(arrays, path)
  layout, scanned, num_layers = _layers(arrays, path)
  block = _SCANNED if scanned else 'Transformer/encoderblock_0/'
  _, attention, _, mlp = _BLOCK_NAMES[layout]
  query = arrays[f'{block}{attention}/query/kernel']
  hidden = arrays.get(f'{block}{mlp}/Dense_0/kernel')
  kernel = arrays['embedding/kernel']
  if query.ndim != 3 + scanned or hidden is None or kernel.ndim != 4:
    raise ValueError(f'{path!r}: {block}{attention}/query/kernel is {query.shape}, '
                     f'{block}{mlp}/Dense_0/kernel {None if hidden is None else hidden.shape}, '
                     f'embedding/kernel {kernel.shape}; a ViT has [D, H, D/H], [D, F], '
                     '[p, p, C, D] (scanned: a leading layer axis)')
  patch, patch_width, channels, d_model = kernel.shape
  if patch != patch_width:
    raise ValueError(f'embedding/kernel is {kernel.shape} in {path!r}: tx ViT patches are '
                     'square')
  if 'pre_logits/kernel' in arrays and arrays['pre_logits/kernel'].shape[-1] != d_model:
    raise ValueError(f"pre_logits/kernel is {arrays['pre_logits/kernel'].shape} in {path!r}: "
                     f"tx's pooler maps d_model={d_model} to itself, not to "
                     f"{arrays['pre_logits/kernel'].shape[-1]}")
  table = _posemb_name(arrays)
  if table is None:  # vit_jax without add_position_embedding; big_vision posemb='sincos2d'.
    posemb, prefix, side = ('none' if layout == 'vit_jax' else 'sincos2d'), True, 1
  else:
    if arrays[table].ndim != 3 or arrays[table].shape[0] != 1:
      raise ValueError(f'{table} is {arrays[table].shape} in {path!r}; a position table is '
                       f'[1, rows, {d_model}]')
    posemb, (prefix, side) = 'learn', _posemb_prefix(arrays, table, path)
    prefix = prefix or 'cls' not in arrays  # without [CLS] no row is a prefix's: the default.
  head = arrays.get('head/kernel')
  model = ViT(num_classes=0 if head is None else head.shape[-1], patch_size=patch,
              pool='cls' if 'cls' in arrays else 'mean', num_layers=num_layers,
              d_model=d_model, num_heads=query.shape[-2], d_ff=hidden.shape[-1], posemb=posemb,
              posemb_prefix=prefix, norm='pre', activation='gelu',
              layer_norm_epsilon=_EPSILON, pooler='pre_logits/kernel' in arrays,
              scan_layers=scanned)
  return model, layout, (side * patch, side * patch, channels)


def _pairs(model: ViT, layout: str, table: str | None) -> list:
  """(file name, tx path, to_tx, from_tx) for every parameter of `model` in `layout`; the
  blocks are scanned in the file exactly when they are in the model (`scan_layers`)."""
  pairs = [('embedding/kernel', ('embedding', 'kernel'), *SAME),
           ('embedding/bias', ('embedding', 'bias'), *SAME),
           ('Transformer/encoder_norm/scale', ('encoder', 'final_norm', 'scale'), *SAME),
           ('Transformer/encoder_norm/bias', ('encoder', 'final_norm', 'bias'), *SAME)]
  if model.pool == 'cls':
    pairs.append(('cls', ('cls',), *SAME))
  if table is not None:
    pairs.append((table, ('pos_embedding',), *SAME))
  for name, tx_name, wanted in (('pre_logits', 'pooler', model.pooler),
                                ('head', 'head', model.num_classes)):
    if wanted:
      pairs += [(f'{name}/{leaf}', (tx_name, leaf), *SAME) for leaf in ('kernel', 'bias')]
  first_norm, attention, second_norm, mlp = _BLOCK_NAMES[layout]
  blocks = ([(_SCANNED, STACKED)] if model.scan_layers else
            [(f'Transformer/encoderblock_{i}/', f'block_{i}') for i in range(model.num_layers)])
  for block, tx_block in blocks:
    modules = [(first_norm, ('self_attention_norm',)), (second_norm, ('ffn_norm',)),
               (f'{mlp}/Dense_0', ('ffn', 'hidden')), (f'{mlp}/Dense_1', ('ffn', 'output'))]
    modules += [(f'{attention}/{n}', ('self_attention', n))
                for n in ('query', 'key', 'value', 'out')]
    for name, path in modules:
      leaves = ('scale', 'bias') if name.startswith('LayerNorm') else ('kernel', 'bias')
      pairs += [(f'{block}{name}/{leaf}', ('encoder', tx_block, *path, leaf), *SAME)
                for leaf in leaves]
  return pairs


def load_vit_jax(path: str):
  """(tx.ViT, params) of a vit_jax or big_vision `.npz` checkpoint; float32 NumPy params.

  The model computes what vit_jax's (or big_vision's) ViT computes on the same image:
    x = [cls; patches·E] + P (vit_jax)   or   [cls; patches·E + P] (big_vision),
    h = LN(Encoder(x))[0] or the mean over tokens, tanh(W_pre h + b) with pre_logits,
    logits = W_head h + b_head (none without a head: the pooled vector is the output).
  """
  arrays = _read(path)
  model, layout, image = _model(arrays, path)
  pairs = _pairs(model, layout, _posemb_name(arrays))
  expected = expected_shapes(model, jax.ShapeDtypeStruct((1, *image), np.float32))
  return model, convert(pairs, arrays, expected, path)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of the square images a checkpoint's position table was made for:
  side · patch_size, the table covering side × side patches."""
  arrays = _read(path, lambda name: name in _POSEMB_NAMES + ('embedding/kernel', 'cls'))
  table = _posemb_name(arrays)
  patch = arrays['embedding/kernel'].shape[0]
  if table is None:
    raise ValueError(f'{path!r} has no position table (sin-cos or no posemb): its ViT takes '
                     f'any image whose sides are multiples of the patch size {patch}; no size '
                     'is implied')
  _, side = _posemb_prefix(arrays, table, path)
  return side * patch, side * patch


def _refuse_what_the_layout_computes_differently(model: ViT, layout: str) -> None:
  """ValueError naming the first field of `model` that `layout`'s code computes otherwise."""
  posembs = ('learn', 'none') if layout == 'vit_jax' else ('learn', 'sincos2d')
  class_token = model.has_class_token
  differs = {
      'posemb': model.posemb not in posembs,
      'posemb_prefix': (layout == 'vit_jax' and model.posemb == 'learn' and class_token
                        and not model.posemb_prefix),
      'class_token': class_token != (model.pool == 'cls'), 'norm': model.norm != 'pre',
      'final_norm': model.final_norm is False, 'activation': model.activation != 'gelu',
      'layer_norm_epsilon': model.layer_norm_epsilon != _EPSILON,
      'beta_scale': model.beta_scale != 1.0, 'learn_beta': model.learn_beta,
      'score': model.score != 'dot', 'embedding_norm': model.embedding_norm,
      'num_kv_heads': model.num_kv_heads not in (None, model.num_heads),
      'extra_tokens': model.extra_tokens, 'fc_norm': model.fc_norm}
  allowed = ("posemb 'learn' (its table covering [CLS] too: posemb_prefix=True) or 'none'"
             if layout == 'vit_jax' else "posemb 'learn' or 'sincos2d'")
  for field, bad in differs.items():
    if bad:
      raise ValueError(
          f'{field}={getattr(model, field)!r}: layout={layout!r} computes a ViT with '
          f'{allowed}, [CLS] exactly when pool="cls", norm="pre" and a final '
          f'LayerNorm, activation="gelu" (tanh), layer_norm_epsilon={_EPSILON}, beta_scale=1, '
          'score="dot", and none of learn_beta, embedding_norm, grouped heads, extra tokens, '
          'fc_norm')


def save_vit_jax(model: ViT, params, path: str, layout: str = 'vit_jax') -> None:
  """Writes `model` and `params` as an `.npz` that `layout`'s code loads: 'vit_jax' (its
  published names, per-layer blocks, `checkpoint.load` and timm's `_load_weights` read it) or
  'big_vision' (scanned blocks, the table at the top level). A [CLS] row of the table
  (posemb_prefix=True) is kept in big_vision's layout as its older files hold it, which its
  loader adds to cls: the same sum. ValueError for a ViT that code computes differently.
  `load_vit_jax` of the file gives back `model` (scan_layers as the layout stores blocks:
  True for 'big_vision') and `params` (stacked accordingly) exactly."""
  check_choice('layout', layout, LAYOUTS)
  _refuse_what_the_layout_computes_differently(model, layout)
  scanned = layout == 'big_vision'
  if scanned and not model.scan_layers:
    params = stack_layers(params)
  elif model.scan_layers and not scanned:
    params = unstack_layers(params)
  stored = model.clone(scan_layers=scanned)
  table = None if stored.posemb != 'learn' else (
      _VIT_JAX_POSEMB if layout == 'vit_jax' else _BIG_VISION_POSEMB)
  pairs = _pairs(stored, layout, table)
  flat = flatten(params)
  missing = sorted({tx_path for _, tx_path, *_ in pairs} - set(flat))
  if missing:
    raise ValueError(f'params has no {"/".join(missing[0])}, which {model.__class__.__name__}'
                     f'(pool={model.pool!r}, pooler={model.pooler}, num_classes='
                     f'{model.num_classes}) has')
  arrays = unconvert(pairs, flat, layout)
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare name.
    np.savez(f, **arrays)
