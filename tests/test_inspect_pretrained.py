"""experiments.inspect --pretrained: random transformers checkpoints (every parameter perturbed)
saved with save_pretrained. Images are prepared as transformers' own image processors prepare
them, text is split as the tokenizers library splits it, and the attention inspect draws is
transformers' output_attentions."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
from PIL import Image  # noqa: E402

import tx  # noqa: E402
from experiments.inspect import pretrained as inspect  # noqa: E402
from experiments.inspect.head_stats import output_token_maps, rollout_maps  # noqa: E402
from tests.test_pretrained import perturbed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=8)
LABELS = ['cat', 'dog', 'fox', 'owl', 'eel', 'yak', 'ant']
PROCESSOR = dict(size={'height': 32, 'width': 32}, image_mean=[0.3, 0.4, 0.5],
                 image_std=[0.2, 0.25, 0.3], resample=Image.Resampling.BICUBIC)
# transformers' PIL image processors (ViTImageProcessor is one without torchvision).
ViTProcessor = getattr(transformers, 'ViTImageProcessorPil', transformers.ViTImageProcessor)
CLIPProcessor = getattr(transformers, 'CLIPImageProcessorPil', transformers.CLIPImageProcessor)
WORDS = ['[UNK]', '[CLS]', '[SEP]', 'the', 'cat', 'sat', 'on', 'mat', 'a', 'dog', 'ran', '.']
TEXT = 'the cat sat on a mat . the dog ran'



def photo(width, height, seed=0):
  """An RGB image with smooth structure (a gradient) and noise, so resampling filters differ."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  pixels = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], -1)
  pixels += rng.normal(0, 40, pixels.shape)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def hf_pixels(processor, images):
  """[N, H, W, C] float32: what transformers' processor gives the model (channels last)."""
  return processor(images, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)


def one_line(e):
  return '\n' not in str(e) and len(str(e)) < 300


@pytest.fixture(scope='module')
def vit_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.ViTConfig(**VIT, id2label=dict(enumerate(LABELS)),
                                  label2id={label: i for i, label in enumerate(LABELS)})
  directory = tmp_path_factory.mktemp('vit')
  perturbed(transformers.ViTForImageClassification(config)).save_pretrained(directory)
  ViTProcessor(**PROCESSOR).save_pretrained(directory)
  return str(directory)


def word_tokenizer(bert: bool):
  """A word-level tokenizer over WORDS; BERT's adds [CLS] … [SEP] in its post-processor."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {word: i for i, word in enumerate(WORDS)}, unk_token='[UNK]'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  if bert:
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', 1), ('[SEP]', 2)])
  return tokenizer


@pytest.fixture(scope='module')
def text_dirs(tmp_path_factory):
  """{'gpt2': directory, 'bert': directory}: each with its tokenizer.json."""
  torch.manual_seed(1)
  models = {
      'gpt2': transformers.GPT2LMHeadModel(transformers.GPT2Config(
          n_embd=32, n_layer=2, n_head=4, n_positions=24, vocab_size=len(WORDS),
          bos_token_id=None, eos_token_id=None)),
      'bert': transformers.BertForSequenceClassification(transformers.BertConfig(
          vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64, max_position_embeddings=24, pad_token_id=0,
          id2label={0: 'negative', 1: 'neutral', 2: 'positive'},
          label2id={'negative': 0, 'neutral': 1, 'positive': 2}))}
  directories = {}
  for name, model in models.items():
    directory = tmp_path_factory.mktemp(name)
    perturbed(model).save_pretrained(directory)
    word_tokenizer(name == 'bert').save(str(directory / 'tokenizer.json'))
    directories[name] = str(directory)
  return directories


def test_images_are_prepared_as_transformers_image_processors_prepare_them(vit_dir):
  image = photo(45, 29)  # not square: resizing changes the aspect ratio.
  prep = tx.pretrained.image_preprocessing(vit_dir)
  assert (prep.size, prep.resample, prep.mean) == ((32, 32), 'bicubic', (0.3, 0.4, 0.5))
  expected = hf_pixels(ViTProcessor.from_pretrained(vit_dir), image)[0]
  delta = np.abs(inspect.preprocess(image, prep) - expected).max()
  print(f'max |preprocess − ViTImageProcessor| = {delta:.2e}')
  assert delta <= 1e-5 and np.abs(expected).max() > 1.0
  # A non-square size, another filter and rescale factor.
  prep = tx.pretrained.ImagePreprocessing(size=(24, 40), mean=(0.6, 0.5, 0.4),
                                          std=(0.3, 0.2, 0.1), resample='nearest', rescale=1 / 200)
  processor = ViTProcessor(size={'height': 24, 'width': 40}, image_mean=[0.6, 0.5, 0.4],
                           image_std=[0.3, 0.2, 0.1], resample=Image.Resampling.NEAREST,
                           rescale_factor=1 / 200)
  np.testing.assert_allclose(inspect.preprocess(image, prep), hf_pixels(processor, image)[0],
                             rtol=0, atol=1e-5)
  # crop_fraction 0.875 (timm): the shorter side to ⌊32 / 0.875⌋ = 36, then the centre 32×32;
  # CLIP's processor does the same (its crop offsets equal timm's where the margins are even).
  prep = tx.pretrained.ImagePreprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3,
                                          resample='bicubic', crop_fraction=0.875,
                                          center_crop=True)
  processor = CLIPProcessor(size={'shortest_edge': 36}, crop_size={'height': 32, 'width': 32},
                            image_mean=[0.5] * 3, image_std=[0.25] * 3, do_convert_rgb=False)
  for wide in (photo(50, 30), photo(30, 50)):  # long side 60, margins 28 and 4.
    np.testing.assert_allclose(inspect.preprocess(wide, prep), hf_pixels(processor, wide)[0],
                               rtol=0, atol=1e-5)


def _check_png(path, width_in, height_in):
  pixels = np.asarray(Image.open(path).convert('RGB'), np.float64) / 255
  assert pixels.shape[:2] == (round(height_in * 100), round(width_in * 100)), path
  assert pixels.std() > 0.05, f'{path} is (nearly) blank'


def _rollout(weights: list, t: int) -> np.ndarray:
  """[N, T, T] float64 attention rollout: the product of ½ I + ½ (head mean), rows renormalised."""
  rollout = np.eye(t)
  for w in weights:
    step = 0.5 * np.eye(t) + 0.5 * np.asarray(w, np.float64).mean(1)
    rollout = (step / step.sum(-1, keepdims=True)) @ rollout
  return rollout


def test_inspect_a_vit_checkpoint_draws_transformers_attention(vit_dir, tmp_path):
  images = [photo(45, 29, seed=0), photo(30, 50, seed=1)]
  paths = [str(tmp_path / 'a.png'), str(tmp_path / 'b.jpg')]
  for image, path in zip(images, paths):
    image.save(path)
  written = inspect.inspect_pretrained(vit_dir, images=','.join(paths), out=str(tmp_path / 'out'))
  assert sorted(os.path.basename(p) for p in written) == [
      'attention_image0.png', 'attention_image1.png', 'head_statistics.png', 'inspection.json',
      'offset_profiles.png', 'position_content.png', 'rollout.png']
  _check_png(tmp_path / 'out' / 'attention_image1.png', 4 * 1.7 + 0.6, 2 * 1.95 + 0.8)
  _check_png(tmp_path / 'out' / 'rollout.png', 2 * 2.6, 5.4 + 0.12 * 4)  # 6-line titles

  model, params = tx.pretrained.load(vit_dir)
  seen = inspect.image_attention(model, params, vit_dir,
                                 [(path, inspect.read_image(path)) for path in paths])
  hf = transformers.ViTForImageClassification.from_pretrained(
      vit_dir, attn_implementation='eager').eval()
  pixels = hf_pixels(ViTProcessor.from_pretrained(vit_dir), [inspect.read_image(p) for p in paths])
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_attentions=True)
  assert [layer.path for layer in seen.layers] == [f'encoder/block_{i}/self_attention'
                                                   for i in range(2)]
  for layer, expected in zip(seen.layers, out.attentions):
    expected = expected.numpy()  # [N, H, 17, 17]: [CLS], then 4×4 patches row-major
    np.testing.assert_allclose(layer.weights, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(output_token_maps(layer, True),
                               expected[:, :, 0, 1:].reshape(2, 4, 4, 4), rtol=0, atol=1e-5)
  rollout = _rollout([a.numpy() for a in out.attentions], 17)
  np.testing.assert_allclose(rollout_maps(seen.layers, True), rollout[:, 0, 1:].reshape(2, 4, 4),
                             rtol=0, atol=1e-5)
  probabilities = torch.softmax(out.logits, -1).numpy()
  for top, p in zip(seen.predictions, probabilities):
    order = np.argsort(-p)[:5]
    assert [name for name, _ in top] == [LABELS[i] for i in order]
    np.testing.assert_allclose([q for _, q in top], p[order], rtol=1e-4)
  with open(tmp_path / 'out' / 'inspection.json') as f:
    record = json.load(f)
  assert record['inputs'] == ['a.png', 'b.jpg'] and record['predictions'][0][0][0] == LABELS[
      int(np.argmax(probabilities[0]))]
  assert set(record['layers']['encoder/block_1/self_attention']) >= {
      'entropy', 'mean_distance', 'relative', 'content', 'offset_profile'}


def test_a_mean_pooled_vit_with_extra_tokens_maps_the_mean_patch_row(monkeypatch):
  """A class token, two extra (register) tokens and mean pooling: the tokens are labelled in
  tx.ViT's order, and the maps are the mean over the 3×4 patch rows, not [CLS]'s row."""
  model = tx.ViT(num_layers=2, d_model=16, num_heads=2, d_ff=32, patch_size=4, num_classes=3,
                 pool='mean', class_token=True, extra_tokens=2)
  prep = tx.pretrained.ImagePreprocessing(size=(12, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
  monkeypatch.setattr(inspect, 'image_preprocessing', lambda source: prep)
  monkeypatch.setattr(inspect, '_class_names', lambda source: str)
  x = np.zeros((1, 12, 16, 3), np.float32)
  params = model.init(jax.random.key(0), x)['params']
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), params)
  pictures = [('a.png', photo(16, 12, seed=0)), ('b.png', photo(16, 12, seed=1))]
  seen = inspect.image_attention(model, params, 'a-vit', pictures)
  assert not seen.cls_pooled
  patches = [f'{r},{c}' for r in range(3) for c in range(4)]
  assert seen.layers[0].query.labels == [['CLS', 'extra 0', 'extra 1'] + patches] * 2
  pixels = np.stack([inspect.preprocess(image, prep) for _, image in pictures])
  weights = list(tx.attention_weights(model, {'params': params}, pixels).values())
  for layer, w in zip(seen.layers, weights):  # [N, H, 15, 15]: 3 tokens, then the patches.
    expected = np.asarray(w, np.float64)[:, :, 3:, 3:].mean(2).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(output_token_maps(layer, seen.cls_pooled), expected, rtol=0,
                               atol=1e-6)
  expected = _rollout(weights, 15)[:, 3:, 3:].mean(1).reshape(2, 3, 4)
  np.testing.assert_allclose(rollout_maps(seen.layers, seen.cls_pooled), expected, rtol=0,
                             atol=1e-6)


@pytest.mark.parametrize('kind', ['gpt2', 'bert'])
def test_inspect_text_draws_the_tokens_and_transformers_attention(kind, text_dirs, tmp_path):
  directory = text_dirs[kind]
  tokens = word_tokenizer(kind == 'bert').encode(TEXT).tokens
  assert tokens[0] == ('[CLS]' if kind == 'bert' else 'the') and len(tokens) >= 10
  model, params = tx.pretrained.load(directory)
  seen = inspect.text_attention(model, params, directory, TEXT)
  assert seen.tokens == tokens
  assert all(layer.query.labels == layer.key.labels == [tokens] for layer in seen.layers)
  hf_class = (transformers.GPT2LMHeadModel if kind == 'gpt2'
              else transformers.BertForSequenceClassification)
  hf = hf_class.from_pretrained(directory, attn_implementation='eager').eval()
  ids = torch.tensor([[WORDS.index(t) for t in tokens]])
  with torch.no_grad():
    out = hf(ids, output_attentions=True)
  assert len(seen.layers) == len(out.attentions) == 2
  for layer, expected in zip(seen.layers, out.attentions):
    np.testing.assert_allclose(layer.weights, expected.numpy(), rtol=0, atol=1e-5)
  logits = out.logits[0, -1] if kind == 'gpt2' else out.logits[0]
  names = WORDS if kind == 'gpt2' else ['negative', 'neutral', 'positive']
  assert [name for name, _ in seen.predictions[0]] == [
      names[i] for i in np.argsort(-logits.numpy())[:5]]

  written = inspect.inspect_pretrained(directory, text=TEXT, out=str(tmp_path / 'out'))
  assert sorted(os.path.basename(p) for p in written) == [
      'attention_text.png', 'head_statistics.png', 'inspection.json', 'offset_profiles.png']
  panel = 2.3  # 12 tokens: the smallest panel
  _check_png(tmp_path / 'out' / 'attention_text.png', 4 * panel + 0.6, 2 * panel + 0.6)
  with open(tmp_path / 'out' / 'inspection.json') as f:
    record = json.load(f)
  assert record['tokens'] == tokens and 'content' not in record['layers'][seen.layers[0].path]


def test_bad_requests_are_one_line_errors(vit_dir, text_dirs, tmp_path):
  cases = [(dict(workdir='runs/x', source='gpt2'), '--workdir=runs/x and --pretrained=gpt2: '
                                                   'give one'),
           (dict(image='a.png'), "--image='a.png' goes with --pretrained=SOURCE"),
           (dict(source='gpt2'), 'with neither of --image and --text'),
           (dict(source='gpt2', image='a.png', text='hi'), 'with both of --image and --text'),
           (dict(source='gpt2', text='hi', run_flags={'step': 3}), '--step=3 reads a trained run')]
  for kwargs, message in cases:
    args = dict(dict(workdir=None, source=None, image=None, text=None, run_flags={}), **kwargs)
    with pytest.raises(ValueError, match=message) as e:
      inspect.check_flags(**args)
    assert one_line(e.value)
  inspect.check_flags('runs/x', None, None, None, {'step': 3})  # a run with --step is fine.
  picture = tmp_path / 'p.png'
  photo(32, 32).save(picture)
  (tmp_path / 'notes.png').write_text('not an image')
  no_tokenizer = tmp_path / 'gpt2'
  no_tokenizer.mkdir()
  for name in ('config.json', 'model.safetensors'):
    (no_tokenizer / name).write_bytes(open(os.path.join(text_dirs['gpt2'], name), 'rb').read())
  cases = [((vit_dir,), dict(text='the cat'), r'an image model \(ViT\): give --image=PATH'),
           ((text_dirs['bert'],), dict(images=str(picture)),
            r'a text model \(EncoderClassifier\): give --text='),
           ((str(no_tokenizer),), dict(text='the cat'), 'has no tokenizer.json: --text needs'),
           ((vit_dir,), dict(images=str(tmp_path / 'none.png')), 'none.png: no such file'),
           ((vit_dir,), dict(images=str(tmp_path / 'notes.png')), 'not an image PIL can read'),
           ((text_dirs['gpt2'],), dict(text=' '.join(['the'] * 25)),
            '--text gives 25 tokens; .* takes at most 24'),
           ((text_dirs['gpt2'],), dict(text='  '), "--text='  ' gives no tokens")]
  for args, kwargs, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      inspect.inspect_pretrained(*args, **kwargs, out=str(tmp_path / 'out'))
    assert one_line(e.value), e.value
  assert not (tmp_path / 'out').exists()


def test_the_command_line(vit_dir, tmp_path):
  picture = tmp_path / 'photo.jpg'
  photo(40, 30).save(picture)
  command = [sys.executable, '-m', 'experiments.inspect', f'--pretrained={vit_dir}']
  done = subprocess.run(command + [f'--image={picture}', f'--out={tmp_path / "out"}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'wrote 5 files to {tmp_path / "out"}: attention_image0.png, rollout.png' in done.stdout
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and 'with neither of --image and --text' in done.stderr
  assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
