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


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> dict:
  """{'first_s': time of the first call, 'median_s': median of the `repeats` calls after
  `warmup` (>= 1) warm-up calls, 'times_s': those calls}. `fn` must do the same work on
  every call."""

  def timed_call():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  calls = [timed_call() for _ in range(warmup + repeats)]
  times = calls[warmup:]
  return {'first_s': calls[0], 'median_s': statistics.median(times), 'times_s': times}


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled program (aliased buffers counted once)."""
  m = compiled.memory_analysis()
  return None if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes
                                 + m.temp_size_in_bytes - m.alias_size_in_bytes)


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
  if hasattr(os, 'sched_getaffinity'):  # Linux only
    env['sched_affinity_cpus'] = len(os.sched_getaffinity(0))
  return env


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):  # not Linux, or no model name listed
    return platform.processor()
