"""Pretrained weights in and out of tx. Each loader returns (model, params): a tx Linen module
and float32 NumPy params, checked to be exactly the model's tree (nothing missing, nothing left
over, every shape equal); a checkpoint of an architecture tx does not build is one ValueError.

- `tx.pretrained.hf`: Hugging Face ViT, GPT-2 and BERT directories (config.json and
  model.safetensors, as the Hub and save_pretrained write them), and ViT back to that layout.
- `tx.pretrained.timm`: timm `vit_*` models (a Hub directory or a state-dict file).
- `tx.pretrained.vit_jax`: vit_jax and big_vision `.npz` files, and ViT back to either layout.

`load(source)` picks the loader from what `source` is. The loaders import safetensors (and
huggingface_hub, for Hub ids) only when called: `import tx` does not need them
(`pip install 'tx[pretrained]'`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

from tx.pretrained import vit_jax
from tx.pretrained._convert import read_config
from tx.pretrained.hf import (bert_from_hf_config, gpt2_from_hf_config, load_hf_bert,
                              load_hf_gpt2, load_hf_vit, save_hf_vit, vit_from_hf_config)
from tx.pretrained.timm import load_timm_vit
from tx.pretrained.vit_jax import load_vit_jax, save_vit_jax

_HUB_ID = re.compile(r'^[\w.-]+/[\w.-]+$')
_HF_LOADERS = {'vit': load_hf_vit, 'gpt2': load_hf_gpt2, 'bert': load_hf_bert}
_STATE_DICTS = ('.safetensors', '.pth', '.pt', '.bin')
_EXPECTED = ('a checkpoint directory as the Hub, save_pretrained or timm write it, or an .npz '
             'or state-dict file')


def local_path(source: str) -> str:
  """`source` itself when it exists on disk; for a Hub id ('google/vit-base-patch16-224') the
  directory huggingface_hub downloads it to (config files, safetensors weights, tokenizer)."""
  if os.path.exists(source):
    return source
  if not _HUB_ID.match(source):
    raise ValueError(f'{source!r} is neither a file, a directory nor a Hub id (owner/name)')
  try:
    hub = importlib.import_module('huggingface_hub')
  except ImportError:
    raise ImportError(f'{source!r} is not on disk; to download it from the Hub: pip install '
                      'huggingface_hub') from None
  return hub.snapshot_download(source, allow_patterns=['*.json', '*.safetensors', '*.txt'])


def load(source: str):
  """(model, params) of a pretrained checkpoint, by what `source` is:

    a directory whose config.json has model_type 'vit', 'gpt2' or 'bert'   Hugging Face
    a directory whose config.json names a timm 'architecture'              timm
    a .safetensors, .pth, .pt or .bin file                                  timm state dict
    an .npz file                                                            vit_jax, big_vision
    owner/name, not on disk                                                 the Hub, then as above
  """
  path = local_path(source)
  if os.path.isfile(path):
    if path.endswith('.npz'):
      return load_vit_jax(path)
    if path.endswith(_STATE_DICTS):
      return load_timm_vit(path)
    raise ValueError(f'{source!r}: a file must be .npz (vit_jax, big_vision) or a state dict '
                     f'({", ".join(_STATE_DICTS)}); for Hugging Face give its directory')
  config = read_config(path, _EXPECTED)
  if 'architecture' in config:
    return load_timm_vit(path)
  model_type = config.get('model_type')
  if model_type not in _HF_LOADERS:
    raise ValueError(f'{source!r}: model_type={model_type!r}; tx loads '
                     f'{", ".join(map(repr, _HF_LOADERS))} and timm ViTs')
  return _HF_LOADERS[model_type](path)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """How a checkpoint's images were prepared: x = (rescale · resize(image) − mean) / std per
  channel, for pixels 0..255, after resizing to `size` (height, width) with `resample`
  ('bilinear' | 'bicubic' | 'nearest' | ...). With center_crop (timm's eval transform) the image
  is instead resized, keeping its aspect ratio, to cover size / crop_fraction, and its centre
  `size` cut out (timm's crop_pct)."""
  size: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  resample: str = 'bilinear'
  crop_fraction: float = 1.0
  rescale: float = 1 / 255
  center_crop: bool = False


# PIL's resampling codes, as HF preprocessor_config.json stores them.
_PIL_RESAMPLE = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box', 5: 'hamming'}


def image_preprocessing(source: str) -> ImagePreprocessing:
  """The preprocessing of an image checkpoint: HF preprocessor_config.json, timm's
  pretrained_cfg, or for an .npz vit_jax's (mean = std = 0.5, i.e. pixels to [−1, 1]) at the
  image size of its position table."""
  path = local_path(source)
  if os.path.isfile(path) and path.endswith('.npz'):
    return ImagePreprocessing(size=vit_jax.image_size(path), mean=(0.5,) * 3, std=(0.5,) * 3)
  if os.path.isfile(path):
    raise ValueError(f'{source!r}: a state-dict file does not say its preprocessing; give '
                     "timm's directory (config.json holds pretrained_cfg)")
  config = read_config(path, _EXPECTED)
  if 'architecture' in config:
    cfg = config.get('pretrained_cfg', {})
    if cfg.get('crop_mode', 'center') != 'center':
      raise ValueError(f"crop_mode={cfg['crop_mode']!r} in {source!r}: tx reproduces timm's "
                       "'center' crop only")
    _, height, width = cfg.get('input_size', (3, 224, 224))
    return ImagePreprocessing(size=(height, width), mean=tuple(cfg.get('mean', (0.485, 0.456,
                              0.406))), std=tuple(cfg.get('std', (0.229, 0.224, 0.225))),
                              resample=cfg.get('interpolation', 'bicubic'),
                              crop_fraction=cfg.get('crop_pct', 0.875), center_crop=True)
  processor_path = os.path.join(path, 'preprocessor_config.json')
  if not os.path.isfile(processor_path):
    raise ValueError(f'{source!r} has no preprocessor_config.json: an image checkpoint '
                     "directory holds one (transformers' image processor writes it)")
  with open(processor_path) as f:
    processor = json.load(f)
  size = processor.get('size', {'height': 224, 'width': 224})
  if isinstance(size, dict) and {'height', 'width'} <= set(size):
    size = (size['height'], size['width'])
  elif isinstance(size, int):
    size = (size, size)
  else:
    raise ValueError(f'size={size!r} in {processor_path!r}; tx reads {{"height": H, "width": '
                     'W}} or an int (a ViT image processor)')
  if not processor.get('do_resize', True):
    size = (config['image_size'],) * 2
  normalise = processor.get('do_normalize', True)
  mean = tuple(processor.get('image_mean', (0.5,) * 3)) if normalise else (0.0,) * 3
  std = tuple(processor.get('image_std', (0.5,) * 3)) if normalise else (1.0,) * 3
  rescale = processor.get('rescale_factor', 1 / 255) if processor.get('do_rescale', True) else 1
  return ImagePreprocessing(size=size, mean=mean, std=std, rescale=rescale,
                            resample=_PIL_RESAMPLE.get(processor.get('resample', 2), 'bilinear'))
