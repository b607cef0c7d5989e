"""The lecture's "second-order model with skips" example as a word-level language-model dataset.

Every example holds one sentence of the two templates (Check the program / battery ...):

  check the program log and find out whether it ran please .       (probability 0.6)
  check the battery log and find out whether it ran down please .  (probability 0.4)

with the decisive word X ∈ {program, battery} k = `distance` tokens before "ran". The k − 1
words between them are the last k − 1 of "log and find out whether it" (k ≤ 7; k = 7 is the
lecture's sentence), or, for k > 7, "log", k − 7 distractor words drawn uniformly from
DISTRACTORS, then "and find out whether it". A random number of distractors comes before
"check" (so the absolute positions of X and "ran" say nothing of k), and <pad> fills the window
after the sentence's ".".

What each model can see of the token after "ran" (down or please):
  order 1, context (ran): nothing; the best guess is the prior, please, right 60% of the time.
  order 2, context (w, ran): w = X only at k = 1; for k ≥ 2 it is "it" in both templates.
  order n: the decisive word only for k ≤ n − 1 (Vocab^(n−1) contexts to count).
  attention from "ran": X at any k, if the query "ran" picks it out among the keys (the
  lecture's mask over the (word, ran) features).
"""

from __future__ import annotations

import numpy as np

from experiments.data.memory import Dataset

PAD_WORD = '<pad>'
TEMPLATE = ('check', 'the', 'log', 'and', 'find', 'out', 'whether', 'it', 'ran', 'down', 'please',
            '.')
DECISIVE = ('program', 'battery')  # program → "ran please", battery → "ran down please".
PRIOR = 0.6  # P(program): the lecture's 40/60 proportion.
# Nouns that could have "run" but never decide what follows "ran", and fillers.
DISTRACTORS = ('printer', 'laptop', 'phone', 'server', 'router', 'camera', 'today', 'again',
               'now', 'first', 'then', 'also', 'quickly', 'carefully', 'maybe', 'still')
WORDS = (PAD_WORD,) + TEMPLATE + DECISIVE + DISTRACTORS  # token id = index.
ID = {w: i for i, w in enumerate(WORDS)}
MIDDLE = ('log', 'and', 'find', 'out', 'whether', 'it')  # between X and "ran" at k = 7.


def sentence(decisive: str, distance: int, rng: np.random.Generator) -> list[str]:
  """The words of one sentence with `decisive` `distance` tokens before "ran" (module
  docstring); distractors for distance > 7 are drawn from `rng`."""
  if distance <= len(MIDDLE):
    middle = list(MIDDLE[len(MIDDLE) + 1 - distance:])
  else:
    noise = rng.choice(DISTRACTORS, distance - 1 - len(MIDDLE)).tolist()
    middle = [MIDDLE[0], *noise, *MIDDLE[1:]]
  end = ['ran', 'please', '.'] if decisive == 'program' else ['ran', 'down', 'please', '.']
  return ['check', 'the', decisive, *middle, *end]


def skip_sentences(train_size: int = 4000, test_size: int = 4000, max_distance: int = 20,
          seq_len: int = 32, seed: int = 0) -> Dataset:
  """Sentences of the two templates as windows of seq_len + 1 word ids (inputs = the first
  seq_len, targets = shifted by one), deterministic from `seed`.

  Train: train_size sentences, k uniform in 1..max_distance, X = program with probability
  PRIOR. Test: test_size // max_distance sentences at each k = 1..max_distance, of which
  round(PRIOR · that) have X = program (so the prior is right exactly that often at every k).
  Besides inputs and targets, each split holds per example 'distance' (k), 'ran' (the input
  position of "ran", whose target is the word after it) and 'decisive' (the input position
  of X). info: vocab_size, pad_id, words (id → word, space-separated).
  """
  if max_distance < 1:
    raise ValueError(f'data.max_distance={max_distance}; it must be >= 1')
  longest = max_distance + 6  # check the X, k − 1 words, ran down please .
  if seq_len + 1 < longest:
    raise ValueError(f'data.seq_len={seq_len}; the longest sentence (max_distance='
                     f'{max_distance}) has {longest} words, so it must be >= {longest - 1}')
  per_distance = test_size // max_distance
  if per_distance < 1:
    raise ValueError(f'data.test_size={test_size}; it must be >= data.max_distance='
                     f'{max_distance} (test_size // max_distance sentences per distance)')
  rng = np.random.default_rng(seed)

  def windows(decisive, distances):
    n = len(distances)
    ids = np.full((n, seq_len + 1), ID[PAD_WORD], np.int32)
    ran, where = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for i, (x, k) in enumerate(zip(decisive, distances)):
      words = sentence(DECISIVE[x], int(k), rng)
      start = int(rng.integers(0, seq_len + 2 - len(words)))
      prefix = rng.choice(DISTRACTORS, start).tolist()
      ids[i, :start + len(words)] = [ID[w] for w in prefix + words]
      where[i], ran[i] = start + 2, start + 2 + k
    return {'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'distance': distances.astype(np.int32),
            'ran': ran, 'decisive': where}

  train_k = rng.integers(1, max_distance + 1, train_size)
  train = windows((rng.random(train_size) >= PRIOR).astype(int), train_k)
  program = round(PRIOR * per_distance)
  test_x = np.concatenate([rng.permutation([0] * program + [1] * (per_distance - program))
                           for _ in range(max_distance)])
  test_k = np.repeat(np.arange(1, max_distance + 1), per_distance)
  test = windows(test_x, test_k)
  order = rng.permutation(len(test_k))  # the first test examples (evaluators' sample) mix k.
  test = {name: values[order] for name, values in test.items()}
  return Dataset(train, test, {'vocab_size': len(WORDS), 'pad_id': ID[PAD_WORD],
                               'words': ' '.join(WORDS)})
