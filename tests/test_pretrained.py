"""Pretrained checkpoints: random-init Hugging Face ViTs, every parameter moved away from its
init, saved as transformers saves them, loaded into tx: the same logits. And back."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')

import tx  # noqa: E402
from tx import pretrained  # noqa: E402

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4, num_labels=5)


def hf_vit(**overrides):
  """A random ViTForImageClassification whose every parameter is perturbed (LayerNorm scales
  not 1, biases not 0), in eval mode."""
  torch.manual_seed(0)
  return perturbed(transformers.ViTForImageClassification(transformers.ViTConfig(
      **{**CONFIG, **overrides})))


def perturbed(model):
  """`model` in eval mode, N(0, 0.2²) added to every parameter (torch's current seed)."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def images(n=3, size=16):
  return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def hf_logits(model, x):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()


def tx_logits(model, params, x):
  return np.asarray(model.apply({'params': params}, x))


def save(model, tmp_path_factory, name: str):
  """(model, the directory save_pretrained wrote it to)."""
  directory = tmp_path_factory.mktemp('hf') / name
  model.save_pretrained(directory)
  return model, str(directory)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  return save(hf_vit(), tmp_path_factory, 'vit')


def test_a_saved_hf_vit_gives_the_same_logits_in_tx(saved):
  model, directory = saved
  tx_model, params = pretrained.load_hf_vit(directory)
  assert (tx_model.activation, tx_model.layer_norm_epsilon) == ('gelu_exact', 1e-12)
  x = images()
  expected = hf_logits(model, x)
  np.testing.assert_allclose(tx_logits(tx_model, params, x), expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected).max() > 0.5  # the perturbed head gives logits worth comparing.
  weights = tx.attention_weights(tx_model, {'params': params}, x)  # inspectable as any tx ViT.
  assert len(weights) == 2


def test_transformers_5_in_memory_names_load_too(saved, tmp_path):
  model, _ = saved
  if not any('q_proj' in k for k in model.state_dict()):
    pytest.skip('transformers < 5 names its modules as the Hub files do')
  (tmp_path / 'config.json').write_text(model.config.to_json_string())
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(tmp_path / 'model.safetensors'))
  tx_model, params = pretrained.load_hf_vit(str(tmp_path))
  x = images()
  np.testing.assert_allclose(tx_logits(tx_model, params, x), hf_logits(model, x), rtol=1e-5,
                             atol=1e-5)


def test_tx_to_hf_and_back_keeps_the_logits(tmp_path):
  model = tx.ViT(num_classes=4, patch_size=4, num_layers=2, d_model=32, num_heads=4, d_ff=64,
                 activation='gelu_exact', layer_norm_epsilon=1e-12)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(1), images(1))['params'])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape).astype(np.float32), params)
  pretrained.save_hf_vit(model, params, str(tmp_path))
  hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path)).eval()
  x = images()
  ours = tx_logits(model, params, x)
  np.testing.assert_allclose(hf_logits(hf, x), ours, rtol=1e-5, atol=1e-5)
  again, again_params = pretrained.load_hf_vit(str(tmp_path))
  np.testing.assert_array_equal(tx_logits(again, again_params, x), ours)


def test_checkpoints_tx_cannot_load_exactly_are_one_clear_error(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, directory = saved
  weights = load_file(f'{directory}/model.safetensors')
  config = open(f'{directory}/config.json').read()

  def write(w, c=config):
    (tmp_path / 'config.json').write_text(c)
    save_file(w, str(tmp_path / 'model.safetensors'))
    return str(tmp_path)

  missing = {k: v for k, v in weights.items() if 'layer.1.output.dense.weight' not in k}
  with pytest.raises(ValueError, match=r'has no vit.encoder.layer.1.output.dense.weight \(tx '
                     r'needs it for encoder/block_1/ffn/output/kernel\)'):
    pretrained.load_hf_vit(write(missing))
  with pytest.raises(ValueError, match=r'has vit.pooler.dense.bias \(and 1 more\) that tx does '
                     'not use'):
    pretrained.load_hf_vit(write({**weights, 'vit.pooler.dense.weight': np.zeros((32, 32),
                                  np.float32), 'vit.pooler.dense.bias': np.zeros(32, np.float32)}))
  wrong = dict(weights, **{'classifier.weight': np.zeros((5, 31), np.float32)})
  with pytest.raises(ValueError, match=r'classifier.weight is \(5, 31\) .* tx needs head/kernel '
                     r'of \(32, 5\)'):
    pretrained.load_hf_vit(write(wrong))
  with pytest.raises(ValueError, match="model_type='bert': load_hf_vit reads 'vit'"):
    pretrained.load_hf_vit(write(weights, config.replace('"vit"', '"bert"')))
  with pytest.raises(ValueError, match="has no config.json: give a directory as save_pretrained"):
    pretrained.load_hf_vit(str(tmp_path / 'nowhere'))


GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=24, vocab_size=50, bos_token_id=None,
            eos_token_id=None)  # no eos: both generate to the end.


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
  torch.manual_seed(0)
  model = perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)))
  return save(model, tmp_path_factory, 'gpt2')


def test_a_saved_gpt2_gives_the_same_logits_and_greedy_text_in_tx(gpt2):
  model, directory = gpt2
  tx_model, params = pretrained.load_hf_gpt2(directory)
  assert (tx_model.activation, tx_model.layer_norm_epsilon, tx_model.scale_embeddings) == (
      'gelu', 1e-5, False)
  tokens = np.random.default_rng(0).integers(0, GPT2['vocab_size'], (2, 12))
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(tx_model.apply({'params': params}, tokens))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected).std() > 0.5
  prompt = tokens[:, :5]
  with torch.no_grad():
    hf_tokens = model.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False,
                               pad_token_id=0).numpy()
  decoded = tx.generate(tx_model, params, prompt, max_new_tokens=10)
  np.testing.assert_array_equal(np.asarray(decoded.tokens), hf_tokens)


def test_gpt2_files_without_the_transformer_prefix_and_other_variants(gpt2, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, directory = gpt2
  weights = {k.removeprefix('transformer.'): v
             for k, v in load_file(f'{directory}/model.safetensors').items()}
  weights['h.0.attn.bias'] = np.tril(np.ones((1, 1, 24, 24), np.float32))  # old files' buffer
  config = open(f'{directory}/config.json').read()
  (tmp_path / 'config.json').write_text(config)
  save_file(weights, str(tmp_path / 'model.safetensors'))
  model, params = pretrained.load_hf_gpt2(str(tmp_path))
  reference, reference_params = pretrained.load_hf_gpt2(directory)
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  (tmp_path / 'config.json').write_text(config.replace('"scale_attn_weights": true',
                                                       '"scale_attn_weights": false'))
  with pytest.raises(ValueError, match='scale_attn_weights=False is a GPT-2 variant tx does not '
                     'build'):
    pretrained.load_hf_gpt2(str(tmp_path))


def test_a_saved_bert_classifier_gives_the_same_logits_with_padding_and_token_types(tmp_path):
  torch.manual_seed(0)
  model = perturbed(transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=20, num_labels=3, pad_token_id=0)))
  model.save_pretrained(tmp_path)
  tx_model, params = pretrained.load_hf_bert(str(tmp_path))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 60, (3, 12))
  tokens[1, 8:], tokens[2, 5:] = 0, 0  # right padding
  types = (np.arange(12) >= rng.integers(3, 9, (3, 1))).astype(np.int64)
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
                     attention_mask=torch.from_numpy((tokens != 0).astype(np.int64))).logits
  ours = np.asarray(tx_model.apply({'params': params}, tokens, types))
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)
  assert np.abs(ours - np.asarray(tx_model.apply({'params': params}, tokens))).max() > 1e-3


def test_other_shapes_round_trip_and_what_hf_vit_cannot_compute_is_refused(tmp_path):
  """1 channel, 24-pixel images, patch 8, 3 heads of 16, d_ff not 4·d, 7 labels."""
  hf = hf_vit(num_channels=1, image_size=24, patch_size=8, hidden_size=48,
              num_attention_heads=3, intermediate_size=40, num_labels=7)
  hf.save_pretrained(tmp_path / 'hf')
  model, params = pretrained.load_hf_vit(str(tmp_path / 'hf'))
  x = np.random.default_rng(2).normal(size=(2, 24, 24, 1)).astype(np.float32)
  np.testing.assert_allclose(tx_logits(model, params, x), hf_logits(hf, x), rtol=1e-5, atol=1e-5)
  pretrained.save_hf_vit(model, params, str(tmp_path / 'again'))  # size and channels from params
  again = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / 'again'))
  np.testing.assert_allclose(hf_logits(again.eval(), x), hf_logits(hf, x), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='learn_beta=True: HF ViTForImageClassification has'):
    pretrained.save_hf_vit(model.clone(learn_beta=True), params, str(tmp_path / 'no'))
  with pytest.raises(ValueError, match='beta_scale=2.0: HF ViTForImageClassification has'):
    pretrained.save_hf_vit(model.clone(beta_scale=2.0), params, str(tmp_path / 'no'))


def test_older_bert_files_and_sharded_or_bin_only_directories(tmp_path):
  from safetensors.numpy import load_file, save_file
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=10, num_labels=2)
  perturbed(transformers.BertForSequenceClassification(config)).save_pretrained(tmp_path / 'new')
  _, reference = pretrained.load_hf_bert(str(tmp_path / 'new'))
  weights = load_file(str(tmp_path / 'new' / 'model.safetensors'))
  old = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                  'LayerNorm.beta'): v
         for k, v in weights.items()}
  old['bert.embeddings.position_ids'] = np.arange(10)[None]
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'new' / 'config.json').read_text())
  names = sorted(old)  # two shards and their index, as save_pretrained writes large models
  for i, part in enumerate((names[:10], names[10:])):
    save_file({k: old[k] for k in part}, str(tmp_path / 'old' / f'model-0000{i + 1}.safetensors'))
  (tmp_path / 'old' / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {
      k: f'model-0000{1 + (k in names[10:])}.safetensors' for k in names}}))
  _, params = pretrained.load_hf_bert(str(tmp_path / 'old'))
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'config.json').write_text('{}')
  (tmp_path / 'bin' / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ValueError, match='has only pytorch_model.bin: convert it once'):
    pretrained.load_hf_bert(str(tmp_path / 'bin'))


def test_a_left_padded_gpt2_batch_gives_each_row_its_own_logits(gpt2):
  model, directory = gpt2
  tx_model, params = pretrained.load_hf_gpt2(directory)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, GPT2['vocab_size'], (3, 9))
  valid = np.arange(9) >= np.array([[0], [3], [6]])  # rows padded on the left by 0, 3, 6
  tokens = np.where(valid, tokens, 0)
  positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(valid.astype(int)),
                     position_ids=torch.from_numpy(positions)).logits.numpy()
  ours = np.asarray(tx_model.apply({'params': params}, tokens, valid=valid, positions=positions))
  np.testing.assert_allclose(ours[valid], expected[valid], rtol=1e-5, atol=1e-5)
  for row in range(3):  # and what the row's tokens give alone.
    alone = np.asarray(tx_model.apply({'params': params}, tokens[row][valid[row]][None]))
    np.testing.assert_allclose(ours[row][valid[row]], alone[0], rtol=1e-5, atol=1e-5)


def test_a_left_padded_gpt2_batch_generates_what_transformers_and_each_prompt_alone_do(gpt2):
  """transformers' generate takes the attention_mask and numbers positions from it; tx's
  padding='left' does the same: equal token for token, pads kept, and each row is what
  transformers generates from that prompt alone."""
  model, directory = gpt2
  tx_model, params = pretrained.load_hf_gpt2(directory)
  lengths = np.array([7, 4, 2])
  valid = np.arange(7) >= 7 - lengths[:, None]
  prompts = np.where(valid, np.random.default_rng(4).integers(1, GPT2['vocab_size'], (3, 7)), 0)
  with torch.no_grad():
    expected = model.generate(torch.from_numpy(prompts),
                              attention_mask=torch.from_numpy(valid.astype(np.int64)),
                              do_sample=False, max_new_tokens=8, pad_token_id=0).numpy()
  ours = np.asarray(tx.generate(tx_model, params, prompts, max_new_tokens=8,
                                prompt_lengths=lengths, padding='left').tokens)
  np.testing.assert_array_equal(ours, expected)
  for row, n in enumerate(lengths):
    with torch.no_grad():
      alone = model.generate(torch.from_numpy(prompts[row:row + 1, 7 - n:]), do_sample=False,
                             max_new_tokens=8, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours[row, 7 - n:], alone[0])


def test_load_picks_the_loader_from_the_directory_and_fetches_hub_ids(saved, gpt2, monkeypatch,
                                                                      tmp_path):
  _, vit_directory = saved
  _, gpt2_directory = gpt2
  model, params = pretrained.load(vit_directory)
  reference, reference_params = pretrained.load_hf_vit(vit_directory)
  assert model == reference
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  assert isinstance(pretrained.load(gpt2_directory)[0], tx.DecoderLM)
  hub = pytest.importorskip('huggingface_hub')
  asked = []
  monkeypatch.setattr(hub, 'snapshot_download',
                      lambda repo, **kw: asked.append((repo, kw)) or gpt2_directory)
  assert isinstance(pretrained.load('someone/gpt2-tiny')[0], tx.DecoderLM)
  assert asked[0][0] == 'someone/gpt2-tiny' and '*.safetensors' in asked[0][1]['allow_patterns']
  with pytest.raises(ValueError, match="is neither a file, a directory nor a Hub id"):
    pretrained.load(str(tmp_path / 'not' / 'here'))
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="model_type='llama'; tx loads 'vit', 'gpt2', 'bert'"):
    pretrained.load(str(tmp_path))
  (tmp_path / 'weights.ckpt').write_bytes(b'')
  with pytest.raises(ValueError, match=r'a file must be .npz \(vit_jax, big_vision\) or a state'):
    pretrained.load(str(tmp_path / 'weights.ckpt'))


def test_image_preprocessing_reads_the_processor_config(saved, tmp_path):
  _, directory = saved
  processor = transformers.ViTImageProcessor(size={'height': 20, 'width': 24},
                                             image_mean=[0.1, 0.2, 0.3],
                                             image_std=[0.4, 0.5, 0.6], resample=3)
  processor.save_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(open(f'{directory}/config.json').read())
  spec = pretrained.image_preprocessing(str(tmp_path))
  assert spec == pretrained.ImagePreprocessing(size=(20, 24), mean=(0.1, 0.2, 0.3),
                                               std=(0.4, 0.5, 0.6), resample='bicubic',
                                               rescale=1 / 255)
  with pytest.raises(ValueError, match='has no preprocessor_config.json'):
    pretrained.image_preprocessing(directory)


@pytest.mark.parametrize('pooling', [True, False])
def test_a_vit_model_without_a_classifier_gives_its_pooled_output(tmp_path, pooling):
  torch.manual_seed(0)
  config = transformers.ViTConfig(**{**CONFIG, 'image_size': 16})
  model = perturbed(transformers.ViTModel(config, add_pooling_layer=pooling))
  model.save_pretrained(tmp_path)
  tx_model, params = pretrained.load(str(tmp_path))
  assert (tx_model.num_classes, tx_model.pooler) == (0, pooling)
  x = images()
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
  expected = out.pooler_output if pooling else out.last_hidden_state[:, 0]
  np.testing.assert_allclose(tx_logits(tx_model, params, x), expected.numpy(), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('kind', ['BertModel', 'BertForMaskedLM'])
def test_a_bert_without_a_classifier_gives_its_pooled_output(tmp_path, kind):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=16)
  model = perturbed(getattr(transformers, kind)(config))  # a masked LM has no pooler.
  model.save_pretrained(tmp_path)
  tx_model, params = pretrained.load_hf_bert(str(tmp_path))
  assert (tx_model.num_classes, tx_model.pooler) == (0, kind == 'BertModel')
  tokens = np.random.default_rng(0).integers(1, 40, (2, 10))
  tokens[1, 6:] = 0
  with torch.no_grad():
    bert = model if kind == 'BertModel' else model.bert
    out = bert(input_ids=torch.from_numpy(tokens),
               attention_mask=torch.from_numpy((tokens != 0).astype(np.int64)))
  expected = out.pooler_output if kind == 'BertModel' else out.last_hidden_state[:, 0]
  np.testing.assert_allclose(np.asarray(tx_model.apply({'params': params}, tokens)),
                             expected.numpy(), rtol=1e-5, atol=1e-5)


def test_bert_variants_tx_does_not_build_are_refused(tmp_path):
  config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=16, num_labels=3)
  transformers.BertForTokenClassification(config).save_pretrained(tmp_path / 'tokens')
  with pytest.raises(ValueError, match='has classifier.weight but no pooler: a per-token head'):
    pretrained.load(str(tmp_path / 'tokens'))
  config.is_decoder = True
  transformers.BertLMHeadModel(config).save_pretrained(tmp_path / 'causal')
  with pytest.raises(ValueError, match='is_decoder=True is a BERT variant tx does not build'):
    pretrained.load(str(tmp_path / 'causal'))


def test_a_scanned_vit_saves_as_its_blocks_and_a_processor_size_tx_cannot_read_is_one_error(
    saved, tmp_path):
  _, directory = saved
  model, params = pretrained.load_hf_vit(directory)
  scanned = model.clone(scan_layers=True)
  pretrained.save_hf_vit(scanned, tx.stack_layers(params), str(tmp_path / 'scanned'))
  again, again_params = pretrained.load_hf_vit(str(tmp_path / 'scanned'))
  jax.tree.map(np.testing.assert_array_equal, again_params, params)
  (tmp_path / 'scanned' / 'preprocessor_config.json').write_text(
      json.dumps({'size': {'shortest_edge': 224}}))
  with pytest.raises(ValueError, match=r"size=\{'shortest_edge': 224\} in .*; tx reads"):
    pretrained.image_preprocessing(str(tmp_path / 'scanned'))
