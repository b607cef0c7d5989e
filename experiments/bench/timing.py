"""How the benchmark times things, and what it records about where it ran.

Every measurement: call once or more to warm up (compilation and first-touch allocation are
not timed, but the first call's time is recorded), then time `repeats` calls, each blocked
until its results are ready, and report the median.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
            block: Callable[[object], object] = jax.block_until_ready) -> dict:
  """{'first_s': time of the first call, 'median_s': median of `repeats` timed calls,
  'times_s': those calls}. `fn` must do the same work on every call; `block` waits for it."""
  start = time.perf_counter()
  block(fn())
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return {'first_s': first, 'median_s': statistics.median(times), 'times_s': times}


def environment() -> dict:
  """The device, library versions and thread counts of this process."""
  import flax
  import jaxlib
  import optax
  device = jax.devices()[0]
  env = {'backend': jax.default_backend(), 'device': str(device),
         'device_kind': device.device_kind, 'device_count': jax.device_count(),
         'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
         'optax': optax.__version__, 'python': platform.python_version(),
         'cpu_count': os.cpu_count(), 'cpu': _cpu_name(),
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'omp_num_threads': os.environ.get('OMP_NUM_THREADS', '')}
  try:
    env['sched_affinity_cpus'] = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    pass
  return env


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
