"""Ablation: positional encodings on ViT / digits — none, learn, sinusoidal, sincos2d, rope.

  python -m experiments.sweep --config=configs/ablations/posemb_vit.py          # 5 x 3 seeds
  python -m experiments.sweep --config=configs/ablations/posemb_vit.py:quick    # smoke grid

The base is configs/vit.py (the default ViT on digits, ~80 s a run), so the
default grid is 15 runs, about 20 minutes on a 2-core CPU. `:quick` shrinks the
model and the schedule (60 steps) to check the machinery end to end in about a
minute; its numbers are not results.
"""

from configs import vit

POSEMBS = ('none', 'learn', 'sinusoidal', 'sincos2d', 'rope')
SEEDS = (0, 1, 2)


def get_config(arg=None):
  c = vit.get_config()
  if arg == 'quick':
    c.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32)
    c.update(dict(total_steps=60, eval_every=60, checkpoint_every=60, log_every=20))
  elif arg:
    raise ValueError(f"config argument {arg!r}; allowed: 'quick' or none")
  return c


def sweep(add, arg=None):
  for posemb in POSEMBS:
    for seed in SEEDS:
      add(**{'model.posemb': posemb, 'seed': seed})
