"""Fine-tuning from a checkpoint (config.init_from): random-init Hugging Face ViTs with every
parameter perturbed, saved as transformers saves them, and tx workdirs."""

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import tx  # noqa: E402
from experiments import init_from  # noqa: E402
from experiments.config_check import check_config  # noqa: E402
from experiments.metrics import read_metrics  # noqa: E402
from experiments.optimizer import make_schedule  # noqa: E402
from experiments.restore import load_run  # noqa: E402
from experiments.sweep import grid  # noqa: E402
from experiments.train import train_and_evaluate  # noqa: E402
from tests.test_data import _write_cifar  # noqa: E402
from tests.test_pretrained import perturbed  # noqa: E402
from tests.test_runner import tiny_config  # noqa: E402
from tx import pretrained  # noqa: E402

# 16×16 images in patches of 4 (a 4×4 grid); digits are 8×8 (2×2), with 10 classes, not 5.
HF = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
          image_size=16, patch_size=4, num_labels=5, num_channels=1)


def save_hf_vit(directory, seed=0, **overrides) -> str:
  torch.manual_seed(seed)
  model = perturbed(transformers.ViTForImageClassification(
      transformers.ViTConfig(**{**HF, **overrides})))
  model.save_pretrained(directory)
  return str(directory)


def finetune_config(source, steps=4, **overrides):
  c = importlib.import_module('configs.vit_finetune').get_config(f'init_from={source}')
  c.update(dict(total_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=1,
                batch_size=16, eval_batch_size=120))
  c.evals.attention_entropy.examples = 16
  c.update(overrides)
  return c


def bilinear(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64 weights of jax.image.resize's 'bilinear' along one axis: output i
  samples the input at x_i = (i + ½)·n_in/n_out − ½ (half-pixel centres) with the triangle
  kernel max(0, 1 − |j − x_i|·s), s = min(n_out/n_in, 1) (antialiased: twice as wide when
  halving), each row normalised over the inputs 0 ≤ j < n_in."""
  s = n_out / n_in
  x = (np.arange(n_out) + 0.5) / s - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - x[:, None]) * min(s, 1.0))
  return w / w.sum(1, keepdims=True)


def flat(params) -> dict:
  return {'/'.join(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def test_first_step_starts_from_the_checkpoint(tmp_path, capsys):
  source = save_hf_vit(tmp_path / 'hf')
  config = finetune_config(source)
  assert float(make_schedule(config, 4)(0)) == 0.0  # the first update moves nothing,
  _, state = train_and_evaluate(config, str(tmp_path / 'run'), stop_after=1)
  assert int(state.step) == 1  # so these are the params the first step started from.
  _, loaded = pretrained.load(source)
  got, want = flat(state.params), flat(loaded)
  assert got.keys() == want.keys()
  for name, value in got.items():
    if name == 'pos_embedding':  # [CLS] + 4×4 patches -> [CLS] + 2×2.
      table = np.asarray(want[name], np.float64)[0]
      w = bilinear(4, 2)  # rows (3, 3, 1, 0)/7 and (0, 1, 3, 3)/7
      cells = np.einsum('ia,jb,abd->ijd', w, w, table[1:].reshape(4, 4, 16)).reshape(4, 16)
      assert value.shape == (1, 5, 16)
      np.testing.assert_allclose(value[0], np.concatenate([table[:1], cells]), rtol=1e-6,
                                 atol=1e-7)
    elif name.startswith('head/'):  # 5 classes -> 10: zeros, as tx.ViT initialises it.
      assert value.shape[-1] == 10 and not value.any()
    else:
      np.testing.assert_array_equal(value, want[name], err_msg=name)
  out = capsys.readouterr().out
  assert f'init_from {source} (pretrained): ViT, 2 layers, d_model 16, 2 heads' in out
  assert 'head re-initialised (10 classes; the checkpoint: 5 classes)' in out
  assert 'pos_embedding resampled from a 4x4 to a 2x2 patch grid, 1 prefix row kept' in out
  assert 'no pixel normalisation recorded: [0, 1] pixels taken as they are' in out


def test_the_architecture_is_the_checkpoints(tmp_path):
  source = save_hf_vit(tmp_path / 'hf')
  config = finetune_config(source)
  config.model.dropout = 0.1
  resolved = init_from.resolve(config)
  # The checkpoint's fields, the fine-tune's own, and num_classes left to the data.
  assert {k: resolved.model[k] for k in ('d_model', 'num_layers', 'num_heads', 'd_ff',
                                         'patch_size', 'activation', 'layer_norm_epsilon')} == \
      dict(d_model=16, num_layers=2, num_heads=2, d_ff=32, patch_size=4,
           activation='gelu_exact', layer_norm_epsilon=1e-12)
  assert (resolved.model.dropout, resolved.model.implementation) == (0.1, 'xla')
  assert 'num_classes' not in resolved.model and 'd_model' not in config.model
  check_config(config)
  train_and_evaluate(config, str(tmp_path / 'run'), stop_after=1)
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['model'] == resolved.model.to_dict()  # the whole model is recorded.
  # A field the config sets against the checkpoint: one line, naming it and both values.
  vit = importlib.import_module('configs.vit').get_config()
  vit.init_from = source
  with pytest.raises(ValueError) as e:
    check_config(vit)
  assert str(e.value).startswith(f"config.model.num_heads=4; config.init_from='{source}' has "
                                 'num_heads=2') and '\n' not in str(e.value)
  config.model.name = 'EncoderClassifier'
  with pytest.raises(ValueError, match=r"config.model.name='EncoderClassifier'; .* holds a ViT"):
    init_from.resolve(config)


def test_an_rgb_checkpoint_on_grey_images_computes_the_same(tmp_path):
  """The normalisation folded into the patch embedding and its channels summed: the adapted
  model on grey pixels x in [0, 1] is the checkpoint on (repeat(x) − mean) / std."""
  source = save_hf_vit(tmp_path / 'hf', num_channels=3)
  transformers.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3],
                                 image_std=[0.4, 0.5, 0.6]).save_pretrained(source)
  checkpoint = init_from.load(source)
  model = checkpoint.model
  grey = np.random.default_rng(0).uniform(size=(3, 16, 16, 1)).astype(np.float32)
  fresh = model.init(jax.random.key(0), grey)['params']
  params, notes = init_from.adapt_params(checkpoint, fresh, model, grey.shape[1:])
  assert [n.split(' ')[:2] for n in notes] == [['its', 'normalisation'], ['patch', 'kernel']]
  rgb = (np.repeat(grey, 3, -1) - np.array([0.1, 0.2, 0.3])) / np.array([0.4, 0.5, 0.6])
  np.testing.assert_allclose(model.apply({'params': params}, grey),
                             model.apply({'params': checkpoint.params}, rgb.astype(np.float32)),
                             rtol=1e-4, atol=1e-4)
  # One value for every channel: the same for each.
  same = dataclasses.replace(checkpoint, normalisation=(1.0, (0.2,), (0.5,)))
  params_same, _ = init_from.adapt_params(same, fresh, model, grey.shape[1:])
  rgb = (np.repeat(grey, 3, -1) - 0.2) / 0.5
  np.testing.assert_allclose(model.apply({'params': params_same}, grey),
                             model.apply({'params': checkpoint.params}, rgb.astype(np.float32)),
                             rtol=1e-4, atol=1e-4)
  # scan_layers: the same params, the blocks stacked.
  scanned = model.clone(scan_layers=True)
  fresh = jax.eval_shape(lambda r: scanned.init(r, grey)['params'], jax.random.key(0))
  stacked, notes = init_from.adapt_params(checkpoint, fresh, scanned, grey.shape[1:])
  assert notes[-1] == 'blocks stacked for scan_layers'
  jax.tree.map(np.testing.assert_array_equal, tx.unstack_layers(stacked), params)


def test_a_parameter_of_another_shape_is_a_one_line_error(tmp_path):
  source = save_hf_vit(tmp_path / 'hf')
  checkpoint = init_from.load(source)
  model = checkpoint.model.clone(d_ff=24)
  fresh = jax.eval_shape(lambda r: model.init(r, np.zeros((1, 8, 8, 1)))['params'],
                         jax.random.key(0))
  with pytest.raises(ValueError) as e:
    init_from.adapt_params(checkpoint, fresh, model, (8, 8, 1))
  assert str(e.value) == (f"config.init_from='{source}': encoder/block_0/ffn/hidden/bias is "
                          '(32,) in the checkpoint and (24,) in the model; only the head '
                          '(re-initialised) and the position table (resampled) may differ')
  # The same through the config check (before anything is written): RGB CIFAR images for a
  # checkpoint of grey ones.
  cifar = tmp_path / 'cifar-10-batches-py'
  cifar.mkdir()
  _write_cifar(cifar, ['data_batch_1', 'test_batch'], b'labels', 10)
  config = importlib.import_module('configs.vit_finetune').get_config(
      f'init_from={source},data_dir={cifar}')
  config.batch_size = 8
  with pytest.raises(ValueError) as e:
    check_config(config, str(tmp_path / 'run'))
  assert str(e.value).startswith(f"config.init_from='{source}': embedding/kernel is (4, 4, 1, "
                                 '16) in the checkpoint and (4, 4, 3, 16) in the model')
  assert not (tmp_path / 'run').exists()
  for bad, message in [(str(tmp_path / 'nowhere'), 'is neither a file, a directory nor a Hub'),
                       (f'{source}@3', '@STEP is for a tx workdir')]:
    with pytest.raises(ValueError, match='^' + re.escape(f'config.init_from={bad!r}: ') + '.*'
                                         + message):
      init_from.load(bad)


def test_a_normalisation_for_other_channels_is_a_one_line_error(tmp_path):
  source = save_hf_vit(tmp_path / 'hf')  # grey images, and a processor for RGB ones.
  transformers.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3],
                                 image_std=[0.4, 0.5, 0.6]).save_pretrained(source)
  checkpoint = init_from.load(source)
  fresh = jax.eval_shape(lambda r: checkpoint.model.init(r, np.zeros((1, 8, 8, 1)))['params'],
                         jax.random.key(0))
  with pytest.raises(ValueError) as e:
    init_from.adapt_params(checkpoint, fresh, checkpoint.model, (8, 8, 1))
  assert str(e.value) == (f"config.init_from='{source}': its recorded pixel normalisation has 3 "
                          'channels (mean (0.1, 0.2, 0.3)) and its patch kernel 1; they must '
                          'agree, or the mean be one value')


def test_the_position_table_is_kept_on_any_grid_and_resampled_on_a_square_one():
  """A run on 16×24 images in patches of 2 (an 8×12 grid) is its own init_from: its table is
  taken as it is; one of an 8×8 grid goes to a 4×4 one."""
  model = tx.ViT(num_layers=1, d_model=8, num_heads=2, d_ff=16, patch_size=2, num_classes=3)
  x = np.zeros((1, 16, 24, 1), np.float32)
  params = jax.device_get(model.init(jax.random.key(0), x)['params'])
  run = init_from.Checkpoint(model, params, 'tx workdir, step 4', source='runs/wide')
  adapted, notes = init_from.adapt_params(run, params, model, x.shape[1:])
  assert notes == [] and adapted['pos_embedding'].shape == (1, 1 + 8 * 12, 8)
  jax.tree.map(np.testing.assert_array_equal, adapted, params)
  square = jax.device_get(model.init(jax.random.key(0), x[:, :, :16])['params'])
  small = jax.eval_shape(lambda r: model.init(r, x[:, :8, :8])['params'], jax.random.key(0))
  adapted, notes = init_from.adapt_params(dataclasses.replace(run, params=square), small, model,
                                          (8, 8, 1))
  assert notes == ['pos_embedding resampled from an 8x8 to a 4x4 patch grid, 1 prefix row kept']


def test_a_file_deleted_while_the_source_is_signed_is_left_out(tmp_path, monkeypatch):
  (tmp_path / 'kept').write_text('x')
  listing = [(str(tmp_path), [], ['gone', 'kept'])]  # 'gone' deleted after it was listed.
  monkeypatch.setattr(os, 'walk', lambda path: iter(listing))
  assert [name for name, _, _ in init_from._signature(str(tmp_path))] == [
      str(tmp_path / 'kept')]


def test_from_a_tx_workdir_and_a_step_of_it(tmp_path, capsys):
  first = str(tmp_path / 'first')
  _, trained = train_and_evaluate(tiny_config('vit', steps=4, checkpoint_every=2,
                                              keep_checkpoints=3), first, stop_after=4)
  # Any config whose model agrees with the run's: here the same one, another seed.
  for source, step in [(first, 4), (f'{first}@2', 2)]:
    config = tiny_config('vit', steps=4, seed=1, init_from=source)
    _, state = train_and_evaluate(config, str(tmp_path / f'from{step}'), stop_after=1)
    want = trained.params if step == 4 else load_run(first, 2)[1]
    jax.tree.map(np.testing.assert_array_equal, state.params, jax.device_get(want))
    assert f'init_from {source} (tx workdir, step {step}): ViT, 1 layer,' in capsys.readouterr().out
  assert not np.array_equal(*(flat(p)['encoder/block_0/ffn/hidden/kernel']
                              for p in (trained.params, load_run(first, 2)[1])))
  # A step that is not saved: the steps that are, in config.init_from's words.
  with pytest.raises(ValueError) as e:
    init_from.load(f'{first}@3')
  assert str(e.value) == (f"config.init_from='{first}@3': the checkpoints of {first} are at "
                          'steps [2, 4]')


def test_a_resume_continues_from_the_workdir_not_the_source(tmp_path, capsys):
  source = save_hf_vit(tmp_path / 'hf')
  shutil.copytree(source, tmp_path / 'original')
  config = finetune_config(source, steps=4, checkpoint_every=2)
  run = str(tmp_path / 'run')
  train_and_evaluate(config, run, stop_after=2)  # saved step 2, then "killed".
  save_hf_vit(source, seed=1)  # other weights at the source.
  capsys.readouterr()
  _, resumed = train_and_evaluate(config, run)
  out = capsys.readouterr().out
  assert 'Resumed from step 2' in out and 'init_from' not in out
  straight = finetune_config(str(tmp_path / 'original'), steps=4, checkpoint_every=2)
  _, want = train_and_evaluate(straight, str(tmp_path / 'straight'))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, want.params)
  # A resume reads nothing of SOURCE, not even its architecture: the check passes without it.
  shutil.rmtree(source)
  check_config(config, run)
  with pytest.raises(ValueError, match='^' + re.escape(f'config.init_from={source!r}')):
    check_config(config)
  # Another init_from is a config change, as any other field.
  with pytest.raises(ValueError, match=re.escape(f'was trained with another config: init_from '
                                                 f'"{source}" -> "{tmp_path}/original"')):
    train_and_evaluate(straight, run)


def test_a_resume_without_init_from_keeps_the_recorded_architecture(tmp_path, capsys):
  """init_from='' with --allow_config_change=init_from: the model is config.json's, not
  tx.ViT's defaults (configs/vit_finetune.py sets no architecture)."""
  config = finetune_config(save_hf_vit(tmp_path / 'hf'), steps=4, checkpoint_every=2)
  run = str(tmp_path / 'run')
  train_and_evaluate(config, run, stop_after=2)
  config.init_from = ''
  with open(os.path.join(run, 'config.json')) as f:
    assert init_from.resolve(config, run).model.to_dict() == json.load(f)['model']
  check_config(config, run)
  capsys.readouterr()
  summary, _ = train_and_evaluate(config, run, allow_config_change=('init_from',))
  assert 'Resumed from step 2' in capsys.readouterr().out and summary['steps'] == 4


def test_a_short_finetune_lowers_the_loss(tmp_path):
  config = finetune_config(save_hf_vit(tmp_path / 'hf'), steps=60, batch_size=64)
  config.optimizer.update(dict(lr=3e-3, warmup_steps=5))
  summary, _ = train_and_evaluate(config, str(tmp_path / 'run'))
  losses = [r['loss'] for r in read_metrics(str(tmp_path / 'run')) if r['split'] == 'train']
  assert losses[0] == pytest.approx(math.log(10), abs=1e-5)  # the zero head: uniform.
  assert np.mean(losses[-10:]) < math.log(10) - 0.2  # measured: 1.96 at step 60.
  assert summary['eval/loss'] < math.log(10) - 0.2 and summary['eval/accuracy'] > 0.2


def test_a_resumed_sweep_reads_nothing_of_init_from(tmp_path, capsys):
  """Two seeds at β = 0.5 fine-tuned as one vectorized program: one start line, and the
  checkpoint not kept in memory. Then the source is deleted and one point interrupted: the
  rerun checks both points and resumes one without reading it."""
  source = save_hf_vit(tmp_path / 'hf')
  base = finetune_config(source, steps=4, checkpoint_every=2)
  base.model.beta_scale = 0.5
  module = types.SimpleNamespace(get_config=lambda arg: base,
                                 sweep=lambda add, arg: [add(seed=seed) for seed in (0, 1)])
  points, sweepdir = grid.expand(module, None), tmp_path / 'sweep'
  cache = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    grid.run_all(module, None, points, str(sweepdir), vectorize=True)
    out = capsys.readouterr().out
    assert out.count('init_from') == 1
    assert f'init_from {source} (pretrained): ViT, 2 layers' in out
    assert '; beta_scale 0.5, the source trained at beta_scale 1\n' in out
    assert init_from._load.cache_info().currsize == 0
    shutil.rmtree(source)
    shutil.rmtree(sweepdir / 'seed=1' / 'checkpoints' / '4')
    os.remove(sweepdir / 'seed=1' / 'summary.json')
    rows = grid.run_all(module, None, points, str(sweepdir), vectorize=True)
  finally:  # run_all turns on the persistent compilation cache, in tmp_path.
    jax.config.update('jax_compilation_cache_dir', cache[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', cache[1])
  out = capsys.readouterr().out
  assert 'Resumed from step 2' in out and 'init_from' not in out
  assert [row['steps'] for row in rows] == [4, 4]
