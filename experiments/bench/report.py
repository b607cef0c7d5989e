"""The benchmark's results as markdown tables (printed, and written to bench.md)."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _peer_rate(results: dict, model: str, dtype: str, compiled: bool, impl: str = 'tx'):
  for r in results.get('peer', {}).get('rows', []):
    if (r['model'], r['dtype'], r['compiled'], r.get('impl', 'tx')) == (model, dtype, compiled,
                                                                          impl):
      return r.get('examples_per_s')  # None when that peer run failed
  return None


def _ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else 'n/a'


def markdown(results: dict) -> str:
  env = results['environment']
  parts = [f'Device: {env["device_kind"]} ({env["backend"]}, {env["cpu"]}, {env["cpu_count"]} '
           f'cores); jax {env["jax"]}, flax {env["flax"]}, optax {env["optax"]}, '
           f'python {env["python"]}; mode {results["mode"]}.']
  peer = results.get('peer', {})
  if peer.get('rows'):
    first = peer['rows'][0]
    parts[0] += f' PyTorch {first.get("torch")} with {first.get("threads")} threads.'
  elif 'unavailable' in peer:
    parts[0] += f' PyTorch peer not run: {peer["unavailable"]}'
  if 'matmul' in results:
    parts.append(_table(['matmul', 'n', 'GFLOP/s'], [
        [m['dtype'], m['n'], f'{m["flop_per_s"] / 1e9:.1f}'] for m in results['matmul']]))
  if 'train' in results:
    peak = {m['dtype']: m['flop_per_s'] for m in results.get('matmul', [])}
    timm = any(r.get('impl') == 'timm' for r in results.get('peer', {}).get('rows', []))
    rows = []
    for r in results['train']:
      eager, compiled = (_peer_rate(results, r['model'], r['dtype'], c) for c in (False, True))
      timm_rate = _peer_rate(results, r['model'], r['dtype'], True, 'timm')
      fp32 = r['dtype'] == results.get('peer', {}).get('dtype', 'float32')  # the peer's dtype
      rows.append([r['model'], r['dtype'], r['batch'], f'{r["median_s"] * 1e3:.1f}',
                   f'{r["examples_per_s"]:.1f}', f'{r["flop_per_s"] / 1e9:.1f}',
                   f'{r["flop_per_s"] / peak[r["dtype"]]:.0%}' if r['dtype'] in peak else 'n/a',
                   f'{eager:.1f}' if fp32 and eager else '', _ratio(r['examples_per_s'], eager)
                   if fp32 else '', f'{compiled:.1f}' if fp32 and compiled else '',
                   _ratio(r['examples_per_s'], compiled) if fp32 else ''])
      if timm:
        rows[-1] += [f'{timm_rate:.1f}' if timm_rate else '', _ratio(r['examples_per_s'], timm_rate)]
    parts.append(_table(['model', 'dtype', 'batch', 'tx ms/step', 'tx examples/s', 'GFLOP/s',
                         'MFU', 'torch eager ex/s', 'tx/eager', 'torch.compile ex/s',
                         'tx/compile'] + (['timm compile ex/s', 'tx/timm'] if timm else []),
                        rows))
    failed = [r for r in results.get('peer', {}).get('rows', []) if 'error' in r]
    parts += [f'Peer {r["impl"]} {r["model"]} (compile={r["compiled"]}) failed: {r["error"]}'
              for r in failed]
  if 'attention' in results:
    by_length = {}
    for r in results['attention']:
      by_length.setdefault(r['length'], {})[r['implementation']] = r
    rows = []
    for length, impl in by_length.items():
      ours, fused = impl['xla'], impl['fused']
      mib = lambda r: f'{r["peak_bytes"] / 2**20:.0f}' if r['peak_bytes'] is not None else 'n/a'
      rows.append([length, f'{ours["median_s"] * 1e3:.2f}', f'{fused["median_s"] * 1e3:.2f}',
                   _ratio(ours['median_s'], fused['median_s']), mib(ours), mib(fused)])
    first = results['attention'][0]
    parts.append(f'Attention forward + backward, batch {first["batch"]}, {first["heads"]} heads '
                 f'of {first["head_dim"]}, {first["dtype"]}:\n\n' + _table(
                     ['T', 'ours ms', 'fused ms', 'fused speedup', 'ours peak MiB',
                      'fused peak MiB'], rows))
  if 'parallel' in results:
    p = results['parallel']
    parts.append(f'Data parallel, {p["spec"]}, global batch {p["batch"]} over {p["devices"]} '
                 f'{p["device_kind"]} devices:\n\n' + _table(
                     ['runner', 'ms/step', 'examples/s', 'first call s'],
                     [[m, f'{p[m]["median_s"] * 1e3:.1f}', f'{p[m]["examples_per_s"]:.0f}',
                       f'{p[m]["first_s"]:.1f}'] for m in ('pmap', 'jit')]))
  if 'vectorized' in results:
    v = results['vectorized']
    parts.append(f'Sweep of {v["members"]} {v["model"]} runs differing in β:\n\n' + _table(
        ['', 'member-steps/s', 'first call s'],
        [['sequential', f'{v["sequential_member_steps_per_s"]:.1f}',
          f'{v["sequential"]["first_s"]:.1f}'],
         ['vectorized (vmap)', f'{v["vectorized_member_steps_per_s"]:.1f}',
          f'{v["vectorized"]["first_s"]:.1f}']]) + f'\n\nvectorized/sequential: {v["speedup"]:.2f}x')
  return '\n\n'.join(parts)
