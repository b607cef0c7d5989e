"""Run a grid of `experiments.run` trainings and summarise them as tables and plots
(experiments/sweep/grid.py; docs/sweeps.md).

  python -m experiments.sweep --config=configs/ablations/NAME.py[:ARG] [--workdir=DIR] [--vectorize]
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments.cli import exit_on_interrupt, fail_unless_verbose, parse_flags
from experiments.sweep.grid import run_sweep

_CONFIG = flags.DEFINE_string('config', None, 'An ablation config file[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; default runs/sweep-<name>[-arg].')
flags.DEFINE_alias('sweepdir', 'workdir')  # the older spelling
_VECTORIZE = flags.DEFINE_bool('vectorize', False, 'Train runs that differ only in seed and '
                                'model.beta_scale together, as one vmapped program.')
_ALLOW = flags.DEFINE_list('allow_config_change', [], 'Config fields (or sections) the resumed '
                           'runs may change from the configs they were trained with.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks, and library messages '
                             '(orbax, absl) on the console instead of SWEEPDIR/library.log.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if not _CONFIG.value:
      raise ValueError('--config is required, e.g. --config=configs/ablations/posemb_vit.py:quick')
    run_sweep(_CONFIG.value, _WORKDIR.value, _VECTORIZE.value, _ALLOW.value,
              library_log=not _VERBOSE.value)
  except Exception as e:  # one line unless --verbose; a signal: saved, exit 128 + signal.
    fail_unless_verbose(e, _VERBOSE.value)


if __name__ == '__main__':
  app.run(exit_on_interrupt(main, 'every run and file finished so far is kept; the same command '
                                  'resumes'), flags_parser=parse_flags)
