"""vit_jax and big_vision `.npz` checkpoints: tx ViTs with every parameter moved away from its
init, saved in both layouts, then read by code nobody here wrote (timm's own reader,
`_load_weights`) and by a float64 NumPy forward pass that follows vit_jax's and big_vision's
model code module by module (it runs without timm); loaded back into tx exactly; and the
files tx cannot load exactly are one clear error."""

import pickle

import jax
import ml_dtypes
import numpy as np
import pytest

import tx
from tx import pretrained
from tx.pretrained import vit_jax

SHAPE = dict(patch_size=4, num_layers=2, d_model=32, num_heads=4, d_ff=48)


def images(n=3, size=16, channels=3):
  return np.random.default_rng(0).normal(size=(n, size, size, channels)).astype(np.float32)


def perturbed_vit(size=16, channels=3, **fields):
  """A tx ViT of SHAPE (with `fields`) and params away from any init: N(0, 0.2²) everywhere,
  around 1 for LayerNorm scales (shapes from tracing init, which compiles nothing)."""
  model = tx.ViT(**{'num_classes': 5, **SHAPE, **fields})
  shapes = jax.eval_shape(model.init, jax.random.key(1), images(1, size, channels))['params']
  rng = np.random.default_rng(1)
  return model, jax.tree_util.tree_map_with_path(
      lambda path, leaf: (path[-1].key == 'scale') + 0.2 * rng.normal(size=leaf.shape).astype(
          np.float32), shapes)


def tx_logits(model, params, x):
  return np.asarray(jax.jit(model.apply)({'params': params}, x))


# --- vit_jax's and big_vision's forward pass, in float64 NumPy, by the files' names ---------

def _layer_norm(x, arrays, name):
  """Flax nn.LayerNorm with its default ε = 1e-6, as both codes use it."""
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * arrays[f'{name}/scale'] + arrays[f'{name}/bias']


def _gelu_tanh(x):
  """Flax nn.gelu (approximate=True), which both codes' MlpBlock calls."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _sincos_2d(h, w, width, temperature=10_000.):
  """big_vision's posemb_sincos_2d (MoCo v3): [sin(x ω), cos(x ω), sin(y ω), cos(y ω)]."""
  y, x = np.mgrid[:h, :w]
  omega = 1. / (temperature ** (np.arange(width // 4) / (width // 4 - 1)))
  y = np.einsum('m,d->md', y.flatten(), omega)
  x = np.einsum('m,d->md', x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def _attention(y, arrays, name):
  """Flax MultiHeadDotProductAttention: softmax(q·k / √(D/H)) v, then out."""
  q, k, v = (np.einsum('ntd,dhe->nthe', y, arrays[f'{name}/{n}/kernel']) +
             arrays[f'{name}/{n}/bias'] for n in ('query', 'key', 'value'))
  logits = np.einsum('nqhe,nkhe->nhqk', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('nhqk,nkhe->nqhe', weights, v)
  return np.einsum('nqhe,hed->nqd', out, arrays[f'{name}/out/kernel']) + arrays[f'{name}/out/bias']


def npz_forward(path, x):
  """What vit_jax's VisionTransformer (models_vit.py) or big_vision's _Model (models/vit.py)
  computes from the arrays at `path` on images x, in float64."""
  arrays = {k: np.asarray(v, np.float64) for k, v in np.load(path).items()}
  kernel = arrays['embedding/kernel']
  p, n, (height, width, c) = kernel.shape[0], x.shape[0], x.shape[1:]
  patches = x.astype(np.float64).reshape(n, height // p, p, width // p, p, c)
  tokens = np.einsum('niujvc,uvcd->nijd', patches, kernel) + arrays['embedding/bias']
  tokens = tokens.reshape(n, -1, kernel.shape[-1])
  big_vision = any('MultiHeadDotProductAttention_0' in k for k in arrays)
  table = arrays.get('pos_embedding' if big_vision else
                     'Transformer/posembed_input/pos_embedding')
  added = big_vision and (table is None or table.shape[1] == tokens.shape[1])
  if added:  # big_vision: posemb first (its sincos2d without a table), then [CLS].
    tokens = tokens + (_sincos_2d(height // p, width // p, tokens.shape[-1]) if table is None
                       else table)
  if 'cls' in arrays:
    tokens = np.concatenate([np.repeat(arrays['cls'], n, axis=0), tokens], axis=1)
  if table is not None and not added:  # vit_jax's table, or an older big_vision [CLS] row.
    tokens = tokens + table
  scanned = 'Transformer/encoderblock/LayerNorm_0/scale' in arrays
  depth = (len(arrays['Transformer/encoderblock/LayerNorm_0/scale']) if scanned else
           sum(k.endswith('/LayerNorm_0/scale') for k in arrays))
  names = (('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
           if big_vision else
           ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'))
  for i in range(depth):
    block = 'Transformer/encoderblock/' if scanned else f'Transformer/encoderblock_{i}/'
    layer = {k[len(block):]: (v[i] if scanned else v)
             for k, v in arrays.items() if k.startswith(block)}
    tokens = tokens + _attention(_layer_norm(tokens, layer, names[0]), layer, names[1])
    y = _layer_norm(tokens, layer, names[2])
    mlp = names[3]
    hidden = _gelu_tanh(y @ layer[f'{mlp}/Dense_0/kernel'] + layer[f'{mlp}/Dense_0/bias'])
    tokens = tokens + hidden @ layer[f'{mlp}/Dense_1/kernel'] + layer[f'{mlp}/Dense_1/bias']
  tokens = _layer_norm(tokens, arrays, 'Transformer/encoder_norm')
  h = tokens[:, 0] if 'cls' in arrays else tokens.mean(axis=1)
  if 'pre_logits/kernel' in arrays:
    h = np.tanh(h @ arrays['pre_logits/kernel'] + arrays['pre_logits/bias'])
  if 'head/kernel' in arrays:
    h = h @ arrays['head/kernel'] + arrays['head/bias']
  return h


# (layout, pool, pooler, posemb_prefix): both layouts, [CLS] and mean pooling, pre_logits, and
# big_vision's older table with a [CLS] row.
CASES = [('vit_jax', 'cls', False, True), ('vit_jax', 'mean', True, True),
         ('big_vision', 'cls', True, False), ('big_vision', 'mean', False, True),
         ('big_vision', 'cls', False, True)]


@pytest.mark.parametrize('layout,pool,pooler,posemb_prefix', CASES)
def test_the_saved_file_computes_txs_logits_in_vit_jax_and_big_vision_code(
    tmp_path, layout, pool, pooler, posemb_prefix):
  model, params = perturbed_vit(pool=pool, pooler=pooler, posemb_prefix=posemb_prefix)
  path = str(tmp_path / 'vit.npz')
  vit_jax.save_vit_jax(model, params, path, layout)
  x = images()
  ours = tx_logits(model, params, x)
  np.testing.assert_allclose(ours, npz_forward(path, x), rtol=1e-5, atol=1e-5)
  assert np.abs(ours).max() > 0.5  # the perturbed head gives logits worth comparing.


@pytest.mark.parametrize('layout,pool,pooler,posemb_prefix', CASES)
def test_timms_own_reader_of_the_saved_file_gives_txs_logits(
    tmp_path, layout, pool, pooler, posemb_prefix):
  from tests.timm_reference import import_timm
  timm = import_timm()
  import torch
  model, params = perturbed_vit(pool=pool, pooler=pooler, posemb_prefix=posemb_prefix)
  path = str(tmp_path / 'vit.npz')
  vit_jax.save_vit_jax(model, params, path, layout)

  def timm_output(act_layer):
    # timm's reader leaves pre_logits out: with it, timm gives the pooled vector (no head).
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5,
        num_classes=0 if pooler else 5, class_token=pool == 'cls',
        global_pool='token' if pool == 'cls' else 'avg', fc_norm=False,
        no_embed_class=not posemb_prefix, act_layer=act_layer).eval()
    timm.models.vision_transformer._load_weights(reference, path)
    with torch.no_grad():
      return reference(torch.from_numpy(images().transpose(0, 3, 1, 2))).double().numpy()

  expected = timm_output('gelu_tanh')
  if pooler:  # vit_jax's pre_logits and head (Dense layers: x W + b) on timm's pooled vector.
    arrays = np.load(path)
    expected = np.tanh(expected @ arrays['pre_logits/kernel'] + arrays['pre_logits/bias'])
    expected = expected @ arrays['head/kernel'] + arrays['head/bias']
  ours = tx_logits(model, params, images())
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  if layout == 'vit_jax' and pool == 'cls':
    # timm's default, exact GELU is not what vit_jax computes: its conversion differs.
    assert np.abs(timm_output('gelu') - ours).max() > 5e-5


@pytest.mark.parametrize('layout,pool,pooler,posemb_prefix', CASES)
def test_loading_the_saved_file_gives_back_the_model_and_params_exactly(
    tmp_path, layout, pool, pooler, posemb_prefix):
  model, params = perturbed_vit(pool=pool, pooler=pooler, posemb_prefix=posemb_prefix,
                                scan_layers=layout == 'big_vision')
  path = str(tmp_path / 'vit.npz')
  vit_jax.save_vit_jax(model, params, path, layout)
  loaded, loaded_params = vit_jax.load_vit_jax(path)
  assert loaded == model
  assert jax.tree.structure(loaded_params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
  again, again_params = pretrained.load(path)
  assert again == model
  x = images()
  np.testing.assert_array_equal(tx_logits(again, again_params, x), tx_logits(model, params, x))
  assert pretrained.image_preprocessing(path) == pretrained.ImagePreprocessing(
      size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)


def test_the_layouts_convert_between_scanned_and_per_layer_blocks(tmp_path):
  """An unscanned tx ViT in big_vision's scanned layout loads scanned; a scanned one in
  vit_jax's per-layer layout loads per layer; the logits stay."""
  model, params = perturbed_vit(num_classes=0)  # no head: the pooled vector is the output.
  x = images()
  vit_jax.save_vit_jax(model, params, str(tmp_path / 'bv.npz'), 'big_vision')
  scanned, scanned_params = vit_jax.load_vit_jax(str(tmp_path / 'bv.npz'))
  assert scanned == model.clone(scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, scanned_params, tx.stack_layers(params))
  np.testing.assert_allclose(tx_logits(scanned, scanned_params, x), tx_logits(model, params, x),
                             rtol=1e-6, atol=1e-6)
  vit_jax.save_vit_jax(scanned, scanned_params, str(tmp_path / 'vj.npz'))
  again, again_params = vit_jax.load_vit_jax(str(tmp_path / 'vj.npz'))
  assert again == model
  jax.tree.map(np.testing.assert_array_equal, again_params, params)


def test_files_without_a_position_table_other_shapes_and_prefixes(tmp_path):
  """big_vision's sincos2d and vit_jax without posemb have no table; 1 channel, 24-pixel
  images, patch 8, 3 heads; optimizer prefixes and bfloat16 arrays load as timm reads them."""
  x = np.random.default_rng(2).normal(size=(2, 24, 24, 1)).astype(np.float32)
  for layout, posemb in (('big_vision', 'sincos2d'), ('vit_jax', 'none')):
    model, params = perturbed_vit(size=24, channels=1, patch_size=8, d_model=48, num_heads=3,
                                  posemb=posemb, num_classes=7,
                                  scan_layers=layout == 'big_vision')
    path = str(tmp_path / f'{layout}.npz')
    vit_jax.save_vit_jax(model, params, path, layout)
    loaded, loaded_params = vit_jax.load_vit_jax(path)
    assert (loaded.posemb, loaded.patch_size, loaded.num_heads) == (posemb, 8, 3)
    ours = tx_logits(loaded, loaded_params, x)
    np.testing.assert_array_equal(ours, tx_logits(model, params, x))
    np.testing.assert_allclose(ours, npz_forward(path, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='has no position table .* multiples of the patch size 8'):
      vit_jax.image_size(path)

  model, params = perturbed_vit()
  vit_jax.save_vit_jax(model, params, str(tmp_path / 'plain.npz'))
  arrays = dict(np.load(str(tmp_path / 'plain.npz')))
  for prefix in ('opt/target/', 'params/'):
    extra = {'opt/state/step': np.zeros(())} if prefix == 'opt/target/' else {}
    np.savez(str(tmp_path / 'prefixed.npz'), **{prefix + k: v for k, v in arrays.items()},
             **extra)
    loaded, loaded_params = vit_jax.load_vit_jax(str(tmp_path / 'prefixed.npz'))
    assert loaded == model
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
  np.savez(str(tmp_path / 'bf16.npz'), **{k: v.astype(ml_dtypes.bfloat16)
                                          for k, v in arrays.items()})
  _, bf16_params = vit_jax.load_vit_jax(str(tmp_path / 'bf16.npz'))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, b.astype(ml_dtypes.bfloat16).astype(np.float32)), bf16_params, params)
  assert vit_jax.image_size(str(tmp_path / 'plain.npz')) == (16, 16)


def test_files_tx_cannot_load_exactly_are_one_clear_error(tmp_path):
  model, params = perturbed_vit(pool='mean')
  vit_jax.save_vit_jax(model, params, str(tmp_path / 'bv.npz'), 'big_vision')
  bv = dict(np.load(str(tmp_path / 'bv.npz')))
  vit_jax.save_vit_jax(model.clone(pool='cls'), perturbed_vit()[1], str(tmp_path / 'vj.npz'))
  vj = dict(np.load(str(tmp_path / 'vj.npz')))

  def write(arrays, **kwargs):
    path = str(tmp_path / 'bad.npz')
    np.savez(path, **arrays, **kwargs)
    return path

  map_head = {'MAPHead_0/probe': np.zeros((1, 1, 32), np.float32),
              'MAPHead_0/LayerNorm_0/scale': np.ones(32, np.float32)}
  with pytest.raises(ValueError, match="has MAPHead_0: big_vision's attention pooling "
                     r"\(pool_type='map'\), which tx does not build"):
    pretrained.load(write({**bv, **map_head}))
  missing = {k: v for k, v in vj.items()
             if k != 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'}
  with pytest.raises(ValueError, match=r'has no Transformer/encoderblock_1/MlpBlock_3/Dense_1/'
                     r'bias \(tx needs it for encoder/block_1/ffn/output/bias\)'):
    vit_jax.load_vit_jax(write(missing))
  with pytest.raises(ValueError, match=r'has Transformer/encoderblock_2/LayerNorm_9/scale \(and '
                     r'0 more\) that tx does not use'):
    vit_jax.load_vit_jax(write({**vj, 'Transformer/encoderblock_2/LayerNorm_9/scale':
                                np.ones(32, np.float32)}))
  wrong = dict(vj, **{'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel':
                      np.zeros((4, 8, 31), np.float32)})
  with pytest.raises(ValueError, match=r'out/kernel is \(4, 8, 31\) .* tx needs encoder/block_0/'
                     r'self_attention/out/kernel of \(4, 8, 32\)'):
    vit_jax.load_vit_jax(write(wrong))
  narrow = dict(vj, **{'pre_logits/kernel': np.zeros((32, 16), np.float32),
                       'pre_logits/bias': np.zeros(16, np.float32)})
  with pytest.raises(ValueError, match=r"pre_logits/kernel is \(32, 16\) .*: tx's pooler maps "
                     'd_model=32 to itself, not to 16'):
    vit_jax.load_vit_jax(write(narrow))
  with pytest.raises(ValueError, match=r'has 18 rows .*: not 1 \+ a square grid of patches'):
    vit_jax.image_size(write(dict(vj, **{'Transformer/posembed_input/pos_embedding':
                                         np.zeros((1, 18, 32), np.float32)})))
  with pytest.raises(ValueError, match=r'not an .npz of plain arrays .* \(allow_pickle=False\)'):
    vit_jax.load_vit_jax(write(vj, labels=np.array([{'cat': 0}], dtype=object)))
  (tmp_path / 'pickled.npz').write_bytes(pickle.dumps(vj))
  with pytest.raises(ValueError, match='not an .npz of plain arrays'):
    pretrained.load(str(tmp_path / 'pickled.npz'))
  with pytest.raises(ValueError, match="has params/img/embedding/kernel: tx reads a ViT stored "
                     'at the top level'):
    vit_jax.load_vit_jax(write({f'params/img/{k}': v for k, v in vj.items()}))


def test_what_vit_jax_or_big_vision_compute_differently_is_refused_on_save(tmp_path):
  model, params = perturbed_vit()
  path = str(tmp_path / 'no.npz')
  refusals = [(dict(activation='gelu_exact'), 'vit_jax', "activation='gelu_exact': "
               "layout='vit_jax' computes"),
              (dict(posemb='rope'), 'vit_jax', "posemb='rope'"),
              (dict(posemb='sincos2d'), 'vit_jax', "posemb='sincos2d'"),
              (dict(posemb='none'), 'big_vision', "posemb='none'"),
              (dict(posemb_prefix=False), 'vit_jax', 'posemb_prefix=False'),
              (dict(layer_norm_epsilon=1e-12), 'big_vision', 'layer_norm_epsilon=1e-12'),
              (dict(learn_beta=True), 'vit_jax', 'learn_beta=True'),
              (dict(fc_norm=True), 'vit_jax', 'fc_norm=True'),
              (dict(extra_tokens=1), 'big_vision', 'extra_tokens=1'),
              (dict(pool='mean', class_token=True), 'vit_jax', 'class_token=True')]
  for fields, layout, message in refusals:
    with pytest.raises(ValueError, match=message):
      vit_jax.save_vit_jax(model.clone(**fields), params, path, layout)
  with pytest.raises(ValueError, match="layout='timm'; allowed: 'vit_jax', 'big_vision'"):
    vit_jax.save_vit_jax(model, params, path, 'timm')
  with pytest.raises(ValueError, match='params has pooler/bias, which vit_jax has no place for'):
    vit_jax.save_vit_jax(model, {**params, 'pooler': {'kernel': np.zeros((32, 32)),
                                                      'bias': np.zeros(32)}}, path)
