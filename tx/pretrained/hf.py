"""Hugging Face ViT (`ViTForImageClassification`, `ViTModel`), GPT-2 (`GPT2LMHeadModel`) and
BERT (`BertForSequenceClassification`, `BertModel`) checkpoints in and out of tx, each a
directory holding `model.safetensors` and `config.json` as the Hub and `save_pretrained` write
them.

    model, params = tx.pretrained.load_hf_vit('path/to/vit-base-patch16-224')
    logits = model.apply({'params': params}, images)   # images [batch, H, W, C], normalised
    tx.pretrained.save_hf_vit(model, params, 'out/')   # loads with ViTForImageClassification

Layouts as in `tx.pretrained._convert`; GPT-2's Conv1D already stores [in, out], with W_q, W_k,
W_v side by side in c_attn; a patch-embedding convolution [D, C, p, p] becomes [p, p, C, D]. The
activation (exact or tanh GELU) and LayerNorm ε come from config.json. transformers 5 names
ViT's modules differently in memory (vit.layers.i.attention.q_proj, mlp.fc1, ...) than the
Hub's files (vit.encoder.layer.i.attention.attention.query, intermediate.dense, ...): both load.

Every load checks that the converted tree is exactly the model's (no parameter missing or left
over, every shape equal) and names the first difference.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np

from tx.models import DecoderLM, EncoderClassifier, unstack_layers
from tx.pretrained._convert import (SAME, attention, convert, dense, expected_shapes, flatten,
                                   fused_qkv, norm, patch_embedding, read_config,
                                   read_safetensors, safetensors_module, unconvert)
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


def _weight_files(directory: str) -> list[str]:
  """model.safetensors, or the shards its index (model.safetensors.index.json) lists."""
  single = os.path.join(directory, 'model.safetensors')
  index = single + '.index.json'
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(directory, shard) for shard in shards]
  hint = ('; it has only pytorch_model.bin: convert it once with transformers '
          '(from_pretrained, then save_pretrained) to safetensors'
          if os.path.isfile(os.path.join(directory, 'pytorch_model.bin')) else '')
  raise ValueError(f'{directory!r} has no model.safetensors (nor a sharded index){hint}')


def _read_directory(directory: str, rename=_historical) -> tuple[dict, dict]:
  """(config.json, {rename(name): float32 array}) of a Hugging Face checkpoint directory."""
  config = read_config(directory, 'a directory as save_pretrained or the Hub writes it '
                       '(config.json, model.safetensors)')
  files = _weight_files(directory)
  weights = {}
  for path in files:
    weights.update({rename(k): v for k, v in read_safetensors(path).items()})
  return config, weights


def _activation(config: dict, model_type: str, reads: str, field: str, default: str) -> str:
  """tx's activation for a config of `model_type`; ValueError for another model type (the
  loader `reads` its checkpoints) or an activation tx lacks."""
  if config.get('model_type') != model_type:
    raise ValueError(f"model_type={config.get('model_type')!r}: {reads} checkpoints")
  act = config.get(field, default)
  if act not in _ACTIVATIONS:
    raise ValueError(f'{field}={act!r}; allowed: {", ".join(map(repr, _ACTIVATIONS))}')
  return _ACTIVATIONS[act]


def _num_labels(config: dict) -> int:
  """As transformers counts them: id2label first."""
  return len(config.get('id2label') or {}) or config.get('num_labels') or 2


def vit_from_hf_config(config: dict, head: bool = True, pooler: bool = False) -> ViT:
  """The tx ViT of a Hugging Face ViTConfig (as a dict): ViTForImageClassification's with
  `head`, else ViTModel's (num_classes=0; with `pooler` its tanh pooler, pooler_output);
  ValueError for what tx lacks."""
  act = _activation(config, 'vit', "load_hf_vit reads 'vit' (ViTForImageClassification, "
                    'ViTModel)', 'hidden_act', 'gelu')
  if not config.get('qkv_bias', True):
    raise ValueError('qkv_bias=False: tx attention always has query, key and value biases')
  if pooler and (config.get('pooler_act', 'tanh') != 'tanh' or
                 config.get('pooler_output_size') not in (None, config['hidden_size'])):
    raise ValueError(f"pooler_act={config.get('pooler_act')!r}, pooler_output_size="
                     f"{config.get('pooler_output_size')!r}: tx's pooler is tanh, d_model wide")
  patch = config['patch_size']
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      raise ValueError(f'patch_size={patch}: tx ViT patches are square')
    patch = patch[0]
  return ViT(num_classes=_num_labels(config) if head else 0, patch_size=patch,
             num_layers=config['num_hidden_layers'], d_model=config['hidden_size'],
             num_heads=config['num_attention_heads'], d_ff=config['intermediate_size'],
             activation=act, layer_norm_epsilon=config.get('layer_norm_eps', 1e-12),
             posemb='learn', pool='cls', norm='pre', pooler=pooler)


def _vit_pairs(model: ViT):
  """(HF name, tx path, to_tx, from_tx) for every parameter of `model`."""
  d, h = model.d_model, model.num_heads
  pairs = [('vit.embeddings.cls_token', ('cls',), *SAME),
           ('vit.embeddings.position_embeddings', ('pos_embedding',), *SAME),
           *patch_embedding('vit.embeddings.patch_embeddings.projection', ('embedding',)),
           *norm('vit.layernorm', ('encoder', 'final_norm'))]
  if model.num_classes:
    pairs += dense('classifier', ('head',))
  if model.pooler:
    pairs += dense('vit.pooler.dense', ('pooler',))
  for i in range(model.num_layers):
    hf, block = f'vit.encoder.layer.{i}.', ('encoder', f'block_{i}')
    pairs += [*attention(f'{hf}attention.attention', f'{hf}attention.output.dense',
                          ('query', 'key', 'value'), (*block, 'self_attention'), d, h),
              *dense(f'{hf}intermediate.dense', (*block, 'ffn', 'hidden')),
              *dense(f'{hf}output.dense', (*block, 'ffn', 'output')),
              *norm(f'{hf}layernorm_before', (*block, 'self_attention_norm')),
              *norm(f'{hf}layernorm_after', (*block, 'ffn_norm'))]
  return pairs


def _vit_name(name: str) -> str:
  """A ViTModel's names lack ViTForImageClassification's 'vit.' prefix; v5 names → the Hub's."""
  return _historical(name if name.startswith(('vit.', 'classifier.')) else f'vit.{name}')


def load_hf_vit(directory: str):
  """(tx.ViT, params) of a Hugging Face ViT checkpoint directory; float32 params as NumPy.
  A ViTForImageClassification gives a classifier; a ViTModel (as the ImageNet-21k
  checkpoints) a tx ViT with num_classes=0, returning its pooler_output (tanh pooler over the
  [CLS] token) when the file has the pooler, else the final-normed [CLS] vector."""
  config, weights = _read_directory(directory, _vit_name)
  head = 'classifier.weight' in weights
  model = vit_from_hf_config(config, head, pooler=not head and 'vit.pooler.dense.weight' in weights)
  size, channels = config['image_size'], config.get('num_channels', 3)
  height, width = size if isinstance(size, (list, tuple)) else (size, size)
  expected = expected_shapes(model, jax.ShapeDtypeStruct((1, height, width, channels), np.float32))
  return model, convert(_vit_pairs(model), weights, expected, directory)


def save_hf_vit(model: ViT, params, directory: str, id2label: dict | None = None):
  """Writes `model` and `params` as a ViTForImageClassification directory (config.json,
  model.safetensors, the Hub's names), which transformers and `load_hf_vit` load. The image
  size and channels are those the parameters were made for (square images). ValueError for a
  ViT that HF's computes differently."""
  differs = {'posemb': model.posemb != 'learn', 'pool': model.pool != 'cls',
             'norm': model.norm != 'pre', 'beta_scale': model.beta_scale != 1.0,
             'learn_beta': model.learn_beta,
             'score': model.score != 'dot', 'embedding_norm': model.embedding_norm,
             'final_norm': model.final_norm is False, 'num_kv_heads': model.num_kv_heads
             not in (None, model.num_heads), 'extra_tokens': model.extra_tokens,
             'posemb_prefix': not model.posemb_prefix, 'fc_norm': model.fc_norm,
             'pooler': model.pooler, 'num_classes': not model.num_classes}
  for field, bad in differs.items():
    if bad:
      raise ValueError(f'{field}={getattr(model, field)!r}: HF ViTForImageClassification has '
                       'posemb="learn", pool="cls", norm="pre", beta_scale=1, score="dot", a '
                       'head, and none of learn_beta, embedding_norm, grouped '
                       'heads, extra tokens, fc_norm, pooler')
  pairs = _vit_pairs(model)
  if model.scan_layers:  # HF has one module per block: the scanned stack, sliced.
    params = unstack_layers(params)
  flat = flatten(params)
  weights = unconvert(pairs, flat, 'HF ViT')
  tokens, channels = flat[('pos_embedding',)].shape[1] - 1, flat[('embedding', 'kernel')].shape[2]
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f'the position table has {tokens} patch rows: not a square grid')
  activation = {v: k for k, v in _ACTIVATIONS.items() if k != 'gelu_new'}.get(model.activation)
  labels = id2label or {i: f'LABEL_{i}' for i in range(model.num_classes)}
  config = {'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
            'hidden_size': model.d_model, 'num_hidden_layers': model.num_layers,
            'num_attention_heads': model.num_heads, 'intermediate_size': model.d_ff,
            'hidden_act': activation, 'layer_norm_eps': model.layer_norm_epsilon,
            'image_size': side * model.patch_size, 'patch_size': model.patch_size,
            'num_channels': channels, 'qkv_bias': True, 'hidden_dropout_prob': 0.0,
            'attention_probs_dropout_prob': 0.0,
            'id2label': {str(i): label for i, label in labels.items()},
            'label2id': {label: int(i) for i, label in labels.items()}}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  safetensors_module('numpy').save_file(weights, os.path.join(directory, 'model.safetensors'),
                                  metadata={'format': 'pt'})


# --- GPT-2 -------------------------------------------------------------------------------------

def gpt2_from_hf_config(config: dict) -> DecoderLM:
  """The tx DecoderLM of a Hugging Face GPT2Config (as a dict): pre-LN, learned positions,
  unscaled and tied token embeddings; ValueError for what tx lacks."""
  act = _activation(config, 'gpt2', "load_hf_gpt2 reads 'gpt2' (GPT2LMHeadModel)",
                    'activation_function', 'gelu_new')
  unsupported = {'scale_attn_weights': not config.get('scale_attn_weights', True),
                 'scale_attn_by_inverse_layer_idx': config.get('scale_attn_by_inverse_layer_idx'),
                 'add_cross_attention': config.get('add_cross_attention'),
                 'tie_word_embeddings': not config.get('tie_word_embeddings', True)}
  for field, bad in unsupported.items():
    if bad:
      raise ValueError(f'{field}={config.get(field)!r} is a GPT-2 variant tx does not build')
  d = config['n_embd']
  return DecoderLM(vocab_size=config['vocab_size'], num_layers=config['n_layer'], d_model=d,
                   num_heads=config['n_head'], d_ff=config.get('n_inner') or 4 * d,
                   posemb='learn', num_positions=config.get('n_positions') or config.get(
                       'n_ctx', 1024), norm='pre',
                   activation=act, layer_norm_epsilon=config.get('layer_norm_epsilon', 1e-5),
                   scale_embeddings=False, tie_embeddings=True)


def _gpt2_pairs(model: DecoderLM):
  """(HF name, tx path, to_tx) for every parameter. GPT-2's Conv1D stores W [in, out] (x W + b,
  no transpose); c_attn holds [W_q | W_k | W_v] side by side."""
  d, h = model.d_model, model.num_heads
  same = SAME[0]
  pairs = [('wte.weight', ('embed', 'embedding', 'embedding'), same),
           ('wpe.weight', ('decoder', 'posemb', 'pos_embedding'), same),
           *norm('ln_f', ('decoder', 'final_norm'))]
  for i in range(model.num_layers):
    hf, block = f'h.{i}.', ('decoder', f'block_{i}')
    pairs += fused_qkv(f'{hf}attn.c_attn', (*block, 'self_attention'), d, h, stacked_on=1)
    pairs += [(f'{hf}attn.c_proj.weight', (*block, 'self_attention', 'out', 'kernel'),
               lambda w: w.reshape(h, d // h, d)),
              (f'{hf}attn.c_proj.bias', (*block, 'self_attention', 'out', 'bias'), same),
              (f'{hf}mlp.c_fc.weight', (*block, 'ffn', 'hidden', 'kernel'), same),
              (f'{hf}mlp.c_fc.bias', (*block, 'ffn', 'hidden', 'bias'), same),
              (f'{hf}mlp.c_proj.weight', (*block, 'ffn', 'output', 'kernel'), same),
              (f'{hf}mlp.c_proj.bias', (*block, 'ffn', 'output', 'bias'), same),
              *norm(f'{hf}ln_1', (*block, 'self_attention_norm')),
              *norm(f'{hf}ln_2', (*block, 'ffn_norm'))]
  return pairs


def load_hf_gpt2(directory: str):
  """(tx.DecoderLM, params) of a Hugging Face GPT-2 checkpoint directory (GPT2LMHeadModel or
  GPT2Model, names with or without 'transformer.'); float32 params as NumPy. The LM head is
  the token table (tied), as in GPT-2; old files' attention-mask buffers are skipped."""
  config, weights = _read_directory(directory, lambda k: k.removeprefix('transformer.'))
  model = gpt2_from_hf_config(config)
  if 'wte.weight' not in weights:
    raise ValueError(f'{directory!r} has no wte.weight (the token table) under any prefix')
  if 'lm_head.weight' in weights and not np.array_equal(weights['lm_head.weight'],
                                                        weights['wte.weight']):
    raise ValueError(f'{directory!r}: lm_head.weight differs from wte.weight; tx ties them')
  expected = expected_shapes(model, jax.ShapeDtypeStruct((1, 1), np.int32))
  params = convert(_gpt2_pairs(model), weights, expected, directory,
                    ignored=(r'^lm_head\.weight$', r'^h\.\d+\.attn\.(masked_)?bias$'))
  return model, params


# --- BERT --------------------------------------------------------------------------------------

def bert_from_hf_config(config: dict, head: bool = True, pooler: bool = True
                        ) -> EncoderClassifier:
  """The tx EncoderClassifier of a Hugging Face BertConfig (as a dict): post-LN, learned
  positions, token types, a LayerNorm over the embeddings, the first token pooled (through the
  tanh pooler with `pooler`), unscaled embeddings; without `head`, BertModel's (num_classes=0:
  pooler_output, or the [CLS] vector without a pooler). ValueError for what tx lacks."""
  act = _activation(config, 'bert', "load_hf_bert reads 'bert' (BertForSequenceClassification, "
                    'BertModel)', 'hidden_act', 'gelu')
  for field in ('is_decoder', 'add_cross_attention'):
    if config.get(field):
      raise ValueError(f'{field}=True is a BERT variant tx does not build (EncoderClassifier '
                       'attends both ways, without cross-attention)')
  if config.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f"position_embedding_type={config['position_embedding_type']!r}: tx "
                     "builds BERT's absolute (learned) positions only")
  return EncoderClassifier(
      num_classes=_num_labels(config) if head else 0, vocab_size=config['vocab_size'],
      pad_id=config.get('pad_token_id') or 0, num_layers=config['num_hidden_layers'],
      d_model=config['hidden_size'], num_heads=config['num_attention_heads'],
      d_ff=config['intermediate_size'], posemb='learn',
      num_positions=config['max_position_embeddings'], norm='post',
      activation=act, layer_norm_epsilon=config.get('layer_norm_eps', 1e-12),
      scale_embeddings=False, embedding_norm=True, pool='first',
      num_token_types=config.get('type_vocab_size', 2), pooler=pooler)


def _bert_pairs(model: EncoderClassifier):
  d, h = model.d_model, model.num_heads
  pairs = [('bert.embeddings.word_embeddings.weight', ('embed', 'embedding', 'embedding'),
            *SAME),
           ('bert.embeddings.position_embeddings.weight', ('encoder', 'posemb', 'pos_embedding'),
            *SAME),
           ('bert.embeddings.token_type_embeddings.weight', ('token_type_embed', 'embedding'),
            *SAME),
           *norm('bert.embeddings.LayerNorm', ('encoder', 'embedding_norm'))]
  if model.pooler:
    pairs += dense('bert.pooler.dense', ('pooler',))
  if model.num_classes:
    pairs += dense('classifier', ('head',))
  for i in range(model.num_layers):
    hf, block = f'bert.encoder.layer.{i}.', ('encoder', f'block_{i}')
    pairs += [*attention(f'{hf}attention.self', f'{hf}attention.output.dense',
                          ('query', 'key', 'value'), (*block, 'self_attention'), d, h),
              *norm(f'{hf}attention.output.LayerNorm', (*block, 'self_attention_norm')),
              *dense(f'{hf}intermediate.dense', (*block, 'ffn', 'hidden')),
              *dense(f'{hf}output.dense', (*block, 'ffn', 'output')),
              *norm(f'{hf}output.LayerNorm', (*block, 'ffn_norm'))]
  return pairs


def _bert_name(name: str) -> str:
  """A BertModel's names lack the 'bert.' prefix; older files name LayerNorm's weight and bias
  gamma and beta."""
  if name.startswith(('embeddings.', 'encoder.', 'pooler.')):
    name = f'bert.{name}'
  return re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight',
                re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name))


def load_hf_bert(directory: str):
  """(tx.EncoderClassifier, params) of a Hugging Face BERT directory; float32 params as NumPy.
  A BertForSequenceClassification gives its classifier; any other BERT (BertModel, or the
  pre-training checkpoints such as bert-base-uncased, whose masked-LM and next-sentence heads
  'cls.*' are left out) gives the encoder with num_classes=0, returning pooler_output (or the
  [CLS] vector where the file has no pooler). Call the model as
  model.apply({'params': params}, input_ids, token_type_ids): positions equal to pad_token_id
  are masked out, as an attention_mask of input_ids != pad_token_id does in transformers."""
  config, weights = _read_directory(directory, _bert_name)
  head = 'classifier.weight' in weights
  pooler = 'bert.pooler.dense.weight' in weights
  if head and not pooler:
    raise ValueError(f'{directory!r} has classifier.weight but no pooler: a per-token head '
                     '(BertForTokenClassification, ...), which tx does not build')
  model = bert_from_hf_config(config, head, pooler)
  expected = expected_shapes(model, jax.ShapeDtypeStruct((1, 1), np.int32))
  ignored = (r'^bert\.embeddings\.position_ids$',) + (() if head else (r'^cls\.',))
  return model, convert(_bert_pairs(model), weights, expected, directory, ignored=ignored)
