"""A run's workdir: who may write it, and what it was trained with.

- lock.json: one process writes a workdir at a time. The lock is taken before anything else
  is written and removed at exit (also after SIGTERM/SIGINT). A lock whose process is gone
  (same host, pid no longer running or reused, or the host rebooted) is taken over with a
  warning; one held from another host is refused, naming it. With several processes of one
  run, process 0 holds it and the others wait for its answer.
- config.json: the config the run started with, written when it starts from no checkpoint
  and never replaced. A resume compares its config field by field with it (plus the changes
  recorded since): a difference is refused unless named in `allowed`; an allowed change is
  appended to config_changes.json with the step it took effect at.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time

import ml_collections
import numpy as np

LOCK = 'lock.json'
CONFIG = 'config.json'
CHANGES = 'config_changes.json'
LIBRARY_LOG = 'library.log'  # process i > 0 of a multi-host run: library.<i>.log
# Fields that change how a run is executed or watched, not what it computes: these may differ
# on resume without being allowed (the change is still recorded).
FREE = ('parallel', 'num_devices', 'distributed', 'eval_batch_size', 'log_every',
        'checkpoint_every', 'keep_checkpoints', 'tensorboard', 'debug_nans',
        'model.implementation', 'model.remat', 'model.remat_policy')
# Config fields that have another name now, as config.json files written earlier spell them.
RENAMED = {('model', 'max_len'): 'num_positions', ('data', 'min_len'): 'min_length',
           ('data', 'max_len'): 'max_length', ('data', 'test_max_len'): 'extrapolate_max_length'}


def library_log(directory: str, process: int = 0) -> str:
  """Where a process's library messages go (experiments.library_log)."""
  return os.path.join(directory, LIBRARY_LOG if not process else f'library.{process}.log')


# --- what a workdir may be -------------------------------------------------------------------

def check_usable(workdir: str):
  """ValueError unless `workdir` is new, empty, or a run directory (it has config.json)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir!r} is a file; give a directory')
  if not os.path.isdir(workdir):
    return
  entries = sorted(name for name in os.listdir(workdir)
                   if name != LOCK and not (name.startswith('library.') and name.endswith('.log')))
  if entries and CONFIG not in entries:
    shown = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
    raise ValueError(f'--workdir={workdir!r} holds {shown} but no {CONFIG}: it is not a run '
                     'directory; use a new or empty one')


# --- the lock --------------------------------------------------------------------------------

HEARTBEAT_S = 60  # the holder touches its lock this often
STALE_S = 15 * 60  # a lock from another host untouched this long is taken over


def _first_line(path: str) -> str | None:
  with contextlib.suppress(OSError):
    with open(path) as f:
      return f.readline().strip()
  return None


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  text = _first_line(f'/proc/{pid}/stat')
  fields = text.rpartition(')')[2].split() if text else []
  return fields[19] if len(fields) > 19 else None


def _me() -> dict:
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'machine_id': _first_line('/etc/machine-id'),
          'boot_id': _first_line('/proc/sys/kernel/random/boot_id'),
          'process_start': _process_start(os.getpid()),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}


def _running(holder: dict, age_s: float) -> bool | None:
  """Whether the lock's holder still runs; None when it cannot be told (another machine whose
  lock was touched within STALE_S)."""
  me = _me()
  if (holder.get('host'), holder.get('machine_id')) != (me['host'], me['machine_id']):
    return None if age_s < STALE_S else False
  if holder.get('boot_id') and holder['boot_id'] != me['boot_id']:
    return False  # the machine rebooted since.
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, under another user.
  start = holder.get('process_start')
  return not start or _process_start(pid) in (None, start)  # or a later process has its pid.


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}  # being written this instant, or damaged: judged by its age.


def _create(path: str, me: dict) -> bool:
  """Creates the lock file with O_EXCL (atomic also on NFS); False if it exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
  except BaseException:
    os.remove(path)  # a full disk, say: no empty lock left behind.
    raise
  return True


def _take_over(path: str, holder: dict) -> bool:
  """Moves the lock judged dead aside; puts it back if another process replaced it meanwhile
  (it took the dead lock over first)."""
  aside = f'{path}.stale-{os.getpid()}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  taken = _read(aside) == holder
  if not taken:
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)
  os.remove(aside)
  return taken


def _acquire(directory: str) -> dict:
  """Takes directory/lock.json; returns what it holds. ValueError naming a live holder."""
  path, me = os.path.join(directory, LOCK), _me()
  for _ in range(5):
    if _create(path, me):
      return me
    holder = _read(path)
    try:
      age_s = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
      continue  # released meanwhile.
    if not holder and age_s < 10:
      time.sleep(0.5)  # another process is writing its lock now.
      continue
    running = _running(holder, age_s) if holder else False
    who = (f'pid {holder.get("pid")} on host {holder.get("host")} (started '
           f'{holder.get("started")})' if holder else 'an unreadable lock')
    if running is False:
      if _take_over(path, holder):
        print(f'warning: {directory} was locked by {who}, which is no longer running; taking '
              'the lock over', file=sys.stderr, flush=True)
      continue
    hint = (f'; if it is gone, delete {path} (or wait: a lock from another host is taken over '
            f'once untouched for {STALE_S // 60} minutes)' if running is None else '')
    raise ValueError(f'{directory} is in use by {who}: wait for it to finish or stop it{hint}')
  raise ValueError(f'{directory}: could not take {path} (other processes keep taking it)')


def _release(directory: str, me: dict, created: bool):
  path = os.path.join(directory, LOCK)
  if _read(path) == me:
    os.remove(path)
  if created:
    with contextlib.suppress(OSError):
      os.rmdir(directory)  # only if it is empty: a run refused before writing anything.


def _heartbeat(paths: list[str], stop: threading.Event):
  """Touches the locks every HEARTBEAT_S, so that another host can tell a live holder."""
  while not stop.wait(HEARTBEAT_S):
    for path in paths:
      with contextlib.suppress(OSError):
        os.utime(path)


@contextlib.contextmanager
def locked(directories):
  """Holds each directory's lock (creating the directory) for the body; process 0 takes them,
  and every process learns whether it could."""
  import jax  # here: the commands import this module before jax is configured.
  error = None
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      try:
        for d in directories:
          created = not os.path.isdir(d)
          os.makedirs(d, exist_ok=True)
          me = _acquire(d)
          stack.callback(_release, d, me, created)
        stop = threading.Event()
        threading.Thread(target=_heartbeat, daemon=True, name='workdir-lock-heartbeat',
                         args=([os.path.join(d, LOCK) for d in directories], stop)).start()
        stack.callback(stop.set)
      except BaseException as e:  # told to the other processes before it is raised.
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not ok and error is None:
        error = ValueError(f'{directories[0]}: process 0 could not lock it (its error says why)')
    if error is not None:
      raise error
    yield


# --- the config it was trained with ----------------------------------------------------------

def flat(values: dict) -> dict:
  """{'a.b': value} of a nested dict of JSON values."""
  from flax import traverse_util
  return traverse_util.flatten_dict(values, sep='.')


def as_json(config) -> dict:
  """The config as config.json holds it."""
  return json.loads(config.to_json())


def recorded(workdir: str, step: int | None = None) -> dict:
  """The config the workdir's run trains with (at `step`; default: now): config.json (older
  field names updated) with the changes of config_changes.json made up to then applied.
  ValueError naming a file that does not read."""
  values = _load_json(os.path.join(workdir, CONFIG), dict)
  for (section, old), new in RENAMED.items():
    if old in values.get(section, {}):
      values[section][new] = values[section].pop(old)
  for change in changes(workdir):
    if step is None or change['step'] <= step:
      for field, (_, new) in change['changed'].items():
        *sections, leaf = field.split('.')
        node = values
        for s in sections:
          node = node.setdefault(s, {})
        node[leaf] = new
  return values


def recorded_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(recorded(workdir, step))


def changes(workdir: str) -> list[dict]:
  """config_changes.json: [{'step': s, 'changed': {field: [old, new]}}, ...], oldest first."""
  path = os.path.join(workdir, CHANGES)
  return _load_json(path, list) if os.path.exists(path) else []


def _load_json(path: str, kind: type):
  """The JSON value of a file tx wrote; a one-line ValueError naming it when it does not read
  or is not a `kind`."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f'{path} does not read: {e.strerror}') from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    why = 'empty file' if not text.strip() else f'{e.msg} at line {e.lineno} column {e.colno}'
    raise ValueError(f'{path} is not JSON ({why}); tx wrote it whole, so it was changed since: '
                     'restore it, or use another workdir') from None
  if not isinstance(value, kind):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not the {kind.__name__} tx '
                     'writes there: restore it, or use another workdir')
  return value


def differences(before: dict, after: dict) -> dict:
  """{field: [before, after]} for every dotted field of both whose value differs. A field in
  one only is not a difference: configs gain fields as tx grows (a run recorded before a
  field existed ran as its default does), and lose ones it no longer reads."""
  a, b = flat(before), flat(after)
  return {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def describe(diff: dict) -> str:
  return ', '.join(f'{k} {json.dumps(old)} -> {json.dumps(new)}' for k, (old, new) in diff.items())


def _refused(diff: dict, allowed) -> dict:
  """The part of `diff` in fields neither FREE nor in `allowed` (fields or whole sections)."""
  covered = lambda k: any(k == a or k.startswith(a + '.') for a in (*FREE, *allowed))
  return {k: v for k, v in diff.items() if not covered(k)}


def check_allowed(diff: dict, allowed, workdir: str):
  """ValueError listing the fields of `diff` that are neither FREE nor in `allowed` (dotted
  fields or whole sections, e.g. 'optimizer')."""
  refused = _refused(diff, allowed)
  if refused:
    raise ValueError(f'{workdir} was trained with another config: {describe(refused)}; '
                     f'resume with --allow_config_change={",".join(refused)} to record the '
                     'change, or use a new --workdir')


def check_allow_flag(allowed, config):
  """ValueError for a name in --allow_config_change that is not a config field or section."""
  fields = flat(as_json(config))
  for a in allowed:
    if not any(k == a or k.startswith(a + '.') for k in fields):
      raise ValueError(f'--allow_config_change={a}: not a config field')


def start_record(workdir: str, config):
  """config.json of a run that starts from no checkpoint (changes recorded before go)."""
  from experiments.metrics import write_atomically
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(workdir, CHANGES))
  write_atomically(os.path.join(workdir, CONFIG), config.to_json(indent=2))


def record_change(workdir: str, step: int, diff: dict):
  """Appends {'step', 'changed'} to config_changes.json (rewritten atomically)."""
  from experiments.metrics import write_atomically
  entry = {'step': step, 'changed': diff, 'time': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  write_atomically(os.path.join(workdir, CHANGES),
                   json.dumps(changes(workdir) + [entry], indent=2))


def finished_summary(workdir: str, config, allowed=()) -> dict | None:
  """The summary of the finished run of `config` in `workdir`, or None if it has not finished
  there (no summary.json; or one that does not parse: a warning, and the run is resumed to
  write it again; or its config differs in `allowed` fields only: the run is resumed with
  the change). ValueError when the workdir holds a run of another config."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  try:
    summary = _load_json(path, dict)
  except ValueError as e:
    print(f'warning: {e}; resuming the run to write it again', file=sys.stderr, flush=True)
    return None
  if not os.path.exists(os.path.join(workdir, CONFIG)):
    raise ValueError(f'{workdir} has a summary.json but no {CONFIG}: it is not a run of this '
                     'sweep; move it away')
  diff = differences(recorded(workdir), as_json(config))
  refused = _refused(diff, allowed)
  if refused:
    raise ValueError(f'{workdir} holds a finished run of another config ({describe(refused)}); '
                     'move it away, use a new --workdir, or resume it with '
                     f'--allow_config_change={",".join(refused)}')
  return None if _refused(diff, ()) else summary
