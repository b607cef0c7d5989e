"""Generate from a trained run: continue a prompt (LM runs) or decode a source (seq2seq runs).

  python -m experiments.generate --workdir=RUN --prompt="def main(" [--max_new_tokens=200]
  python -m experiments.generate --workdir=RUN --prompt="The " --method=sample --temperature=0.8 \\
      --top_p=0.9 --num_samples=3 --seed=1
  python -m experiments.generate --workdir=RUN --source="3 1 4 1 5" [--method=beam --beam_size=4]

Decoding is tx.generate / tx.beam_search: one compiled loop over a KV cache. The methods and
the length flags (--max_new_tokens, and --max_len, the older spelling) are in
docs/generation.md. Ctrl-C: one line on stderr, exit code 130.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

import tx
from experiments.cli import (define_run_reader_flags, exit_on_interrupt, fail_unless_verbose,
                             parse_flags, start_run_reader)
from experiments.data import EOS, symbol_names
from experiments.data import text as text_data
from experiments.restore import load_run
from tx.validate import check_choice

METHODS = ('greedy', 'sample', 'beam')


def encode_prompt(text: str, vocabulary) -> np.ndarray:
  """Token ids [1, T] of `text` in the run's vocabulary: a string of characters (those of its
  training text; id i is vocabulary[i]) or the encode function of its tokenizer
  (experiments.data.text.codec)."""
  if isinstance(vocabulary, str):
    unknown = sorted(set(text) - set(vocabulary))
    if unknown:
      raise ValueError(f'--prompt has characters the model never saw: {"".join(unknown)!r}; '
                       f'allowed: the {len(vocabulary)} characters of its training text')
  if not text:
    raise ValueError('--prompt is empty; give at least one character')
  ids = ([vocabulary.index(c) for c in text] if isinstance(vocabulary, str)
         else vocabulary(text))
  return np.array([ids], np.int32)


def encode_source(text: str, names: dict[int, str]) -> np.ndarray:
  """Symbol ids of a seq2seq source, '3 1 4' or '314' (or '12+34' in addition), with </s>."""
  ids = {name: i for i, name in names.items() if name and not name.startswith('<')}
  tokens = text.split() if any(c.isspace() for c in text.strip()) else list(text.strip())
  bad = [t for t in tokens if t not in ids]
  if bad or not tokens:
    raise ValueError(f'--source={text!r}: {"unknown symbols " + repr(bad) if bad else "empty"}; '
                     f'allowed: {" ".join(ids)} (separated by spaces, or one character each)')
  return np.array([[ids[t] for t in tokens] + [EOS]], np.int32)


def generate_text(workdir: str, *, prompt: str | None = None, source: str | None = None,
                  method: str = 'greedy', max_new_tokens: int | None = None,
                  max_len: int | None = None, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, beam_size: int = 4,
                  length_penalty: float = 0.6, seed: int = 0, step: int | None = None) -> list[str]:
  """The generated texts (one per sample or beam, best beam first), as printed by the command;
  the arguments are the command's flags. Without max_new_tokens or max_len, up to the trained
  length (LM: the context length less the prompt; seq2seq: the padded target width)."""
  check_choice('--method', method, METHODS)
  if num_samples < 1:
    raise ValueError(f'--num_samples={num_samples}; it must be a positive integer')
  run, params, _ = load_run(workdir, step)
  info = run.dataset.info
  if run.task == 'lm':
    if prompt is None:
      raise ValueError(f'--workdir={workdir!r} is a language-model run: give --prompt="..."')
    encode, decode, _ = text_data.codec(info)  # by its characters, or by its tokenizer.
    inputs = encode_prompt(prompt, info['chars'] if 'chars' in info else encode)
    length = max_len or run.config.model.num_positions  # the total, prompt included.
    if not max_new_tokens and length <= inputs.shape[1]:
      unit = 'characters' if 'chars' in info else 'tokens'
      raise ValueError(f'--max_len={length} (the total length, prompt included) must exceed '
                       f'the prompt\'s {inputs.shape[1]} {unit}; or give --max_new_tokens')
    max_new_tokens = max_new_tokens or length - inputs.shape[1]
    ids = dict(eos_id=None)  # text runs on past an end-of-text token, into the next document.
  elif run.task == 'seq2seq':
    if source is None:
      raise ValueError(f'--workdir={workdir!r} is a seq2seq run: give --source="..."')
    names = symbol_names(run.config.data.task, info['vocab_size'])
    inputs = encode_source(source, names)
    max_new_tokens = max_new_tokens or max_len or info['width']
    ids = dict(eos_id=info['eos_id'], pad_id=info['pad_id'], bos_id=info['bos_id'])
    shown = ' '.join(names[int(t)] for t in inputs[0]) + ' → '  # the source, then the output.
    decode = lambda tokens: shown + ' '.join(names[int(t)] for t in tokens if t != info['pad_id'])
  else:
    raise ValueError(f'--workdir={workdir!r} is a {run.task} run; generate needs a language-model '
                     'run (--prompt) or a seq2seq run (--source)')
  if method == 'beam':
    beams = tx.beam_search(run.model, params, inputs, beam_size=beam_size,
                           max_new_tokens=max_new_tokens,
                           length_penalty_alpha=length_penalty, **ids)
    tokens, scores = np.asarray(beams.tokens[0]), np.asarray(beams.scores[0])
    return [f'{decode(t)}   (score {s:.3f})' for t, s in zip(tokens, scores)]
  sample = method == 'sample'
  out = tx.generate(run.model, params, np.repeat(inputs, num_samples if sample else 1, axis=0),
                    max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                    temperature=temperature if sample else 0.0,
                    top_k=top_k if sample else None, top_p=top_p if sample else None, **ids)
  return [decode(t) for t in np.asarray(out.tokens)]


def define_flags():
  """The command's flags; defined only when run as a program (see experiments.inspect)."""
  define_run_reader_flags('A language-model or seq2seq run written by experiments.run.')
  flags.DEFINE_string('prompt', None, 'Text to continue (language-model runs).')
  flags.DEFINE_string('source', None, 'Source symbols to decode (seq2seq runs), e.g. "3 1 4".')
  flags.DEFINE_enum('method', 'greedy', METHODS, 'Decoding method.')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate after the prompt or source; '
                       'default: up to the trained length.')
  flags.DEFINE_integer('max_len', None, 'Older spelling: the total length for LMs (prompt '
                       'included), the output length for seq2seq.')
  flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (--method=sample).')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens only (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens with this mass.')
  flags.DEFINE_integer('num_samples', 1, 'Samples to draw (--method=sample).')
  flags.DEFINE_integer('beam_size', 4, 'Beams (--method=beam).')
  flags.DEFINE_float('length_penalty', 0.6, 'α of the GNMT length penalty (--method=beam).')
  flags.DEFINE_integer('seed', 0, 'PRNG seed for sampling.')


def main(argv):
  f = flags.FLAGS
  start_run_reader(argv, '--workdir=RUN --prompt="..." (LM) or --source="..." (seq2seq)')
  start = time.time()
  options = ('prompt', 'source', 'method', 'max_new_tokens', 'max_len', 'temperature', 'top_k',
             'top_p', 'num_samples', 'beam_size', 'length_penalty', 'seed', 'step')
  try:
    texts = generate_text(f.workdir, **{name: f[name].value for name in options})
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- {"beam" if f.method == "beam" else "sample"} {i + 1} ---')
    print(text, flush=True)
  print(f'({time.time() - start:.1f} s, loading and compiling included)', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main, 'generate writes no files, so nothing was left behind'),
          flags_parser=parse_flags)
