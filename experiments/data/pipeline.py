"""Batches through grain: made in worker processes, placed on the devices ahead of the step.

Every dataset (in memory or on disk) offers train_batch(config, step) and
eval_batch(batch_size, index), pure functions of their arguments. The pipeline is a grain
`MapDataset` over the steps (or eval batch indices) mapped by that function:

  MapDataset.range(first, last).map(make)   element s = the batch of step s
    .to_iter_dataset()                       read in order
    .mp_prefetch(workers)                    data.workers > 0: worker w makes the batches
                                             w, w + W, ...; grain restores their order
    ThreadPrefetch(map(put), 2)              a background thread places the next batches
                                             on the devices (the run's sharding) while the
                                             current step runs (images on disk, or workers;
                                             in-memory batches are gathered on demand)

So the pipeline holds no state a checkpoint must save: a run resumed at step s starts the
range at s and reads the batches it would have read, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import signal

import grain
import jax
from grain.experimental import ThreadPrefetchIterDataset

from experiments.data import sampling

PREFETCH = 2  # batches made and placed on the devices ahead of the step.


def _iterate(dataset, make, first: int, last: int, workers: int, put):
  ds = grain.MapDataset.range(first, last).map(make)
  if workers:
    _absl_flags_parsed()
    # An element is a whole batch: one reading thread per worker, two batches ahead. (grain's
    # defaults, 16 threads and 500 elements, hold gigabytes of batches per worker.)
    reading = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    it = ds.to_iter_dataset(reading).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_ignore_ctrl_c)
  else:  # made in the prefetch thread below, or on demand: no copies, no worker start-up.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if put is not None:
    it = it.map(put)
  # A batch held in memory takes microseconds to gather: a thread making it ahead would cost
  # the step more in GIL hand-offs than it saves (8-17% of the default job's wall time).
  if workers or not dataset.held_in_memory:
    return iter(ThreadPrefetchIterDataset(it, prefetch_buffer_size=PREFETCH))
  return iter(it)


def _ignore_ctrl_c(worker_index: int, worker_count: int):
  """Ctrl-C reaches every process of the terminal's group: the trainer saves and stops, and
  closing the pipeline stops the workers, which would otherwise print a traceback each."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _absl_flags_parsed():
  """grain's worker processes read absl flags; a program without absl's app (a test, a
  notebook) has not parsed them, so their defaults are taken."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@contextlib.contextmanager
def train_feed(dataset, configs, first: int, last: int, workers: int = 0, put=None):
  """Iterator over steps first..last-1 of [each member's batch], passed through put()
  (the runner's placement on its devices); workers and threads are stopped at exit."""
  it = _iterate(dataset, functools.partial(member_batches, dataset, tuple(configs), _process()),
                first, last, workers, put)
  try:
    yield it
  finally:
    _close(it)


@contextlib.contextmanager
def eval_feed(dataset, batch_size: int, workers: int = 0):
  """Iterator over the test set's eval batches (host arrays, this process's rows)."""
  count = sampling.num_eval_batches(dataset.num_test, batch_size)
  it = _iterate(dataset, functools.partial(_eval_batch, dataset, batch_size, _process()), 0,
                count, workers, None)
  try:
    yield it
  finally:
    _close(it)


def _close(it):
  close = getattr(it, 'close', None)
  if close is not None:
    close()


def _process() -> tuple[int, int]:
  """(index, count) of this process among the run's, read here in the trainer: a worker
  process is not part of the distributed run, and its jax would say (0, 1)."""
  return jax.process_index(), jax.process_count()


def member_batches(dataset, configs, process, step: int) -> list:
  """Each member's batch for `step` (process = (p, P): its rows); members with the same seed
  share one, made once."""
  by_seed = {}
  for c in configs:
    if c.seed not in by_seed:
      by_seed[c.seed] = dataset.train_batch(c, step, process)
  return [by_seed[c.seed] for c in configs]


def _eval_batch(dataset, batch_size: int, process, index: int) -> dict:
  return dataset.eval_batch(batch_size, index, process)
