"""Data parallelism: the same pure step under jax.pmap or under jax.jit on a device mesh.

pmap: the state is replicated along a leading device axis, each device gets
  [B / devices] examples, and the step averages gradients and metrics with
  `lax.pmean` over the axis 'batch'.
jit:  a Mesh over the devices with NamedSharding: the batch is split along
  'data', the state is replicated, and XLA inserts the all-reduce.

Both take process-local batches (each host feeds only its own rows) and
`fetch` replicated results (state, metrics) to the host as NumPy.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'
PARALLEL = ('pmap', 'jit')


def select_devices(num_devices: int):
  """All devices (num_devices=0), or the first `num_devices` (single-process only)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise ValueError(f'config.num_devices={num_devices}: only 0 (all) works with several hosts')
    if num_devices > len(devices):
      raise ValueError(f'config.num_devices={num_devices}, but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return devices


def check_batch(field: str, batch_size: int, num_devices: int, grad_accum_steps: int):
  if batch_size % num_devices:
    raise ValueError(f'config.{field}={batch_size} is not divisible by the {num_devices} '
                     'devices; use a multiple of the device count')
  if (batch_size // num_devices) % grad_accum_steps:
    raise ValueError(f'config.grad_accum_steps={grad_accum_steps} does not divide the per-device '
                     f'batch of {batch_size // num_devices}')


class PmapRunner:
  """jax.pmap over the local devices; collectives span every host's devices."""

  def __init__(self, devices, train_step, eval_step):
    self.devices = [d for d in devices if d.process_index == jax.process_index()]
    self.n = len(self.devices)
    self._train = jax.pmap(functools.partial(train_step, axis_name=AXIS), axis_name=AXIS,
                           devices=devices, donate_argnums=(0,))
    self._eval = jax.pmap(functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS,
                          devices=devices)

  def put_state(self, state):
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), state)

  def fetch(self, tree):
    """Host copy of one replica, read from the first local device (no cross-device gather)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)

  def put_batch(self, batch):
    return jax.tree.map(lambda x: x.reshape((self.n, -1) + x.shape[1:]), batch)

  def train_step(self, state, batch):
    return self._train(state, self.put_batch(batch))

  def eval_step(self, state, batch):
    return self._eval(state.params, self.put_batch(batch))


class JitRunner:
  """jax.jit with the batch sharded along the mesh axis 'data' and the state replicated."""

  def __init__(self, devices, train_step, eval_step):
    mesh = Mesh(np.asarray(devices), ('data',))
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P('data'))
    self._train = jax.jit(train_step, donate_argnums=(0,),
                          out_shardings=(self.replicated, self.replicated))
    self._eval = jax.jit(eval_step, out_shardings=self.replicated)

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def fetch(self, tree):
    """Host copy of a replicated tree, read from the first local device."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def put_batch(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch)

  def train_step(self, state, batch):
    return self._train(state, self.put_batch(batch))

  def eval_step(self, state, batch):
    return self._eval(state.params, self.put_batch(batch))


def make_runner(parallel: str, devices, train_step, eval_step):
  if parallel not in PARALLEL:
    raise ValueError(f'config.parallel={parallel!r}; allowed: {", ".join(map(repr, PARALLEL))}')
  return (PmapRunner if parallel == 'pmap' else JitRunner)(devices, train_step, eval_step)
