"""Ablation: the attention temperature β = s / √d_head on ViT / digits, fixed or learned.

  python -m experiments.sweep --config=configs/ablations/temperature_vit.py
  python -m experiments.sweep --config=configs/ablations/temperature_vit.py:quick --vectorize

s ∈ {0, 1/8, 1/4, 1/2, 1, 2, 4, 8} plus a learned per-head β (starting at
s = 1), for posemb learn and sincos2d, 3 seeds each: 54 runs. The base is
configs/vit.py on a shorter schedule (1,000 steps; `:steps=N`). With
--vectorize the 24 fixed-β runs of a posemb train as one program, and the 3
learned-β runs as another (their parameter trees differ); on a 2-core CPU the
sequential sweep is faster for this model (README, --vectorize). Every run
records attention entropy per layer: s = 0 is a uniform average of the values
(a bag of patches, entropy log 17), large s approaches hard attention (entropy → 0). `:quick` (a tiny
model, 60 steps, sincos2d only, s ∈ {0, 8} and learned, 2 seeds) checks the machinery only.
"""

from configs import common, vit

SCALES = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
POSEMBS = ('learn', 'sincos2d')


def get_config(arg=None):
  return common.ablation_config(vit, arg)


def sweep(add, arg=None):
  arg = common.ablation_arg(arg)
  for posemb in POSEMBS[-1:] if arg.quick else POSEMBS:
    for learn_beta, scales in ((False, (0.0, 8.0) if arg.quick else SCALES), (True, (1.0,))):
      for s in scales:
        for seed in common.ablation_seeds(arg):
          add(**{'model.posemb': posemb, 'model.learn_beta': learn_beta,
                 'model.beta_scale': s, 'seed': seed})
