"""Image decoding and augmentation, one example at a time on the host (in grain's workers).

Pixels come out as float32 [size, size, 3] in [0, 1], as every tx image dataset's do; a
pretrained checkpoint's normalisation is folded into its patch embedding (experiments/init_from).
Randomness comes from a NumPy Generator seeded by (seed, step, row of the global batch), so an
example's augmentation depends on neither the worker nor the number of hosts.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

CROPS = ('inception', 'shift', 'none')


class CorruptImage(ValueError):
  """An example whose image cannot be decoded: `name` says where it came from."""

  def __init__(self, name: str, reason: str):
    self.name, self.reason = name, reason
    super().__init__(f'{name}: not a readable image ({reason}); set '
                     '--config.data.skip_corrupt=True to skip such files')

  def __reduce__(self):  # raised in a grain worker process, re-raised in the trainer.
    return type(self), (self.name, self.reason)


def decode(data, name: str, draft: int = 0) -> Image.Image:
  """An RGB PIL image from encoded bytes (JPEG, PNG, ...) or a uint8 array [H, W] / [H, W, C].
  draft > 0 lets a JPEG decode at a reduced scale whose shorter side is still >= draft."""
  try:
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
      image = Image.open(io.BytesIO(data))
      if draft:
        image.draft('RGB', (draft, draft))
      image.load()
    return image.convert('RGB')
  except Image.UnidentifiedImageError:
    raise CorruptImage(name, 'PIL knows no image format of these bytes') from None
  except Exception as e:  # noqa: BLE001 (PIL raises many kinds for damaged files)
    raise CorruptImage(name, f'{type(e).__name__}: {e}'.replace('\n', ' ')) from None


def inception_box(width: int, height: int, rng: np.random.Generator, min_scale: float,
                  ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """The crop of Szegedy et al. (2015) as torchvision's RandomResizedCrop draws it: area
  s·W·H with s ~ U[min_scale, 1] and aspect r with log r ~ U[log 3/4, log 4/3]; the first of
  10 draws that fits, else the centre crop of the largest box within the ratio range.
  Returns (left, top, right, bottom)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def centre_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
  """The centred square whose side is crop_fraction of the shorter side: resizing it to S is
  "resize the shorter side to S / crop_fraction, then centre-crop S" (0.875: 256 → 224)."""
  side = min(width, height) * crop_fraction
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def to_array(image: Image.Image) -> np.ndarray:
  return np.asarray(image, np.float32) / 255.0


def train_image(data, name: str, rng: np.random.Generator, size: int, crop: str = 'inception',
                min_scale: float = 0.08, shift: int = 0, flip: bool = True) -> np.ndarray:
  """A training view: crop='inception' resizes an inception crop to size×size (bilinear);
  'shift' resizes the whole image to size×size and translates it by up to `shift` pixels
  (zero fill: pad-and-crop); 'none' only resizes. Then a horizontal flip with p = 1/2."""
  image = decode(data, name)
  if crop == 'inception':
    box = inception_box(*image.size, rng, min_scale)
    image = image.resize((size, size), Image.BILINEAR, box=box)
  elif image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  x = to_array(image)
  if crop == 'shift' and shift:
    dy, dx = rng.integers(0, 2 * shift + 1, 2)
    x = np.pad(x, ((shift, shift), (shift, shift), (0, 0)))[dy:dy + size, dx:dx + size]
  if flip and rng.random() < 0.5:
    x = x[:, ::-1]
  return np.ascontiguousarray(x)


def eval_image(data, name: str, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """The evaluation view: the centred square of `crop_fraction` of the shorter side, resized
  to size×size (bilinear). JPEGs are decoded at the smallest power-of-2 scale still larger."""
  image = decode(data, name, draft=math.ceil(size / crop_fraction))
  box = centre_box(*image.size, crop_fraction)
  return to_array(image.resize((size, size), Image.BILINEAR, box=box))


def mixup(batch: dict, rng: np.random.Generator, alpha: float) -> dict:
  """Mixup (Zhang et al., 2018) within the batch: λ ~ Beta(α, α), x ← λ·x + (1 − λ)·x',
  where x' is the batch rolled by one; the loss mixes the targets with the same λ
  (batch['mix'] = λ per example, batch['mix_targets'] the rolled targets)."""
  lam = np.float32(rng.beta(alpha, alpha))
  inputs = batch['inputs']
  return batch | {'inputs': lam * inputs + (1 - lam) * np.roll(inputs, 1, axis=0),
                  'mix_targets': np.roll(batch['targets'], 1, axis=0),
                  'mix': np.full(len(inputs), lam, np.float32)}
