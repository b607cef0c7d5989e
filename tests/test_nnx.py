"""The Flax NNX recipe of docs/library.md: a tx module wrapped by `flax.nnx.bridge.ToNNX` computes
what the Linen module computes, sows its attention weights, and trains with `nnx.Optimizer`
exactly as optax on the Linen parameters does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tx

if not hasattr(nnx.Variable, 'set_value'):  # the recipe's API: flax >= 0.12
  pytest.skip('the NNX recipe needs flax >= 0.12', allow_module_level=True)

VIT = dict(num_classes=3, patch_size=4, num_layers=2, d_model=16, num_heads=2, d_ff=32)


def loss_fn(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_a_tx_module_in_nnx_computes_sows_and_trains_as_in_linen():
  linen = tx.ViT(**VIT)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  y = jnp.array([0, 2, 1, 2])
  model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert jax.tree.structure(params) == jax.tree.structure(
      linen.init(jax.random.key(0), x)['params'])
  np.testing.assert_array_equal(model(x), linen.apply({'params': params}, x))

  model(x, mutable=['intermediates'])  # attention weights, as tx.attention_weights reads them
  sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
  reference = tx.attention_weights(linen, {'params': params}, x)
  for i, weights in enumerate(reference.values()):
    np.testing.assert_array_equal(sown['encoder'][f'block_{i}']['self_attention']
                                  ['attention_weights'][0], weights)

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  adam = optax.adam(1e-2)

  @jax.jit
  def linen_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(linen.apply({'params': p}, x), y))(params)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, nnx_losses, linen_losses = adam.init(params), [], []
  for _ in range(5):
    nnx_losses.append(float(nnx_step(model, optimizer, x, y)))
    params, opt_state, loss = linen_step(params, opt_state, x, y)
    linen_losses.append(float(loss))
  np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-6)
  assert nnx_losses[-1] < nnx_losses[0] - 0.05


def test_dropout_in_nnx_draws_a_new_mask_at_each_call():
  model = nnx.bridge.ToNNX(tx.ViT(**VIT, dropout=0.3), rngs=nnx.Rngs(0, dropout=1))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  nnx.bridge.lazy_init(model, x)
  state = nnx.state(model, nnx.Param)  # a head that is not zero, so the logits show dropout.
  head = state['head']['kernel']
  head.set_value(jax.random.normal(jax.random.key(2), head.get_value().shape))
  nnx.update(model, state)
  a, b = model(x, deterministic=False), model(x, deterministic=False)
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_array_equal(model(x), model(x))
