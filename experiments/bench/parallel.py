"""pmap against jit on several devices: the trainer's train step under each runner.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench.parallel \\
      --spec=vit-digits --repeats=5

The device count is fixed when jax starts, so `experiments.bench` runs this module in a
subprocess with 8 simulated CPU devices (on a GPU/TPU host: the real devices). Each step is
the full per-step path of `experiments.run`: the host batch is split over the devices
(pmap: a leading device axis; jit: a batch sharded along the mesh axis 'data'), one step
runs with the state donated, and the gradients are averaged across devices. Prints one JSON
line: per runner, the first-call and median step times.
"""

from __future__ import annotations

import functools
import json

import jax
from absl import app, flags

from experiments import parallel as parallel_lib
from experiments import trainer
from experiments.bench import specs, train
from experiments.bench.timing import measure


def bench(spec: specs.Spec, repeats: int) -> dict:
  devices = jax.devices()
  model = specs.tx_model(spec)
  step = train.step_fn(spec, model)
  state = jax.jit(functools.partial(train.init_state, spec, model))()
  batch = specs.synthetic_batch(spec)
  eval_step = functools.partial(trainer.eval_step, eval_fn=lambda p, b: {})
  out = {'devices': len(devices), 'device_kind': devices[0].device_kind, 'spec': spec.name,
         'batch': spec.batch}
  for mode in parallel_lib.PARALLEL:
    runner = parallel_lib.make_runner(mode, devices, step, eval_step)
    carry = {'state': runner.put_state(jax.device_get(state))}

    def run():
      carry['state'], metrics = runner.train_step(carry['state'], batch)
      return carry['state'], metrics

    t = measure(run, repeats=repeats, warmup=2)
    out[mode] = dict(t, examples_per_s=spec.batch / t['median_s'])
  return out


def main(argv):
  del argv
  print(json.dumps(bench(specs.by_name(flags.FLAGS.spec), flags.FLAGS.repeats)), flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('spec', 'vit-digits', 'A model of experiments/bench/specs.py.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps per runner (median reported).')
  app.run(main)
