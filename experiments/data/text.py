"""Subword tokenizers and sequence packing for language models.

  text_lm  a language-modelling dataset from a UTF-8 text file or a string column of parquet
           shards: a byte-level BPE trained on the training documents (or a tokenizer.json),
           documents packed into one token stream per split, cut into windows.
  codec    encode / decode / token labels for a language-model dataset's info, by its tokenizer
           or, for the character LM, by its characters.

Tokenizers are those of the `tokenizers` package (Hugging Face), imported only here.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from experiments.data import memory, sources

EOT = '<|endoftext|>'  # the end-of-text token a trained BPE gets (id 0).
# End-of-text tokens looked for, in this order, in a loaded tokenizer.json.
EOS_TOKENS = (EOT, '<|end_of_text|>', '</s>', '<eos>')
BYTE_ALPHABET = 256  # a byte-level BPE holds every byte as a token, whatever it is trained on.
DOCUMENTS_PER_BATCH = 1024  # documents per encode_batch call: bounds the Encoding objects alive.
SHOWN = {' ': '␣', '\n': '\\n', '\t': '\\t'}  # whitespace in token labels.


def _tokenizers():
  try:
    import tokenizers
  except ImportError:
    raise ImportError('data.name=text needs the tokenizers package: pip install tokenizers'
                      ) from None
  return tokenizers


def train_bpe(documents, vocab_size: int):
  """A byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, split by GPT-2's
  regex, merges learned from pair counts) with EOT as id 0, trained on the `documents` strings.
  Its vocabulary is at most vocab_size: fewer when the text has no more pairs to merge.
  Training is deterministic: the same documents give the same tokenizer in every process and
  with any number of threads (ties in pair counts are broken by the pair, not by hash order)."""
  tk = _tokenizers()
  tokenizer = tk.Tokenizer(tk.models.BPE())
  tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=False)
  tokenizer.train_from_iterator(documents, trainer=trainer)
  return tokenizer


def load_tokenizer(path: str):
  """The tokenizer of a tokenizer.json file (as the Hub and save_pretrained write it), without
  padding or truncation."""
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer={path!r} is not a file; give a tokenizer.json or 'bpe'")
  tk = _tokenizers()
  try:
    tokenizer = tk.Tokenizer.from_file(path)
  except Exception as e:  # the Rust parser's errors are plain Exceptions.
    reason = ' '.join(str(e).split())
    raise ValueError(f"data.tokenizer={path!r} is not a tokenizer.json ({reason}); give one or "
                     "'bpe'") from None
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def eos_id(tokenizer, name: str) -> int:
  """The id of the tokenizer's end-of-text token, the first of EOS_TOKENS it has."""
  for token in EOS_TOKENS:
    i = tokenizer.token_to_id(token)
    if i is not None:
      return i
  raise ValueError(f'data.tokenizer={name!r} has no end-of-text token; it needs one of '
                   f'{", ".join(EOS_TOKENS)}')


def pack(tokenizer, documents, eos: int) -> np.ndarray:
  """One int32 token stream of the documents (GPT-2's packing): each document's ids, no special
  tokens added by the tokenizer's post-processor, followed by `eos`:
  [d0 ids, eos, d1 ids, eos, ...]."""
  encode = getattr(tokenizer, 'encode_batch_fast', tokenizer.encode_batch)  # no offsets.
  parts, batch = [], []

  def flush():
    ids = []
    for encoding in encode(batch, add_special_tokens=False):
      ids += encoding.ids
      ids.append(eos)
    parts.append(np.array(ids, np.int32))
    batch.clear()

  for document in documents:
    batch.append(document)
    if len(batch) == DOCUMENTS_PER_BATCH:
      flush()
  if batch:
    flush()
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def windows(ids: np.ndarray, seq_len: int) -> dict:
  """Consecutive, non-overlapping examples of a token stream: window k is
  ids[k·seq_len : (k+1)·seq_len + 1], inputs its first seq_len tokens and targets the last
  seq_len (the next token of each input). Every token but the first of the stream is a target
  once; the tail that does not fill a window is dropped."""
  n = (len(ids) - 1) // seq_len
  return {'inputs': ids[:n * seq_len].reshape(n, seq_len),
          'targets': ids[1:n * seq_len + 1].reshape(n, seq_len)}


def _is_string(arrow_type) -> bool:
  import pyarrow as pa
  view = getattr(pa.types, 'is_string_view', lambda t: False)
  return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or view(arrow_type)


class _ParquetColumn:
  """The documents of one split: the non-empty strings of `column` in its shards, rows
  [start, stop) of the shards' concatenation. Iterable more than once (the tokenizer trains on
  one pass, packing reads another); it reads one shard at a time."""

  def __init__(self, files: list[str], column: str, start: int = 0, stop: int | None = None):
    self.files, self.column, self.start, self.stop = files, column, start, stop

  def __iter__(self):
    import pyarrow.parquet as pq
    offset = 0
    for f in self.files:
      rows = pq.ParquetFile(f).metadata.num_rows
      lo = max(self.start - offset, 0)
      hi = rows if self.stop is None else min(self.stop - offset, rows)
      offset += rows
      if lo < hi:
        values = pq.read_table(f, columns=[self.column])[self.column].slice(lo, hi - lo)
        yield from filter(None, values.to_pylist())  # null and empty rows are no documents.


def _parquet_documents(root: str, column: str, eval_split: str, test_fraction: float):
  """(train documents, test documents) of the parquet shards under root; see text_lm."""
  if not os.path.isdir(root):
    raise ValueError(f'data.dir={root!r} is not a directory; point it at a folder of parquet '
                     'shards (data/train-*.parquet, …)')
  import pyarrow.parquet as pq
  available = sources.parquet_splits(root)
  if 'train' not in available:
    raise ValueError(f'data.dir={root!r} has no train split (train-*.parquet or '
                     f'train/*.parquet); it has {", ".join(available) or "no parquet files"}')
  test_split = None  # None: hold out the last train rows.
  if eval_split or any(s in available for s in sources.EVAL_SPLITS):
    test_split = sources.eval_split_of(available, eval_split, f'data.dir={root!r}')
  files = {s: sources.parquet_files(root, s) for s in ('train', test_split) if s}
  for f in sorted({f for shards in files.values() for f in shards}):
    schema = pq.read_schema(f)
    if column not in schema.names:
      raise ValueError(f'data.column={column!r} is not a column of {f}; it has '
                       f'{", ".join(schema.names)}')
    kind = schema.field(column).type
    if not _is_string(kind):
      raise ValueError(f'data.column={column!r} is a {kind} column in {f}; give a string column')
  if test_split:
    return _ParquetColumn(files['train'], column), _ParquetColumn(files[test_split], column)
  rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files['train'])
  cut = int(rows * (1 - test_fraction))
  if cut == 0 or cut == rows:
    raise ValueError(f'data.dir={root!r} has only a train split, of {rows} rows: too few to '
                     f'hold out data.test_fraction={test_fraction} of them as the test set')
  return (_ParquetColumn(files['train'], column, 0, cut),
          _ParquetColumn(files['train'], column, cut))


def text_lm(path: str = '', dir: str = '', column: str = 'text', tokenizer: str = 'bpe',
            vocab_size: int = 2048, seq_len: int = 128, test_fraction: float = 0.1,
            eval_split: str = '') -> memory.Dataset:
  """Subword language modelling on a UTF-8 text file (`path`) or parquet shards (`dir`); with
  neither, the default text of the character LM (memory.pydoc_text).

  Documents: a text file is one document, split by position as char_lm splits it: the last
  test_fraction of its characters is the test document. Under `dir`, the non-empty rows of the
  string column `column` are the documents; the train split is train-*.parquet or
  train/*.parquet (sources.parquet_files), the test split `eval_split`, else the first of
  val, validation, test that exists, else the last test_fraction of the train rows.
  Tokens: tokenizer='bpe' trains a byte-level BPE of vocab_size tokens on the train documents
  only (deterministic, so a resumed run or experiments.generate rebuilds the same model);
  tokenizer=PATH loads a tokenizer.json, whose own size replaces vocab_size.
  Packing: each split is one stream, doc0 ids, eos, doc1 ids, eos, … (int32), cut into
  non-overlapping windows of seq_len + 1 tokens (train and test alike; see `windows`), so that
  windows cross document boundaries and no position is padding.
  info: vocab_size, tokenizer (its JSON, as Tokenizer.to_str writes it), eos_id, and
  chars_per_token, the test documents' characters per token of their stream (eos included),
  which turns the loss per token into bits per character.
  """
  if path and dir:
    raise ValueError(f'data.path={path!r} and data.dir={dir!r} are both set; give one of them '
                     '(a text file, or a folder of parquet shards)')
  if tokenizer == 'bpe' and vocab_size <= BYTE_ALPHABET:
    raise ValueError(f'data.vocab_size={vocab_size}; a byte-level BPE needs more than '
                     f'{BYTE_ALPHABET} (every byte, plus {EOT})')
  if dir:
    train_docs, test_docs = _parquet_documents(dir, column, eval_split, test_fraction)
    where = f'data.dir={dir!r}'
  else:
    if path and not os.path.isfile(path):
      raise ValueError(f'data.path={path!r} is not a readable file')
    text = memory._read_text(path) if path else memory.pydoc_text()
    cut = int(len(text) * (1 - test_fraction))
    train_docs, test_docs = [text[:cut]], [text[cut:]]
    where = f'data.path={path!r}' if path else 'the default text'
  if tokenizer == 'bpe':
    tok = train_bpe(train_docs, vocab_size)
  else:
    tok = load_tokenizer(tokenizer)
  eos = eos_id(tok, tokenizer)
  splits, tokens = {}, 0
  for split, documents in (('train', train_docs), ('test', test_docs)):
    ids = pack(tok, documents, eos)
    tokens = len(ids)
    if len(ids) < seq_len + 1:
      raise ValueError(f'data.seq_len={seq_len} needs {seq_len + 1} tokens per split; the '
                       f'{split} split of {where} has {len(ids)}')
    splits[split] = windows(ids, seq_len)
  return memory.Dataset(splits['train'], splits['test'],
                        {'vocab_size': tok.get_vocab_size(), 'tokenizer': tok.to_str(),
                         'eos_id': eos,
                         'chars_per_token': sum(map(len, test_docs)) / tokens})


def codec(info: dict):
  """(encode, decode, token_name) of a language-model dataset's info:
  encode(text) -> list of ids, decode(ids) -> text, token_name(id) -> a label for tables and
  plots, whitespace shown as ␣, \\n and \\t. By info['tokenizer'] (text_lm; encode adds no
  special tokens, decode keeps them, a token that is part of a character is labelled by its
  vocabulary entry) when present, else by info['chars'] (char_lm: id i is chars[i]; encode
  raises a ValueError naming the characters that are not there)."""
  if 'tokenizer' in info:
    tokenizer = _tokenizers().Tokenizer.from_str(info['tokenizer'])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    decode = lambda ids: tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @functools.lru_cache(maxsize=None)
    def text_of(i: int) -> str:
      text = decode([i])
      return tokenizer.id_to_token(i) if '\ufffd' in text else text  # a byte of a character.
  else:
    chars = info['chars']
    index = {c: i for i, c in enumerate(chars)}

    def encode(text):
      unknown = sorted(set(text) - set(index))
      if unknown:
        raise ValueError(f'{"".join(unknown)!r} are characters not in the vocabulary of '
                         f'{len(chars)} characters')
      return [index[c] for c in text]

    decode = lambda ids: ''.join(chars[i] for i in ids)
    text_of = lambda i: chars[i]

  def token_name(i) -> str:
    text = text_of(int(i))
    return ''.join(SHOWN.get(c, c) for c in text)

  return encode, decode, token_name
