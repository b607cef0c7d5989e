"""ViT: parameter counts of the named variants, every posemb, pooling, resolution change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx
from tx.layers import hparams
from tx.models import ModelHParams

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


def perturbed_params(model, images, seed=1):
  """The model's params with N(0, 0.5²) added to every leaf: no zero head, unit LN scale."""
  params = jax.tree.map(np.asarray, model.init(jax.random.key(seed), images)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.5 * rng.normal(size=p.shape).astype(np.float32), params)


def layer_norm(x, p, eps=1e-6):
  x = x.astype(np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def vit_by_hand(model, params, images, class_token):
  """The ViT written out in NumPy around tx.Encoder: patches, prefix tokens, the learned table
  (before or after the prefix), the encoder, pooling over the patches, fc_norm, pooler, head."""
  p, (n, h, w, c) = model.patch_size, images.shape
  patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  kernel = params['embedding']['kernel'].reshape(p * p * c, -1)
  x = patches.reshape(n, -1, p * p * c) @ kernel + params['embedding']['bias']
  table = params['pos_embedding'][0]
  if not model.posemb_prefix:
    x = x + table
  prefix = ([params['cls'][0]] if class_token else []) + (
      [params['extra_tokens'][0]] if model.extra_tokens else [])
  prefix = np.concatenate(prefix or [np.zeros((0, x.shape[-1]))])
  k = len(prefix)
  x = np.concatenate([np.broadcast_to(prefix, (n, k, x.shape[-1])), x], 1)
  if model.posemb_prefix:
    x = x + table
  encoder = tx.Encoder(**{**hparams(model, ModelHParams), 'posemb': 'none',
                          'final_norm': not model.fc_norm})
  x = np.asarray(encoder.apply({'params': params['encoder']}, jnp.asarray(x, jnp.float32)),
                 np.float64)
  pooled = x[:, 0] if model.pool == 'cls' else x[:, k:].mean(1)
  if model.fc_norm:
    pooled = layer_norm(pooled, params['fc_norm'])
  if model.pooler:
    pooled = np.tanh(pooled @ params['pooler']['kernel'] + params['pooler']['bias'])
  if not model.num_classes:
    return pooled
  return pooled @ params['head']['kernel'] + params['head']['bias']


@pytest.mark.parametrize('options', [
    dict(extra_tokens=3),                                          # [CLS] + registers
    dict(extra_tokens=2, posemb_prefix=False),                     # timm's no_embed_class
    dict(posemb_prefix=False, fc_norm=True, num_classes=0),       # features
    dict(pool='mean', class_token=True, extra_tokens=4, posemb_prefix=False, fc_norm=True),
    dict(pool='mean', extra_tokens=1, pooler=True),                # registers, no [CLS]
    dict(pool='mean', fc_norm=True, pooler=True),
])
def test_prefix_tokens_posemb_fc_norm_and_pooler_match_the_vit_written_by_hand(options):
  model = tx.ViT(**{**SMALL, **options})
  images = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 1)))
  params = perturbed_params(model, images)
  class_token = model.class_token if model.class_token is not None else model.pool == 'cls'
  prefix_rows = (int(class_token) + model.extra_tokens) * model.posemb_prefix
  assert params['pos_embedding'].shape == (1, prefix_rows + 16, 16)
  assert ('final_norm' in params['encoder']) == (not model.fc_norm)
  ours = np.asarray(model.apply({'params': params}, images))
  assert ours.shape == (2, model.num_classes or model.d_model)
  np.testing.assert_allclose(ours, vit_by_hand(model, params, images, class_token), rtol=1e-5,
                             atol=1e-5)


def test_default_fields_keep_the_parameter_tree():
  model = tx.ViT(**SMALL)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  assert sorted(shapes) == ['cls', 'embedding', 'encoder', 'head', 'pos_embedding']
  assert shapes['cls'].shape == (1, 1, 16) and shapes['pos_embedding'].shape == (1, 17, 16)
  assert 'final_norm' in shapes['encoder']


def test_mean_pooling_leaves_the_prefix_tokens_out():
  """The pooled vector is the mean of the encoder's patch outputs (read from its captured
  output), which differs from the mean of its [CLS] and register outputs."""
  model = tx.ViT(**{**SMALL, 'pool': 'mean', 'class_token': True, 'extra_tokens': 2,
                    'num_classes': 0})
  images = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 8, 1)))
  params = perturbed_params(model, images)
  ours, state = model.apply({'params': params}, images, capture_intermediates=True)
  tokens = np.asarray(state['intermediates']['encoder']['__call__'][0])  # [2, 3 + 16, 16]
  np.testing.assert_allclose(ours, tokens[:, 3:].mean(1), rtol=1e-6, atol=1e-6)
  assert np.abs(tokens[:, :3].mean(1) - tokens[:, 3:].mean(1)).max() > 1e-2


def test_features_are_the_pre_head_vector_of_the_same_model():
  headful = tx.ViT(**{**SMALL, 'extra_tokens': 1, 'pooler': True})
  images = np.asarray(jax.random.normal(jax.random.key(4), (3, 8, 8, 1)))
  params = perturbed_params(headful, images)
  logits = headful.apply({'params': params}, images)
  trunk = {k: v for k, v in params.items() if k != 'head'}
  features = headful.clone(num_classes=0).apply({'params': trunk}, images)
  np.testing.assert_allclose(features @ params['head']['kernel'] + params['head']['bias'],
                             logits, rtol=1e-5, atol=1e-5)


def test_prefix_tokens_keep_their_rows_when_the_table_is_resampled():
  model = tx.ViT(**{**SMALL, 'extra_tokens': 2})
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  with pytest.raises(ValueError, match=r'num_prefix_tokens=3\) for a new image size'):
    model.apply({'params': params}, jnp.zeros((1, 12, 12, 1)))
  old = params['pos_embedding']
  params['pos_embedding'] = tx.resample_posemb(old, (6, 6), num_prefix_tokens=3)
  np.testing.assert_array_equal(params['pos_embedding'][:, :3], old[:, :3])
  assert model.apply({'params': params}, jnp.zeros((1, 12, 12, 1))).shape == (1, 10)
  patches_only = tx.ViT(**{**SMALL, 'extra_tokens': 2, 'posemb_prefix': False})
  params = patches_only.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  with pytest.raises(ValueError, match=r'num_prefix_tokens=0\)'):
    patches_only.apply({'params': params}, jnp.zeros((1, 12, 12, 1)))


@pytest.mark.parametrize('options, message', [
    (dict(class_token=False), "class_token=False with pool='cls'"),
    (dict(num_classes=-1), 'num_classes=-1; it must be >= 0'),
    (dict(extra_tokens=-2), 'extra_tokens=-2; it must be >= 0'),
])
def test_inconsistent_token_options_are_one_clear_error(options, message):
  with pytest.raises(ValueError, match=message):
    tx.ViT(**{**SMALL, **options}).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize('options', [
    dict(pool='cls', posemb='learn'),
    dict(pool='mean', posemb='rope', class_token=True, extra_tokens=2),
    dict(pool='cls', posemb='sincos2d', implementation='fused'),
    dict(pool='mean', posemb='learn', extra_tokens=1, scan_layers=True, remat=True,
         implementation='fused'),
])
def test_padded_tokens_give_the_unpadded_logits_and_gradients(options):
  """pad_tokens_to=8: 17 or 19 tokens (16 patches after [CLS] and extra tokens) padded to 24,
  the pad keys masked through key_lengths; logits and every gradient equal the unpadded
  model's (through nn.scan and nn.remat too)."""
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
  labels = np.array([1, 4, 7])
  plain = tx.ViT(**SMALL, **options)
  params = plain.init(jax.random.key(0), images)['params']
  leaves, tree = jax.tree.flatten(params)  # the head starts at zero: move every parameter.
  noise = [0.3 * jax.random.normal(k, x.shape) for k, x in
           zip(jax.random.split(jax.random.key(1), len(leaves)), leaves)]
  params = jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise)])
  padded = plain.clone(pad_tokens_to=8)

  def loss(p, model):
    logits = model.apply({'params': p}, images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels]), logits

  (l0, logits0), g0 = jax.value_and_grad(loss, has_aux=True)(params, plain)
  (l1, logits1), g1 = jax.value_and_grad(loss, has_aux=True)(params, padded)
  np.testing.assert_allclose(logits1, logits0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)
  assert abs(float(l1 - l0)) < 1e-5 and np.abs(np.asarray(logits0)).std() > 0.1


def test_padding_to_a_multiple_of_8_is_what_makes_vit_b16_fused():
  """The q, k, v a bfloat16 ViT-B/16 at 224 hands its attention: 197 tokens, which
  `tx.fused_is_valid` refuses on a GPU; with pad_tokens_to=8, 200 tokens, which it takes."""
  seen = []

  def recording(q, k, v, **kwargs):
    seen.append((q, k, v, kwargs.get('key_lengths')))
    return tx.dot_product_attention(q, k, v, **kwargs)

  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  for pad, tokens, valid in ((1, 197, False), (8, 200, True)):
    seen.clear()
    vit = tx.vit_variant('B/16', num_classes=10, dtype=jnp.bfloat16, pad_tokens_to=pad,
                         attention_fn=recording)
    jax.eval_shape(vit.init, jax.random.key(0), images)
    assert len(seen) == 12
    for q, k, v, lengths in seen:
      assert q.shape[-3] == k.shape[-3] == tokens
      assert tx.fused_is_valid(q, k, v, backend='gpu') is valid
      assert (lengths is None) == (pad == 1)
  with pytest.raises(ValueError, match='pad_tokens_to=0; it must be an integer >= 1'):
    tx.ViT(**SMALL, pad_tokens_to=0).init(jax.random.key(0), np.zeros((1, 8, 8, 3)))
