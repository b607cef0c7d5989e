"""orbax-checkpoint in the workdir: the train state plus a JSON record of config and data position.

Keeps the last `keep` checkpoints and the best one by an eval metric.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpoints:
  """checkpoints/<step>/{state, meta}: state = {step, params, opt_state, rng};
  meta = {config, data: {seed, position}, metrics}."""

  def __init__(self, workdir: str, keep: int = 2, best_metric: str = 'accuracy',
               best_mode: str = 'max'):
    self.best_metric = best_metric
    preserve = [policies.LatestN(keep)]
    if best_metric:
      sign = 1.0 if best_mode == 'max' else -1.0
      preserve.append(policies.BestN(get_metric_fn=lambda m: sign * m[best_metric], n=1,
                                     reverse=False, keep_checkpoints_without_metrics=False))
    # best_fn/best_mode also make orbax write each step's metrics to disk, so that the best
    # checkpoint is still known (and kept) after a restart.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve), create=True,
        enable_async_checkpointing=True,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                         options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, metrics: dict | None = None):
    metrics = metrics if metrics and self.best_metric in metrics else None
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)

  def restore(self, like, step: int | None = None):
    """Restores (state shaped like `like`, meta) from `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def wait(self):
    """Blocks until every asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
