"""Ablation: the alignment score s(q, k) on ViT / digits — dot, scaled dot, general, additive,
cosine with a learned β, and location.

  python -m experiments.sweep --config=configs/ablations/scores_vit.py
  python -m experiments.sweep --config=configs/ablations/scores_vit.py:quick

Base: configs/vit.py (4 pre-LN layers, d_head 16, 17 tokens) on a shorter schedule (1,000
steps, as temperature_vit.py; `:steps=N`). Grid: 6 scores × 3 seeds = 18 runs (65 min measured
while other jobs loaded the 2-core CPU about tenfold; docs/lessons.md §4). The six variants
and their β are those of scores_seq2seq.py (its docstring says why each β). The location
score is built for the ViT's 17 tokens (location_keys = the sequence length): one learned
attention pattern over positions per query content, i.e. a learned, input-dependent mixing of
patches. `:quick` (a tiny model, 60 steps, 2 seeds; about a minute) checks the machinery; its
numbers are not results.
"""

from configs import common, vit
from configs.ablations.scores_seq2seq import score_points


def get_config(arg=None):
  return common.ablation_config(vit, arg)


def sweep(add, arg=None):
  for variant in score_points(get_config(arg).model):
    for seed in common.ablation_seeds(arg):
      add(**{**variant, 'seed': seed})
