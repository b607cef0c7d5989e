"""tx.attention_weights / tx.attention_entropy: the math against NumPy, and every layer found."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx


def test_entropy_of_uniform_is_log_t_and_of_one_hot_is_zero():
  t = 7
  uniform = jnp.full((2, 3, 5, t), 1.0 / t)
  np.testing.assert_allclose(tx.attention_entropy(uniform), np.log(t), rtol=1e-6)
  one_hot = jax.nn.one_hot(jnp.zeros((2, 3, 5), jnp.int32), t)
  np.testing.assert_allclose(tx.attention_entropy(one_hot), 0.0, atol=1e-7)


def test_entropy_matches_numpy_and_masks_queries():
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.ones(6), size=(2, 3, 4))  # [batch, H, Tq, Tk]
  w[0, 0, 0] = [1, 0, 0, 0, 0, 0]  # a zero weight contributes 0, not NaN.
  per_query = -(w * np.log(np.where(w > 0, w, 1))).sum(-1)
  np.testing.assert_allclose(tx.attention_entropy(w), per_query.mean(-1), rtol=1e-5)
  queries = np.array([[1, 1, 0, 0], [1, 0, 1, 1]])
  expected = (per_query * queries[:, None]).sum(-1) / queries.sum(-1)[:, None]
  np.testing.assert_allclose(tx.attention_entropy(w, queries), expected, rtol=1e-5)


@pytest.mark.parametrize('implementation', [None, 'fused'])
def test_attention_weights_of_every_layer(implementation):
  model = tx.EncoderDecoder(vocab_size=11, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                            implementation=implementation)
  src = jnp.array([[3, 4, 5, 2, 0]])
  tgt = jnp.array([[1, 6, 7, 8]])
  variables = model.init(jax.random.key(0), src, tgt)
  weights = tx.attention_weights(model, variables, src, tgt)
  assert sorted(weights) == sorted(
      [f'encoder/block_{i}/self_attention' for i in range(2)] +
      [f'decoder/block_{i}/{kind}' for i in range(2) for kind in ('self_attention',
                                                                   'cross_attention')])
  assert weights['encoder/block_0/self_attention'].shape == (1, 2, 5, 5)
  assert weights['decoder/block_1/cross_attention'].shape == (1, 2, 4, 5)
  np.testing.assert_allclose(weights['decoder/block_0/cross_attention'][..., -1], 0.0)  # pad key.
  causal = weights['decoder/block_0/self_attention'][0, 0]
  np.testing.assert_allclose(np.triu(causal, 1), 0.0, atol=1e-7)


def test_beta_zero_attention_is_uniform():
  model = tx.ViT(num_classes=3, patch_size=2, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                 beta_scale=0.0)
  images = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  variables = model.init(jax.random.key(0), images)
  for w in tx.attention_weights(model, variables, images).values():
    np.testing.assert_allclose(w, 1.0 / 5, rtol=1e-6)  # 4 patches + CLS.
    np.testing.assert_allclose(tx.attention_entropy(w), np.log(5), rtol=1e-6)
