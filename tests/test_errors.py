"""Every bad input raises ValueError naming the argument, its value and what is allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tx

KEY = jax.random.key(0)
Q = np.zeros((2, 3, 4, 8), np.float32)


def test_d_model_not_divisible_by_heads():
  with pytest.raises(ValueError, match=r'd_model=30 .*is not divisible by num_heads=4'):
    tx.MultiHeadAttention(num_heads=4).init(KEY, jnp.zeros((1, 3, 30)))


@pytest.mark.parametrize('k_shape,v_shape,match', [
    ((2, 5, 4, 6), (2, 5, 4, 8), 'head dim Dk'),
    ((2, 5, 4, 8), (2, 6, 4, 8), 'key length Tk'),
    ((2, 5, 3, 8), (2, 5, 3, 8), 'does not divide the H=4 query heads'),
    ((2, 5, 2, 8), (2, 5, 4, 8), 'number of key/value heads'),
    ((5, 4, 8), (5, 4, 8), 'equal rank'),
    ((3, 5, 4, 8), (3, 5, 4, 8), 'batch dims'),
])
def test_qkv_shapes_that_do_not_fit(k_shape, v_shape, match):
  with pytest.raises(ValueError, match=match):
    tx.dot_product_attention(Q, np.zeros(k_shape), np.zeros(v_shape))


def test_mask_that_does_not_broadcast():
  with pytest.raises(ValueError, match=r'mask has shape \(3, 5\).*\(2, 4, 3, 3\)'):
    tx.dot_product_attention(Q, Q, Q, mask=np.ones((3, 5), bool))
  with pytest.raises(ValueError, match='bias has shape'):
    tx.dot_product_attention(Q, Q, Q, bias=np.ones((7,)))


def test_image_not_divisible_by_patch():
  with pytest.raises(ValueError, match=r'image size 10x10 is not divisible by patch_size=4'):
    tx.ViT(num_classes=2, patch_size=4, num_layers=1, d_model=8, num_heads=2, d_ff=8).init(
        KEY, jnp.zeros((1, 10, 10, 1)))


def test_sequence_longer_than_learned_table():
  lm = tx.DecoderLM(vocab_size=5, posemb='learn', num_positions=4, num_layers=1, d_model=8,
                    num_heads=2, d_ff=8)
  with pytest.raises(ValueError, match=r'sequence length 6 exceeds the learned posemb table '
                                       r'\(num_positions=4\); use a larger num_positions'):
    lm.init(KEY, jnp.zeros((1, 6), jnp.int32))


SMALL = dict(num_layers=1, d_model=8, num_heads=2, d_ff=8)


@pytest.mark.parametrize('make,field,value', [
    (lambda: tx.Encoder(posemb='learned', **SMALL), 'posemb', 'learned'),
    (lambda: tx.Encoder(score='bilinear', **SMALL), 'score', 'bilinear'),
    (lambda: tx.Encoder(implementation='cudnn', **SMALL), 'implementation', 'cudnn'),
    (lambda: tx.Encoder(norm='sandwich', **SMALL), 'norm', 'sandwich'),
    (lambda: tx.Encoder(activation='swish', **SMALL), 'activation', 'swish'),
    (lambda: tx.EncoderClassifier(num_classes=2, pool='max', **SMALL), 'pool', 'max'),
])
def test_unknown_option_strings(make, field, value):
  with pytest.raises(ValueError, match=rf"{field}='{value}'; allowed: "):
    make().init(KEY, jnp.zeros((1, 3, 8)))


def test_unknown_vit_options():
  with pytest.raises(ValueError, match=r"posemb='learned'; allowed: 'learn', 'sincos2d'"):
    tx.ViT(num_classes=2, patch_size=2, posemb='learned', **SMALL).init(KEY, jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match=r"variant='XL/16'"):
    tx.vit_variant('XL/16', num_classes=2)
  with pytest.raises(ValueError, match="implementation='flash'"):
    tx.dot_product_attention(Q, Q, Q, implementation='flash')


def test_negative_beta():
  with pytest.raises(ValueError, match=r'beta=-0.5 is negative'):
    tx.dot_product_attention(Q, Q, Q, beta=-0.5)
  with pytest.raises(ValueError, match=r'beta_scale=-1.0 is negative'):
    tx.MultiHeadAttention(num_heads=2, beta_scale=-1.0).init(KEY, jnp.zeros((1, 3, 8)))
  with pytest.raises(ValueError, match='learn_beta=True'):
    tx.MultiHeadAttention(num_heads=2, beta_scale=0.0, learn_beta=True).init(KEY, jnp.zeros((1, 3, 8)))


def test_fused_limits_are_explicit():
  with pytest.raises(ValueError, match='return_weights=True needs'):
    tx.dot_product_attention(Q, Q, Q, return_weights=True, implementation='fused')
  with pytest.raises(ValueError, match='supports score="dot" only'):
    tx.MultiHeadAttention(num_heads=2, score='cosine', implementation='fused').init(
        KEY, jnp.zeros((1, 3, 8)))


@pytest.mark.parametrize('dtype', [np.complex64, np.int32, np.bool_])
@pytest.mark.parametrize('name', ['q', 'k', 'v'])
def test_attention_on_complex_or_integer_inputs(name, dtype):
  """Attention is defined on real vectors: nothing is silently cast (a complex input would
  lose its imaginary part)."""
  qkv = dict(q=Q, k=Q, v=Q)
  qkv[name] = Q.astype(dtype)
  match = rf'^{name} has dtype {np.dtype(dtype).name}; allowed: real floating point'
  with pytest.raises(ValueError, match=match):
    tx.dot_product_attention(**qkv)
  scores, v = np.zeros((2, 3, 4, 4), np.float32), np.zeros((2, 4, 4, 8), np.float32)
  with pytest.raises(ValueError, match=rf'^scores has dtype {np.dtype(dtype).name}; allowed'):
    tx.attend(scores.astype(dtype), v)
  with pytest.raises(ValueError, match=rf'^v has dtype {np.dtype(dtype).name}; allowed'):
    tx.attend(scores, v.astype(dtype))
