"""Reading attention out of a model: the weights of every layer, their entropy, rollout,
mean distance, and how much of them position alone explains; and the hidden states of every
layer, with how contextual they are (Ethayarajh, 2019)."""

from __future__ import annotations

import flax
import jax.numpy as jnp
import numpy as np

from tx.layers import DecoderBlock, EncoderBlock
from tx.models import Decoder, Encoder, unstack_layers

_SHORT = {'encoder': 'enc', 'decoder': 'dec'}


class AttentionLayer(str):
  """One attention layer of a model: a `str` whose value is its '/'-joined module path
  ('decoder/block_1/cross_attention'), so it works as a dict key, sorts and serialises as
  that string, with the parts of the path as attributes, so that no caller parses it.

  Built from `scope`, the module names from the model's root to the layer (the keys of
  Flax's 'intermediates', after `tx.unstack_layers`):
    scope      ('decoder', 'block_1', 'cross_attention')
    name       scope[-1]: 'self_attention', 'cross_attention', ...
    block      i of the innermost enclosing 'block_<i>', or None
    stack      the module holding that block: 'encoder' or 'decoder' in tx models; '' when
               there is no block, or when the block sits at the root and `stack` is not
               given (`attention_weights` gives it for a bare tx.Encoder or tx.Decoder)
    is_cross   name == 'cross_attention': queries from the decoder, keys from the encoder
    is_causal  a decoder's self-attention, which every tx model masks causally
    label      a short name for plots: 'dec 1 cross', 'enc 0 self'
    call_order a sort key in the order tx models call their layers (encoder before decoder,
               blocks by index, self- before cross-attention): `jax.jit` returns a dict
               with its keys sorted as strings, and sorted(weights, key=lambda l:
               l.call_order) restores the order.
  """
  __slots__ = ('scope', 'stack', 'block', 'name')

  def __new__(cls, scope, stack: str | None = None):
    scope = tuple(scope)
    if not scope or not all(isinstance(n, str) and n for n in scope):
      raise ValueError(f'scope={scope!r}; allowed: a non-empty tuple of module names')
    self = super().__new__(cls, '/'.join(scope))
    self.scope, self.name = scope, scope[-1]
    blocks = [i for i, n in enumerate(scope[:-1])
              if n.startswith('block_') and n[len('block_'):].isdigit()]
    self.block = int(scope[blocks[-1]][len('block_'):]) if blocks else None
    if stack is None:
      stack = scope[blocks[-1] - 1] if blocks and blocks[-1] > 0 else ''
    self.stack = stack
    return self

  def __reduce__(self):  # copy and pickle rebuild it from its parts, not from the string.
    return AttentionLayer, (self.scope, self.stack)

  @property
  def is_cross(self) -> bool:
    return self.name == 'cross_attention'

  @property
  def is_causal(self) -> bool:
    return self.stack == 'decoder' and self.name == 'self_attention'

  @property
  def label(self) -> str:
    kind = self.name[:-len('_attention')] if self.name.endswith('_attention') else self.name
    block = '' if self.block is None else str(self.block)
    return ' '.join(x for x in (_SHORT.get(self.stack, self.stack), block, kind) if x)

  @property
  def call_order(self) -> tuple:
    return (self.stack == 'decoder', -1 if self.block is None else self.block, self.is_cross,
            self.scope)


_BARE = ('attention',)  # the scope of a bare MultiHeadAttention, which sows at the root.


def attention_weights(model, variables, *args, method=None, **kwargs) -> dict:
  """Runs `model.apply(variables, *args, **kwargs)` and returns the attention weights of
  every attention layer, {AttentionLayer: weights [batch..., H, Tq, Tk]}, in call order.

  The keys compare equal to their paths ('encoder/block_0/self_attention', ...) and carry
  stack, block, name, is_cross, is_causal and label. A bare `MultiHeadAttention` (whose
  weights have no enclosing scope) gives one entry, AttentionLayer(('attention',)). Under
  `jax.jit` the keys stay AttentionLayers but come back sorted as strings; sort them by
  `call_order` to restore the call order.

  The weights are what `MultiHeadAttention` sows into 'intermediates'. A model
  configured with implementation='fused' or None (auto, which may pick the fused
  kernel on GPU; the kernel cannot return weights) is run on the 'xla' path, which
  computes the same function. A model with scan_layers=True gives one entry per
  layer under the unscanned keys ('encoder/block_0/self_attention', ...).
  """
  if getattr(model, 'implementation', 'xla') != 'xla':
    model = model.clone(implementation='xla')
  _, state = model.apply(variables, *args, method=method, mutable=['intermediates'], **kwargs)
  flat = flax.traverse_util.flatten_dict(unstack_layers(state.get('intermediates', {})))
  # A bare Encoder or Decoder holds its blocks at the root, which has no name of its own.
  root = next((name for cls, name in ((Decoder, 'decoder'), (Encoder, 'encoder'))
               if isinstance(model, cls)), None)
  layers = {AttentionLayer(path[:-1] or _BARE, root): value[0] for path, value in flat.items()
            if path[-1] == 'attention_weights'}
  return _call_order(layers)


def _call_order(weights: dict) -> dict:
  """Within a block, self-attention before cross-attention (the order DecoderBlock calls them).

  An unscanned model's intermediates already come in call order; a scanned stack returns
  each block's sown values sorted by name (cross < self), which this undoes. Blocks keep
  their order of first appearance.
  """
  first = {}
  for layer in weights:
    first.setdefault(layer.scope[:-1], len(first))
  rank = lambda layer: (first[layer.scope[:-1]], layer.is_cross)
  return {layer: weights[layer] for layer in sorted(weights, key=rank)}


def attention_entropy(weights, query_mask=None):
  """Entropy of each head's attention distribution, averaged over queries, in nats.

    H_h = Σ_q m_q · (-Σ_k w_hqk log w_hqk) / Σ_q m_q,   with 0 · log 0 = 0,

  for weights [batch..., H, Tq, Tk] (rows sum to 1) and an optional query mask
  m [batch..., Tq] (1 = a real query; default all). Returns [batch..., H].
  Uniform attention over T keys gives log T (β = 0); one-hot attention gives 0
  (β → ∞).
  """
  w = weights.astype(jnp.float32)
  per_query = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
  if query_mask is None:
    return per_query.mean(axis=-1)
  m = jnp.asarray(query_mask, jnp.float32)[..., None, :]  # [batch..., 1, Tq]
  return (per_query * m).sum(-1) / jnp.maximum(m.sum(-1), 1e-9)


def attention_rollout(weights, residual: float = 0.5):
  """Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each
  output token through all layers, with the residual path counted as identity attention.

  With Ā_l the head-mean of layer l's weights [batch..., H, T, T]:
    Â_l = residual · I + (1 - residual) · Ā_l,   rows renormalised to sum to 1,
    rollout = Â_L · ... · Â_2 · Â_1                [batch..., T, T].
  `weights` is a sequence of per-layer weights, first layer first (e.g. the values of
  `attention_weights` of a ViT). Row q of the result is the share of each input token in
  output token q (for ViT, row 0 is the [CLS] token's map over the patches).
  """
  rollout = None
  for w in weights:
    a = jnp.asarray(w, jnp.float32).mean(axis=-3)
    a = residual * jnp.eye(a.shape[-1], dtype=a.dtype) + (1.0 - residual) * a
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  if rollout is None:
    raise ValueError('attention_rollout needs the weights of at least one layer')
  return rollout


def mean_attention_distance(weights, positions, query_mask=None):
  """Mean attention distance per head (Dosovitskiy et al., 2021, Fig. 7), averaged over queries:

    D_h = Σ_q m_q Σ_k w_hqk · ‖p_q − p_k‖₂ / Σ_q m_q

  for weights [batch..., H, Tq, Tk], token positions [T] (1-D) or [T, dims] (e.g. patch
  centres (y, x) in pixels; Tq = Tk = T) and an optional query mask m [batch..., Tq]
  (default all). Returns [batch..., H]: 0 when every token attends to itself, large for
  global heads.
  """
  p = jnp.asarray(positions, jnp.float32)
  if p.ndim == 1:
    p = p[:, None]
  distance = jnp.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))  # [T, T]
  per_query = (jnp.asarray(weights, jnp.float32) * distance).sum(-1)
  if query_mask is None:
    return per_query.mean(-1)
  m = jnp.asarray(query_mask, jnp.float32)[..., None, :]
  return (per_query * m).sum(-1) / jnp.maximum(m.sum(-1), 1e-9)


def position_content_shares(weights, offsets, valid=None) -> dict:
  """How much of each head's attention position explains, and how much depends on content.

  An exact nested analysis of variance of the weights w_nhqk over examples n, queries q
  and keys k, per head h:

    w_nhqk − ḡ = [m(δ) − ḡ] + [m(q, k) − m(δ)] + [w_nhqk − m(q, k)]
                  relative      absolute          content
                  position      position

  where δ = offsets[q, k] groups the cells by relative position (e.g. k − q, or a 2-D
  patch offset), m(δ) is the mean of the cells with that offset, m(q, k) the mean over
  examples of one cell (the attention map position alone predicts), and ḡ the mean of
  all cells; every mean and sum runs over the valid cells (padding and causally masked
  keys are left out). The three sums of squares add up to Σ (w − ḡ)², so the shares

    relative = SS_offset / SS_total,  absolute = SS_cell / SS_total,
    content  = SS_examples / SS_total

  sum to 1: `relative` is what the head's average profile over offsets explains,
  `absolute` what the exact positions add, `content` the variance across examples. Memory
  is O(N·H·Tq·Tk) (float64).

  weights [N, H, Tq, Tk]; offsets [Tq, Tk] integer group ids (not traced); valid
  [N, Tq, Tk] bool, default all. Returns {'relative', 'absolute', 'content'}: [H] each,
  and 'profile' {offset id: [H] mean weight m(δ)}.
  """
  w = np.asarray(weights, np.float64)
  n, h, tq, tk = w.shape
  valid = np.ones((n, tq, tk), bool) if valid is None else np.broadcast_to(valid, (n, tq, tk))
  ids, group = np.unique(np.asarray(offsets).reshape(-1), return_inverse=True)
  group = group.reshape(-1)
  v = valid.reshape(n, 1, tq * tk)  # [N, 1, C]
  x = np.where(v, w.reshape(n, h, tq * tk), 0.0)  # [N, H, C], zero where invalid
  cell_count = v.sum(0, dtype=np.float64)[0]  # [C]
  cell_sum = x.sum(0)  # [H, C]
  by_group = lambda values: np.bincount(group, weights=values, minlength=len(ids))
  group_count = by_group(cell_count)  # [G]
  group_mean = np.stack([by_group(c) for c in cell_sum]) / np.maximum(group_count, 1)  # [H, G]
  grand = cell_sum.sum(-1) / max(cell_count.sum(), 1)  # [H]
  cell_mean = cell_sum / np.maximum(cell_count, 1)  # [H, C]
  ss_offset = (group_count * (group_mean - grand[:, None]) ** 2).sum(-1)
  ss_cell = (cell_count * (cell_mean - group_mean[:, group]) ** 2).sum(-1)
  ss_examples = (np.where(v, x - cell_mean, 0.0) ** 2).sum((0, 2))
  total = np.maximum(ss_offset + ss_cell + ss_examples, 1e-30)
  used = group_count > 0
  return {'relative': ss_offset / total, 'absolute': ss_cell / total,
          'content': ss_examples / total,
          'profile': {int(i): group_mean[:, g] for g, i in enumerate(ids) if used[g]}}


_LAYER_0 = ('posemb', 'embedding_norm')  # a stack's modules before its first block, in order.


def hidden_states(model, variables, *args, method=None, **kwargs) -> dict:
  """Runs `model.apply(variables, *args, **kwargs)` and returns the residual stream of every
  encoder and decoder stack, layer by layer: {stack: [h_0, h_1, ..., h_L]}, each
  h_l [batch..., T, d_model]:

    h_0 = E(tokens) + P    the input of the first block: the token embedding plus the position
                           embedding (none with rope, which rotates q and k instead), after
                           the embedding LayerNorm with embedding_norm=True (BERT);
    h_l = block_l(h_{l-1}) the output of block l (1-based), l = 1..L; h_L comes before the final
                           LayerNorm of a pre-LN stack.

  `stack` is the stack's module path: 'decoder' for a DecoderLM, 'encoder' and 'decoder' for
  an EncoderDecoder (`method='encode'`: the encoder only), 'encoder' for an
  EncoderClassifier or a ViT; a bare Encoder or Decoder is 'encoder' or 'decoder'. The
  outputs are read with Flax's `capture_intermediates`, so no module sows anything for it;
  with scan_layers=True the layers come back unstacked.
  """
  def wanted(module, method_name: str) -> bool:  # under nn.scan a block's parent is a Scope.
    return method_name == '__call__' and (
        isinstance(module, (EncoderBlock, DecoderBlock))
        or (module.name in _LAYER_0 and isinstance(module.parent, (Encoder, Decoder))))

  _, state = model.apply(variables, *args, method=method, capture_intermediates=wanted,
                         mutable=['intermediates'], **kwargs)
  flat = flax.traverse_util.flatten_dict(unstack_layers(state.get('intermediates', {})))
  root = next((name for cls, name in ((Decoder, 'decoder'), (Encoder, 'encoder'))
               if isinstance(model, cls)), '')
  stacks: dict = {}
  for path, (value,) in flat.items():
    if path[-1] == '__call__':
      stacks.setdefault('/'.join(path[:-2]) or root, {})[path[-2]] = value
  out = {}
  for stack, outputs in stacks.items():
    first = [outputs[name] for name in _LAYER_0 if name in outputs][-1:]
    blocks = sorted((int(name[len('block_'):]), h) for name, h in outputs.items()
                    if name.startswith('block_'))
    out[stack] = first + [h for _, h in blocks]
  return out


def _unit_rows(x) -> np.ndarray:
  """x [..., d] as float64 rows of norm 1 (a zero row stays zero)."""
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def mean_pairwise_cosine(x) -> float:
  """The mean cosine similarity of the rows of x [n, d] over all pairs i ≠ j (n ≥ 2):

    (1 / (n² − n)) Σ_{i≠j} cos(x_i, x_j) = (‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / (n² − n),

  u_i = x_i / ‖x_i‖ (Σ_{i,j} u_i·u_j = ‖Σ_i u_i‖²; a zero row has cosine 0 with every row),
  in O(n·d) and float64. With the rows one word's representations in n contexts it is
  Ethayarajh's (2019) self-similarity SelfSim(w), 1 for a static embedding; with rows drawn
  from the whole corpus, his anisotropy baseline, the expected cosine of two random words
  (0 for isotropic representations, near 1 when all share one direction).
  """
  u = _unit_rows(x)
  n = u.shape[0]
  if u.ndim != 2 or n < 2:
    raise ValueError(f'x.shape={u.shape}; allowed: [n, d] with n >= 2 rows')
  total = u.sum(0)
  return float((total @ total - (u * u).sum()) / (n * n - n))


def intra_sentence_similarity(x, valid=None):
  """Ethayarajh's (2019) intra-sentence similarity of each sentence, the mean cosine of its
  words' representations x_i with their mean s̄:

    IntraSim(s) = (1/n) Σ_i cos(x_i, s̄),   s̄ = (1/n) Σ_i x_i,

  over the n valid positions of x [batch..., T, d] (valid [batch..., T] bool, default all).
  Returns float64 [batch...]; 0 for a sentence with no valid position.
  """
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape[:-1]) if valid is None else np.asarray(valid, np.float64)
  count = m.sum(-1)
  mean = (x * m[..., None]).sum(-2) / np.maximum(count, 1)[..., None]
  cos = (_unit_rows(x) * _unit_rows(mean)[..., None, :]).sum(-1)
  return (cos * m).sum(-1) / np.maximum(count, 1)


def max_explainable_variance(x) -> float:
  """Ethayarajh's (2019) maximum explainable variance of a word's representations x [n, d]
  (its occurrence matrix, one row per context): the share of their (uncentred) second moment
  along the best single direction,

    MEV = σ_1² / Σ_i σ_i²,   σ_i the singular values of x,

  the most of the representations that any static embedding (one vector per word, scaled per
  context) can explain: 1 when every row is a multiple of one vector, 1/min(n, d) at least.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or not x.size:
    raise ValueError(f'x.shape={x.shape}; allowed: a non-empty [n, d] matrix')
  s2 = np.linalg.svd(x, compute_uv=False) ** 2
  return float(s2[0] / max(s2.sum(), 1e-300))
