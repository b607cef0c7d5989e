"""Where inspect writes: a folder it replaces as a whole, written beside it first and renamed
into place only once complete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil

# The files inspect writes (for a run or a pretrained checkpoint): a folder holding only these
# is an earlier output it may replace.
OUTPUT_FILES = re.compile(r'attention_(example|image)\d+\.png|attention_text\.png|'
                          r'(rollout|cross_attention|head_statistics|position_content|'
                          r'offset_profiles)\.png|inspection\.json')


def check_replaceable(out: str):
  """ValueError unless `out` is absent, empty, or an earlier output of inspect (which the new
  one replaces as a whole)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out} is a file; give a folder')
  others = sorted(name for name in (os.listdir(out) if os.path.isdir(out) else ())
                  if not OUTPUT_FILES.fullmatch(name))
  if others:
    raise ValueError(f'{out} holds {others[0]!r}, which inspect does not write; inspect replaces '
                     'its output folder as a whole: give --out a new folder')


@contextlib.contextmanager
def staged(out: str):
  """Yields a new folder beside `out` to write into. It is renamed to `out` when the block
  completes (an earlier `out` is removed only then), and removed when the block raises or
  Ctrl-C stops it."""
  parent, name = os.path.split(os.path.abspath(out))
  staging = os.path.join(parent, f'.{name}.partial-{os.getpid()}')
  old = os.path.join(parent, f'.{name}.old-{os.getpid()}')
  os.makedirs(parent, exist_ok=True)
  for left in (staging, old):  # left by a killed earlier process with this pid.
    shutil.rmtree(left, ignore_errors=True)
  os.mkdir(staging)
  try:
    yield staging
    if os.path.isdir(out):
      os.replace(out, old)
    os.replace(staging, out)
  except BaseException:
    if os.path.isdir(old) and not os.path.exists(out):  # stopped between the two renames.
      os.replace(old, out)
    shutil.rmtree(staging, ignore_errors=True)
    raise
  shutil.rmtree(old, ignore_errors=True)
