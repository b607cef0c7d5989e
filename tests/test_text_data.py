"""experiments.data.text: byte-level BPE, packing into windows, text and parquet sources, the
one-line errors, and a short configs/lm.py:tokenizer=bpe run that generate continues."""

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import lm
from experiments import generate, tasks
from experiments.data import memory, text
from experiments.train import train_and_evaluate
from tests.test_runner import tiny_config

WORDS = ('the model reads a token and the next one; attention weights sum to one, so each head '
         'mixes what it reads. naïve café 世界 ✓').split()
VOCAB = 300  # the 256 bytes, <|endoftext|> and 43 merges: fast to train, still subword.


def _documents(n: int, words: int = 12, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp('text') / 'corpus.txt'
  path.write_text('\n'.join(_documents(60)), encoding='utf-8')
  return str(path)


def _write_parquet(root, splits: dict, column=None):
  """splits: name -> list of shards, each a list of rows; the Hub's data/<split>-k-of-n layout."""
  (root / 'data').mkdir(parents=True, exist_ok=True)
  for split, shards in splits.items():
    for k, rows in enumerate(shards):
      table = pa.table({'text': pa.array(rows, pa.string()), 'id': list(range(len(rows)))}
                       if column is None else column(rows))
      pq.write_table(table, root / 'data' / f'{split}-{k:05d}-of-{len(shards):05d}.parquet')
  return str(root)


def _stream(split: dict) -> np.ndarray:
  """The tokens the windows cover: every input, then the last target."""
  return np.concatenate([split['inputs'].ravel(), split['targets'][-1, -1:]])


def test_windows_tile_the_stream_and_pack_appends_eos_to_each_document():
  w = text.windows(np.arange(10, dtype=np.int32), 3)  # 9 targets: 3 windows, none dropped.
  np.testing.assert_array_equal(w['inputs'], [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  np.testing.assert_array_equal(w['targets'], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  assert len(text.windows(np.arange(9), 3)['inputs']) == 2  # the tail short of a window goes.
  tok = text.train_bpe(_documents(20), VOCAB)
  docs = ['the model', 'naïve ✓', 'a']
  ids = [tok.encode(d).ids for d in docs]
  np.testing.assert_array_equal(text.pack(tok, docs, 0), ids[0] + [0] + ids[1] + [0] + ids[2] + [0])
  assert text.pack(tok, docs, 0).dtype == np.int32


def test_parquet_rows_are_documents_packed_in_order(tmp_path):
  train = [['the model reads', None, 'a token'], ['', 'each head mixes']]  # null, empty: skipped.
  test = [['attention weights', 'sum to one']]
  root = _write_parquet(tmp_path, {'train': train, 'test': test})
  d = text.text_lm(dir=root, vocab_size=VOCAB, seq_len=2)
  tok, eos = Tokenizer.from_str(d.info['tokenizer']), d.info['eos_id']
  assert eos == tok.token_to_id('<|endoftext|>') == 0
  assert d.info['vocab_size'] == tok.get_vocab_size() <= VOCAB
  expected = lambda docs: sum((tok.encode(x).ids + [eos] for x in docs), [])
  train_ids = expected(['the model reads', 'a token', 'each head mixes'])
  n = (len(train_ids) - 1) // 2
  np.testing.assert_array_equal(d.train['inputs'], np.reshape(train_ids[:2 * n], (n, 2)))
  np.testing.assert_array_equal(d.train['targets'], np.reshape(train_ids[1:2 * n + 1], (n, 2)))
  test_ids = expected(['attention weights', 'sum to one'])
  np.testing.assert_array_equal(_stream(d.test), test_ids[:len(_stream(d.test))])
  assert d.train['inputs'].dtype == np.int32


def test_a_train_only_parquet_holds_out_its_last_rows(tmp_path):
  docs = [f'document {i}: ' + d for i, d in enumerate(_documents(20, words=4))]
  root = _write_parquet(tmp_path, {'train': [docs[:12], docs[12:]]})
  d = text.text_lm(dir=root, vocab_size=VOCAB, seq_len=4, test_fraction=0.25)
  _, decode, _ = text.codec(d.info)
  test_docs = decode(_stream(d.test)).split('<|endoftext|>')  # the last one may be cut short.
  assert test_docs[:4] == docs[15:19] and len(test_docs) >= 5
  assert decode(_stream(d.train)).startswith(docs[0] + '<|endoftext|>' + docs[1])
  with pytest.raises(ValueError, match=r"data.eval_split='valid' is not in data.dir=.*; it has"):
    text.text_lm(dir=root, vocab_size=VOCAB, eval_split='valid')


def test_the_eval_split_is_validation_then_test_unless_named(tmp_path):
  root = _write_parquet(tmp_path, {'train': [_documents(10)], 'validation': [['the model']],
                                   'test': [['attention weights sum to one']]})
  decoded = lambda **kw: text.codec((d := text.text_lm(dir=root, vocab_size=VOCAB, seq_len=2,
                                                       **kw)).info)[1](_stream(d.test))
  assert decoded().startswith('the model')
  assert decoded(eval_split='test').startswith('attention weights')


def test_the_tokenizer_round_trips_any_text_and_trains_deterministically(corpus):
  docs = _documents(30)
  tok = text.train_bpe(docs, VOCAB)
  # Rust's hash maps are seeded anew for each map: a second training in this process meets
  # other hash orders, as another process would.
  assert text.train_bpe(docs, VOCAB).to_str() == tok.to_str()
  encode, decode, _ = text.codec({'tokenizer': tok.to_str()})
  for x in ('the model reads', 'naïve café, 世界 ✓\n\ttabs  and  spaces ', 'Ünseen Ωmega 🙂',
            '<|endoftext|> in the text', ''):
    assert decode(encode(x)) == x
  assert len(encode('the model reads')) < len('the model reads')  # merges happened.
  a, b = text.text_lm(path=corpus, vocab_size=VOCAB, seq_len=8), text.text_lm(
      path=corpus, vocab_size=VOCAB, seq_len=8)
  assert a.info == b.info
  np.testing.assert_array_equal(a.train['inputs'], b.train['inputs'])


def test_a_text_file_is_one_document_split_by_position(corpus):
  d = text.text_lm(path=corpus, vocab_size=VOCAB, seq_len=8, test_fraction=0.2)
  raw = open(corpus, encoding='utf-8').read()
  cut = int(len(raw) * 0.8)
  _, decode, _ = text.codec(d.info)
  # A window may end inside a character (decoded as U+FFFD) or at the final end-of-text token.
  assert raw[:cut].startswith(decode(_stream(d.train)).rstrip('\ufffd'))
  test = decode(_stream(d.test)).removesuffix('<|endoftext|>')
  assert raw[cut:].startswith(test.rstrip('\ufffd'))
  assert (d.train['inputs'] == d.info['eos_id']).sum() == 0  # one document: eos at its end only.
  # Bits per character: the test text's characters over its tokens (with the final eos).
  tokens = len(Tokenizer.from_str(d.info['tokenizer']).encode(raw[cut:]).ids) + 1
  assert d.info['chars_per_token'] == (len(raw) - cut) / tokens
  metrics = tasks.eval_metrics_of('lm', {'loss': 2.0}, d.info['chars_per_token'])
  assert metrics['bits_per_char'] == pytest.approx(2.0 / np.log(2) * tokens / (len(raw) - cut))


def test_a_tokenizer_json_is_loaded_and_sets_vocab_size(corpus, tmp_path):
  trained = text.text_lm(path=corpus, vocab_size=VOCAB, seq_len=8)
  path = str(tmp_path / 'tokenizer.json')
  Tokenizer.from_str(trained.info['tokenizer']).save(path)
  d = text.text_lm(path=corpus, tokenizer=path, vocab_size=50_000, seq_len=8)
  assert d.info['vocab_size'] == trained.info['vocab_size'] <= VOCAB
  np.testing.assert_array_equal(d.train['inputs'], trained.train['inputs'])
  no_eos = Tokenizer(models.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]'))
  no_eos.pre_tokenizer = pre_tokenizers.Whitespace()
  no_eos.save(str(tmp_path / 'words.json'))
  with pytest.raises(ValueError, match=r"data.tokenizer='.*words.json' has no end-of-text token"):
    text.text_lm(path=corpus, tokenizer=str(tmp_path / 'words.json'))


def test_the_default_text_is_pydoc():
  d = text.text_lm(vocab_size=VOCAB, seq_len=256)
  first = text.codec(d.info)[1](d.train['inputs'][0])
  assert memory.pydoc_text().startswith(first.rstrip('\ufffd'))


def _one_line_error(match, **kwargs):
  with pytest.raises(ValueError, match=match) as e:
    text.text_lm(**kwargs)
  assert '\n' not in str(e.value)


def test_errors_are_one_line_and_name_the_field(corpus, tmp_path):
  shards = _write_parquet(tmp_path / 'ok', {'train': [_documents(10)]})
  numbers = _write_parquet(tmp_path / 'numbers', {'train': [[1, 2]]},
                           column=lambda rows: pa.table({'text': rows}))
  test_only = _write_parquet(tmp_path / 'test_only', {'test': [_documents(2)]})
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  for match, kwargs in (
      (r"data.path='nope.txt' is not a readable file", dict(path='nope.txt')),
      (r'data.path=.* and data.dir=.* are both set; give one', dict(path=corpus, dir=shards)),
      (r"data.dir='nowhere' is not a directory", dict(dir='nowhere')),
      (r'data.dir=.* has no train split .*; it has .*test', dict(dir=test_only)),
      (r"data.column='body' is not a column of .*; it has text, id", dict(dir=shards,
                                                                       column='body')),
      (r"data.column='text' is a int64 column in .*; give a string column", dict(dir=numbers)),
      (r"data.tokenizer='none.json' is not a file; give a tokenizer.json or 'bpe'",
       dict(path=corpus, tokenizer='none.json')),
      (r"data.tokenizer='.*bad.json' is not a tokenizer.json",
       dict(path=corpus, tokenizer=str(tmp_path / 'bad.json'))),
      (r'data.vocab_size=256; a byte-level BPE needs more than 256', dict(vocab_size=256)),
      (r'data.seq_len=1000 needs 1001 tokens per split; the test split of data.path=.* has',
       dict(path=corpus, vocab_size=VOCAB, seq_len=1000))):
    _one_line_error(match, **kwargs)


def test_lm_config_keeps_char_by_default_and_switches_to_bpe():
  assert lm.get_config('').data.to_dict() == dict(name='char_lm', path='', seq_len=128,
                                                   test_fraction=0.1)
  assert lm.get_config('tokenizer=bpe,seq_len=64').data.to_dict() == dict(
      name='text', path='', dir='', column='text', tokenizer='bpe', vocab_size=2048, seq_len=64,
      test_fraction=0.1, eval_split='')


def test_codec_labels_characters_as_before_and_subword_tokens_by_their_text():
  encode, decode, name = text.codec({'chars': '\t\n ab'})
  assert [name(np.int32(i)) for i in range(5)] == ['\\t', '\\n', '␣', 'a', 'b']
  assert encode('ab a') == [3, 4, 2, 3] and decode(np.array([4, 2])) == 'b '
  with pytest.raises(ValueError, match="'z' are characters not in the vocabulary"):
    encode('za')
  tok = text.train_bpe(_documents(20), VOCAB)
  _, _, name = text.codec({'tokenizer': tok.to_str()})
  assert name(0) == '<|endoftext|>' and name(tok.token_to_id('Ġthe')) == '␣the'
  assert name(tok.encode('ñ').ids[0]) == 'Ã'  # half a character: its byte-level entry.


def test_a_bpe_run_trains_and_generates(corpus, tmp_path):
  config = tiny_config('lm', arg='tokenizer=bpe,quick,seq_len=16', steps=2, eval_batch_size=16)
  config.data.update(path=corpus, vocab_size=VOCAB)
  workdir = str(tmp_path / 'run')
  summary, _ = train_and_evaluate(config, workdir)
  assert np.isfinite(summary['eval/loss'])
  (greedy,) = generate.generate_text(workdir, prompt='the 世界', max_new_tokens=4)
  assert greedy.startswith('the 世界') and len(greedy) > len('the 世界')
  with pytest.raises(ValueError, match=r"the prompt's \d+ tokens"):
    generate.generate_text(workdir, prompt='the model reads', max_len=3)
