"""Ablation: ALiBi and the length-aware β = s·log(n)/√d_k on seq2seq reverse and sort, against
sinusoidal and rotary encodings, trained on lengths 1..10 and tested on 11..20.

  python -m experiments.sweep --config=configs/ablations/extrapolation_seq2seq.py --vectorize
  python -m experiments.sweep --config=configs/ablations/extrapolation_seq2seq.py:quick --vectorize

Base: configs/seq2seq.py (a 2+2-layer EncoderDecoder), 1,000 steps (`:steps=N`), as
configs/ablations/posemb_seq2seq.py. model.beta_length is 'none' (β = s/√d_k) or 'log'
(β_i = s·log(n_i)/√d_k, n_i the keys query i may attend: the real source tokens in the encoder
and the cross-attention, i + 1 in the decoder), s = 1. Every run is evaluated by length on the
test split (1..10) and the extrapolation split (11..20) by greedy decoding
(exact_match_vs_length.png). Grid: {reverse, sort} × {sinusoidal, rope, alibi} × {none, log}
× 3 seeds = 36 runs; `:task=reverse` (or sort) runs one task's 18. Measured 2026-12-06 with
--vectorize on the 2-core CPU: 11 min 57 s. Expected (docs/results.md §7): over lengths
11..20, sort 0.53 exact match with alibi, 0.37 rope, 0.10 sinusoidal; reverse at most 0.14 with
any of them.
`:quick` checks the machinery in one vectorized group: reverse, alibi with the log β, 2 seeds,
60 steps of the 1-layer model.
"""

from configs import common, seq2seq

POSEMBS = ('sinusoidal', 'rope', 'alibi')
BETA_LENGTHS = ('none', 'log')
TASKS = ('reverse', 'sort')


def _arg(arg):
  """The ablation's arguments (quick, seeds, steps) and task: '' for both, or one of TASKS."""
  if arg is None or isinstance(arg, str):
    arg = common.parse_arg(arg, quick=False, seeds=3, steps=0, task='')
  if arg.task and arg.task not in TASKS:
    raise ValueError(f'config argument task={arg.task!r}; allowed: {", ".join(TASKS)} (or '
                     'none for both)')
  return arg


def get_config(arg=None):
  arg = _arg(arg)
  c = common.ablation_config(seq2seq, arg)
  c.model.beta_length = 'none'
  if arg.quick:
    c.data.update(train_size=2000, test_size=200)
  return c


def sweep(add, arg=None):
  arg = _arg(arg)
  tasks = ('reverse',) if arg.quick else (arg.task,) if arg.task else TASKS
  for task in tasks:
    for posemb in ('alibi',) if arg.quick else POSEMBS:
      for beta_length in ('log',) if arg.quick else BETA_LENGTHS:
        for seed in common.ablation_seeds(arg):
          add(**{'data.task': task, 'model.posemb': posemb, 'model.beta_length': beta_length,
                 'seed': seed})
