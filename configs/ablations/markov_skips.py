"""Lesson: a one-layer, attention-only DecoderLM on the lecture's Markov-with-skips sentences.

  python -m experiments.lessons.markov [--quick] [--seeds=N]      (the lesson: this config,
                                                                    Markov baselines, plots)
  python -m experiments.sweep --config=configs/ablations/markov_skips.py[:quick] --vectorize
  python -m experiments.run --config=configs/ablations/markov_skips.py

Data: experiments/data/skips.py, "check the program|battery ... it ran [down] please ." with
the decisive word 1..20 tokens before "ran" (4,000 train / 4,000 test sentences). Model: one
pre-LN decoder block with one head, d_ff = 0 (no FFN) and no positional encoding, untied
output layer: its logits are W_out·LN(e(w_t) + Attn_t), a first-order table through the
residual plus the words that the query w_t picks out of the context, at any distance.
Grid: `:seeds=N` seeds (3; 2 with `:quick`), trained as one vectorized program.

Expected (the lesson, 5 seeds; measured 2026-12-06 while other jobs shared the 2-core CPU):
150 s wall, 29 s of CPU time; accuracy on the word after "ran" 1.000 at every distance for
every seed, where the Markov tables of order n sit at the 0.600 prior for k >= n
(docs/lessons.md, section 1).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.ablation_arg(arg)
  c = common.training(batch_size=64, total_steps=arg.steps or 1000, log_every=100,
                      eval_every=500, checkpoint_every=500, best_metric='loss', best_mode='min',
                      eval_batch_size=400)
  c.optimizer.lr = 3e-3
  # At the end, the lesson's measures of the word after "ran" and of the attention there.
  c.evals = ml_collections.ConfigDict(dict(
      test=dict(type='task_metrics', at='eval'),
      after_ran=dict(type='experiments.lessons.markov', at='end')))
  c.data = ml_collections.ConfigDict(dict(name='skips', train_size=4000, test_size=4000,
                                          max_distance=20, seq_len=32, seed=0))
  c.model = ml_collections.ConfigDict(dict(
      name='DecoderLM', num_layers=1, d_model=32, num_heads=1, d_ff=0, num_positions=32,
      posemb='none', norm='pre', beta_scale=1.0, learn_beta=False, score='dot',
      implementation='xla', dropout=0.0, attention_dropout=0.0, tie_embeddings=False,
      dtype='float32', remat=False, remat_policy='nothing', scan_layers=False))
  if arg.quick:  # the machinery end to end, not a result.
    c.total_steps = arg.steps or 60
    c.optimizer.warmup_steps = 10
    c.update(dict(eval_every=c.total_steps, checkpoint_every=c.total_steps, log_every=50))
    c.data.update(train_size=1000, test_size=400, max_distance=10, seq_len=16)
    c.model.num_positions = 16
  return c


def sweep(add, arg=None):
  for seed in common.ablation_seeds(arg):
    add(seed=seed)
