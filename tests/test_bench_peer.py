"""The PyTorch peer of the benchmark computes tx's function and takes tx's optimizer step.

Each tx model of `experiments.bench.specs` gets its parameters (randomly perturbed, so that a
zero head or a unit LayerNorm scale cannot hide a mix-up) copied into the torch mirror; the
logits, the gradients and the parameters after optimizer steps must then agree with tx and
optax in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')

from configs import common  # noqa: E402
from experiments import optimizer, tasks  # noqa: E402
from experiments.bench import peer, specs  # noqa: E402

TINY = {s.kind: s for s in specs.TINY_SPECS}
KINDS = specs.KINDS


def padded_batch(spec, seed=0):
  """The synthetic batch; for the EncoderDecoder, sources and targets end in pads (id 0)."""
  batch = specs.synthetic_batch(spec, seed)
  if spec.kind == 'EncoderDecoder':
    lengths = np.linspace(spec.seq_len, 1, spec.batch).round().astype(int)  # [8, 6, 3, 1]
    for i, n in enumerate(lengths):
      batch['inputs'][i, n:] = 0
      batch['targets'][i, max(n, 2):] = 0
  return batch


def tx_params(spec, seed=0):
  """tx's initial parameters plus N(0, 0.05²) noise on every entry (NumPy arrays)."""
  params = jax.jit(specs.tx_model(spec).init)(
      jax.random.key(seed), *tasks.model_inputs(spec.task, specs.synthetic_batch(spec)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32),
                      params)


def torch_model(spec, params):
  model = peer.build_model(spec)
  peer.load_tx_params(model, params)
  return model


def params_close(spec, model, tree, small_grad, steps):
  """Parameters equal to rtol 1e-5 / atol 1e-6, except where tx's gradient was ever near 0.

  Adam's first steps move each entry by about lr·g/(|g| + ε): where |g| is at the level of
  float noise (< 1e-5, e.g. every key bias, whose true gradient is exactly 0 because softmax
  ignores the per-row constant q·b_k) the two frameworks' noise decides the step, so such
  entries are only held to the largest possible disagreement, 2·lr per step.
  """
  reference = dict(torch_model(spec, tree).named_parameters())
  for name, p in model.named_parameters():
    got, want = p.detach().numpy(), reference[name].detach().numpy()
    tol = np.where(small_grad[name], 2 * steps * peer.OPTIMIZER['lr'],
                   1e-6 + 1e-5 * np.abs(want))
    bad = np.abs(got - want) > tol
    assert not bad.any(), (name, got[bad], want[bad])


def grads_close(spec, model, tree, tol):
  """|torch grad − tx grad| <= tol · max |tx grad| + 1e-7, tensor by tensor (the floor is
  for the key biases, whose gradient is 0 up to float noise)."""
  reference = dict(torch_model(spec, tree).named_parameters())
  for name, p in model.named_parameters():
    want = reference[name].detach().numpy()
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=0, atol=tol * np.abs(want).max() + 1e-7,
                               err_msg=name)


@pytest.mark.parametrize('kind', KINDS)
def test_logits_equal_tx(kind):
  spec = TINY[kind]
  batch, params = padded_batch(spec), tx_params(spec)
  expected = jax.jit(specs.tx_model(spec).apply)({'params': params},
                                                 *tasks.model_inputs(spec.task, batch))
  inputs, _ = peer.torch_batch(spec, batch)
  with torch.no_grad():
    logits = torch_model(spec, params)(*inputs)
  assert logits.dtype == torch.float32
  np.testing.assert_allclose(logits.numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_source_padding_is_masked():
  """What the padded source positions hold does not reach the decoder: bumping the pad
  token's embedding moves only the tied logit of the pad token itself."""
  spec = TINY['EncoderDecoder']
  batch = specs.synthetic_batch(spec)  # targets without pads
  batch['inputs'][1:, 5:] = 0
  model = torch_model(spec, tx_params(spec))
  inputs, _ = peer.torch_batch(spec, batch)
  with torch.no_grad():
    base = model(*inputs)
    model.embed.embedding.weight[0] += 1.0
    moved = model(*inputs)
  assert not torch.allclose(moved[..., 0], base[..., 0])
  np.testing.assert_allclose(moved[..., 1:].numpy(), base[..., 1:].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec', specs.TINY_SPECS + specs.CPU_SPECS + specs.GPU_SPECS,
                         ids=lambda s: s.name)
def test_parameter_count_equals_tx(spec):
  shapes = jax.eval_shape(specs.tx_model(spec).init, jax.random.key(0),
                          *tasks.model_inputs(spec.task, specs.synthetic_batch(spec)))
  expected = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  with torch.device('meta'):
    model = peer.build_model(spec)
  assert peer.num_params(model) == expected


def tx_optimizer(weight_decay):
  config = common.training()
  config.optimizer.update(schedule='constant', warmup_steps=0)
  schedule = optimizer.make_schedule(config, total_steps=10)
  assert float(schedule(0)) == float(schedule(5)) == np.float32(config.optimizer.lr)
  o = config.optimizer  # the peer's constants are the configs' defaults
  assert (peer.OPTIMIZER['lr'], peer.OPTIMIZER['betas'], peer.OPTIMIZER['weight_decay'],
          peer.GRAD_CLIP) == (o.lr, (o.b1, o.b2), o.weight_decay, o.grad_clip)
  config.optimizer.weight_decay = weight_decay
  return optimizer.make_optimizer(config, schedule)


@pytest.mark.parametrize('kind', KINDS)
def test_optimizer_steps_equal_optax(kind):
  """Loss, gradients and the parameters after each of two AdamW steps equal tx's.

  Both clip (the gradient norms are 2-5) and both decay with λ = 0.5 instead of the configs'
  1e-4, whose effect (lr·λ·θ ~ 1e-9) would hide below the tolerance.
  """
  spec = TINY[kind]
  params = tx_params(spec)
  model = specs.tx_model(spec)
  optimizer = tx_optimizer(weight_decay=0.5)

  def loss(p, batch):
    total, _ = tasks.loss_and_metrics(spec.task, model, p, batch)
    return total / tasks.loss_weights(spec.task, batch).sum()

  @jax.jit
  def tx_step(p, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(p, batch)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return jax.tree.map(jnp.add, p, updates), opt_state, value, grads

  step = peer.TrainStep(spec, torch_model(spec, params), weight_decay=0.5)
  opt_state = optimizer.init(params)
  small_grad = {name: False for name, _ in step.model.named_parameters()}
  for i in range(2):
    batch = padded_batch(spec, seed=i)
    inputs, targets = peer.torch_batch(spec, batch)
    new_params, opt_state, tx_loss, tx_grads = tx_step(params, opt_state, batch)
    # The gradients, before clipping, from the same loss.
    step.optimizer.zero_grad()
    torch_loss = step.loss(inputs, targets)
    torch_loss.backward()
    np.testing.assert_allclose(torch_loss.item(), float(tx_loss), rtol=1e-6)
    # Step 2 starts from parameters that differ where |g| was at noise level (see below).
    grads_close(spec, step.model, tx_grads, tol=1e-5 if i == 0 else 1e-4)
    for name, g in torch_model(spec, tx_grads).named_parameters():
      small_grad[name] = small_grad[name] | (g.detach().abs().numpy() < 1e-5)
    # The full step: clip, AdamW with tx's decay mask.
    step(inputs, targets)
    params = new_params
    params_close(spec, step.model, params, small_grad, steps=i + 1)
  # The loose tolerance covers few entries: the test still checks nearly every parameter.
  loose = sum(int(m.sum()) for m in small_grad.values())
  assert loose < 0.03 * peer.num_params(step.model), loose


@pytest.mark.parametrize('kind', KINDS)
def test_weight_decay_mask_is_tx_mask(kind):
  """The peer decays exactly the parameters that tx's optimizer decays."""
  spec = TINY[kind]
  params = tx_params(spec)
  model = torch_model(spec, params)
  tx_decays = {peer._torch_name(path): bool(decays) for path, decays in
               traverse_util.flatten_dict(optimizer.decay_mask(params)).items()}
  assert {n: peer.decays(n, p) for n, p in model.named_parameters()} == tx_decays


def test_time_train_step_eager():
  result = peer.time_train_step(TINY['ViT'], warmup=1, repeats=2)
  assert result['step_s_median'] > 0 and result['examples_per_s'] > 0
  assert len(result['times_s']) == 2 and len(result['first_steps_s']) == 1
  assert np.isfinite(result['final_loss'])
  assert result['torch'] == torch.__version__ and result['threads'] >= 1


def test_compiled_step_traces_whole_and_equals_eager():
  """torch.compile captures forward + loss as one graph (fullgraph: no graph breaks) with the
  eager loss and gradients, and steps. The 'aot_eager' backend runs dynamo and AOTAutograd
  without inductor's C++ code generation, which takes 20-50 s per model on a 2-core CPU:
  `python -m experiments.bench` exercises that."""
  spec = TINY['EncoderDecoder']
  params = tx_params(spec)
  inputs, targets = peer.torch_batch(spec, padded_batch(spec))
  eager = peer.TrainStep(spec, torch_model(spec, params))
  compiled = peer.TrainStep(spec, torch_model(spec, params), compile=True,
                            compile_options=dict(backend='aot_eager', fullgraph=True))
  losses = [s.loss(inputs, targets) for s in (eager, compiled)]
  for loss in losses:
    loss.backward()
  np.testing.assert_allclose(losses[1].item(), losses[0].item(), rtol=1e-6)
  for (name, a), b in zip(compiled.model.named_parameters(), eager.model.parameters()):
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert np.isfinite(compiled(inputs, targets).item())


@pytest.mark.parametrize('kind', ['DecoderLM', 'EncoderDecoder'])
def test_bfloat16_autocast_step(kind):
  """bfloat16 compute under autocast keeps float32 parameters and a finite, close loss."""
  spec = TINY[kind]
  batch = padded_batch(spec)
  inputs, targets = peer.torch_batch(spec, batch)
  params = tx_params(spec)
  f32 = peer.TrainStep(spec, torch_model(spec, params))
  bf16 = peer.TrainStep(spec, torch_model(spec, params), dtype='bfloat16')
  with torch.no_grad():
    expected, got = float(f32.loss(inputs, targets)), float(bf16.loss(inputs, targets))
  np.testing.assert_allclose(got, expected, rtol=0.05)
  bf16(inputs, targets)
  assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_without_torch_every_entry_point_says_why(monkeypatch):
  monkeypatch.setattr(peer, '_TORCH_ERROR', 'torch does not import (ImportError: no torch)')
  spec = specs.TINY_SPECS[0]
  for call in (lambda: peer.build_model(spec), lambda: peer.time_train_step(spec),
               lambda: peer.torch_batch(spec, specs.synthetic_batch(spec))):
    with pytest.raises(RuntimeError, match=r'^torch does not import \(ImportError: no torch\)$'):
      call()
