"""A two-minute tour of the tx library on CPU: β, ViT sizes, and a tiny ViT on digits.

  python -m experiments.demo

1. How the temperature β shapes attention: the mean entropy of the weights,
   from uniform (β = 0) to hard argmax (large β).
2. The parameter counts of the named ViT variants (the vit_jax reference values).
3. A small ViT trained for a few hundred AdamW steps on scikit-learn's bundled
   8×8 digits (1,797 images; a fixed permutation with seed 0 holds out 360
   for test), patch size 2.

Placeholder for `python -m experiments.run` (issue 3), which replaces it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import tx


def beta_table():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(64, 4, 32)).astype(np.float32) for _ in range(3))
  print('β / (1/sqrt(d_k))   mean attention entropy (nats; uniform = %.2f)' % np.log(64))
  for scale in (0.0, 0.25, 1.0, 4.0, 16.0):
    _, w = tx.dot_product_attention(q, k, v, beta=scale / np.sqrt(32), return_weights=True)
    entropy = -(w * jnp.log(jnp.where(w > 0, w, 1.0))).sum(-1).mean()
    print(f'{scale:>17g}   {float(entropy):.3f}')


def vit_table():
  print('\nViT variant   parameters (224px, 1000 classes)')
  for name in tx.VIT_VARIANTS:
    model = tx.vit_variant(f'{name}/16', num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    print(f'{name + "/16":<12}  {sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)):,}')


def train_digits(steps: int = 600, batch_size: int = 128, seed: int = 0):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1] in [0, 1].
  y = digits.target
  order = np.random.default_rng(0).permutation(len(y))  # a fixed split: 1437 train / 360 test.
  train, test = order[:-360], order[-360:]
  x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
  model = tx.ViT(num_classes=10, patch_size=2, num_layers=4, d_model=64, num_heads=4, d_ff=128,
                 posemb='sincos2d', pool='mean')
  params = model.init(jax.random.key(seed), x_train[:1])['params']
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, steps), weight_decay=1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({'params': p}, xb), yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  print(f'\nTraining ViT (4 layers, d=64, patch 2, sincos2d) on digits: {len(x_train)} train / '
        f'{len(x_test)} test')
  start = time.time()
  for i in range(1, steps + 1):
    idx = rng.choice(len(x_train), batch_size, replace=False)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
    if i % 100 == 0:
      print(f'step {i:4d}  loss {float(loss):.4f}  {i / (time.time() - start):.1f} steps/s')
  predict = jax.jit(lambda p, xb: model.apply({'params': p}, xb).argmax(-1))
  accuracy = float((np.asarray(predict(params, x_test)) == y_test).mean())
  print(f'test accuracy {accuracy:.4f}  ({time.time() - start:.0f} s, compile included)')
  return accuracy


if __name__ == '__main__':
  beta_table()
  vit_table()
  train_digits()
