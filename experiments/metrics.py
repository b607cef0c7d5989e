"""What a run writes and shows: JSON-lines metrics, a progress line, a learning-curve PNG.

Only process 0 writes files; every process may print.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax


def is_writer() -> bool:
  return jax.process_index() == 0


def replace_atomically(path: str, write):
  """Calls write(temporary path), then renames that file to `path`: whatever happens (a kill,
  a full disk), `path` is the old file or the complete new one, never part of it. The
  temporary file, .<name>.<pid>.tmp, is beside `path` (a rename within one file system is
  atomic) and named for this process (two writers never share one). If the write raises, the
  temporary file is removed and the error raised again."""
  head, tail = os.path.split(path)
  temporary = os.path.join(head, f'.{tail}.{os.getpid()}.tmp')
  try:
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def write_atomically(path: str, text: str):
  """Writes `text` (UTF-8, newlines as given) to `path` through `replace_atomically`."""
  def write(temporary):
    with open(temporary, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
  replace_atomically(path, write)


def _jsonable(v):
  """A Python scalar for JSON; inf and nan as the strings 'inf' and 'nan'."""
  v = v.item() if hasattr(v, 'item') else v
  return str(v) if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter:
  """Appends {'step': s, 'split': 'train'|'eval', name: value, ...} records to metrics.jsonl;
  with tensorboard=True, also TensorBoard event files (through tensorboardX: no TensorFlow)."""

  def __init__(self, workdir: str, tensorboard: bool = False, drop_after: int | None = None):
    """drop_after: on resume, forget records after this step (they will be written again)."""
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if drop_after is not None and is_writer() and os.path.exists(self.path):
      kept = [r for r in read_metrics(workdir) if r['step'] <= drop_after]
      write_atomically(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
    self.tb = None
    if tensorboard and is_writer():
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise ValueError('config.tensorboard=True needs tensorboardX: pip install tensorboardX') from None
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict):
    if not is_writer():
      return
    record = {'step': int(step), 'split': split, **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for k in metrics:
        if isinstance(record[k], (int, float)):
          self.tb.add_scalar(f'{split}/{k}', record[k], int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a last line cut short by a killed process is left out."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in filter(str.strip, f):  # blank lines left out.
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith('\n'):  # not the last, cut line: a damaged file, said plainly.
          raise ValueError(f'{path} has a line that is not JSON: {line[:80]!r}') from None
  return records


class Progress:
  """A one-line progress report: step, loss, lr, steps/s, examples/s and ETA."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int = 0):
    self.total, self.batch_size, self.s0, self.t0 = total_steps, batch_size, first_step, time.time()

  def show(self, step: int, metrics: dict):
    rate = (step - self.s0) / max(time.time() - self.t0, 1e-9)
    eta = '--:--:--'
    if rate > 0:
      eta = time.strftime('%H:%M:%S', time.gmtime((self.total - step) / rate))
    print(f'step {step:>{len(str(self.total))}}/{self.total} '
          f'[{100 * step / self.total:5.1f}%]  loss {metrics["loss"]:.4f}  '
          f'lr {metrics["learning_rate"]:.2e}  {rate:.2f} steps/s  '
          f'{rate * self.batch_size:.0f} ex/s  ETA {eta}', flush=True)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (PNG files, no display)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str, dpi: int = 100):
  """Lays out `fig`, writes it as a PNG through `replace_atomically`, and closes it."""
  fig.tight_layout()
  try:
    replace_atomically(path, lambda temporary: fig.savefig(temporary, dpi=dpi, format='png'))
  finally:
    pyplot().close(fig)


def plot_learning_curves(workdir: str) -> str | None:
  """learning_curves.png: train loss and eval loss against step, and eval metrics beside them."""
  if not is_writer():
    return None
  records = read_metrics(workdir)
  train = [r for r in records if r['split'] == 'train']
  evals = [r for r in records if r['split'] == 'eval']
  if not train:
    return None
  others = sorted({k for r in evals for k in r if k not in ('step', 'split', 'loss')
                   and isinstance(r[k], (int, float))})
  fig, axes = pyplot().subplots(1, 1 + bool(others), figsize=(11 if others else 6, 4))
  axes = list(axes) if others else [axes]
  axes[0].plot([r['step'] for r in train], [r['loss'] for r in train], label='train')
  eval_loss = [(r['step'], r['loss']) for r in evals if 'loss' in r]  # evaluators may not give one
  if eval_loss:
    axes[0].plot(*zip(*eval_loss), 'o-', label='eval')
  axes[0].set(xlabel='step', ylabel='loss', yscale='log', title='loss')
  axes[0].legend()
  for k in others:
    axes[1].plot([r['step'] for r in evals], [r.get(k) for r in evals], 'o-', label=k)
  if others:
    axes[1].set(xlabel='step', title='eval')
    axes[1].legend()
  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  path = os.path.join(workdir, 'learning_curves.png')
  save_figure(fig, path)
  return path
