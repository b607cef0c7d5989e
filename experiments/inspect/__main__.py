"""Look inside a trained run: attention maps, ViT rollout, head statistics, and how much of
each head's attention position explains (the files: inspection.py; on real runs: docs/inspect.md).

  python -m experiments.inspect --workdir=RUN [--examples=N] [--out=DIR] [--step=S]
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments.cli import (define_run_reader_flags, exit_on_interrupt, fail_unless_verbose,
                             parse_flags, start_run_reader)
from experiments.inspect.inspection import inspect_run, output_dir


def define_flags():
  """The command's flags; defined only when run as a program."""
  define_run_reader_flags('A run directory written by experiments.run.')
  flags.DEFINE_integer('examples', 4, 'Test examples to draw attention maps of (at most the '
                       'test set).')
  flags.DEFINE_integer('stat_examples', 256, 'Test examples the head statistics average over.')
  flags.DEFINE_string('out', None, 'Output directory; default: WORKDIR/inspect.')
  flags.DEFINE_integer('max_tokens', 32, 'Tokens shown per heatmap axis of causal layers (the '
                       'first ones, which never attend past themselves); other layers show all.')


def main(argv):
  f = flags.FLAGS
  start_run_reader(argv, '--workdir=RUN [--examples=N] [--out=DIR]')
  try:
    paths = inspect_run(f.workdir, f.out, f.examples, f.stat_examples, f.step, f.max_tokens)
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  print(f'wrote {len(paths)} files to {os.path.dirname(paths[-1])}: '
        + ', '.join(os.path.basename(p) for p in paths), flush=True)


def interrupted() -> str:
  """What a Ctrl-C left: inspect writes its folder only once complete."""
  if not flags.FLAGS.workdir:
    return 'nothing was written'
  out = output_dir(flags.FLAGS.workdir, flags.FLAGS.out)
  return (f'{out} keeps its earlier output; nothing new was written' if os.path.isdir(out)
          else f'nothing was written to {out}')


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main, interrupted), flags_parser=parse_flags)
