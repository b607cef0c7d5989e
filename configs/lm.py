"""DecoderLM (GPT-style, pre-LN, tied embeddings), character level, on a local text file.

  python -m experiments.run --config=configs/lm.py
  python -m experiments.run --config=configs/lm.py --config.data.path=/path/to/text.txt
  python -m experiments.run --config=configs/lm.py:tokenizer=bpe [--config.data.dir=PARQUET]

Data: by default the English text of Python's documentation topics
(`pydoc_data.topics`, ~465k characters), which ships with every CPython. The
last 10% of the text is the test set. Reports loss (nats/char), bits per
character and next-character accuracy.

Expected (2-core CPU, measured 2026-11-22, JAX 0.10.2): 146 s wall; test
loss 1.226 nats/char = 1.77 bits per character, next-character accuracy 0.667
(a unigram model of this text has 4.69 bits/char).

:tokenizer=bpe trains a byte-level BPE of data.vocab_size tokens on the training text and packs
documents into windows of seq_len tokens (experiments/data/text.py, docs/data.md);
:tokenizer=PATH loads a tokenizer.json. Loss and accuracy are per token; bits_per_char divides
bits per token by the test text's characters per token (3.50 here). The default text is 116k
train / 13k test tokens, so the run is 500 steps (~9 epochs): 1,500 overfit (test loss 4.62
nats/token at step 500, 6.23 at 1,500, train loss 0.38). Expected (2-core CPU, measured
2026-12-06, JAX 0.10.2): 64 s wall; test loss 4.46 nats/token = 6.44 bits per token = 1.84
bits per character, next-token accuracy 0.226.
"""

import ml_collections

from configs import common



def get_config(arg=None):
  arg = common.parse_arg(arg, seq_len=128, posemb='rope', beta_scale=1.0, learn_beta=False,
                         score='dot', quick=False, tokenizer='char')
  c = common.training(batch_size=16, total_steps=1500, log_every=100, eval_every=500,
                      checkpoint_every=500, best_metric='loss', best_mode='min',
                      eval_batch_size=256)
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 0.1
  c.data = ml_collections.ConfigDict(dict(name='char_lm', path='', seq_len=arg.seq_len,
                                          test_fraction=0.1))
  if arg.tokenizer != 'char':  # 'bpe', or the path of a tokenizer.json.
    c.data = ml_collections.ConfigDict(dict(
        name='text', path='', dir='', column='text', tokenizer=arg.tokenizer, vocab_size=2048,
        seq_len=arg.seq_len, test_fraction=0.1, eval_split=''))
    c.total_steps = 500  # ~9 epochs of the default text's 116k tokens; more overfits.
  c.model = ml_collections.ConfigDict(dict(
      name='DecoderLM', num_layers=2, d_model=128, num_heads=4, d_ff=512, num_positions=arg.seq_len,
      posemb=arg.posemb, norm='pre', activation='gelu', beta_scale=arg.beta_scale,
      learn_beta=arg.learn_beta, score=arg.score, implementation='xla', dropout=0.0,
      attention_dropout=0.0, tie_embeddings=True, dtype='float32', remat=False,
      remat_policy='nothing', scan_layers=False))
  if arg.quick:
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 50, 50, 50, 25
  return c
