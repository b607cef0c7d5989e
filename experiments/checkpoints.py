"""orbax-checkpoint in the workdir: the train state plus a JSON record of config and data position.

Keeps the last `keep` checkpoints and the best one by an eval metric. Nothing is unpickled:
orbax stores arrays with tensorstore and the record as JSON. orbax renames a step's directory
into place when it is complete, so a kill during a save leaves no step behind; a step whose
files were later truncated or altered fails the check against its record (each array's shape
and dtype, and a CRC-32 of the state's bytes), and `restore_latest` moves it aside.

Only step folders tx wrote count: a directory (not a link) holding the state or meta item. Anything else in checkpoints/ (a stray or linked `100/`, a copy) is
never restored, counted towards `keep` or deleted; `foreign()` names it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


ORBAX_TEMPORARY = '.orbax-checkpoint-tmp'  # in the names of saves not yet complete


def is_step_folder(path) -> bool:
  """Whether `path` is a step folder tx wrote (one that lost an item is still one: restoring
  it fails, and it is moved aside as corrupt)."""
  path = str(path)
  return (os.path.isdir(path) and not os.path.islink(path)
          and any(os.path.isdir(os.path.join(path, item)) for item in ('state', 'meta')))


class _StepFolders(ocp.step.NameFormat):
  """orbax's standard step names (checkpoints/<step>), finding only folders tx wrote."""

  def __init__(self):
    self.standard = ocp.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self.standard.build_name(step)

  def find_all(self, base_path):
    return (m for m in self.standard.find_all(base_path) if is_step_folder(m.path))

  def find_step(self, base_path, step: int):
    metadata = self.standard.find_step(base_path, step)
    if not is_step_folder(metadata.path):
      raise ValueError(f'{metadata.path} is not a step folder tx wrote')
    return metadata


class Checkpoints:
  """checkpoints/<step>/{state, meta}: state = {step, params, opt_state, rng}; meta = the
  caller's JSON (config, data: {seed, position}, history, metrics) and state: its record."""

  def __init__(self, workdir: str, keep: int = 2, best_metric: str = 'accuracy',
               best_mode: str = 'max', reader: bool = False):
    """reader: for a command that only reads (possibly while the run trains): it leaves
    orbax's saves in progress alone."""
    self.best_metric = best_metric
    preserve = [policies.LatestN(keep)]
    if best_metric:
      sign = 1.0 if best_mode == 'max' else -1.0
      preserve.append(policies.BestN(get_metric_fn=lambda m: sign * m[best_metric], n=1,
                                     reverse=False, keep_checkpoints_without_metrics=False))
    # best_fn/best_mode also make orbax write each step's metrics to disk, so that the best
    # checkpoint is still known (and kept) after a restart.
    # create=False: the directory appears with the first save, not when a run that is then
    # refused only looked; the run (not a reader) removes orbax's leftovers of a killed save.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve), create=False,
        cleanup_tmp_directories=not reader, step_name_format=_StepFolders(),
        enable_async_checkpointing=True,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode)
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def foreign(self) -> dict[str, str]:
    """{name: what it is} of the entries in checkpoints/ that are not step folders tx wrote
    (orbax's incomplete saves aside)."""
    if not os.path.isdir(self.directory):
      return {}
    out = {}
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if ORBAX_TEMPORARY in name or is_step_folder(path):
        continue
      out[name] = ('a link' if os.path.islink(path) else 'a file' if not os.path.isdir(path)
                   else 'not a step folder')
    return out

  def save(self, step: int, state, meta: dict, metrics: dict | None = None):
    """Starts saving a host `state` (NumPy leaves) and `meta` (JSON) with meta['state'] = its
    record; SaveFailed if this save or an earlier one failed."""
    metrics = metrics if metrics and self.best_metric in metrics else None
    meta = dict(meta, state=state_record(state))
    with self._saving():
      os.makedirs(self.directory, exist_ok=True)
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)

  def complete_steps(self) -> list[int]:
    """The steps on disk now, re-read (a save that failed is not among them)."""
    self.manager.reload()
    return self.steps()

  def check_saves(self):
    """SaveFailed if an asynchronous save has failed (a full disk, say); cheap. (orbax's own
    finalize thread collects a failed save's error, so `check_for_errors` alone misses it:
    waiting on a save no longer in progress returns at once and raises it.)"""
    with self._saving():
      self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        self.manager.wait_until_finished()

  def _saving(self):
    return _raise_as_save_failed(self.directory)

  def restore(self, like, step: int | None = None):
    """Restores (host state shaped like `like`, meta) from `step` (default: the latest);
    like=None returns the arrays as saved, in nested dicts, without the checks below.
    ValueError naming the first parameter whose shape or dtype differs from `like` (a model of
    another shape); CorruptCheckpoint when the files do not read back as what was saved.
    """
    step = self.latest_step() if step is None else step
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise CorruptCheckpoint(step, f'its record does not read: {type(e).__name__}') from e
    if not isinstance(meta, dict):
      raise CorruptCheckpoint(step, 'its record is not a JSON object')
    # Without `like` (the arrays as saved, nested dicts) the record's paths and order do not
    # apply; older checkpoints have no record.
    record = meta.get('state') if like is not None else None
    if record is not None:
      check_fits(record['arrays'], like, self.directory, step)
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:
      raise CorruptCheckpoint(step, f'its arrays do not read: {type(e).__name__}') from e
    # On the host: restored arrays are committed to this process's device, and placing those
    # on a mesh across processes would be a cross-host transfer (which CPU backends lack).
    state = jax.device_get(state)
    if record is not None and state_record(state)['crc32'] != record['crc32']:
      raise CorruptCheckpoint(step, 'its arrays differ from what was saved (CRC-32 mismatch)')
    return state, meta

  def restore_latest(self, like):
    """(state, meta) of the newest readable step, or None when there is none. An unreadable
    step gets a one-line warning and is moved to checkpoints_corrupt/, and the next older step
    is tried; a model that does not fit the checkpoint is an error, not a skip."""
    for step in reversed(self.steps()):
      try:
        return self.restore(like, step)
      except CorruptCheckpoint as e:
        aside = os.path.join(os.path.dirname(self.directory), 'checkpoints_corrupt', str(step))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        print(f'warning: {e}; skipped it and moved it to {aside}', file=sys.stderr, flush=True)
    return None

  def delete_after(self, step: int):
    """Deletes the saved steps after `step`."""
    for later in [s for s in self.steps() if s > step]:
      self.manager.delete(later)

  def wait(self):
    """Blocks until every asynchronous save is on disk; SaveFailed if one failed."""
    with self._saving():
      self.manager.wait_until_finished()

  def close(self):
    with self._saving():
      self.manager.close()


class SaveFailed(ValueError):
  """A save that failed, in one line; with `step`, where the run stopped and what is left."""

  def __init__(self, directory: str, error: BaseException, step: int | None = None,
               newest: int | None = None):
    if isinstance(error, SaveFailed):
      text = str(error)
    else:
      first = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
      text = f'saving a checkpoint in {directory} failed: {type(error).__name__}: {first[:300]}'
    if step is not None:
      text += (f'; the run stopped at step {step}; its newest complete checkpoint is '
               + (f'step {newest}' if newest is not None else 'none'))
    super().__init__(text)


@contextlib.contextmanager
def _raise_as_save_failed(directory: str):
  try:
    yield
  except SaveFailed:
    raise
  except Exception as e:  # orbax and tensorstore raise many types; all mean the same here.
    raise SaveFailed(directory, e) from e


class CorruptCheckpoint(Exception):
  def __init__(self, step: int, why: str):
    super().__init__(f'checkpoint step {step} is unusable: {why}')


def array_specs(tree) -> dict:
  """{path: [shape, dtype]} of every leaf, paths as jax.tree_util.keystr writes them."""
  return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_record(state) -> dict:
  """{'arrays': array_specs(state), 'crc32': CRC-32 over every leaf's bytes in tree order}."""
  crc = 0
  for leaf in jax.tree.leaves(state):
    crc = zlib.crc32(np.ascontiguousarray(leaf).view(np.uint8).reshape(-1), crc)
  return {'arrays': array_specs(state), 'crc32': crc}


def check_fits(saved: dict, like, directory: str, step: int):
  """ValueError naming the first array of `like` whose shape or dtype differs from `saved`."""
  where, wanted = f'checkpoint step {step} in {directory}', array_specs(like)
  hint = 'the model differs from the one that was saved; use a new --workdir'
  for path, (shape, dtype) in wanted.items():
    if path not in saved:
      raise ValueError(f'{where} has no {path} (shape {tuple(shape)}) that the model has: {hint}')
    if saved[path] != [shape, dtype]:
      raise ValueError(f'{where} does not fit the model: {path} is {tuple(saved[path][0])} '
                       f'{saved[path][1]} there and {tuple(shape)} {dtype} in the model; restore '
                       "with the config the run was trained with (its config.json, with "
                       "config_changes.json) or use a new --workdir")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise ValueError(f'{where} has {extra[0]} that the model does not: {hint}')
