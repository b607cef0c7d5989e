"""Ablation: the alignment score s(q, k) on seq2seq reverse and sort — dot, scaled dot, general
(Luong), additive (Bahdanau), cosine with a learned β, and location (Luong).

  python -m experiments.sweep --config=configs/ablations/scores_seq2seq.py
  python -m experiments.sweep --config=configs/ablations/scores_seq2seq.py:task=reverse  # half
  python -m experiments.sweep --config=configs/ablations/scores_seq2seq.py:quick

Base: configs/seq2seq.py (a 2+2-layer EncoderDecoder, d_head 16) on a shorter schedule: 500
steps (`:steps=N`). At 1,000 steps the scaled dot saturates (posemb_seq2seq.py: exact match
≥ 0.998 on both tasks with any posemb), so 500 steps leave room for the scores to differ in
how fast they learn, and halve the grid's time. The greedy decoding by length
(exact_match_by_length, lengths 1–20) is left out: length extrapolation is posemb_seq2seq.py's
subject, and decoding 2,000 sequences would add to every run; exact match is the
teacher-forced one of the test split (the same verdict per sequence as greedy decoding).
Grid: {reverse, sort} × 6 scores × 3 seeds = 36 runs (66 min measured while other jobs loaded
the 2-core CPU about tenfold; docs/lessons.md §4).
The score is used by every attention of the model (encoder self-, decoder self- and
cross-attention); Luong et al. (2015) compared theirs on the decoder→encoder attention only.

The logits are β·s(q, k), β = beta_scale / √d_head. Each score gets the β that gives it
logits of about unit spread at initialisation, except plain dot, kept unscaled on purpose:

  name        score       β                  logits at init (q, k entries ~ N(0, 1))
  dot         'dot'       1                  q·k: std √d (Luong's dot)
  scaled dot  'dot'       1/√d               std 1 (Vaswani)
  general     'general'   1/√d               qᵀWk, LeCun W: std √d, as dot, so scaled as dot
  additive    'additive'  1                  vᵀ tanh(W_q q + W_k k): O(1) (Bahdanau)
  cosine      'cosine'    learned, from √d   cos ∈ [−1, 1]; √d·cos ≈ q·k/√d when |q|,|k| ≈ √d
  location    'location'  1                  (W q)_j, LeCun W: std 1 (Luong's softmax(W_a h_t))

Cosine scores are bounded, so a fixed 1/√d would leave every softmax nearly uniform
(logits within ±0.25) and the projections could not sharpen it: β is learned per head
(log-parametrised) from √d, where its logits start with the scaled dot's spread.
The location score has one output per key position (location_keys = num_positions = the
11 positions of the training width), for the encoder's and the decoder's keys alike.
`:quick` (a tiny model, 60 steps, reverse only, 2 seeds; about a minute) checks the
machinery; its numbers are not results.
"""

import math

from configs import common, seq2seq

# (name, score, β·√d_head as a function of d_head, learn_beta)
VARIANTS = (('dot', 'dot', math.sqrt, False),
            ('scaled dot', 'dot', lambda d: 1.0, False),
            ('general', 'general', lambda d: 1.0, False),
            ('additive', 'additive', math.sqrt, False),
            ('cosine', 'cosine', float, True),
            ('location', 'location', math.sqrt, False))


TASKS = ('reverse', 'sort')


def parse(arg):
  """The ablation's arguments (quick, seeds, steps; 500 steps by default) and `task`: one of
  TASKS for that half of the grid, or 'both'."""
  if not isinstance(arg, str | None):
    return arg
  arg = common.parse_arg(arg, quick=False, seeds=3, steps=0, task='both')
  if arg.task not in TASKS + ('both',):
    raise ValueError(f"config argument task={arg.task!r}; allowed: {', '.join(TASKS)}, both")
  arg.steps = arg.steps or (0 if arg.quick else 500)
  return arg


def get_config(arg=None):
  arg = parse(arg)
  c = common.ablation_config(seq2seq, arg)
  del c.evals['exact_match_by_length']
  if arg.quick:
    c.data.update(train_size=2000, test_size=200)
  return c


def score_points(model) -> list[dict]:
  """The six variants' overrides for a config.model: score, beta_scale, learn_beta."""
  d_head = model.d_model // model.num_heads
  return [{'model.score': score, 'model.beta_scale': float(scale(d_head)),
           'model.learn_beta': learn} for _, score, scale, learn in VARIANTS]


def sweep(add, arg=None):
  arg = parse(arg)
  variants = score_points(get_config(arg).model)
  for task in ('reverse',) if arg.quick else TASKS if arg.task == 'both' else (arg.task,):
    for variant in variants:
      for seed in common.ablation_seeds(arg):
        add(**{'data.task': task, **variant, 'seed': seed})
