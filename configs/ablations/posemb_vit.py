"""Ablation: positional encodings on ViT / digits — none, learn, sinusoidal, sincos2d, rope.

  python -m experiments.sweep --config=configs/ablations/posemb_vit.py          # 5 x 3 seeds
  python -m experiments.sweep --config=configs/ablations/posemb_vit.py:quick    # smoke grid

The base is configs/vit.py (the default ViT on digits, ~80 s a run), so the
default grid is 15 runs, about 20 minutes on a 2-core CPU. `:quick` shrinks the
model and the schedule (60 steps) and uses 2 seeds to check the machinery end
to end; its numbers are not results. `:seeds=N` changes the number of seeds, and
`:quick,steps=N` the length of the smoke runs.
"""

from configs import common, vit

POSEMBS = ('none', 'learn', 'sinusoidal', 'sincos2d', 'rope')


def get_config(arg=None):
  c = vit.get_config()  # the full default schedule (4,500 steps), not ablation_config's.
  arg = common.ablation_arg(arg)
  if arg.quick:
    common.make_quick(c, arg.steps or 60)
  return c


def sweep(add, arg=None):
  for posemb in POSEMBS:
    for seed in common.ablation_seeds(arg):
      add(**{'model.posemb': posemb, 'seed': seed})
