"""Look inside a trained run or a pretrained checkpoint: attention maps, ViT rollout, head
statistics, and how much of each head's attention position explains (the files: inspection.py
and pretrained.py; on real runs and checkpoints: docs/inspect.md).

  python -m experiments.inspect --workdir=RUN [--examples=N] [--out=DIR] [--step=S]
  python -m experiments.inspect --pretrained=SOURCE --image=PATH[,PATH...] [--out=DIR]
  python -m experiments.inspect --pretrained=SOURCE --text="..." [--out=DIR]
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments.cli import (define_run_reader_flags, exit_on_interrupt, fail,
                             fail_unless_verbose, parse_flags, start_run_reader)
from experiments.inspect import pretrained
from experiments.inspect.inspection import inspect_run, output_dir

USAGE = ('--workdir=RUN [--examples=N] [--out=DIR], or --pretrained=SOURCE --image=PATH or '
         '--text="..." [--out=DIR]')


def define_flags():
  """The command's flags; defined only when run as a program."""
  define_run_reader_flags('A run directory written by experiments.run.')
  flags.DEFINE_integer('examples', 4, 'Test examples to draw attention maps of (at most the '
                       'test set).')
  flags.DEFINE_integer('stat_examples', 256, 'Test examples the head statistics average over.')
  flags.DEFINE_string('out', None, 'Output directory; default: WORKDIR/inspect, or '
                      'runs/inspect-NAME for --pretrained.')
  flags.DEFINE_integer('max_tokens', 32, 'Tokens shown per heatmap axis of causal layers (the '
                       'first ones, which never attend past themselves); other layers show all.')
  flags.DEFINE_string('pretrained', None, 'A pretrained checkpoint instead of a run: a '
                      'directory, file or Hub id that tx.pretrained.load reads (HF ViT, GPT-2, '
                      'BERT, timm ViT, vit_jax .npz).')
  flags.DEFINE_string('image', None, 'With --pretrained (ViT): images to draw the attention on, '
                      'comma-separated paths of any format PIL reads.')
  flags.DEFINE_string('text', None, 'With --pretrained (GPT-2, BERT): a text, split by the '
                      "checkpoint's tokenizer.json.")


def main(argv):
  f = flags.FLAGS
  run_flags = {name: f[name].value for name in pretrained.RUN_FLAGS if f[name].present}
  try:
    pretrained.check_flags(f.workdir, f.pretrained, f.image, f.text, run_flags)
  except ValueError as e:
    fail_unless_verbose(e, f.verbose)
  if f.pretrained:
    if len(argv) > 1:
      fail(f'unexpected arguments {argv[1:]}; use {USAGE}')
    logging.set_verbosity(logging.WARNING)
  else:
    start_run_reader(argv, USAGE)
  try:
    if f.pretrained:
      paths = pretrained.inspect_pretrained(f.pretrained, f.image, f.text, f.out, f.max_tokens)
    else:
      paths = inspect_run(f.workdir, f.out, f.examples, f.stat_examples, f.step, f.max_tokens)
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  print(f'wrote {len(paths)} files to {os.path.dirname(paths[-1])}: '
        + ', '.join(os.path.basename(p) for p in paths), flush=True)


def interrupted() -> str:
  """What a Ctrl-C left: inspect writes its folder only once complete."""
  f = flags.FLAGS
  if f.pretrained:
    out = pretrained.output_dir(f.pretrained, f.out)
  elif f.workdir:
    out = output_dir(f.workdir, f.out)
  else:
    return 'nothing was written'
  return (f'{out} keeps its earlier output; nothing new was written' if os.path.isdir(out)
          else f'nothing was written to {out}')


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main, interrupted), flags_parser=parse_flags)
