"""pmap against jit on several devices: the trainer's train step under each runner.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench.pmap_vs_jit \\
      --spec=vit-digits --repeats=5

The device count is fixed when jax starts, so `experiments.bench` runs this module in a
subprocess with 8 simulated CPU devices (on a GPU/TPU host: the real devices). Each step is
the full per-step path of `experiments.run`: the host batch is split over the devices
(pmap: a leading device axis; jit: a batch sharded along the mesh axis 'data'), one step
runs with the state donated, and the gradients are averaged across devices. Prints one JSON
line: per runner, the first-call and median step times.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from experiments import runners
from experiments.bench import specs, step_time
from experiments.bench.timing import measure


def bench(spec: specs.Spec, repeats: int) -> dict:
  devices = jax.devices()
  run = step_time.run_of(spec, specs.tx_model(spec))
  batch = specs.synthetic_batch(spec)
  out = {'devices': len(devices), 'device_kind': devices[0].device_kind, 'spec': spec.name,
         'batch': spec.batch}
  for mode in runners.PARALLEL:
    runner = runners.make_runner(mode, devices, run)
    state = runner.put_state(runner.init(run, [0]))
    t = measure(step_time.stepper(runner.train_step, state, [batch]), repeats=repeats, warmup=2)
    out[mode] = dict(t, examples_per_s=spec.batch / t['median_s'])
  return out


def main(argv):
  del argv
  print(json.dumps(bench(specs.by_name(flags.FLAGS.spec), flags.FLAGS.repeats)), flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('spec', 'vit-digits', 'A model of experiments/bench/specs.py.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps per runner (median reported).')
  app.run(main)
