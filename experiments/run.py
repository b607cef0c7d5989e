"""Train and evaluate a tx model from an ml_collections config.

  python -m experiments.run --config=configs/vit.py [--workdir=DIR] [--config.KEY=VALUE ...]

The workdir (default: a new runs/<config>-<time>/) receives config.json, metrics.jsonl,
checkpoints/, summary.json and learning_curves.png; it is locked while the run writes it.
Rerunning with a workdir that holds a checkpoint resumes from it, with the config it was
trained with (a change is refused unless --allow_config_change names it; docs/reliability.md). SIGTERM or SIGINT (Ctrl-C) saves the current step and exits with
128 + the signal number (143, 130).
"""

from __future__ import annotations

import contextlib
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import library_log
from experiments import workdir as workdir_lib
from experiments.cli import exit_on_interrupt, fail, fail_unless_verbose, parse_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config(arg) file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default: a new one under runs/.')
_ALLOW = flags.DEFINE_list('allow_config_change', [], 'Config fields (or sections) a resume may '
                           'change from the config the workdir was trained with, e.g. '
                           'total_steps,optimizer.lr; the change is recorded in the workdir.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks, and library messages '
                             '(orbax, absl) on the console instead of WORKDIR/library.log.')


def default_workdir(config_path: str) -> str:
  """A new runs/<config>-<time>[-N] directory, created atomically so runs never share one."""
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  base = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs('runs', exist_ok=True)
  for n in range(1, 1000):
    path = base if n == 1 else f'{base}-{n}'
    with contextlib.suppress(FileExistsError):
      os.mkdir(path)
      return path
  raise ValueError(f'could not create a new workdir next to {base}; pass --workdir')


def init_distributed(config):
  """jax.distributed.initialize() for multi-host runs: with config.distributed, or when
  JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID where no
  cluster auto-detection applies). CPU processes talk through gloo."""
  env = os.environ
  if not (config.distributed or env.get('JAX_COORDINATOR_ADDRESS')):
    return
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {name: int(env[var]) for name, var in (('num_processes', 'JAX_NUM_PROCESSES'),
                                                  ('process_id', 'JAX_PROCESS_ID')) if var in env}
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use --config=... and --config.KEY=VALUE')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  if _CONFIG.value is None:
    fail('--config is required, e.g. --config=configs/vit.py')
  try:
    config = _CONFIG.value
    init_distributed(config)
    import jax
    from experiments.config_check import check_config
    # Before the workdir exists: a bad config leaves nothing on disk.
    check_config(config, _WORKDIR.value)
    workdir_lib.check_allow_flag(_ALLOW.value, config)
    if jax.process_count() > 1 and not _WORKDIR.value:
      raise ValueError('--workdir is required with several processes (they must share one)')
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].serialize().split('=', 1)[1])
    print(f'workdir: {workdir}', flush=True)
    if not _VERBOSE.value:
      library_log.route_to(workdir_lib.library_log(workdir, jax.process_index()))
    from experiments.train import train_and_evaluate
    summary, _ = train_and_evaluate(config, workdir, allow_config_change=_ALLOW.value)
  except Exception as e:  # one line unless --verbose; a signal: saved, exit 128 + signal.
    fail_unless_verbose(e, _VERBOSE.value)
  print('summary: ' + ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                                for k, v in summary.items() if not isinstance(v, dict)) +
        f' (all of it in {workdir}/summary.json)', flush=True)


if __name__ == '__main__':
  app.run(exit_on_interrupt(main, 'the checkpoints saved so far are kept; the same command '
                                  'resumes'), flags_parser=parse_flags)
