"""ViT: parameter counts of the named variants, every posemb, pooling, resolution change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx

# From vit_jax's models_test.py (google-research/vision_transformer): 224x224x3 images,
# 1000 classes, CLS token and learned posemb.
REFERENCE_PARAMS = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'B/16': 86_567_656,
    'L/16': 304_326_632,
}


def count_params(model, image_size=224):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_named_variant_parameter_counts(name):
  assert count_params(tx.vit_variant(name, num_classes=1000)) == REFERENCE_PARAMS[name]


def test_gap_variant_parameter_count():
  # vit_jax 'ViT-B_16-gap-norep': no CLS token, so no CLS posemb row either.
  assert count_params(tx.vit_variant('B/16', num_classes=1000, pool='mean')) == 86_566_120


SMALL = dict(num_classes=10, patch_size=2, num_layers=2, d_model=16, num_heads=2, d_ff=32)


@pytest.mark.parametrize('posemb', ['learn', 'sincos2d', 'sinusoidal', 'rope', 'none'])
@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_every_posemb_runs_and_trains(posemb, pool):
  model = tx.ViT(posemb=posemb, pool=pool, **SMALL)
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  params = model.init(jax.random.key(1), images)['params']
  logits = model.apply({'params': params}, images)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert np.all(logits == 0)  # the head starts at zero, as in vit_jax.
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  g = jax.grad(lambda p: model.apply({'params': p}, images)[:, 0].sum())(params)
  assert np.abs(g['embedding']['kernel']).max() > 0  # gradients reach the patch embedding.


def test_without_posemb_patches_are_a_bag():
  """With posemb='none' and mean pooling, shuffling the patches leaves the logits unchanged."""
  model = tx.ViT(posemb='none', pool='mean', **SMALL)
  images = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
  params = model.init(jax.random.key(1), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  # Swap the top-left and bottom-right 2x2 patches.
  swapped = images.at[:, :2, :2].set(images[:, 2:, 2:]).at[:, 2:, 2:].set(images[:, :2, :2])
  a, b = model.apply({'params': params}, images), model.apply({'params': params}, swapped)
  np.testing.assert_allclose(a, b, atol=1e-5)
  learned = tx.ViT(posemb='learn', pool='mean', **SMALL)
  p2 = learned.init(jax.random.key(1), images)['params']
  p2['head'] = params['head']
  assert np.abs(learned.apply({'params': p2}, images) - learned.apply({'params': p2}, swapped)).max() > 1e-4


def test_new_resolution_with_resampled_posemb():
  model = tx.ViT(posemb='learn', **SMALL)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  bigger = jnp.zeros((1, 12, 12, 1))
  with pytest.raises(ValueError, match='resample_posemb'):
    model.apply({'params': params}, bigger)
  params['pos_embedding'] = tx.resample_posemb(params['pos_embedding'], (6, 6), num_prefix_tokens=1)
  assert model.apply({'params': params}, bigger).shape == (1, 10)


def test_several_batch_dims():
  model = tx.ViT(**SMALL)
  images = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 1))
  params = model.init(jax.random.key(1), images[0])
  out = model.apply(params, images)
  assert out.shape == (2, 3, 10)
  np.testing.assert_allclose(out[1], model.apply(params, images[1]), atol=1e-6)


def test_patch_embedding_is_the_strided_convolution():
  """A reshape and one product must equal lax's stride-p convolution, with nn.Conv's params."""
  import flax.linen as nn
  images = jax.random.normal(jax.random.key(1), (2, 8, 12, 3))
  embed = tx.vit.PatchEmbedding(16, 4)
  params = embed.init(jax.random.key(0), images)
  conv = nn.Conv(16, (4, 4), strides=(4, 4), padding='VALID')
  assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, params,
                                          conv.init(jax.random.key(0), images))))
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  reference = jax.lax.conv_general_dilated(images, params['params']['kernel'], (4, 4), 'VALID',
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  reference = reference + params['params']['bias']
  np.testing.assert_allclose(embed.apply(params, images), reference.reshape(2, 6, 16), atol=1e-5)
