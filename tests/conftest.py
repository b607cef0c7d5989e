"""Test setup: 8 simulated CPU devices (set before jax is imported) and deterministic hypothesis."""

import os

flag = '--xla_force_host_platform_device_count=8'
if flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from hypothesis import settings  # noqa: E402

settings.register_profile('tx', deadline=None, derandomize=True, max_examples=40,
                          print_blob=True)
settings.load_profile('tx')
