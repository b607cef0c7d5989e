"""Preemption: SIGTERM or SIGINT asks the training loop to checkpoint and stop at a step boundary.

A signal handler sets a flag that the loop reads after each step; the loop then saves the step,
waits for the save and raises `Preempted`. A second signal does what it would have done (a
second Ctrl-C quits at once; the last complete checkpoint is still there); once nothing is left
to save, a signal raises `Preempted` at once (`StopRequest.immediate`). With several processes,
JAX's preemption notice (SIGTERM) stops all at the same step, so their collective save matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run stopped on a signal after saving; `exit_code` is 128 + the signal number."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


@dataclasses.dataclass
class StopRequest:
  """Whether a stop was asked for, and by which signal."""
  signum: int | None = None
  immediate: str | None = None  # set: a signal raises Preempted(immediate) at once.

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name


@contextlib.contextmanager
def catch_stop_signals():
  """Yields a StopRequest set by SIGTERM/SIGINT; restores the previous handlers on exit. Only
  the main thread can own signal handlers; elsewhere (and for SIGTERM under several processes,
  which JAX's preemption notice owns) the request is never set by a signal."""
  request = StopRequest()
  caught = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  if threading.current_thread() is not threading.main_thread():
    caught = ()
  previous = {s: signal.getsignal(s) for s in caught}

  def handler(signum, frame):
    if request.signum is not None:  # a second signal: do what it would have done.
      signal.signal(signum, previous[signum])
      signal.raise_signal(signum)
      return
    request.signum = signum
    if request.immediate is not None:
      raise Preempted(f'{request.name}: {request.immediate}', signum)
    print(f'{request.name} received: saving a checkpoint after this step '
          '(send it again to quit at once)', flush=True)

  for s in caught:
    signal.signal(s, handler)
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
