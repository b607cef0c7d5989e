"""Ablation: the character LM trained at context L = 64 and evaluated at L, 2L and 4L, for
sinusoidal, rotary and ALiBi encodings, each with β = s/√d_k and the length-aware
β_i = s·log(n_i)/√d_k (n_i = i + 1 keys under the causal mask), s = 1.

  python -m experiments.sweep --config=configs/ablations/extrapolation_lm.py --vectorize
  python -m experiments.sweep --config=configs/ablations/extrapolation_lm.py:quick --vectorize

Base: configs/lm.py (a 2-layer pre-LN DecoderLM, d_model 128, on Python's documentation text)
at seq_len=64, 1,000 steps of batch 16 (`:steps=N`). The bits_by_length evaluator scores the
same test tokens in non-overlapping windows of 64, 128 and 256 characters
(bits_per_char_vs_length.png). Grid: {sinusoidal, rope, alibi} × {none, log} × 3 seeds = 18
runs, 9 min 20 s with --vectorize on the 2-core CPU (2026-12-06); bits/char at L, 2L, 4L:
alibi 2.12, 2.10, 2.10 (flat), rope 1.95, 2.16, 2.79, sinusoidal 2.08, 3.29, 3.95
(docs/results.md §7). A learned table cannot run past L: the evaluator reports those lengths
as not evaluated. `:quick` checks the machinery in one vectorized group: alibi with the log
β, 2 seeds, 60 steps of the 1-layer model at L = 32.
"""

from configs import common, lm

POSEMBS = ('sinusoidal', 'rope', 'alibi')
BETA_LENGTHS = ('none', 'log')
TRAIN_LENGTH, QUICK_TRAIN_LENGTH = 64, 32


def get_config(arg=None):
  quick = common.ablation_arg(arg).quick
  length = QUICK_TRAIN_LENGTH if quick else TRAIN_LENGTH
  c = common.ablation_config(lm, arg)
  c.data.seq_len = c.model.num_positions = length
  c.model.beta_length = 'none'
  c.evals.bits_by_length = dict(type='bits_by_length', at='end', max_factor=4)
  return c


def sweep(add, arg=None):
  arg = common.ablation_arg(arg)
  for posemb in ('alibi',) if arg.quick else POSEMBS:
    for beta_length in ('log',) if arg.quick else BETA_LENGTHS:
      for seed in common.ablation_seeds(arg):
        add(**{'model.posemb': posemb, 'model.beta_length': beta_length, 'seed': seed})
