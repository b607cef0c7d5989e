"""Where a train step's time goes: a jax.profiler trace of the bench's step, summed by op
kind and by the part of the model each op came from.

  python -m experiments.bench.profile --spec=vit-b16-224 --dtype=bfloat16 --pad=8 \\
      --mu_dtype=bfloat16 --steps=5 --workdir=runs/profile

runs 2 untraced steps, then traces `steps` steps (`jax.profiler.trace`; the trace stays in
workdir for TensorBoard's profile plugin or XProf) and writes profile.json and profile.md.

Each event that carries an XLA op's name is joined to that instruction of the compiled step
(`compiled.as_text()`), which gives its kind and the op_name metadata JAX wrote: the module
path of the primitive, e.g. `.../transpose(jvp(ViT))/encoder/block_1/block_1.ffn_sublayer/...
/ffn/output/dot_general`. Then

  ms per step of a row = Σ durations of its events / steps
  kind   the HLO opcode, a fusion's kind (kLoop, kInput, kOutput, kCustom) and a custom
         call's target (cuDNN attention, cuBLAS), e.g. 'fusion kCustom'
  part   the last two names on the path, with block_i and jit(...) left out (the same part
         of every layer adds up): Flax modules, e.g. 'ffn/output', 'self_attention/query',
         or a module and an einsum, e.g. 'self_attention/...qhd,...khd->...hqk' (the
         attention's q·kᵀ); ops outside the model (loss, clipping, AdamW, metrics) are
         'outside the model'
  pass   forward (jvp(...)), backward (transpose(jvp(...))) or outside the model

On a GPU the events are the device's ops (its 'XLA Ops' line, or its kernels that name their
op): device time, one op at a time. On a CPU they are the thunks on every thread, so rows are
thread-milliseconds and parallel work adds up (compare shares, not their sum with the step
time). Control flow (while, call, conditional: a scanned stack, gradient accumulation) is
left out, as the ops inside it are counted.

  python -m experiments.bench.profile --spec=lm-d256 --peer

profiles the PyTorch peer's step instead (experiments/bench/peer.py, eager, float32) with
torch.profiler: self time per step of each aten op, on the thread that called it (an op's
intra-op threads are inside its time). Run both under `taskset -c 0` to compare op by op:
on one core XLA's thread-milliseconds and PyTorch's op times are both wall time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

import jax

from experiments.bench import specs, step_time
from experiments.metrics import write_atomically

OUTSIDE = 'outside the model'
CONTROL_FLOW = ('while', 'call', 'conditional')  # their time is their ops', counted apart.
# One HLO instruction: `%name = type opcode(operands), attributes` (ROOT-prefixed or not).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$', re.M)


def _described(hlo_text: str) -> dict:
  """{instruction name: (kind, op_name)} for every instruction of a compiled module."""
  out = {}
  for name, opcode, rest in _INSTRUCTION.findall(hlo_text):
    kind = opcode
    if opcode == 'fusion':
      fusion_kind = re.search(r'kind=(k\w+)', rest)
      kind += f' {fusion_kind.group(1)}' if fusion_kind else ''
    elif opcode == 'custom-call':
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      kind += f' {target.group(1)}' if target else ''
    op_name = re.search(r'op_name="([^"]*)"', rest)
    out[name] = (kind, op_name.group(1) if op_name else '')
  return out


def part_of(op_name: str) -> tuple[str, str]:
  """(pass, part) of an op_name (see the module docstring)."""
  match = re.search(r'(transpose\()?jvp\(\w+\)\)?/(.*)', op_name)
  if not match:
    return OUTSIDE, OUTSIDE
  modules = [c for c in match.group(2).split('/')[:-1]
             if not re.match(r'block_\d+(\.|$)|jit\(', c)]
  return ('backward' if match.group(1) else 'forward'), '/'.join(modules[-2:]) or '(model top)'


def _events(path: str):
  """(op name, duration ns) of the XLA op events in an .xplane.pb trace: a device's 'XLA Ops'
  line where the trace has one; else the device's kernels that name their op (stat
  'hlo_op'; an op's kernels add up); with no device plane (CPU), the host's thunks."""
  planes = list(jax.profiler.ProfileData.from_file(path).planes)
  device = [p for p in planes if p.name.startswith('/device:')]
  op_lines = [line for p in device for line in p.lines if line.name == 'XLA Ops']
  if op_lines:
    return [(dict(e.stats).get('hlo_op', e.name), e.duration_ns)
            for line in op_lines for e in line.events]
  return [(stats['hlo_op'], e.duration_ns) for p in device or planes for line in p.lines
          for e in line.events if 'hlo_op' in (stats := dict(e.stats))]


def summarize(events, described: dict, num_steps: int) -> dict:
  """ms per step by kind and by (pass, part); events of other programs are left out."""
  by_kind, by_part = collections.Counter(), collections.Counter()
  unknown = 0.0
  for name, ns in events:
    ms = ns / 1e6 / num_steps
    name = name.lstrip('%')
    if name not in described:
      unknown += ms
      continue
    kind, op_name = described[name]
    if kind in CONTROL_FLOW:
      continue
    by_kind[kind] += ms
    by_part[part_of(op_name)] += ms
  total = sum(by_kind.values())
  kinds = [dict(kind=k, ms=round(v, 3), share=round(v / total, 4))
           for k, v in by_kind.most_common()]
  parts = collections.defaultdict(collections.Counter)
  for (direction, part), ms in by_part.items():
    parts[part][direction] += ms
  part_rows = sorted(({'part': p, 'ms': round(sum(v.values()), 3),
                       'forward_ms': round(v['forward'], 3),
                       'backward_ms': round(v['backward'], 3),
                       'share': round(sum(v.values()) / total, 4)}
                      for p, v in parts.items()), key=lambda r: -r['share'])
  return dict(total_ms=round(total, 3), other_programs_ms=round(unknown, 3), kinds=kinds,
              parts=part_rows)


def profile_step(spec: specs.Spec, dtype: str, mu_dtype: str, num_steps: int,
                 logdir: str) -> dict:
  """Traces num_steps train steps of `spec` (after 2 untraced ones) into logdir; summarize's
  tables, with the trace file's path."""
  compiled, next_step, _ = step_time.compiled_step(spec, dtype, mu_dtype)
  described = _described(compiled.as_text())  # the very program the trace runs
  for _ in range(2):
    jax.block_until_ready(next_step())
  with jax.profiler.trace(logdir):
    for _ in range(num_steps):
      jax.block_until_ready(next_step())
  path = max(glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True),
             key=os.path.getmtime)
  return dict(summarize(_events(path), described, num_steps), trace=path, spec=spec.name,
              dtype=dtype, pad_tokens_to=spec.pad_tokens_to, remat=spec.remat, mu_dtype=mu_dtype,
              steps=num_steps, device=jax.devices()[0].device_kind)


def profile_peer(spec: specs.Spec, num_steps: int) -> dict:
  """Self CPU ms per step of each aten op of the PyTorch peer's eager float32 step, after 3
  untimed steps; rows sorted by time."""
  import torch  # optional: only the peer needs it
  from experiments.bench import peer
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count() or 1)
  step = peer.TrainStep(spec, peer.build_model(spec))
  inputs, targets = peer.torch_batch(spec, specs.synthetic_batch(spec))
  for _ in range(3):
    step(inputs, targets)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(num_steps):
      step(inputs, targets)
  rows = sorted(((e.key, e.self_cpu_time_total / 1e3 / num_steps, e.count / num_steps)
                 for e in prof.key_averages()), key=lambda r: -r[1])
  total = sum(ms for _, ms, _ in rows)
  return dict(spec=spec.name, steps=num_steps, threads=torch.get_num_threads(),
              torch=torch.__version__, total_ms=round(total, 3),
              ops=[dict(op=k, ms=round(ms, 3), calls=calls, share=round(ms / total, 4))
                   for k, ms, calls in rows])


def peer_markdown(result: dict, top: int = 20) -> str:
  """profile_peer's table, its top rows."""
  lines = [f'PyTorch eager {result["spec"]} float32 ({result["threads"]} threads): '
           f'{result["total_ms"]:.2f} ms of aten ops per step', '',
           '| aten op | ms/step | calls/step | share |', '|---|---|---|---|']
  lines += [f'| {r["op"]} | {r["ms"]:.2f} | {r["calls"]:g} | {r["share"]:.1%} |'
            for r in result['ops'][:top]]
  return '\n'.join(lines)


def markdown(result: dict, top: int = 15) -> str:
  """The two tables, the top rows of each."""
  lines = [f'{result["spec"]} {result["dtype"]} (pad_tokens_to={result["pad_tokens_to"]}, '
           f'mu_dtype={result["mu_dtype"] or "float32"}, remat={result["remat"] or "off"}) '
           f'on {result["device"]}: '
           f'{result["total_ms"]:.2f} ms of ops per step', '',
           '| op kind | ms/step | share |', '|---|---|---|']
  lines += [f'| {r["kind"]} | {r["ms"]:.2f} | {r["share"]:.1%} |' for r in result['kinds'][:top]]
  lines += ['', '| part | ms/step | forward | backward | share |', '|---|---|---|---|---|']
  lines += [f'| {r["part"]} | {r["ms"]:.2f} | {r["forward_ms"]:.2f} | {r["backward_ms"]:.2f} | '
            f'{r["share"]:.1%} |' if r['part'] != OUTSIDE else
            f'| {r["part"]} | {r["ms"]:.2f} | | | {r["share"]:.1%} |'
            for r in result['parts'][:top]]
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  spec = step_time.spec_of(f.spec, f.pad, f.remat)
  os.makedirs(f.workdir, exist_ok=True)
  if f.peer:
    result = profile_peer(spec, f.steps)
    table, name = peer_markdown(result), 'profile_peer'
  else:
    result = profile_step(spec, f.dtype, f.mu_dtype, f.steps, os.path.join(f.workdir, 'trace'))
    table, name = markdown(result), 'profile'
  write_atomically(os.path.join(f.workdir, f'{name}.json'), json.dumps(result, indent=1))
  write_atomically(os.path.join(f.workdir, f'{name}.md'), table + '\n')
  print(table, flush=True)
  if f.print_json:  # for experiments.bench.gpu, which reads a process's last line.
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  from absl import app, flags
  step_time.define_step_flags(flags)
  flags.DEFINE_integer('steps', 5, 'Traced steps.')
  flags.DEFINE_string('workdir', 'runs/profile', 'Where the trace and tables go.')
  flags.DEFINE_bool('print_json', False, 'End with the result as one JSON line.')
  flags.DEFINE_bool('peer', False, "Profile the PyTorch peer's eager step instead.")
  app.run(main)
