"""Input pipeline throughput: images per second of tx's image pipeline on this host's CPUs, and
the number of grain workers a training step rate needs.

The images: `count` JPEGs (quality 90) of width×height pixels, ImageNet's typical 500×375 (toy
sizes in --tiny), written to a temporary ImageNet-layout folder: train/<2 classes>/*.jpg, and
the same files under val/. Each is a synthetic photo: smooth colour gradients and
low-frequency waves, a dozen filled ellipses (sharp edges) and Gaussian noise of σ = 20 grey
levels (grain and texture), which makes a JPEG of about 100 KB at 500×375, near ImageNet's
mean of ~110 KB (its 138 GB training archive over 1.28 M images) and so about a photo's
decode time; pure noise compresses far worse than a photo and decodes slower. The images are
re-read: the files are few, and the OS keeps them in memory, so the disk is not measured.

Measured, each as images/s:
  train view  dataset.train_batch(config, step) in this process: decode, inception crop
              resized to size×size (bilinear), random flip; what one worker does per batch
  eval view   dataset.eval_batch(batch, index): decode with PIL's draft mode (a JPEG is
              decoded at 1/2, 1/4 or 1/8 scale when that still covers size ÷ eval_crop),
              centre crop, resize
  pipeline    pipeline.train_feed with W worker processes (grain's mp_prefetch), batches
              taken as fast as they come, as by a trainer waiting on its data: the images of
              `batches` batches ÷ their wall time, counted from the batch after the first
              2W + 2 (the workers' start-up, seconds of imports, is not counted)
The train and eval views are batch ÷ the median time of `repeats` batches after one warm-up
batch.

Workers needed for a target rate R images/s: ⌈R ÷ r⌉, r the train view's images/s (one
process, one core; a worker reads with one thread). The pipeline rows show what W workers
deliver here against W·r.

Targets: every ViT row of the train section of the same run (its examples/s on this host; on
a CPU host these are small-image ViTs, so the count says what feeding that step rate with
ImageNet-sized JPEGs would take), and tx's ViT-B/16 train step on one H100: bfloat16, batch
128, 61.6 ms a step (docs/performance.md, GPU section), 2,078 images/s.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from configs import common
from experiments.bench import timing
from experiments.data import image_dataset, pipeline

QUALITY = 90
NOISE = 20.0  # grey levels: sets the JPEG's size to about a photo's (see the docstring)
CLASSES = ('a', 'b')
# tx's bf16 ViT-B/16 train step on one H100 at batch 128 (docs/performance.md, GPU section).
H100_VIT_B16 = {'label': 'ViT-B/16 on one H100 (docs/performance.md)',
                'images_per_s': round(128 / 61.6e-3, 1)}


def picture(rng: np.random.Generator, width: int, height: int, noise: float = NOISE,
            shapes: int = 12) -> np.ndarray:
  """A photo-like uint8 [height, width, 3] image: per channel a level, a linear gradient and
  four waves of 1-8 periods across the image, then `shapes` filled ellipses of random colours,
  then Gaussian noise of σ = `noise`."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32) / np.float32(max(width, height))
  smooth = np.empty((height, width, 3), np.float32)
  for c in range(3):
    freq, phase = rng.uniform(1, 8, (4, 2)), rng.uniform(0, 2 * np.pi, 4)
    amp = rng.uniform(10, 30, 4)
    smooth[..., c] = (rng.uniform(60, 190) + rng.uniform(-60, 60) * x + rng.uniform(-60, 60) * y
                      + sum(amp[k] * np.sin(2 * np.pi * (freq[k, 0] * x + freq[k, 1] * y)
                                            + phase[k]) for k in range(4)))
  image = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(shapes):
    left, right = sorted(int(v) for v in rng.integers(0, width, 2))
    top, bottom = sorted(int(v) for v in rng.integers(0, height, 2))
    draw.ellipse((left, top, right, bottom), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  noisy = np.asarray(image, np.float32) + rng.normal(0, noise, (height, width, 3))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def write_folder(root: str, count: int, width: int, height: int, seed: int = 0) -> dict:
  """root/train/<class>/NNN.jpg for `count` pictures alternating between the two classes, and
  the same files under root/val/ (the loader needs an evaluation split). Returns the format,
  size, count and mean file size."""
  sizes = []
  for i in range(count):
    name = os.path.join(CLASSES[i % len(CLASSES)], f'{i:03d}.jpg')
    path = os.path.join(root, 'train', name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(picture(np.random.default_rng([seed, i]), width, height)).save(
        path, 'JPEG', quality=QUALITY)
    os.makedirs(os.path.dirname(os.path.join(root, 'val', name)), exist_ok=True)
    shutil.copyfile(path, os.path.join(root, 'val', name))
    sizes.append(os.path.getsize(path))
  return {'format': 'JPEG', 'quality': QUALITY, 'width': width, 'height': height,
          'count': count, 'mean_bytes': round(float(np.mean(sizes)))}


def workers_needed(target_images_per_s: float, per_worker_images_per_s: float) -> int:
  """⌈target ÷ per-worker rate⌉: the workers that together make at least the target rate."""
  return math.ceil(target_images_per_s / per_worker_images_per_s)


def targets(train_rows) -> list[dict]:
  """The step rates to feed: the train section's ViT rows (model names 'vit…', specs.py),
  then the H100 reference."""
  rows = [{'label': f'{r["model"]} {r["dtype"]} (train section)',
           'images_per_s': r['examples_per_s']}
          for r in train_rows or [] if r['model'].startswith('vit')]
  return rows + [dict(H100_VIT_B16)]


def _view_rate(make_batch, batch: int, repeats: int) -> dict:
  """{'images_per_s': batch ÷ median, 'median_s', 'times_s'} of make_batch(k) for k = 1 …
  repeats, after make_batch(0) as a warm-up (first reads of the files, lazy imports)."""
  k = itertools.count()
  r = timing.measure(lambda: make_batch(next(k)), repeats=repeats)
  return {'images_per_s': batch / r['median_s'], 'median_s': r['median_s'],
          'times_s': r['times_s']}


def _pipeline_rate(dataset, config, workers: int, batches: int) -> dict:
  """Images/s of train_feed with `workers` processes over `batches` batches, timed from the
  arrival of batch 2W + 1 (see the module docstring); 'start_s' is the wait for the first
  batch (the workers' start-up). The steps run on far past the timed ones, so that the
  workers are still making batches when the last timed one arrives (at the end of a range
  they would hand over, quickly, the batches made ahead of the reader)."""
  skip = 2 * workers + 2
  start = time.perf_counter()
  arrived = []
  with pipeline.train_feed(dataset, [config], 0, 10**9, workers=workers) as feed:
    for _ in feed:
      arrived.append(time.perf_counter() - start)
      if len(arrived) == skip + batches:
        break
  wall = arrived[-1] - arrived[skip - 1]
  return {'workers': workers, 'images_per_s': batches * config.batch_size / wall,
          'batches': batches, 'wall_s': wall, 'start_s': arrived[0]}


def bench(*, count: int, width: int, height: int, size: int, batch: int, repeats: int,
          batches: int, workers=(1, 2), train_rows=(), log=print) -> dict:
  """Writes the images to a temporary folder, measures the train view, the eval view and the
  pipeline with each number of `workers`, and the workers each target needs (docstring)."""
  root = tempfile.mkdtemp(prefix='tx-bench-data-')
  try:
    image = write_folder(root, count, width, height)
    dataset = image_dataset.image_folder(dir=root, image_size=size)
    config = common.training(batch_size=batch, seed=0,
                             data=common.image_data('folder', dir=root, image_size=size))
    train = _view_rate(lambda k: dataset.train_batch(config, k), batch, repeats)
    evals = -(-count // batch)
    evaluation = _view_rate(lambda k: dataset.eval_batch(batch, k % evals), batch, repeats)
    log(f'data {width}×{height} JPEG → {size}: train view {train["images_per_s"]:.0f} images/s, '
        f'eval view {evaluation["images_per_s"]:.0f} images/s (one process)')
    fed = []
    for w in workers:
      fed.append(_pipeline_rate(dataset, config, w, batches))
      log(f'data pipeline, {w} worker{"s" if w > 1 else ""}: '
          f'{fed[-1]["images_per_s"]:.0f} images/s (first batch after {fed[-1]["start_s"]:.1f} s)')
  finally:
    shutil.rmtree(root, ignore_errors=True)
  per_worker = train['images_per_s']
  needed = [dict(t, workers_needed=workers_needed(t['images_per_s'], per_worker))
            for t in targets(train_rows)]
  for t in needed:
    log(f'data: {t["label"]} at {t["images_per_s"]:.0f} images/s needs '
        f'{t["workers_needed"]} worker{"s" if t["workers_needed"] > 1 else ""}')
  return {'image': image, 'size': size, 'batch': batch, 'cpu_count': os.cpu_count(),
          'train_view': train, 'eval_view': evaluation, 'pipeline': fed,
          'per_worker_images_per_s': per_worker, 'targets': needed}
