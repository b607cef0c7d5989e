"""Test setup: 8 simulated CPU devices (set before jax is imported) and deterministic hypothesis."""

import os
import tempfile

flag = '--xla_force_host_platform_device_count=8'
if flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same tiny models, also in subprocesses (which inherit this):
# a persistent compilation cache for the test run compiles each program once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='tx-test-jax-cache-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

from hypothesis import settings  # noqa: E402

settings.register_profile('tx', deadline=None, derandomize=True, max_examples=40,
                          print_blob=True)
settings.load_profile('tx')
