"""Command-line error reporting shared by the entry points: one line, exit code 2 (130 after
Ctrl-C)."""

from __future__ import annotations

import functools
import os
import sys
import traceback

from absl import flags, logging


def fail(message: str):
  """One line on stderr, exit code 2."""
  print('error: ' + ' '.join(line.strip() for line in message.splitlines() if line.strip()),
        file=sys.stderr)
  sys.exit(2)


def describe(e: BaseException) -> str:
  """The actionable part of an error, for one line."""
  text = str(e).replace('\\n', '\n').replace("\\'", "'")
  if len(text) > 1 and text[0] == text[-1] == "'":  # a quoted KeyError/AttributeError message.
    text = text[1:-1]
  if 'Traceback' in text:  # config_flags wraps get_config's error: keep its last line.
    return [line for line in text.splitlines() if line.strip()][-1]
  if isinstance(e, (ValueError, flags.Error)):  # ours and absl's name the field already.
    return text
  return f'{type(e).__name__}: {text}'


def fail_unless_verbose(e: BaseException, verbose: bool):
  """The traceback with --verbose, then the one-line error and exit code 2. A run stopped by a
  signal after saving (experiments.preemption.Preempted) says so and exits 128 + signal."""
  if hasattr(e, 'exit_code'):
    print(str(e), flush=True)
    sys.exit(e.exit_code)
  if verbose:
    traceback.print_exc()
  fail(describe(e))


def parse_flags(argv):
  """absl flag parsing with one-line errors and exit code 2 (a bad flag or config override)."""
  check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # a bad flag, a bad :key=value in get_config, a misspelt --config.key
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections names only the missing key.
      unknown = unknown_override(_config_file(argv), argv)
      _, did_you_mean, hint = describe(e).partition('Did you mean')
      e = ValueError(unknown + (f' ({did_you_mean}{hint})' if hint else '')) if unknown else e
    fail_unless_verbose(e, '--verbose' in argv)


def _config_file(argv):
  """The --config file's ConfigDict, loaded again; None where it does not load."""
  paths = [arg.partition('=')[2] for arg in argv if arg.startswith('--config=')]
  try:
    return flags.FLAGS['config'].parser.parse(paths[-1])
  except Exception:  # noqa: BLE001 (then the original error is the one to show)
    return None


def unknown_override(config, argv) -> str | None:
  """'config.a.b=V; unknown field; allowed in config.a: ...' for the first --config.a.b=V
  override in `argv` naming a field that `config` does not have."""
  overrides = [arg[len('--config.'):].partition('=') for arg in argv
               if arg.startswith('--config.') and config is not None]
  for path, _, value in overrides:
    node, keys = config, path.split('.')
    for i, key in enumerate(keys):
      if not hasattr(node, 'keys') or key not in node:
        section = '.'.join(['config', *keys[:i]])
        allowed = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none'
        return f'config.{path}={value!r}; unknown field; allowed in {section}: {allowed}'
      node = node[key]
  return None


def define_run_reader_flags(workdir_help: str):
  """--workdir, --step and --verbose, shared by the commands that read a trained run."""
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks on errors.')


def start_run_reader(argv, usage: str):
  """Stray arguments or no --workdir: one line, exit code 2. Quiets absl (orbax) logging."""
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use {usage}')
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    fail(f'--workdir is required; use {usage}')


INTERRUPTED = 130  # 128 + SIGINT: the exit code a shell reports for a command stopped by Ctrl-C.


def exit_on_interrupt(main, outcome='nothing was written'):
  """`main` for absl's app.run, where Ctrl-C (KeyboardInterrupt) ends the command with one line
  on stderr, 'interrupted (Ctrl-C): <outcome>', and exit code 130, instead of a traceback.
  `outcome` (a string, or a function returning one when Ctrl-C comes) says what was kept."""

  @functools.wraps(main)
  def interruptible(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      print(f'interrupted (Ctrl-C): {outcome() if callable(outcome) else outcome}',
            file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED)

  return interruptible


def check_config_file(argv, flag_values=flags.FLAGS):
  """A --config=PATH[:arg] whose PATH is not a file, for a command with a --config flag: one
  line, exit code 2. (ml_collections defers that error to the config's first use.)"""
  if 'config' not in flag_values:
    return
  specs = [arg.partition('=')[2] for arg in argv if arg.startswith('--config=')]
  specs += [value for arg, value in zip(argv, argv[1:]) if arg == '--config']
  for path in (spec.partition(':')[0] for spec in specs):
    if not os.path.isfile(path):
      fail(f'--config={path}: no such file')
