"""Files a run writes appear whole: a write that fails midway leaves the previous file and no
temporary file (experiments.metrics.replace_atomically and the writers built on it)."""

import errno
import os

import pytest

from experiments import metrics
from experiments.bench import plots
from experiments.sweep import tables


def _disk_full_after(limit: int):
  """open() whose files raise ENOSPC once `limit` characters are written (half a file)."""
  def open_(path, *args, **kwargs):
    f = open(path, *args, **kwargs)
    write = f.write

    def write_some(text):
      write(text[:limit])
      f.flush()
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    f.write = write_some
    return f
  return open_


def _figure():
  fig, ax = metrics.pyplot().subplots()
  ax.plot([0, 1], [1, 0])
  return fig


def test_text_writes_replace_whole_files_and_a_failed_write_leaves_the_old_one(tmp_path,
                                                                               monkeypatch):
  path = str(tmp_path / 'summary.json')
  metrics.write_atomically(path, '{"old": 1}\n')
  metrics.write_atomically(path, '{"new": 2}\r\n')  # written as given: no newline translation.
  assert open(path, 'rb').read() == b'{"new": 2}\r\n' and os.listdir(tmp_path) == ['summary.json']
  monkeypatch.setattr(metrics, 'open', _disk_full_after(5), raising=False)
  with pytest.raises(OSError, match='No space left'):
    metrics.write_atomically(path, '{"newer": 3, "and": "longer"}\n')
  assert open(path, 'rb').read() == b'{"new": 2}\r\n' and os.listdir(tmp_path) == ['summary.json']


def test_sweep_tables_are_written_atomically(tmp_path, monkeypatch):
  rows = [{'model.posemb': p, 'seed': s, 'eval/accuracy': 0.5 + s / 10,
           'attention_entropy': {'block_0': 1.0}} for p in ('learn', 'sincos') for s in (0, 1)]
  csv_path, md_path = str(tmp_path / 'results.csv'), str(tmp_path / 'results.md')
  tables.write_csv(rows, csv_path)
  tables.write_markdown(tables.aggregate(rows, ['model.posemb', 'seed']), md_path, 'posemb')
  csv_text, md_text = open(csv_path, 'rb').read(), open(md_path, 'rb').read()
  assert csv_text.startswith(b'model.posemb,seed,eval/accuracy,attention_entropy/block_0\r\n')
  assert b'| learn | 2 | 0.5500 \xc2\xb1 0.0707 |' in md_text
  monkeypatch.setattr(metrics, 'open', _disk_full_after(10), raising=False)
  with pytest.raises(OSError):
    tables.write_csv(rows[:1], csv_path)
  with pytest.raises(OSError):
    tables.write_markdown(tables.aggregate(rows[:1], ['model.posemb', 'seed']), md_path, 'x')
  assert open(csv_path, 'rb').read() == csv_text and open(md_path, 'rb').read() == md_text
  assert sorted(os.listdir(tmp_path)) == ['results.csv', 'results.md']


def test_figures_are_written_atomically(tmp_path):
  path = str(tmp_path / 'learning_curves.png')
  metrics.save_figure(_figure(), path)  # a .tmp name: the format must be given, not guessed.
  first = open(path, 'rb').read()
  assert first.startswith(b'\x89PNG') and os.listdir(tmp_path) == ['learning_curves.png']
  fig, temporaries = _figure(), []

  def savefig_then_fail(temporary, **kwargs):  # half a PNG in the temporary file, then a full disk.
    temporaries.append(temporary)
    with open(temporary, 'wb') as f:
      f.write(b'\x89PNG half')
    raise OSError(errno.ENOSPC, 'No space left on device', temporary)
  fig.savefig = savefig_then_fail
  with pytest.raises(OSError, match='No space left'):
    metrics.save_figure(fig, path)
  (temporary,) = temporaries
  assert os.path.dirname(temporary) == str(tmp_path) and str(os.getpid()) in temporary
  assert open(path, 'rb').read() == first and os.listdir(tmp_path) == ['learning_curves.png']
  assert fig.number not in metrics.pyplot().get_fignums()  # closed all the same.


def test_bench_figures_go_through_save_figure(tmp_path):
  rows = [{'implementation': impl, 'length': t, 'median_s': t * 1e-6, 'peak_bytes': t * 2**10,
           'batch': 2, 'heads': 2, 'head_dim': 8, 'dtype': 'float32'}
          for impl in ('xla', 'fused') for t in (64, 128)]
  train = [{'model': 'vit', 'dtype': 'float32', 'examples_per_s': 100.0}]
  plots.draw({'attention': rows, 'train': train, 'environment': {'device_kind': 'cpu'}},
             str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['attention.png', 'throughput.png']
  assert all(open(tmp_path / name, 'rb').read().startswith(b'\x89PNG')
             for name in os.listdir(tmp_path))
