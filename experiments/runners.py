"""Runners: the same pure train and eval steps compiled under jax.jit, jax.pmap or jax.vmap.

  jit   a Mesh over the devices with NamedSharding: the batch is split along 'data', the
        state is replicated, and XLA inserts the all-reduce (the default).
  pmap  the state is replicated along a leading device axis, each device gets
        [B / devices] examples, and the step averages gradients and metrics with
        `lax.pmean` over the axis 'batch'.
  vmap  several runs ("members") that differ only in seed and model.beta_scale, trained as
        one program on one device: the state and the batch are stacked on a leading member
        axis, and β is traced (`experiments.sweep --vectorize`).

Every runner has one interface, host-side lists with one entry per member (one for jit
and pmap):
  init(run, seeds)            -> fresh host states
  put_state(states)           -> the device state
  put(batches)                -> the members' batches placed on the devices (the input
                                 pipeline calls it ahead, in its prefetch thread)
  step(state, placed)         -> (state, metrics), on the devices
  train_step(state, batches)  -> step(state, put(batches))
  eval_step(state, batch)     -> metric sums of one eval batch (shared by the members)
  fetch(tree)                 -> host copies, one per member
jit and pmap take process-local batches (each host feeds only its own rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.steps import init_state, step_functions

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


class _OneRun:
  """What jit and pmap share: one member, initialised from config.seed."""

  def init(self, run, seeds):
    (seed,) = seeds
    return [jax.device_get(init_state(run, seed))]

  def put(self, batches):
    (batch,) = batches
    return self.put_batch(batch)

  def step(self, state, placed):
    return self._train(state, placed)

  def train_step(self, state, batches):
    return self.step(state, self.put(batches))

  def eval_step(self, state, batch):
    # Waited for: eval steps of different batches (and the next train step) are independent
    # programs, and XLA:CPU can start some devices' share of one while another still waits
    # for threads; both then block in their all-reduce, and XLA aborts after 40 s.
    return jax.block_until_ready(self._eval(state.params, self.put_batch(batch)))


class PmapRunner(_OneRun):
  """jax.pmap over the local devices; collectives span every host's devices."""

  def __init__(self, devices, run):
    train, evaluate = step_functions(run)
    self.devices = [d for d in devices if d.process_index == jax.process_index()]
    self.n = len(self.devices)
    self._train = jax.pmap(functools.partial(train, axis_name=AXIS), axis_name=AXIS,
                           devices=devices, donate_argnums=(0,))
    self._eval = jax.pmap(functools.partial(evaluate, axis_name=AXIS), axis_name=AXIS,
                          devices=devices)

  def put_state(self, states):
    (state,) = states
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), state)

  def fetch(self, tree):
    """Host copy of one replica, read from the first local device (no cross-device gather)."""
    return [jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)]

  def put_batch(self, batch):
    return jax.tree.map(lambda x: x.reshape((self.n, -1) + x.shape[1:]), batch)


class JitRunner(_OneRun):
  """jax.jit with the batch sharded along the mesh axis 'data' and the state replicated."""

  def __init__(self, devices, run):
    train, evaluate = step_functions(run)
    mesh = Mesh(np.asarray(devices), ('data',))
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P('data'))
    self._train = jax.jit(train, donate_argnums=(0,),
                          out_shardings=(self.replicated, self.replicated))
    self._eval = jax.jit(evaluate, out_shardings=self.replicated)

  def put_state(self, states):
    (state,) = states
    return jax.device_put(state, self.replicated)

  def fetch(self, tree):
    """Host copy of a replicated tree, read from the first local device."""
    return [jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)]

  def put_batch(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch)


class VmapRunner:
  """jax.vmap over members that differ in seed and model.beta_scale, on the default device.

  Each member keeps its own seed, so its own init, dropout stream and batch order: it
  computes what it would compute alone, up to the order of float rounding inside the
  batched program (tests/test_vectorized.py). β is traced: the model is rebuilt inside
  the vmapped step with the member's beta_scale.
  """

  def __init__(self, run, betas):
    self.betas = jnp.asarray(betas, jnp.float32)
    train = lambda state, batch, beta: step_functions(run, beta)[0](state, batch)
    evaluate = lambda params, batch, beta: step_functions(run, beta)[1](params, batch)
    self._train = jax.jit(jax.vmap(train), donate_argnums=(0,))
    # Every member reads the same eval batch, but it is stacked per member (in_axes 0), not
    # broadcast (in_axes None): XLA:CPU (jaxlib 0.10.2) compiled the broadcast form of the LM's
    # weighted loss sum into member 0's value for every member once the batch is large
    # (256 × 128 tokens); tests/test_vectorized.py checks each member against its own run.
    self._eval = jax.jit(jax.vmap(evaluate))

  def init(self, run, seeds):
    seeds = jnp.asarray(seeds, jnp.int32)
    states = jax.jit(jax.vmap(lambda s, b: init_state(run, s, b)))(seeds, self.betas)
    return self.fetch(states)

  def put_state(self, states):
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *states)

  def put(self, batches):
    """The members' batches stacked on a leading member axis, on the device."""
    return jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *batches))

  def step(self, state, placed):
    """One step of every member on a `put` batch."""
    return self._train(state, placed, self.betas)

  def train_step(self, state, batches):
    return self.step(state, self.put(batches))

  def eval_step(self, state, batch):
    return self._eval(state.params, self.put([batch] * len(self.betas)), self.betas)

  def fetch(self, tree):
    host = jax.device_get(tree)  # arrays, not NumPy scalars, also for 0-d leaves (orbax).
    return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), host) for i in range(len(self.betas))]


def make_runner(kind: str, devices, run, betas=None):
  """'jit' | 'pmap' over `devices`, or 'vmap' over members with β scales `betas`."""
  if kind == 'vmap':
    return VmapRunner(run, betas)
  if kind not in PARALLEL:
    raise ValueError(f'config.parallel={kind!r}; allowed: {", ".join(map(repr, PARALLEL))}')
  return (PmapRunner if kind == 'pmap' else JitRunner)(devices, run)
