"""What experiments.inspect computes and writes for a pretrained checkpoint (whatever
tx.pretrained.load reads: a Hugging Face ViT, GPT-2 or BERT directory or Hub id, a timm ViT,
a vit_jax .npz) on the user's images (ViTs) or text (GPT-2, BERT), prepared as the checkpoint
was trained on them; what the files show and how to read them: docs/inspect.md.

Images are read with PIL and prepared from tx.pretrained.image_preprocessing; text is split
with the checkpoint's own tokenizer.json (the `tokenizers` package), whose post-processor adds
BERT's [CLS] and [SEP].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

import tx
from experiments.inspect import figures
from experiments.inspect.head_stats import head_statistics, output_token_maps, rollout_maps
from experiments.inspect.output import check_replaceable, staged
from experiments.inspect.streams import (Layer, Stream, patch_stream, prefix_labels,
                                         with_prefix)
from experiments.metrics import save_figure
from tx.pretrained import ImagePreprocessing, image_preprocessing, load, local_path

TOP_K = 5  # predictions named in the titles
RESAMPLE = ('nearest', 'lanczos', 'bilinear', 'bicubic', 'box', 'hamming')  # PIL's filters
RUN_FLAGS = ('step', 'examples', 'stat_examples')  # flags that read a trained run only
SPLIT = ('relative', 'absolute', 'content')  # the position/content split: needs 2+ inputs


@dataclasses.dataclass
class Seen:
  """A checkpoint's attention on the user's inputs, and what it predicted."""
  layers: list[Layer]  # every attention layer, in call order
  names: list[str]  # per input: its file name, or the text quoted
  predictions: list[list[tuple[str, float]]]  # per input: the TOP_K (name, probability)
  predicting: str = 'classes'  # what the predictions name
  images: np.ndarray | None = None  # [N, H, W, 3] in 0..1, the pixels the ViT saw
  cls_pooled: bool = True  # a ViT's output is its [CLS] token (False: the mean of the patches)
  tokens: list[str] | None = None  # the tokenizer's tokens of the text


def check_flags(workdir: str | None, source: str | None, image: str | None,
                text: str | None, run_flags: dict):
  """ValueError (one line naming the flag) unless the flags ask for one thing: a trained run
  (--workdir, with `run_flags`, the given flags of RUN_FLAGS) or a checkpoint (--pretrained)
  with either --image or --text."""
  if workdir and source:
    raise ValueError(f'--workdir={workdir} and --pretrained={source}: give one, a trained run '
                     'or a pretrained checkpoint')
  if not source:
    for name, value in (('image', image), ('text', text)):
      if value is not None:
        raise ValueError(f'--{name}={value!r} goes with --pretrained=SOURCE (a trained run is '
                         'drawn on its own test set)')
    return
  for name, value in run_flags.items():
    raise ValueError(f'--{name}={value} reads a trained run: it goes with --workdir, not '
                     '--pretrained')
  if (image is None) == (text is None):
    given = 'both' if image is not None else 'neither'
    raise ValueError(f'--pretrained={source} with {given} of --image and --text; give one: '
                     '--image=PATH[,PATH...] (ViT) or --text="..." (GPT-2, BERT)')


def output_dir(source: str, out: str | None = None) -> str:
  """Where inspect writes for a checkpoint: `out`, default runs/inspect-NAME, NAME the last
  part of `source` (a file's without its extension)."""
  name = os.path.basename(os.path.normpath(source))
  if os.path.isfile(source):
    name = os.path.splitext(name)[0]
  return out or os.path.join('runs', f'inspect-{name}')


def inspect_pretrained(source: str, images: str | None = None, text: str | None = None,
                       out: str | None = None, max_tokens: int = 32) -> list[str]:
  """Loads the checkpoint `source` and writes into `out` (default: output_dir(source)):
  for --image (comma-separated paths; ViTs) attention_image<i>.png per image and rollout.png,
  for --text (GPT-2, BERT) attention_text.png (causal layers cropped to `max_tokens`), then
  head_statistics.png, offset_profiles.png, position_content.png (two images or more) and
  inspection.json. Returns the paths. Written into a folder beside `out` that replaces it only
  once complete, as for a run."""
  check_flags(None, source, images, text, {})
  if max_tokens <= 0:
    raise ValueError(f'--max_tokens={max_tokens}; it must be a positive integer')
  out = output_dir(source, out)
  check_replaceable(out)
  pictures = None
  if images is not None:
    paths = [path for path in images.split(',') if path]
    if not paths:
      raise ValueError(f'--image={images!r} names no file')
    pictures = [(path, read_image(path)) for path in paths]
  model, params = load(source)
  if isinstance(model, tx.ViT):
    if pictures is None:
      raise ValueError(f'--text with --pretrained={source}, an image model (ViT): give '
                       '--image=PATH')
    seen = image_attention(model, params, source, pictures)
  elif isinstance(model, (tx.DecoderLM, tx.EncoderClassifier)) and model.vocab_size:
    if text is None:
      raise ValueError(f'--image with --pretrained={source}, a text model '
                       f'({type(model).__name__}): give --text="..."')
    seen = text_attention(model, params, source, text)
  else:
    raise ValueError(f'--pretrained={source} gives a {type(model).__name__}; inspect draws '
                     'ViTs (--image) and token models (--text)')
  with staged(out) as staging:
    names = _write(seen, staging, source, max_tokens)
  return [os.path.join(out, name) for name in names]


# --- images -----------------------------------------------------------------------------------

def read_image(path: str):
  """The image at `path` as a PIL RGB image (PIL's conversion: grey repeated, alpha dropped);
  ValueError naming --image if it is missing or not an image PIL reads."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise ValueError(f'--image={path}: no such file')
  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'--image={path}: not an image PIL can read ({e})') from None


def resize_and_crop(image, prep: ImagePreprocessing) -> np.ndarray:
  """uint8 [height, width, 3]: the PIL image resized with PIL's `prep.resample` filter to
  prep.size = (height, width), as transformers' image processors do. With prep.center_crop and
  crop_fraction f, as timm's eval transform: first resized, keeping its aspect ratio, so that
  it covers (⌊height / f⌋, ⌊width / f⌋) (for a square size: its shorter side to ⌊height / f⌋,
  the longer one truncated), then the centre (height, width) cut out, offsets
  round((H' − height) / 2)."""
  from PIL import Image
  if prep.resample not in RESAMPLE:
    raise ValueError(f'resample={prep.resample!r}; allowed: {", ".join(map(repr, RESAMPLE))}')
  resample = getattr(Image.Resampling, prep.resample.upper())
  height, width = prep.size
  if not prep.center_crop:
    return np.asarray(image.resize((width, height), resample))
  scaled_h, scaled_w = (math.floor(s / prep.crop_fraction) for s in prep.size)
  w, h = image.size
  if scaled_h == scaled_w:  # torchvision's Resize(int)
    short, long = sorted((w, h))
    new_short, new_long = scaled_h, int(scaled_h * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
  else:  # timm's ResizeKeepRatio
    ratio = min(h / scaled_h, w / scaled_w)
    new = (round(w / ratio), round(h / ratio))
  image = image.resize(new, resample)
  top, left = (int(round((n - s) / 2.0)) for n, s in ((new[1], height), (new[0], width)))
  return np.asarray(image.crop((left, top, left + width, top + height)))


def preprocess(image, prep: ImagePreprocessing) -> np.ndarray:
  """float32 [height, width, 3], the model's input: x = (rescale · pixels − mean) / std per
  channel, of the pixels 0..255 of resize_and_crop(image, prep)."""
  pixels = resize_and_crop(image, prep).astype(np.float64) * prep.rescale
  return ((pixels - np.asarray(prep.mean)) / np.asarray(prep.std)).astype(np.float32)


def image_attention(model, params, source: str, pictures: list) -> Seen:
  """The ViT's attention and top predictions on `pictures`, (path, PIL image) pairs, each
  prepared as `source` prepares its images."""
  prep = image_preprocessing(source)
  channels = np.shape(params['embedding']['kernel'])[2]
  if channels != 3:
    raise ValueError(f'--pretrained={source} takes {channels}-channel images; inspect reads '
                     'RGB images (3 channels)')
  x = np.stack([preprocess(image, prep) for _, image in pictures])
  shown = np.stack([resize_and_crop(image, prep) for _, image in pictures]) / 255.0
  p = model.patch_size
  if x.shape[1] % p or x.shape[2] % p:
    raise ValueError(f'{source}: its images are {x.shape[1]}x{x.shape[2]} pixels, not a '
                     f'multiple of its patch size {p}')
  stream = with_prefix(patch_stream(len(x), x.shape[1] // p, x.shape[2] // p, p), len(x),
                       prefix_labels(model))
  layers = attention_layers(model, params, (x,), stream)
  names = _class_names(source)
  predictions = [[] for _ in x]
  if model.num_classes:  # 0: no head, the model returns features
    logits = np.asarray(model.apply({'params': params}, x))
    predictions = [top_predictions(row, names) for row in logits]
  return Seen(layers, [os.path.basename(path) for path, _ in pictures], predictions,
              images=shown, cls_pooled=model.pool == 'cls')


# --- text -------------------------------------------------------------------------------------

def tokenize(source: str, text: str):
  """(tokenizer, encoding) of `text` by the checkpoint's tokenizer.json, special tokens
  included (BERT's [CLS] … [SEP] come from its post-processor), no padding or truncation;
  ValueError when the checkpoint has no tokenizer.json."""
  directory = local_path(source)
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.isfile(path):
    raise ValueError(f'--pretrained={source} has no tokenizer.json: --text needs the '
                     "checkpoint's tokenizer (the tokenizers library's file, as the Hub and "
                     'save_pretrained write it)')
  try:
    from tokenizers import Tokenizer
  except ImportError:
    raise ImportError('--text reads tokenizer.json with the tokenizers package: pip install '
                      'tokenizers') from None
  tokenizer = Tokenizer.from_file(path)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer, tokenizer.encode(text)


def text_attention(model, params, source: str, text: str) -> Seen:
  """The model's attention on `text` and its top predictions: the next token after the text
  (GPT-2) or the classes (BERT; none when it has no head)."""
  tokenizer, encoding = tokenize(source, text)
  ids = np.asarray([encoding.ids], np.int32)
  if not ids.size:
    raise ValueError(f'--text={text!r} gives no tokens')
  if model.posemb == 'learn' and ids.shape[1] > model.num_positions:
    raise ValueError(f'--text gives {ids.shape[1]} tokens; --pretrained={source} takes at most '
                     f'{model.num_positions}')
  inputs = (ids,)
  if isinstance(model, tx.EncoderClassifier) and model.num_token_types:
    inputs = (ids, np.asarray([encoding.type_ids], np.int32))
  t = ids.shape[1]
  stream = Stream([list(encoding.tokens)], np.ones((1, t), bool), np.arange(t)[:, None],
                  np.zeros(t, bool))
  layers = attention_layers(model, params, inputs, stream)
  logits = np.asarray(model.apply({'params': params}, *inputs))
  if isinstance(model, tx.DecoderLM):
    top, predicting = top_predictions(logits[0, -1], tokenizer.id_to_token), 'next tokens'
  else:
    top = top_predictions(logits[0], _class_names(source)) if model.num_classes else []
    predicting = 'classes'
  return Seen(layers, [repr(text)], [top], predicting, tokens=list(encoding.tokens))


# --- both -------------------------------------------------------------------------------------

def attention_layers(model, params, inputs: tuple, stream: Stream) -> list[Layer]:
  """Every attention layer of `model` on `inputs` (model.apply's positional arguments) in call
  order: tx.attention_weights, queries and keys both reading `stream` (self-attention)."""
  weights = tx.attention_weights(model, {'params': params}, *inputs)
  return [Layer(path, np.asarray(w, np.float64), stream, stream) for path, w in weights.items()]


def top_predictions(logits, name_of, k: int = TOP_K) -> list[tuple[str, float]]:
  """The k most probable (name_of(i), p_i), most probable first, p = softmax(logits):
  p_i = exp(z_i − max z) / Σ_j exp(z_j − max z)."""
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max())
  p /= p.sum()
  return [(name_of(int(i)), float(p[i])) for i in np.argsort(-p, kind='stable')[:k]]


def _class_names(source: str):
  """i → the class name in config.json's id2label (Hugging Face), or str(i) (timm, vit_jax)."""
  path = os.path.join(local_path(source), 'config.json')
  labels = {}
  if os.path.isfile(path):
    with open(path) as f:
      config = json.load(f)
    labels = {} if 'architecture' in config else config.get('id2label') or {}
  return lambda i: str(labels.get(str(i), i))


def _title(name: str, predicting: str, top: list[tuple[str, float]], sep: str = ', ') -> str:
  """'NAME, top 5 classes: cat 0.61, dog 0.20, …' (each prediction after `sep`)."""
  if not top:
    return name
  return f'{name}, top {len(top)} {predicting}:{sep[-1]}' + sep.join(f'{label} {p:.2f}'
                                                                      for label, p in top)


def _write(seen: Seen, out: str, source: str, max_tokens: int) -> list[str]:
  """Computes and writes the files into `out`; returns their names."""
  written = []

  def save(name, fig):
    written.append(name)
    save_figure(fig, os.path.join(out, name))

  layers = seen.layers
  labels = [layer.path.label for layer in layers]
  titles = [_title(name, seen.predicting, top) for name, top in zip(seen.names, seen.predictions)]
  if seen.images is not None:
    maps = np.stack([output_token_maps(layer, seen.cls_pooled) for layer in layers],
                    1)  # [N, L, H, rows, cols]
    query = '[CLS]' if seen.cls_pooled else 'the mean patch'
    for i, (image, title) in enumerate(zip(seen.images, titles)):
      save(f'attention_image{i}.png', figures.patch_attention(maps[i], labels, image, title,
                                                              query))
    lines = [_title(name, seen.predicting, top, '\n')  # a line per class under the image
             for name, top in zip(seen.names, seen.predictions)]
    save('rollout.png', figures.rollout(seen.images, rollout_maps(layers, seen.cls_pooled),
                                        lines))
  else:
    save('attention_text.png', figures.attention_grid(layers, 0, titles[0], max_tokens))
  stats = {layer.path: head_statistics(layer) for layer in layers}
  several = len(seen.names) > 1
  if not several:  # one input has no variance across inputs: the split would say 0 content.
    stats = {path: {k: v for k, v in s.items() if k not in SPLIT} for path, s in stats.items()}
  save('head_statistics.png', figures.head_statistics(stats, layers[0].query.unit_name))
  save('offset_profiles.png', figures.offset_profiles(stats))
  if several:
    save('position_content.png', figures.position_content(stats))
  record = {'pretrained': source, 'inputs': seen.names, 'predicting': seen.predicting,
            'predictions': seen.predictions,
            'tokens': seen.tokens, 'layers': stats}
  written.append('inspection.json')
  with open(os.path.join(out, written[-1]), 'w') as f:
    json.dump(record, f, indent=1, default=lambda array: np.asarray(array).tolist())
  return written
