"""The benchmark's results as markdown tables (printed, and written to bench.md)."""

from __future__ import annotations


def markdown(results: dict) -> str:
  """The report: the environment, then a table per section that was run."""
  sections = (('matmul', _matmul), ('train', _train), ('attention', _attention),
              ('parallel', _parallel), ('vectorized', _vectorized), ('data', _data))
  return '\n\n'.join([_environment(results)] + [part for key, section in sections
                                                if key in results for part in section(results)])


def _table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else 'n/a'


def _peer_cells(results: dict, train_row: dict, compiled: bool, impl: str = 'tx') -> list[str]:
  """[peer examples/s, tx/peer] next to the tx timing `train_row`; ['', 'n/a'] when that peer
  did not run or failed. The ratio takes tx's examples/s from the timing taken right before
  and after that peer run ('tx_adjacent'), where there is one: the same minutes as the peer's."""
  for r in results.get('peer', {}).get('rows', []):
    if (r['model'], r['dtype'], r['compiled'], r.get('impl', 'tx')) == (
        train_row['model'], train_row['dtype'], compiled, impl):
      rate = r.get('examples_per_s')
      return [f'{rate:.1f}' if rate else '',
              _ratio(r.get('tx_adjacent', train_row)['examples_per_s'], rate)]
  return ['', 'n/a']


def _environment(results: dict) -> str:
  env, peer = results['environment'], results.get('peer', {})
  line = (f'Device: {env["device_kind"]} ({env["backend"]}, {env["cpu"]}, {env["cpu_count"]} '
          f'cores); jax {env["jax"]}, flax {env["flax"]}, optax {env["optax"]}, '
          f'python {env["python"]}; mode {results["mode"]}.')
  if peer.get('rows'):
    line += f' PyTorch {peer["rows"][0].get("torch")} with {peer["rows"][0].get("threads")} threads.'
  elif 'unavailable' in peer:
    line += f' PyTorch peer not run: {peer["unavailable"]}'
  return line


def _matmul(results: dict) -> list[str]:
  return [_table(['matmul', 'n', 'GFLOP/s'], [
      [m['dtype'], m['n'], f'{m["flop_per_s"] / 1e9:.1f}'] for m in results['matmul']])]


def _train(results: dict) -> list[str]:
  peak = {m['dtype']: m['flop_per_s'] for m in results.get('matmul', [])}
  peer = results.get('peer', {})
  peer_rows = peer.get('rows', [])
  timm = any(r.get('impl') == 'timm' for r in peer_rows)
  rows = []
  for r in results['train']:
    row = [r['model'], r['dtype'], r['batch'], f'{r["median_s"] * 1e3:.1f}',
           f'{r["examples_per_s"]:.1f}', f'{r["flop_per_s"] / 1e9:.1f}',
           f'{r["flop_per_s"] / peak[r["dtype"]]:.0%}' if r['dtype'] in peak else 'n/a']
    # The peer runs in one dtype only; the other dtype's rows leave its columns blank.
    row += (_peer_cells(results, r, False) + _peer_cells(results, r, True)
            if r['dtype'] == peer.get('dtype', 'float32') else [''] * 4)
    rows.append(row + (_peer_cells(results, r, True, 'timm') if timm else []))
  parts = [_table(['model', 'dtype', 'batch', 'tx ms/step', 'tx examples/s', 'GFLOP/s', 'MFU',
                   'torch eager ex/s', 'tx/eager', 'torch.compile ex/s', 'tx/compile'] +
                  (['timm compile ex/s', 'tx/timm'] if timm else []), rows)]
  if any('tx_adjacent' in r for r in peer_rows):
    parts.append('tx/peer divides tx\'s examples/s, timed again right before and right after '
                 'each peer run (the mean of the two medians), by the peer\'s, so that both '
                 'come from the same minutes; the tx columns are the train section\'s.')
  return parts + [f'Peer {r["impl"]} {r["model"]} (compile={r["compiled"]}) failed: {r["error"]}'
                  for r in peer_rows if 'error' in r]


def _attention(results: dict) -> list[str]:
  by_length = {}
  for r in results['attention']:
    by_length.setdefault(r['length'], {})[r['implementation']] = r
  mib = lambda r: f'{r["peak_bytes"] / 2**20:.0f}' if r['peak_bytes'] is not None else 'n/a'
  rows = [[length, f'{impl["xla"]["median_s"] * 1e3:.2f}', f'{impl["fused"]["median_s"] * 1e3:.2f}',
           _ratio(impl['xla']['median_s'], impl['fused']['median_s']), mib(impl['xla']),
           mib(impl['fused'])] for length, impl in by_length.items()]
  first = results['attention'][0]
  return [f'Attention forward + backward, batch {first["batch"]}, {first["heads"]} heads '
          f'of {first["head_dim"]}, {first["dtype"]}:\n\n' + _table(
              ['T', 'ours ms', 'fused ms', 'fused speedup', 'ours peak MiB', 'fused peak MiB'],
              rows)]


def _parallel(results: dict) -> list[str]:
  p = results['parallel']
  return [f'Data parallel, {p["spec"]}, global batch {p["batch"]} over {p["devices"]} '
          f'{p["device_kind"]} devices:\n\n' + _table(
              ['runner', 'ms/step', 'examples/s', 'first call s'],
              [[m, f'{p[m]["median_s"] * 1e3:.1f}', f'{p[m]["examples_per_s"]:.0f}',
                f'{p[m]["first_s"]:.1f}'] for m in ('pmap', 'jit')])]


def _vectorized(results: dict) -> list[str]:
  v = results['vectorized']
  return [f'Sweep of {v["members"]} {v["model"]} runs differing in β:\n\n' + _table(
      ['', 'member-steps/s', 'first call s'],
      [[kind, f'{v[key + "_member_steps_per_s"]:.1f}', f'{v[key]["first_s"]:.1f}']
       for kind, key in (('sequential', 'sequential'), ('vectorized (vmap)', 'vectorized'))])
      + f'\n\nvectorized/sequential: {v["speedup"]:.2f}x']


def _data(results: dict) -> list[str]:
  d = results['data']
  image = d['image']
  rows = [['train view: decode, inception crop, flip', 'one process',
           f'{d["train_view"]["images_per_s"]:.0f}'],
          ['eval view: decode (draft), centre crop', 'one process',
           f'{d["eval_view"]["images_per_s"]:.0f}']]
  rows += [['pipeline.train_feed', f'{r["workers"]} worker{"s" if r["workers"] > 1 else ""}',
            f'{r["images_per_s"]:.0f}'] for r in d['pipeline']]
  return [f'Input pipeline: {image["count"]} {image["format"]}s of {image["width"]}×'
          f'{image["height"]} (quality {image["quality"]}, {image["mean_bytes"] / 1e3:.0f} KB '
          f'on average) to {d["size"]}×{d["size"]}, batch {d["batch"]}, {d["cpu_count"]} '
          'CPUs:\n\n' + _table(['', 'processes', 'images/s'], rows),
          'Workers needed = ⌈target images/s ÷ the train view\'s images/s of one process⌉:\n\n'
          + _table(['target', 'images/s', 'workers needed'],
                   [[t['label'], f'{t["images_per_s"]:,.0f}', t['workers_needed']]
                    for t in d['targets']])]
