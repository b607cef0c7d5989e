"""tx.generate and tx.beam_search: the KV cache against recomputing the full forward pass, beam
search against exhaustive search, sampling filters against NumPy, eos, prompts and keys."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx
from tx import decoding

SMALL = dict(num_layers=2, d_model=16, num_heads=4, d_ff=32, num_positions=12)
EOS, BOS, PAD = 2, 1, 0


def _lm(posemb='rope', vocab=20, **kw):
  model = tx.DecoderLM(vocab_size=vocab, posemb=posemb, **dict(SMALL, **kw))
  prompt = jax.random.randint(jax.random.key(1), (3, 4), 3, vocab)
  return model, model.init(jax.random.key(0), prompt)['params'], prompt


def _seq2seq(posemb='rope'):
  model = tx.EncoderDecoder(vocab_size=20, posemb=posemb, **SMALL)
  source = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12], [5, 0, 0, 0, 0, 0]])
  return model, model.init(jax.random.key(0), source, source)['params'], source


@pytest.mark.parametrize('kind,posemb', [(k, p) for k in ('lm', 'seq2seq')
                                         for p in ('learn', 'sinusoidal', 'rope', 'none')])
def test_cached_decoding_equals_recomputing_the_full_pass(kind, posemb):
  model, params, inputs = _lm(posemb) if kind == 'lm' else _seq2seq(posemb)
  common = dict(max_new_tokens=8 if kind == 'lm' else 11, eos_id=EOS, return_logits=True,
                bos_id=None if kind == 'lm' else BOS)
  cached = tx.generate(model, params, inputs, **common)
  recomputed = tx.generate(model, params, inputs, use_cache=False, **common)
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.logits, recomputed.logits, atol=2e-5)
  # And against one teacher-forced pass over the generated output (an independent reference).
  if kind == 'lm':
    full = model.apply({'params': params}, cached.tokens)[:, 3:-1]
    np.testing.assert_allclose(cached.logits[:, 4:], full, atol=2e-5)
  else:  # (after eos both feed <pad>: the same inputs)
    full = model.apply({'params': params}, inputs, tx.shift_right(cached.tokens, BOS))
    np.testing.assert_allclose(cached.logits, full, atol=2e-5)


def test_sampling_with_the_cache_equals_recomputing_and_keys_decide():
  model, params, prompt = _lm('rope')
  common = dict(max_new_tokens=8, rng=jax.random.key(7), temperature=1.3, top_k=8, top_p=0.9)
  cached = tx.generate(model, params, prompt, **common)
  np.testing.assert_array_equal(cached.tokens, tx.generate(model, params, prompt,
                                                           use_cache=False, **common).tokens)
  np.testing.assert_array_equal(cached.tokens, tx.generate(model, params, prompt, **common).tokens)
  other = tx.generate(model, params, prompt, **dict(common, rng=jax.random.key(8)))
  assert not np.array_equal(cached.tokens, other.tokens)
  greedy = tx.generate(model, params, prompt, max_new_tokens=8)
  for narrow in (dict(top_k=1, top_p=None), dict(top_k=None, top_p=1e-6)):  # one token left
    np.testing.assert_array_equal(tx.generate(model, params, prompt, **{**common, **narrow}).tokens,
                                  greedy.tokens)


def _filter_reference(logits, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  out = np.full_like(x, -np.inf)
  for row, r in zip(x, out):
    order = np.argsort(-row)[:top_k or len(row)]
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    keep = order[:int(np.searchsorted(np.cumsum(p), top_p or 1.0) + 1)]  # smallest set ≥ top_p
    r[keep] = row[keep]
  return out


@pytest.mark.parametrize('top_k,top_p', [(None, None), (3, None), (None, 0.5), (5, 0.8)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = jax.random.normal(jax.random.key(3), (6, 12)) * 2
  got = np.asarray(decoding._filter_logits(logits, 0.7, top_k, top_p))
  want = _filter_reference(logits, 0.7, top_k, top_p)
  np.testing.assert_array_equal(got > decoding.NEG_INF / 2, np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5)


def test_sampled_frequencies_follow_the_filtered_softmax():
  model, params, prompt = _lm('rope')
  prompt = jnp.tile(prompt[:1], (4000, 1))
  out = tx.generate(model, params, prompt, max_new_tokens=1, rng=jax.random.key(0), temperature=1.5,
                    top_k=6, top_p=0.9, return_logits=True)
  probs = jax.nn.softmax(_filter_reference(out.logits[:1, 4], 1.5, 6, 0.9), axis=-1)[0]
  counts = np.bincount(np.asarray(out.tokens[:, 4]), minlength=20) / 4000
  assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs))
  np.testing.assert_allclose(counts, probs, atol=0.03)  # ~4 standard errors at 4,000 draws


def test_rows_finish_independently_at_eos():
  model, params, prompt = _lm('sinusoidal', vocab=6)  # a small vocabulary: eos comes early
  free = np.asarray(tx.generate(model, params, prompt[:, :2] % 6, max_new_tokens=10).tokens)
  stopped = np.asarray(tx.generate(model, params, prompt[:, :2] % 6, max_new_tokens=10, eos_id=EOS,
                                   pad_id=5).tokens)
  finished = 0
  for row_free, row in zip(free, stopped):
    ends = np.flatnonzero(row_free[2:] == EOS)
    if len(ends):
      cut = 2 + ends[0] + 1
      np.testing.assert_array_equal(row[:cut], row_free[:cut])
      assert (row[cut:] == 5).all()
      finished += 1
    else:
      np.testing.assert_array_equal(row, row_free)
  assert 0 < finished < len(free), 'the test needs rows that stop and rows that do not'


def test_prompts_of_different_lengths_equal_each_prompt_alone():
  """The buffer is P + max_new_tokens wide for every row: a row with a prompt of n < P
  tokens generates P - n more, as the same prompt alone with P - n + max_new_tokens."""
  model, params, prompt = _lm('learn')
  lengths = np.array([4, 2, 3])
  padded = np.where(np.arange(4) < lengths[:, None], prompt, 0)
  batch = tx.generate(model, params, padded, max_new_tokens=6, prompt_lengths=lengths)
  assert batch.tokens.shape == (3, 4 + 6)
  for i, n in enumerate(lengths):
    alone = tx.generate(model, params, padded[i:i + 1, :n], max_new_tokens=4 - n + 6)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


def _left_padded(prompt, lengths):
  """Row b's last lengths[b] tokens of `prompt`, after PAD: Hugging Face's layout."""
  width = prompt.shape[1]
  return np.where(np.arange(width) >= width - np.asarray(lengths)[:, None], prompt, PAD)


def _alone(model, params, rows):
  """Each row's logits alone, from one causal pass over the rows right-padded (an independent
  reference: trailing pads never reach earlier positions)."""
  width = max(map(len, rows))
  batch = np.array([list(r) + [PAD] * (width - len(r)) for r in rows])
  return np.asarray(jax.jit(model.apply)({'params': params}, batch))


@pytest.mark.parametrize('posemb', ['learn', 'sinusoidal'])  # rope: the sampling test
def test_left_padded_prompts_equal_each_prompt_alone(posemb):
  """All rows generate positions P ... P + N − 1; row b's pads are masked keys and its slot
  t is position t − pad_b, so each generated token is the argmax of the logits its row's
  real tokens give alone: the row is what greedy decoding of its prompt alone writes."""
  model, params, prompt = _lm(posemb)
  lengths = np.array([4, 2, 3])
  padded = _left_padded(prompt, lengths)
  batch = tx.generate(model, params, padded, max_new_tokens=6, prompt_lengths=lengths,
                      padding='left', return_logits=True)
  assert batch.tokens.shape == (3, 4 + 6)
  np.testing.assert_array_equal(batch.tokens[:, :4], padded)  # the pads stay, as HF's
  tokens = np.asarray(batch.tokens)
  alone = _alone(model, params, [tokens[i, 4 - n:-1] for i, n in enumerate(lengths)])
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(batch.logits[i, 4:], alone[i, n - 1:n + 5], atol=2e-5)
    np.testing.assert_array_equal(tokens[i, 4:], alone[i, n - 1:n + 5].argmax(-1))


def test_left_padded_sampling_conditions_each_row_on_its_own_tokens():
  """Sampling keys depend on the position and the batch, so a sampled row is not comparable
  with its prompt alone; its logits are: each generated position's equal those of the row's
  real tokens alone. Scanned layers, rope and grouped K/V heads; the cache against recomputing."""
  model = tx.DecoderLM(vocab_size=20, posemb='rope', num_kv_heads=2, scan_layers=True, **SMALL)
  prompt = jax.random.randint(jax.random.key(1), (3, 4), 3, 20)
  params = jax.jit(model.init)(jax.random.key(0), prompt)['params']  # (eager scan is slower)
  lengths = np.array([1, 4, 2])
  padded = _left_padded(prompt, lengths)
  common = dict(max_new_tokens=6, prompt_lengths=lengths, padding='left', rng=jax.random.key(3),
                temperature=1.5, top_k=10, return_logits=True)
  sampled = tx.generate(model, params, padded, **common)
  np.testing.assert_array_equal(
      sampled.tokens, tx.generate(model, params, padded, use_cache=False, **common).tokens)
  tokens = np.asarray(sampled.tokens)
  alone = _alone(model, params, [tokens[i, 4 - n:-1] for i, n in enumerate(lengths)])
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(sampled.logits[i, 4:], alone[i, n - 1:n + 5], atol=2e-5)
  argmax = np.stack([alone[i, n - 1:n + 5].argmax(-1) for i, n in enumerate(lengths)])
  assert not np.array_equal(tokens[:, 4:], argmax)  # sampled, not greedy


def test_left_padded_beam_search_scores_each_row_on_its_own_tokens():
  """Every beam's score is Σ log p of its generated tokens given its row's real tokens alone,
  over the GNMT length penalty (no eos: every beam has 5 generated tokens)."""
  model, params, prompt = _lm('sinusoidal')
  lengths = np.array([4, 2, 3])
  padded = _left_padded(prompt, lengths)
  beams = tx.beam_search(model, params, padded, beam_size=3, max_new_tokens=5,
                         prompt_lengths=lengths, padding='left', length_penalty_alpha=0.6)
  tokens = np.asarray(beams.tokens)
  np.testing.assert_array_equal(tokens[:, :, :4], np.repeat(padded[:, None], 3, axis=1))
  rows = [tokens[i, k, 4 - n:-1] for i, n in enumerate(lengths) for k in range(3)]
  logp = np.asarray(jax.nn.log_softmax(_alone(model, params, rows)))
  for j, row in enumerate(rows):
    n = lengths[j // 3]
    score = sum(logp[j, n - 1 + g, tokens[j // 3, j % 3, 4 + g]] for g in range(5))
    np.testing.assert_allclose(beams.scores[j // 3, j % 3],
                               score / float(decoding.length_penalty(5, 0.6)), rtol=1e-5)


def test_bad_padding_arguments_are_one_clear_error():
  model, params, prompt = _lm('rope')
  with pytest.raises(ValueError, match="padding='middle'; allowed: 'right', 'left'"):
    tx.generate(model, params, prompt, max_new_tokens=4, prompt_lengths=[4, 2, 3],
                padding='middle')
  with pytest.raises(ValueError, match=r'prompt_lengths has shape \(2,\); it must be \[batch\] '
                     r'= \(3,\)'):
    tx.generate(model, params, prompt, max_new_tokens=4, prompt_lengths=[4, 2], padding='left')
  with pytest.raises(ValueError, match=r'prompt_lengths must be in \[1, 4\]; got \[5, 2, 3\]'):
    tx.generate(model, params, prompt, max_new_tokens=4, prompt_lengths=[5, 2, 3],
                padding='left')
  with pytest.raises(ValueError, match="prompt_lengths with padding='right': beam_search takes"):
    tx.beam_search(model, params, prompt, beam_size=2, max_new_tokens=4,
                   prompt_lengths=[4, 2, 3])
  s2s = tx.EncoderDecoder(vocab_size=20, **SMALL)  # refused before its params are read
  with pytest.raises(ValueError, match="padding='left' with model EncoderDecoder: left padding"):
    tx.generate(s2s, None, prompt, max_new_tokens=4, bos_id=BOS, padding='left')
  decoder = model.clone(decode=True)  # a decode-mode key mask covers the whole cache
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), prompt)['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  step = functools.partial(decoder.apply, mutable=['cache'])
  for width in (2, 1):  # one column would mask a row's whole cache: refused too.
    with pytest.raises(ValueError, match=rf'mask \(DecoderLM valid=\) has {width} keys; in '
                       'decode mode it covers the whole cache: 4 keys'):
      jax.eval_shape(step, {'params': params, 'cache': cache}, prompt[:, :width],
                     valid=prompt[:, :width] > 0)
  unpadded = tx.beam_search(model, params, prompt, beam_size=2, max_new_tokens=2,
                            prompt_lengths=[4, 4, 4])  # right "padding" of none: no padding.
  np.testing.assert_array_equal(unpadded.tokens, tx.beam_search(
      model, params, prompt, beam_size=2, max_new_tokens=2).tokens)


@pytest.mark.parametrize('kind', ['lm', 'seq2seq'])
def test_max_new_tokens_counts_the_tokens_after_the_prompt_or_bos(kind):
  model, params, inputs = _lm('rope') if kind == 'lm' else _seq2seq('rope')
  given = inputs.shape[1] if kind == 'lm' else 0  # the LM output keeps its prompt
  kw = dict(max_new_tokens=5, bos_id=None if kind == 'lm' else BOS)
  decoded = tx.generate(model, params, inputs, return_logits=True, **kw)
  assert decoded.tokens.shape == (3, given + 5)
  assert decoded.logits.shape == (3, given + 5, 20)
  if kind == 'lm':
    np.testing.assert_array_equal(decoded.tokens[:, :given], inputs)
  beams = tx.beam_search(model, params, inputs, beam_size=2, **kw)
  assert beams.tokens.shape == (3, 2, given + 5)


@pytest.mark.parametrize('kind', ['lm', 'seq2seq'])
def test_beam_search_of_one_beam_is_greedy(kind):
  model, params, inputs = _lm('rope') if kind == 'lm' else _seq2seq('learn')
  common = dict(max_new_tokens=8 if kind == 'lm' else 11, eos_id=EOS,
                bos_id=None if kind == 'lm' else BOS)
  greedy = tx.generate(model, params, inputs, **common)
  for alpha in (0.0, 0.6):
    beams = tx.beam_search(model, params, inputs, beam_size=1, length_penalty_alpha=alpha,
                           **common)
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)


def test_beam_search_with_enough_beams_is_exhaustive_search():
  """Vocabulary 4, 3 generated tokens: 16 beams keep every prefix, so the best beam is the
  best of all outputs (ending at eos or after 3 tokens) under the length-penalised score."""
  model, params, prompt = _lm('rope', vocab=4)
  prompt = prompt[:2, :2] % 4
  alpha = 0.8
  beams = tx.beam_search(model, params, prompt, beam_size=16, max_new_tokens=3, eos_id=EOS,
                         length_penalty_alpha=alpha)
  tails = sorted({tuple(t[:t.index(EOS) + 1] if EOS in t else t)
                  for t in map(list, itertools.product(range(4), repeat=3))})
  for b in range(2):
    seqs = np.array([list(prompt[b]) + list(t) + [PAD] * (3 - len(t)) for t in tails])
    logp = np.asarray(jax.nn.log_softmax(jax.jit(model.apply)({'params': params}, seqs)))
    best = (-np.inf, None)
    for i, (seq, tail) in enumerate(zip(seqs, tails)):
      score = sum(float(logp[i, 1 + j, seq[2 + j]]) for j in range(len(tail)))
      best = max(best, (score / float(decoding.length_penalty(len(tail), alpha)), seq.tolist()))
    np.testing.assert_allclose(beams.scores[b, 0], best[0], rtol=1e-5)
    assert beams.tokens[b, 0].tolist() == best[1]
  assert (np.diff(np.asarray(beams.scores), axis=1) <= 1e-6).all()  # best first


def test_cached_beam_search_equals_recomputing():
  model, params, source = _seq2seq('sinusoidal')
  common = dict(beam_size=3, max_new_tokens=8, eos_id=EOS, bos_id=BOS)
  cached = tx.beam_search(model, params, source, **common)
  recomputed = tx.beam_search(model, params, source, use_cache=False, **common)
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.scores, recomputed.scores, rtol=1e-5)


def test_one_compiled_loop_whatever_the_length():
  """A lax.while_loop: the compiled program does not grow with max_new_tokens (no Python loop
  per token, one trace)."""
  model, params, prompt = _lm('rope')
  programs = []
  for max_new_tokens in (2, 8):
    lowered = decoding._generate.lower(
        model, params, prompt, jax.random.key(0), None, max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_k=None, top_p=None, eos_id=EOS, pad_id=PAD, bos_id=None, first=None,
        use_cache=True, return_logits=False)
    programs.append(lowered.as_text())
  assert all(p.count('stablehlo.while') == 1 for p in programs)
  assert len(programs[0].splitlines()) == len(programs[1].splitlines())


def test_bad_decoding_arguments_are_one_clear_error():
  model, params, prompt = _lm('rope')
  cases = [(dict(max_new_tokens=8, temperature=1.0), 'needs an explicit rng'),
           (dict(max_new_tokens=0), 'max_new_tokens=0; it must be a positive integer'),
           (dict(max_new_tokens=8, top_p=1.5, rng=jax.random.key(0), temperature=1.0),
            'top_p=1.5'),
           (dict(max_new_tokens=8, temperature=-1.0), 'temperature=-1.0'),
           (dict(max_new_tokens=8, prompt_lengths=[0, 1, 2]), 'prompt_lengths')]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      tx.generate(model, params, prompt, **kwargs)
  with pytest.raises(ValueError, match=r'inputs has shape \(3, 0\); .* P >= 1'):
    tx.generate(model, params, prompt[:, :0], max_new_tokens=4)
  s2s, s2s_params, source = _seq2seq()
  with pytest.raises(ValueError, match='bos_id is required'):
    tx.generate(s2s, s2s_params, source, max_new_tokens=5)
  with pytest.raises(ValueError, match='beam_size=0'):
    tx.beam_search(model, params, prompt, beam_size=0, max_new_tokens=8)
