"""Pretrained weights in and out of tx: Hugging Face ViT (`ViTForImageClassification`) and GPT-2
(`GPT2LMHeadModel`) checkpoints, a `model.safetensors` + `config.json` directory as the Hub and
`save_pretrained` write them.

    model, params = tx.pretrained.load_hf_vit('path/to/vit-base-patch16-224')
    logits = model.apply({'params': params}, images)   # images [batch, H, W, C], normalised
    tx.pretrained.save_hf_vit(model, params, 'out/')      # loads with ViTForImageClassification

The mapping (torch's Linear stores W [out, in] and computes x Wᵀ + b; tx's kernels are
[in, ...out]): for each layer i of vit.encoder.layer.i,
    attention.attention.{query,key,value}.weight  [D, D]   → self_attention.{query,key,value}.kernel  Wᵀ as [D, H, D/H]
    attention.output.dense.weight                [D, D]   → self_attention.out.kernel  Wᵀ as [H, D/H, D]
    intermediate.dense / output.dense            [F, D], [D, F] → ffn.hidden / ffn.output  Wᵀ
    layernorm_before / layernorm_after           → self_attention_norm / ffn_norm  (weight → scale)
and embeddings.patch_embeddings.projection.weight [D, C, p, p] → embedding.kernel [p, p, C, D],
embeddings.cls_token → cls, embeddings.position_embeddings → pos_embedding, vit.layernorm →
encoder.final_norm, classifier → head. transformers 5 names its modules differently in memory
(vit.layers.i.attention.q_proj, mlp.fc1, ...); files with either spelling load. HF ViT computes
exact (erf) GELU and LayerNorm with ε = 1e-12: the model gets activation='gelu_exact' and
layer_norm_epsilon from the config.

Every load checks that the converted tree is exactly the model's (no parameter missing or left
over, every shape equal) and names the first difference. safetensors is imported only here, when
called: `import tx` does not need it (`pip install 'tx[pretrained]'`).
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from tx.models import DecoderLM
from tx.vit import ViT

# transformers 5's in-memory names → the historical names that Hub files use.
_V5_NAMES = [(r'^vit\.layers\.(\d+)\.attention\.([qkv])_proj\.',
              lambda m: f'vit.encoder.layer.{m[1]}.attention.attention.'
                        f'{dict(q="query", k="key", v="value")[m[2]]}.'),
             (r'^vit\.layers\.(\d+)\.attention\.o_proj\.',
              lambda m: f'vit.encoder.layer.{m[1]}.attention.output.dense.'),
             (r'^vit\.layers\.(\d+)\.mlp\.fc1\.', r'vit.encoder.layer.\1.intermediate.dense.'),
             (r'^vit\.layers\.(\d+)\.mlp\.fc2\.', r'vit.encoder.layer.\1.output.dense.'),
             (r'^vit\.layers\.(\d+)\.', r'vit.encoder.layer.\1.')]
_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
                'relu': 'relu'}


def _historical(name: str) -> str:
  for pattern, replacement in _V5_NAMES:
    new = re.sub(pattern, replacement, name)
    if new != name:
      return new
  return name


def _read_directory(directory: str, rename=_historical) -> tuple[dict, dict]:
  """(config.json, {rename(name): array}) of a Hugging Face checkpoint directory."""
  config_path = os.path.join(directory, 'config.json')
  weights_path = os.path.join(directory, 'model.safetensors')
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise ValueError(f'{directory!r} has no {os.path.basename(path)}: give a directory as '
                       'save_pretrained or the Hub writes it (config.json, model.safetensors)')
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise ImportError("reading safetensors needs the safetensors package: pip install "
                      "'tx[pretrained]'") from None
  with open(config_path) as f:
    config = json.load(f)
  return config, {rename(k): v for k, v in load_file(weights_path).items()}


def vit_from_hf_config(config: dict) -> ViT:
  """The tx ViT of a Hugging Face ViTConfig (as a dict); ValueError for what tx lacks."""
  if config.get('model_type') != 'vit':
    raise ValueError(f"model_type={config.get('model_type')!r}: load_hf_vit reads 'vit' "
                     'checkpoints (ViTForImageClassification)')
  act = config.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(f'hidden_act={act!r}; allowed: {", ".join(map(repr, _ACTIVATIONS))}')
  if not config.get('qkv_bias', True):
    raise ValueError('qkv_bias=False: tx attention always has query, key and value biases')
  num_labels = config.get('num_labels') or len(config.get('id2label') or {}) or 2
  return ViT(num_classes=num_labels, patch_size=config['patch_size'],
             num_layers=config['num_hidden_layers'], d_model=config['hidden_size'],
             num_heads=config['num_attention_heads'], d_ff=config['intermediate_size'],
             activation=_ACTIVATIONS[act], layer_norm_epsilon=config.get('layer_norm_eps', 1e-12),
             posemb='learn', pool='cls', norm='pre')


def _vit_pairs(model: ViT):
  """(HF name, tx path, to_tx, from_tx) for every parameter of `model`."""
  d, h = model.d_model, model.num_heads
  linear = (lambda w: w.T, lambda k: k.T)  # torch [out, in] ↔ flax [in, out]
  qkv = (lambda w: w.T.reshape(d, h, d // h), lambda k: k.reshape(d, d).T)
  out = (lambda w: w.T.reshape(h, d // h, d), lambda k: k.reshape(d, d).T)
  heads = (lambda b: b.reshape(h, d // h), lambda b: b.reshape(d))
  same = (lambda x: x, lambda x: x)
  pairs = [('vit.embeddings.cls_token', ('cls',), *same),
           ('vit.embeddings.position_embeddings', ('pos_embedding',), *same),
           ('vit.embeddings.patch_embeddings.projection.weight', ('embedding', 'kernel'),
            lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
           ('vit.embeddings.patch_embeddings.projection.bias', ('embedding', 'bias'), *same),
           ('vit.layernorm.weight', ('encoder', 'final_norm', 'scale'), *same),
           ('vit.layernorm.bias', ('encoder', 'final_norm', 'bias'), *same),
           ('classifier.weight', ('head', 'kernel'), *linear),
           ('classifier.bias', ('head', 'bias'), *same)]
  for i in range(model.num_layers):
    hf, block = f'vit.encoder.layer.{i}.', ('encoder', f'block_{i}')
    for name, tx_name in (('query', 'query'), ('key', 'key'), ('value', 'value')):
      pairs += [(f'{hf}attention.attention.{name}.weight', (*block, 'self_attention', tx_name,
                                                           'kernel'), *qkv),
                (f'{hf}attention.attention.{name}.bias', (*block, 'self_attention', tx_name,
                                                         'bias'), *heads)]
    pairs += [(f'{hf}attention.output.dense.weight', (*block, 'self_attention', 'out', 'kernel'),
               *out),
              (f'{hf}attention.output.dense.bias', (*block, 'self_attention', 'out', 'bias'),
               *same),
              (f'{hf}intermediate.dense.weight', (*block, 'ffn', 'hidden', 'kernel'), *linear),
              (f'{hf}intermediate.dense.bias', (*block, 'ffn', 'hidden', 'bias'), *same),
              (f'{hf}output.dense.weight', (*block, 'ffn', 'output', 'kernel'), *linear),
              (f'{hf}output.dense.bias', (*block, 'ffn', 'output', 'bias'), *same)]
    for hf_norm, tx_norm in (('layernorm_before', 'self_attention_norm'),
                             ('layernorm_after', 'ffn_norm')):
      pairs += [(f'{hf}{hf_norm}.weight', (*block, tx_norm, 'scale'), *same),
                (f'{hf}{hf_norm}.bias', (*block, tx_norm, 'bias'), *same)]
  return pairs


def _expected(model, example) -> dict:
  """{path: shape} of the model's parameters for an example input."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(shapes['params'])}


def _convert(pairs, weights: dict, expected: dict, directory: str, ignored=()) -> dict:
  """The params tree from `weights` by `pairs` (hf name, tx path, to_tx, ...), checked to be
  exactly `expected`: every path filled with its shape, every weight used (or `ignored`)."""
  params, used = {}, set()
  for hf, path, to_tx, *_ in pairs:
    if hf not in weights:
      raise ValueError(f'{directory!r} has no {hf} (tx needs it for {"/".join(path)})')
    value = np.asarray(to_tx(weights[hf]), np.float32)
    if value.shape != expected[path]:
      raise ValueError(f'{hf} is {weights[hf].shape} in {directory!r}; tx needs '
                       f'{"/".join(path)} of {expected[path]}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    used.add(hf)
  missing = sorted(set(expected) - {path for _, path, *_ in pairs})
  if missing:  # a mapping that forgot a parameter: a bug in this module, said plainly.
    raise ValueError(f'no mapping fills {"/".join(missing[0])}')
  left = sorted(k for k in set(weights) - used if not any(re.search(i, k) for i in ignored))
  if left:
    raise ValueError(f'{directory!r} has {left[0]} (and {len(left) - 1} more) that tx does not '
                     'use: an architecture this loader does not support')
  return params


def load_hf_vit(directory: str):
  """(tx.ViT, params) of a Hugging Face ViT checkpoint directory; float32 params as NumPy."""
  config, weights = _read_directory(directory)
  model = vit_from_hf_config(config)
  if 'classifier.weight' not in weights:
    raise ValueError(f'{directory!r} has no classifier.weight: load_hf_vit reads '
                     'ViTForImageClassification checkpoints (a ViTModel has no classifier)')
  size, channels = config['image_size'], config.get('num_channels', 3)
  expected = _expected(model, jax.ShapeDtypeStruct((1, size, size, channels), np.float32))
  return model, _convert(_vit_pairs(model), weights, expected, directory)


def save_hf_vit(model: ViT, params, directory: str, image_size: int = 224, channels: int = 3):
  """Writes `model` and `params` as a ViTForImageClassification directory (config.json,
  model.safetensors, the Hub's names), which transformers and `load_hf_vit` load."""
  if (model.posemb, model.pool, model.norm) != ('learn', 'cls', 'pre') or model.scan_layers:
    raise ValueError('save_hf_vit writes ViTs with posemb="learn", pool="cls", norm="pre" and '
                     'unscanned layers, as HF ViT is')
  activation = {v: k for k, v in _ACTIVATIONS.items() if k != 'gelu_new'}.get(model.activation)
  from safetensors.numpy import save_file
  weights = {}
  for hf, path, _, from_tx in _vit_pairs(model):
    node = params
    for key in path:
      node = node[key]
    weights[hf] = np.ascontiguousarray(from_tx(np.asarray(node, np.float32)))
  config = {'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
            'hidden_size': model.d_model, 'num_hidden_layers': model.num_layers,
            'num_attention_heads': model.num_heads, 'intermediate_size': model.d_ff,
            'hidden_act': activation, 'layer_norm_eps': model.layer_norm_epsilon,
            'image_size': image_size, 'patch_size': model.patch_size, 'num_channels': channels,
            'qkv_bias': True, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
            'id2label': {str(i): f'LABEL_{i}' for i in range(model.num_classes)},
            'label2id': {f'LABEL_{i}': i for i in range(model.num_classes)}}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(weights, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})


# --- GPT-2 -------------------------------------------------------------------------------------

def gpt2_from_hf_config(config: dict) -> DecoderLM:
  """The tx DecoderLM of a Hugging Face GPT2Config (as a dict): pre-LN, learned positions,
  unscaled and tied token embeddings; ValueError for what tx lacks."""
  if config.get('model_type') != 'gpt2':
    raise ValueError(f"model_type={config.get('model_type')!r}: load_hf_gpt2 reads 'gpt2' "
                     'checkpoints (GPT2LMHeadModel)')
  act = config.get('activation_function', 'gelu_new')
  unsupported = {'activation_function': act not in _ACTIVATIONS,
                 'scale_attn_weights': not config.get('scale_attn_weights', True),
                 'scale_attn_by_inverse_layer_idx': config.get('scale_attn_by_inverse_layer_idx'),
                 'add_cross_attention': config.get('add_cross_attention'),
                 'tie_word_embeddings': not config.get('tie_word_embeddings', True)}
  for field, bad in unsupported.items():
    if bad:
      raise ValueError(f'{field}={config.get(field)!r} is a GPT-2 variant tx does not build')
  d = config['n_embd']
  return DecoderLM(vocab_size=config['vocab_size'], num_layers=config['n_layer'], d_model=d,
                   num_heads=config['n_head'], d_ff=config.get('n_inner') or 4 * d,
                   posemb='learn', num_positions=config['n_positions'], norm='pre',
                   activation=_ACTIVATIONS[act],
                   layer_norm_epsilon=config.get('layer_norm_epsilon', 1e-5),
                   scale_embeddings=False, tie_embeddings=True)


def _gpt2_pairs(model: DecoderLM):
  """(HF name, tx path, to_tx) for every parameter. GPT-2's Conv1D stores W [in, out] (x W + b,
  no transpose); c_attn holds [W_q | W_k | W_v] side by side."""
  d, h = model.d_model, model.num_heads
  same = lambda x: x
  pairs = [('wte.weight', ('embed', 'embedding', 'embedding'), same),
           ('wpe.weight', ('decoder', 'posemb', 'pos_embedding'), same),
           ('ln_f.weight', ('decoder', 'final_norm', 'scale'), same),
           ('ln_f.bias', ('decoder', 'final_norm', 'bias'), same)]
  for i in range(model.num_layers):
    hf, block = f'h.{i}.', ('decoder', f'block_{i}')
    for j, name in enumerate(('query', 'key', 'value')):
      pairs += [(f'{hf}attn.c_attn.weight', (*block, 'self_attention', name, 'kernel'),
                 lambda w, j=j: w[:, j * d:(j + 1) * d].reshape(d, h, d // h)),
                (f'{hf}attn.c_attn.bias', (*block, 'self_attention', name, 'bias'),
                 lambda b, j=j: b[j * d:(j + 1) * d].reshape(h, d // h))]
    pairs += [(f'{hf}attn.c_proj.weight', (*block, 'self_attention', 'out', 'kernel'),
               lambda w: w.reshape(h, d // h, d)),
              (f'{hf}attn.c_proj.bias', (*block, 'self_attention', 'out', 'bias'), same),
              (f'{hf}mlp.c_fc.weight', (*block, 'ffn', 'hidden', 'kernel'), same),
              (f'{hf}mlp.c_fc.bias', (*block, 'ffn', 'hidden', 'bias'), same),
              (f'{hf}mlp.c_proj.weight', (*block, 'ffn', 'output', 'kernel'), same),
              (f'{hf}mlp.c_proj.bias', (*block, 'ffn', 'output', 'bias'), same)]
    for hf_norm, tx_norm in (('ln_1', 'self_attention_norm'), ('ln_2', 'ffn_norm')):
      pairs += [(f'{hf}{hf_norm}.weight', (*block, tx_norm, 'scale'), same),
                (f'{hf}{hf_norm}.bias', (*block, tx_norm, 'bias'), same)]
  return pairs


def load_hf_gpt2(directory: str):
  """(tx.DecoderLM, params) of a Hugging Face GPT-2 checkpoint directory (GPT2LMHeadModel or
  GPT2Model, names with or without 'transformer.'); float32 params as NumPy. The LM head is
  the token table (tied), as in GPT-2; old files' attention-mask buffers are skipped."""
  config, weights = _read_directory(directory, lambda k: k.removeprefix('transformer.'))
  model = gpt2_from_hf_config(config)
  if 'lm_head.weight' in weights and not np.array_equal(weights['lm_head.weight'],
                                                        weights.get('wte.weight')):
    raise ValueError(f'{directory!r}: lm_head.weight differs from wte.weight; tx ties them')
  expected = _expected(model, jax.ShapeDtypeStruct((1, 1), np.int32))
  params = _convert(_gpt2_pairs(model), weights, expected, directory,
                    ignored=(r'^lm_head\.weight$', r'^h\.\d+\.attn\.(masked_)?bias$'))
  return model, params
