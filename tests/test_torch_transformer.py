"""tx.Encoder and tx.Decoder against torch.nn.Transformer: random torch models, every parameter
moved away from its init, mapped into tx's parameter tree; the same outputs. And a headless
tx.EncoderClassifier (num_classes=0) against transformers' BertModel pooler_output.

torch's layers and tx's blocks compute the same function: post-LN (norm_first=False)
LN(x + f(x)) or pre-LN x + f(LN(x)), a LayerNorm after the last layer (encoder.norm,
decoder.norm ↔ final_norm), ReLU or exact GELU (torch's 'gelu' is x·Φ(x): tx's 'gelu_exact').
"""

import contextlib
from types import SimpleNamespace

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import tx  # noqa: E402
from tx.pretrained._convert import attention, convert, dense, expected_shapes, norm  # noqa: E402
from tests.test_pretrained import perturbed  # noqa: E402

D, HEADS, D_FF, LAYERS = 32, 4, 64, 2
ACTIVATIONS = {'relu': 'relu', 'gelu': 'gelu_exact'}  # torch's name → tx's.
SOURCE_VALID = np.array([[True] * 6, [True] * 4 + [False] * 2])  # 4 of 6 real in row 1.
# torch's notes on its own nested-tensor fast path, not about the comparison.
pytestmark = [pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors'),
              pytest.mark.filterwarnings('ignore:enable_nested_tensor is True')]
VARIANTS = [(norm_first, act) for norm_first in (False, True) for act in ('relu', 'gelu')]



def torch_transformer(norm_first: bool, activation: str):
  """A random nn.Transformer (batch_first, no dropout), every parameter perturbed, in eval
  mode."""
  torch.manual_seed(0)
  return perturbed(torch.nn.Transformer(
      d_model=D, nhead=HEADS, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS,
      dim_feedforward=D_FF, dropout=0.0, activation=activation, batch_first=True,
      norm_first=norm_first))


def tx_stack(cls, norm_first: bool, activation: str, final_norm: bool):
  """The tx.Encoder or tx.Decoder with torch's hyper-parameters (LayerNorm ε = 1e-5)."""
  return cls(num_layers=LAYERS, d_model=D, num_heads=HEADS, d_ff=D_FF, posemb='none',
             norm='pre' if norm_first else 'post', activation=ACTIVATIONS[activation],
             layer_norm_epsilon=1e-5, final_norm=final_norm)


def split_in_proj(state_dict) -> dict:
  """torch's state dict as float32 NumPy, each fused `in_proj_weight` [3D, D] (`in_proj_bias`
  [3D]), which stacks W_q, W_k, W_v, split into `in_proj.{q,k,v}.weight` (`.bias`)."""
  weights = {}
  for name, value in state_dict.items():
    value = value.detach().numpy().astype(np.float32)
    prefix, _, leaf = name.rpartition('.')
    if leaf in ('in_proj_weight', 'in_proj_bias'):
      kind = leaf.removeprefix('in_proj_')
      for part, qkv in zip(np.split(value, 3), 'qkv'):
        weights[f'{prefix}.in_proj.{qkv}.{kind}'] = part
    else:
      weights[name] = value
  return weights


def stack_pairs(stack: str, cross: bool, final_norm: bool) -> list:
  """(torch name, tx path, to_tx, from_tx) for the layers of torch's `stack` ('encoder' or
  'decoder'): self_attn/norm1, [multihead_attn/norm2,] linear1, linear2, last norm."""
  pairs = []
  for i in range(LAYERS):
    layer, block = f'{stack}.layers.{i}', f'block_{i}'
    sublayers = [('self_attn', 'self_attention', 'norm1')]
    if cross:
      sublayers.append(('multihead_attn', 'cross_attention', 'norm2'))
    for torch_name, tx_name, norm_name in sublayers:
      pairs += attention(f'{layer}.{torch_name}.in_proj', f'{layer}.{torch_name}.out_proj',
                         ('q', 'k', 'v'), (block, tx_name), D, HEADS)
      pairs += norm(f'{layer}.{norm_name}', (block, f'{tx_name}_norm'))
    pairs += dense(f'{layer}.linear1', (block, 'ffn', 'hidden'))
    pairs += dense(f'{layer}.linear2', (block, 'ffn', 'output'))
    pairs += norm(f'{layer}.norm{3 if cross else 2}', (block, 'ffn_norm'))
  if final_norm:
    pairs += norm(f'{stack}.norm', ('final_norm',))
  return pairs


def tx_params(weights: dict, stack: str, model, x, memory=None) -> dict:
  """tx params of torch's `stack` from the split `weights`, checked to fill `model` (called on
  x, and memory for a decoder) exactly and to use every weight of the stack."""
  ours = {k: v for k, v in weights.items() if k.startswith(f'{stack}.')}
  pairs = stack_pairs(stack, memory is not None, model.final_norm)
  # expected_shapes calls model.init(key, x): a decoder also needs its memory.
  shaped = model if memory is None else SimpleNamespace(
      init=lambda key, x: model.init(key, x, memory))
  return convert(pairs, ours, expected_shapes(shaped, x), f'torch {stack}')


@contextlib.contextmanager
def fastpath(enabled: bool):
  """torch's fused eval kernels on or off, restored afterwards."""
  before = torch.backends.mha.get_fastpath_enabled()
  torch.backends.mha.set_fastpath_enabled(enabled)
  try:
    yield
  finally:
    torch.backends.mha.set_fastpath_enabled(before)


def inputs(seed: int, length: int):
  return np.random.default_rng(seed).normal(size=(2, length, D)).astype(np.float32)


def assert_close(ours, theirs, where=...):
  """Within 1e-5 of the reference's scale; returns max |Δ|."""
  ours, theirs = np.asarray(ours)[where], np.asarray(theirs)[where]
  delta = float(np.max(np.abs(ours - theirs)))
  assert delta <= 1e-5 * max(1.0, float(np.max(np.abs(theirs)))), delta
  return delta


@pytest.mark.parametrize('torch_fastpath', [True, False])
@pytest.mark.parametrize('norm_first,activation', VARIANTS)
def test_encoder_with_padding_equals_torch(norm_first, activation, torch_fastpath):
  model = torch_transformer(norm_first, activation)
  src = inputs(1, 6)
  with fastpath(torch_fastpath), torch.no_grad():
    expected = model.encoder(torch.from_numpy(src),
                             src_key_padding_mask=torch.from_numpy(~SOURCE_VALID)).numpy()
  encoder = tx_stack(tx.Encoder, norm_first, activation, final_norm=True)
  params = tx_params(split_in_proj(model.state_dict()), 'encoder', encoder, src)
  out = encoder.apply({'params': params}, src, tx.padding_mask(SOURCE_VALID))
  # The fast path's nested tensors drop padded queries: their rows come out as zeros (then
  # encoder.norm's bias). tx computes them as for any query.
  assert_close(out, expected, SOURCE_VALID if torch_fastpath else ...)


@pytest.mark.parametrize('norm_first,activation', VARIANTS)
def test_causal_decoder_with_memory_padding_equals_torch(norm_first, activation):
  model = torch_transformer(norm_first, activation)
  tgt, memory = inputs(2, 5), inputs(3, 6)
  with torch.no_grad():
    expected = model.decoder(
        torch.from_numpy(tgt), torch.from_numpy(memory),
        tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
        memory_key_padding_mask=torch.from_numpy(~SOURCE_VALID)).numpy()
  decoder = tx_stack(tx.Decoder, norm_first, activation, final_norm=True)
  params = tx_params(split_in_proj(model.state_dict()), 'decoder', decoder, tgt, memory)
  out = decoder.apply({'params': params}, tgt, memory,
                      cross_mask=tx.padding_mask(SOURCE_VALID))
  assert_close(out, expected)
  # The causal mask is in force: changing the last target changes no earlier output.
  later = tgt.copy()
  later[:, -1] += 1.0
  moved = decoder.apply({'params': params}, later, memory,
                        cross_mask=tx.padding_mask(SOURCE_VALID))
  np.testing.assert_array_equal(moved[:, :-1], out[:, :-1])


@pytest.mark.parametrize('norm_first,activation', [(False, 'relu'), (True, 'gelu')])
def test_whole_transformer_equals_torch(norm_first, activation):
  model = torch_transformer(norm_first, activation)
  src, tgt = inputs(4, 6), inputs(5, 5)
  with torch.no_grad():
    expected = model(torch.from_numpy(src), torch.from_numpy(tgt),
                     src_key_padding_mask=torch.from_numpy(~SOURCE_VALID),
                     memory_key_padding_mask=torch.from_numpy(~SOURCE_VALID),
                     tgt_mask=model.generate_square_subsequent_mask(5), tgt_is_causal=True)
  weights = split_in_proj(model.state_dict())
  encoder = tx_stack(tx.Encoder, norm_first, activation, final_norm=True)
  decoder = tx_stack(tx.Decoder, norm_first, activation, final_norm=True)
  encoder_params = tx_params(weights, 'encoder', encoder, src)
  memory = encoder.apply({'params': encoder_params}, src, tx.padding_mask(SOURCE_VALID))
  decoder_params = tx_params(weights, 'decoder', decoder, tgt, memory)
  out = decoder.apply({'params': decoder_params}, tgt, memory,
                      cross_mask=tx.padding_mask(SOURCE_VALID))
  assert_close(out, expected.numpy())


@pytest.mark.parametrize('norm_first', [False, True])
def test_encoder_without_a_last_norm_equals_torch(norm_first):
  """torch.nn.TransformerEncoder(norm=None) ↔ final_norm=False, also for a pre-LN stack."""
  torch.manual_seed(0)
  layer = torch.nn.TransformerEncoderLayer(D, HEADS, D_FF, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
  model = perturbed(torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False))
  src = inputs(6, 6)
  with torch.no_grad():
    expected = model(torch.from_numpy(src),
                     src_key_padding_mask=torch.from_numpy(~SOURCE_VALID)).numpy()
  encoder = tx_stack(tx.Encoder, norm_first, 'relu', final_norm=False)
  weights = {f'encoder.{k}': v for k, v in split_in_proj(model.state_dict()).items()}
  params = tx_params(weights, 'encoder', encoder, src)
  assert 'final_norm' not in params
  out = encoder.apply({'params': params}, src, tx.padding_mask(SOURCE_VALID))
  assert_close(out, expected)


def test_a_wrong_mapping_is_caught():
  """The comparison can fail: W_q and W_k swapped, or the last norm left out, change the
  outputs well beyond the tolerance."""
  model = torch_transformer(False, 'relu')
  src = inputs(1, 6)
  with torch.no_grad():
    expected = model.encoder(torch.from_numpy(src),
                             src_key_padding_mask=torch.from_numpy(~SOURCE_VALID)).numpy()
  weights = split_in_proj(model.state_dict())
  swapped = dict(weights)
  swapped['encoder.layers.0.self_attn.in_proj.q.weight'] = weights[
      'encoder.layers.0.self_attn.in_proj.k.weight']
  swapped['encoder.layers.0.self_attn.in_proj.k.weight'] = weights[
      'encoder.layers.0.self_attn.in_proj.q.weight']
  encoder = tx_stack(tx.Encoder, False, 'relu', final_norm=True)
  params = tx_params(swapped, 'encoder', encoder, src)
  out = encoder.apply({'params': params}, src, tx.padding_mask(SOURCE_VALID))
  assert np.max(np.abs(np.asarray(out) - expected)[SOURCE_VALID]) > 1e-2
  with pytest.raises(ValueError, match=r'has encoder\.norm\.bias .* that tx does not use'):
    tx_params(weights, 'encoder', tx_stack(tx.Encoder, False, 'relu', final_norm=False), src)


# --- A headless EncoderClassifier: the pooled vector, as BertModel's pooler_output ------------

def test_headless_classifier_returns_the_pooled_vector():
  """num_classes=0: no 'head' parameter, and the output p is what the headful model's head
  maps to its logits (W p + b), the masked mean of the encoder's outputs."""
  common = dict(vocab_size=20, pool='mean', num_layers=LAYERS, d_model=D, num_heads=HEADS,
                d_ff=D_FF, posemb='sinusoidal_concat')
  tokens = np.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
  headful = tx.EncoderClassifier(num_classes=3, **common)
  params = headful.init(jax.random.key(0), tokens)['params']
  logits, state = headful.apply({'params': params}, tokens, capture_intermediates=True)
  headless = tx.EncoderClassifier(num_classes=0, **common)
  assert 'head' not in headless.init(jax.random.key(0), tokens)['params']
  without_head = {k: v for k, v in params.items() if k != 'head'}
  pooled = np.asarray(headless.apply({'params': without_head}, tokens), np.float64)
  assert pooled.shape == (2, D)
  encoded = np.asarray(state['intermediates']['encoder']['__call__'][0], np.float64)
  valid = (tokens != 0)[..., None]
  np.testing.assert_allclose(pooled, (encoded * valid).sum(1) / valid.sum(1), atol=1e-6)
  head = {k: np.asarray(v, np.float64) for k, v in params['head'].items()}
  np.testing.assert_allclose(logits, pooled @ head['kernel'] + head['bias'], atol=1e-5)
  with pytest.raises(ValueError, match='num_classes=-1; it must be >= 0'):
    tx.EncoderClassifier(num_classes=-1, **common).init(jax.random.key(0), tokens)


def test_headless_bert_classifier_gives_bert_models_pooler_output(tmp_path):
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('safetensors')
  from tx import pretrained
  torch.manual_seed(0)
  model = perturbed(transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=60, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=D_FF, max_position_embeddings=20, num_labels=3, pad_token_id=0)))
  model.save_pretrained(tmp_path)
  tx_model, params = pretrained.load_hf_bert(str(tmp_path))
  tokens = np.random.default_rng(0).integers(1, 60, (3, 12))
  tokens[1, 8:], tokens[2, 5:] = 0, 0  # right padding
  types = (np.arange(12) >= 6).astype(np.int64) * np.ones((3, 1), np.int64)
  with torch.no_grad():
    expected = model.bert(input_ids=torch.from_numpy(tokens),
                          token_type_ids=torch.from_numpy(types),
                          attention_mask=torch.from_numpy((tokens != 0).astype(np.int64)))
  headless = tx_model.clone(num_classes=0)
  without_head = {k: v for k, v in params.items() if k != 'head'}
  pooled = headless.apply({'params': without_head}, tokens, types)
  assert_close(pooled, expected.pooler_output.numpy())
