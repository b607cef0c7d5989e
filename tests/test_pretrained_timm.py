"""timm ViTs in tx: random timm models with small dims, every parameter perturbed, saved as
timm saves them, loaded: the same logits and attention maps. Without timm, state dicts with
timm's names checked against timm's forward pass written out in NumPy, and the errors."""

import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip('safetensors')

import tx  # noqa: E402
from tx import pretrained  # noqa: E402
from tx.pretrained.timm import load_timm_vit  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
             num_classes=5)


def images(n=2, size=32, channels=3):
  return np.random.default_rng(0).normal(size=(n, size, size, channels)).astype(np.float32)


# --- without timm: timm's names and forward pass in NumPy ----------------------------------------

def timm_state_dict(d=32, depth=2, d_ff=64, patch=8, grid=4, channels=3, classes=5,
                    class_token=True, reg_tokens=0, no_embed_class=False, fc_norm=False,
                    pos_embed=True, seed=0):
  """Random float32 weights with timm VisionTransformer's names and shapes."""
  rng = np.random.default_rng(seed)
  w = lambda *shape: rng.normal(scale=0.3, size=shape).astype(np.float32)
  prefix = int(class_token) + reg_tokens
  state = {'patch_embed.proj.weight': w(d, channels, patch, patch), 'patch_embed.proj.bias': w(d)}
  if pos_embed:
    state['pos_embed'] = w(1, grid * grid + (0 if no_embed_class else prefix), d)
  if class_token:
    state['cls_token'] = w(1, 1, d)
  if reg_tokens:
    state['reg_token'] = w(1, reg_tokens, d)
  for i in range(depth):
    b = f'blocks.{i}.'
    state.update({b + 'norm1.weight': 1 + w(d), b + 'norm1.bias': w(d),
                  b + 'attn.qkv.weight': w(3 * d, d), b + 'attn.qkv.bias': w(3 * d),
                  b + 'attn.proj.weight': w(d, d), b + 'attn.proj.bias': w(d),
                  b + 'norm2.weight': 1 + w(d), b + 'norm2.bias': w(d),
                  b + 'mlp.fc1.weight': w(d_ff, d), b + 'mlp.fc1.bias': w(d_ff),
                  b + 'mlp.fc2.weight': w(d, d_ff), b + 'mlp.fc2.bias': w(d)})
  norm = 'fc_norm' if fc_norm else 'norm'
  state.update({f'{norm}.weight': 1 + w(d), f'{norm}.bias': w(d)})
  if classes:
    state.update({'head.weight': w(classes, d), 'head.bias': w(classes)})
  return state


def timm_forward(state, x, num_heads, pool='token'):
  """timm's VisionTransformer.forward in float64 NumPy (eval): x [N, H, W, C]."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  ln = lambda x, n: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
                     * s[f'{n}.weight'] + s[f'{n}.bias'])
  erf = np.vectorize(math.erf)
  kernel = s['patch_embed.proj.weight']
  d, c, p, _ = kernel.shape
  n, hh, ww, _ = x.shape
  patches = x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  z = patches.reshape(n, -1, c * p * p) @ kernel.reshape(d, -1).T + s['patch_embed.proj.bias']
  prefix = [s[k][0] for k in ('cls_token', 'reg_token') if k in s]
  k_prefix = sum(len(t) for t in prefix)
  table = s.get('pos_embed', np.zeros((1, 0, d)))[0]
  before = len(table) == z.shape[1]  # no_embed_class: added before the prefix.
  z = z + table if before else z
  z = np.concatenate([np.broadcast_to(t, (n,) + t.shape) for t in prefix] + [z], 1)
  z = z + table if len(table) and not before else z
  i = 0
  while f'blocks.{i}.norm1.weight' in s:
    b = f'blocks.{i}.'
    qkv = ln(z, b + 'norm1') @ s[b + 'attn.qkv.weight'].T + s[b + 'attn.qkv.bias']
    q, k, v = qkv.reshape(n, -1, 3, num_heads, d // num_heads).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // num_heads)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    out = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, d)
    z = z + out @ s[b + 'attn.proj.weight'].T + s[b + 'attn.proj.bias']
    hidden = ln(z, b + 'norm2') @ s[b + 'mlp.fc1.weight'].T + s[b + 'mlp.fc1.bias']
    hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
    z = z + hidden @ s[b + 'mlp.fc2.weight'].T + s[b + 'mlp.fc2.bias']
    i += 1
  if 'norm.weight' in s:
    z = ln(z, 'norm')
  h = z[:, 0] if pool == 'token' else z[:, k_prefix:].mean(1)
  if 'fc_norm.weight' in s:
    h = ln(h, 'fc_norm')
  return h @ s['head.weight'].T + s['head.bias'] if 'head.weight' in s else h


def save_safetensors(state, path):
  from safetensors.numpy import save_file
  save_file(state, str(path))
  return str(path)


def write_directory(state, directory, **config):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(config))
  save_safetensors(state, directory / 'model.safetensors')
  return str(directory)


NUMPY_CASES = {
    'cls': (dict(), 'token'),
    'registers without class-token rows': (dict(reg_tokens=3, no_embed_class=True), 'token'),
    'class token, registers, gap, fc_norm': (dict(reg_tokens=2, fc_norm=True), 'avg'),
    'gap without class token': (dict(class_token=False), 'avg'),
    'features, no_embed_class': (dict(classes=0, no_embed_class=True, reg_tokens=1), 'token'),
    'no position table': (dict(pos_embed=False), 'token'),
}


@pytest.mark.parametrize('case', NUMPY_CASES)
def test_timm_state_dicts_give_timms_forward_pass(case, tmp_path):
  options, pool = NUMPY_CASES[case]
  state = timm_state_dict(**options)
  directory = write_directory(state, tmp_path / 'vit', architecture='vit_tiny_patch8_32',
                              global_pool=pool, model_args={'num_heads': 4},
                              pretrained_cfg={'input_size': [3, 32, 32]})
  model, params = load_timm_vit(directory)
  x = images()
  ours = np.asarray(model.apply({'params': params}, x))
  expected = timm_forward(state, x, num_heads=4, pool=pool)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected).max() > 0.5
  assert (model.activation, model.layer_norm_epsilon) == ('gelu_exact', 1e-6)


def test_the_architecture_is_read_from_the_weights(tmp_path):
  state = timm_state_dict(d=48, depth=3, d_ff=40, patch=4, grid=3, channels=1, classes=7,
                          reg_tokens=2, no_embed_class=True)
  model, _ = load_timm_vit(save_safetensors(state, tmp_path / 'w.safetensors'), num_heads=3)
  assert (model.d_model, model.num_layers, model.d_ff, model.patch_size, model.num_classes,
          model.num_heads, model.extra_tokens, model.class_token, model.posemb_prefix,
          model.pool, model.fc_norm, model.final_norm) == (48, 3, 40, 4, 7, 3, 2, True, False,
                                                           'cls', False, True)
  gap = save_safetensors(timm_state_dict(fc_norm=True), tmp_path / 'gap.safetensors')
  assert load_timm_vit(gap, num_heads=4)[0].pool == 'mean'  # fc_norm, no global_pool: 'avg'


def test_heads_come_from_the_argument_model_args_or_the_architecture_name(tmp_path):
  state = timm_state_dict(d=192, depth=1, d_ff=8, patch=4, grid=2)
  named = save_safetensors(state, tmp_path / 'deit_tiny_patch4_8-0123abcd.safetensors')
  assert load_timm_vit(named)[0].num_heads == 3  # tiny: 192 dimensions, 3 heads.
  assert load_timm_vit(named, num_heads=6)[0].num_heads == 6
  tagged = save_safetensors(state, tmp_path / 'deit_tiny_patch4_8.fb_in1k.safetensors')
  assert load_timm_vit(tagged)[0].num_heads == 3  # 'arch.tag': the tag is not the name.
  directory = write_directory(state, tmp_path / 'gap', architecture='vit_base_patch16_gap_224',
                              global_pool='token', pretrained_cfg={'input_size': [3, 8, 8]})
  with pytest.raises(ValueError, match=r"architecture='vit_base_patch16_gap_224', d_model=192\); "
                     'pass num_heads= to tx.pretrained.timm.load_timm_vit'):
    load_timm_vit(directory)  # base is 768 wide: its heads say nothing about a 192-wide model.
  unnamed = save_safetensors(state, tmp_path / 'weights.safetensors')
  with pytest.raises(ValueError, match=r"architecture='weights', d_model=192\); pass num_heads="):
    pretrained.load(unnamed)
  with pytest.raises(ValueError, match='num_heads=5; it must divide d_model=192'):
    load_timm_vit(unnamed, num_heads=5)


def test_torch_files_with_a_wrapper_load_as_the_safetensors_file(tmp_path):
  torch = pytest.importorskip('torch')
  state = timm_state_dict(reg_tokens=1)
  reference = load_timm_vit(save_safetensors(state, tmp_path / 'a.safetensors'), num_heads=4)[1]
  for name, saved in (('b.pth', {k: torch.from_numpy(v) for k, v in state.items()}),
                      ('c.bin', {'model': {f'module.{k}': torch.from_numpy(v).bfloat16()
                                           for k, v in state.items()}, 'epoch': 3})):
    torch.save(saved, tmp_path / name)
    _, params = load_timm_vit(str(tmp_path / name), num_heads=4)
    tolerance = 0 if name == "b.pth" else 0.03  # bfloat16 keeps 8 bits of mantissa.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tolerance), params,
                 reference)


UNSUPPORTED = {
    'blocks.0.ls1.gamma': 'LayerScale',
    'blocks.1.attn.q_norm.weight': 'qk-norm',
    'attn_pool.latent': "attention pooling \\(global_pool='map'",
    'norm_pre.weight': 'a LayerNorm before the blocks \\(pre_norm=True, CLIP\\)',
    'head_dist.weight': "DeiT's distillation token and head",
    'blocks.0.attn.norm.weight': 'a norm inside attention \\(scale_attn_norm=True\\)',
}


@pytest.mark.parametrize('name', UNSUPPORTED)
def test_timm_variants_tx_does_not_build_are_one_named_error(name, tmp_path):
  state = dict(timm_state_dict(), **{name: np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=f'has {name}: {UNSUPPORTED[name]}.*which tx ViT does '
                     'not build'):
    load_timm_vit(save_safetensors(state, tmp_path / 'w.safetensors'), num_heads=4)


def test_missing_biases_gated_mlps_and_configs_tx_does_not_build(tmp_path):
  def load(state, **config):
    if config:
      return load_timm_vit(write_directory(state, tmp_path / 'd', architecture='vit_x',
                                           pretrained_cfg={'input_size': [3, 32, 32]},
                                           **config), num_heads=4)
    return load_timm_vit(save_safetensors(state, tmp_path / 'w.safetensors'), num_heads=4)

  state = timm_state_dict()
  for name, message in (('blocks.0.attn.qkv.bias', r'qkv bias \(qkv_bias=False'),
                        ('patch_embed.proj.bias', 'patch-embedding bias'),
                        ('patch_embed.proj.weight', 'the patch embedding: load_timm_vit')):
    with pytest.raises(ValueError, match=f'has no {name}: tx needs {message}'):
      load({k: v for k, v in state.items() if k != name})
  swiglu = dict(state, **{'blocks.0.mlp.fc1.weight': np.ones((128, 32), np.float32),
                          'blocks.0.mlp.fc1.bias': np.ones(128, np.float32)})
  with pytest.raises(ValueError, match=r'a gated MLP \(SwiGLU\)'):
    load(swiglu)
  with pytest.raises(ValueError, match=r"global_pool='max'; tx ViTs pool with 'token', 'avg'"):
    load(state, global_pool='max')
  with pytest.raises(ValueError, match="model_args dynamic_img_size=True; tx ViT builds False"):
    load(state, model_args={'dynamic_img_size': True})
  with pytest.raises(ValueError, match="act_layer='quick_gelu'; tx loads timm ViTs with"):
    load(state, model_args={'act_layer': 'quick_gelu'})
  with pytest.raises(ValueError, match=r'pos_embed has 17 rows, which is neither the 3x3 patch '
                     'grid of 24x24 images'):
    load_timm_vit(write_directory(state, tmp_path / 'e', architecture='vit_x',
                                  pretrained_cfg={'input_size': [3, 24, 24]}), num_heads=4)
  with pytest.raises(ValueError, match='has no config.json'):
    load_timm_vit(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match="global_pool='token' with no cls_token"):
    load(timm_state_dict(class_token=False), global_pool='token')


# --- against timm ----------------------------------------------------------------------------

def timm_vit(**options):
  """A random timm ViT (as timm.create_model builds it, so that save_for_hf can write it), every
  parameter perturbed, in eval mode, attention computed unfused so that hooks see it."""
  from tests.test_pretrained import perturbed
  from tests.timm_reference import import_timm
  timm = import_timm()
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  model = perturbed(timm.create_model('vit_tiny_patch16_224', pretrained=False,
                                      **{**SMALL, **options}))
  for block in model.blocks:
    block.attn.fused_attn = False
  return model


def timm_logits(model, x):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


TIMM_CASES = {
    'cls token': dict(),
    'gap with fc_norm': dict(global_pool='avg'),
    'registers, no_embed_class': dict(reg_tokens=4, no_embed_class=True),
    'gap without class token': dict(class_token=False, global_pool='avg', fc_norm=False),
    'features': dict(num_classes=0),
    'class token, registers, gap (reg4_gap)': dict(reg_tokens=4, no_embed_class=True,
                                                  global_pool='avg'),
    'tanh GELU': dict(act_layer='gelu_tanh'),
}


@pytest.mark.parametrize('case', TIMM_CASES)
def test_a_saved_timm_vit_gives_the_same_outputs_in_tx(case, tmp_path):
  model = timm_vit(**TIMM_CASES[case])
  from timm.models._hub import save_for_hf
  save_for_hf(model, tmp_path, safe_serialization=True)
  tx_model, params = load_timm_vit(str(tmp_path))
  x = images()
  expected = timm_logits(model, x)
  ours = np.asarray(tx_model.apply({'params': params}, x))
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected).max() > 0.5


def test_attention_maps_are_timms_and_every_format_loads(tmp_path):
  model = timm_vit(reg_tokens=2, no_embed_class=True)
  import torch
  from timm.models._hub import save_for_hf
  maps = []
  hooks = [block.attn.attn_drop.register_forward_hook(lambda m, i, out: maps.append(out.numpy()))
           for block in model.blocks]
  x = images()
  expected = timm_logits(model, x)
  for hook in hooks:
    hook.remove()
  save_for_hf(model, tmp_path / 'hub', safe_serialization='both')
  tx_model, params = pretrained.load(str(tmp_path / 'hub'))
  weights = tx.attention_weights(tx_model, {'params': params}, x)
  assert len(weights) == len(maps) == 2
  for ours, theirs in zip(weights.values(), maps):  # [batch, heads, 1 + 2 + 16, 1 + 2 + 16]
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-6)
  (tmp_path / 'hub' / 'model.safetensors').unlink()  # pytorch_model.bin alone
  _, from_bin = load_timm_vit(str(tmp_path / 'hub'))
  jax.tree.map(np.testing.assert_array_equal, from_bin, params)
  torch.save(model.state_dict(), tmp_path / 'vit.pth')
  from safetensors.torch import save_file
  save_file(model.state_dict(), str(tmp_path / 'vit.safetensors'))
  for name in ('vit.pth', 'vit.safetensors'):
    file_model, file_params = load_timm_vit(str(tmp_path / name), num_heads=4)
    assert file_model == tx_model
    jax.tree.map(np.testing.assert_array_equal, file_params, params)
  np.testing.assert_allclose(np.asarray(tx_model.apply({'params': params}, x)), expected,
                             rtol=1e-5, atol=1e-5)
