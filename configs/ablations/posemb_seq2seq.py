"""Ablation: positional encodings on seq2seq reverse and sort, with length extrapolation.

  python -m experiments.sweep --config=configs/ablations/posemb_seq2seq.py
  python -m experiments.sweep --config=configs/ablations/posemb_seq2seq.py:quick --vectorize

Base: configs/seq2seq.py (a 2+2-layer EncoderDecoder), 1,000 steps (`:steps=N`).
Training lengths are 1..10; every run is also evaluated, by length, on lengths
11..20 (exact_match_vs_length.png). A learned posemb table is sized for
training (11 positions with <eos>), so the longer sequences cannot be run
through it: those lengths are reported as not evaluated, with tx's reason,
instead of crashing. Grid: {reverse, sort} × {none, learn, sinusoidal, rope} ×
3 seeds = 24 runs, under 30 minutes on a 2-core CPU.
"""

from configs import common, seq2seq

POSEMBS = ('none', 'learn', 'sinusoidal', 'rope')
QUICK_POSEMBS = ('learn', 'rope')  # `:quick`: a table that cannot extrapolate, one that can.


def get_config(arg=None):
  c = common.ablation_config(seq2seq, arg)
  if common.ablation_arg(arg).quick:
    c.data.update(train_size=2000, test_size=200)
  return c


def sweep(add, arg=None):
  arg = common.ablation_arg(arg)
  for task in ('reverse', 'sort'):
    for posemb in QUICK_POSEMBS if arg.quick else POSEMBS:
      for seed in common.ablation_seeds(arg):
        add(**{'data.task': task, 'model.posemb': posemb, 'seed': seed})
