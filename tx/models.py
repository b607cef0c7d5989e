"""Linen models: Encoder, Decoder, EncoderDecoder, DecoderLM, EncoderClassifier.

All share the hyper-parameters of `ModelHParams` (and `tx.layers.BlockHParams`),
so a config's `model` section maps straight onto any of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tx.layers import BlockHParams, DecoderBlock, EncoderBlock, hparams
from tx.masks import causal_mask, combine_masks, padding_mask, valid_from_tokens
from tx.posemb import AddPositionEmbs
from tx.validate import check_choice

POOLS = ('cls', 'mean')


def shift_right(tokens, bos_id: int):
  """Teacher forcing: decoder inputs [bos, y_0, ..., y_{T-2}] for targets [y_0, ..., y_{T-1}]."""
  bos = jnp.full(tokens.shape[:-1] + (1,), bos_id, tokens.dtype)
  return jnp.concatenate([bos, tokens[..., :-1]], axis=-1)


class ModelHParams(BlockHParams, kw_only=True):
  """Model-level hyper-parameters, on top of the blocks' `BlockHParams`.

  remat: recompute each block's activations in the backward pass instead of keeping
    them (`nn.remat`): less memory, about one more forward pass of compute; the same
    parameters, outputs and gradients.
  remat_policy: what a rematerialised block keeps from its forward pass (one of
    REMAT_POLICIES; only with remat=True): 'nothing' recomputes the whole block;
    'dots' keeps every matrix product's output and recomputes only the elementwise ops
    (LayerNorm, GELU, softmax, residuals); 'dots_no_batch' keeps the products without
    batch dimensions (the Q/K/V, output and MLP projections) and also recomputes the
    attention's q·kᵀ and weights·v, whose [B, H, T, T] operands are the large ones.
  scan_layers: run the blocks as one `nn.scan` over a single block whose parameters
    (and cache, and sown intermediates) are stacked on a leading axis of length
    num_layers, under the name 'blocks' instead of 'block_0' ... 'block_{N-1}'. The
    program holds one block instead of N, so deep models compile faster (on GPU; a
    step may run slower); convert checkpoints with `stack_layers` / `unstack_layers`.
  """
  num_layers: int = 6
  d_model: int = 512
  # 'learn' | 'sinusoidal' | 'sinusoidal_concat' | 'rope' | 'alibi' | 'none'; rope and alibi act
  # in the self-attention only (rotated q, k; a distance bias), never in the cross-attention.
  posemb: str = 'sinusoidal'
  scale_embeddings: bool = True  # token embeddings × √d_model (Vaswani); GPT-2, BERT: False.
  embedding_norm: bool = False  # a LayerNorm over the embedded inputs after the posemb (BERT).
  # A LayerNorm after the last block ('final_norm'): None = only with norm='pre' (ViT, GPT-2);
  # True also after a post-LN stack (torch.nn.Transformer's encoder.norm, decoder.norm).
  final_norm: bool | None = None
  remat: bool = False
  remat_policy: str = 'nothing'
  scan_layers: bool = False


def _block_args(model: ModelHParams) -> dict:
  return dict(hparams(model), rope=model.posemb == 'rope', alibi=model.posemb == 'alibi')


# jax.checkpoint policies by remat_policy: what the backward pass may keep instead of recompute.
REMAT_POLICIES = {'nothing': jax.checkpoint_policies.nothing_saveable,
                  'dots': jax.checkpoint_policies.dots_saveable,
                  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
STACKED = 'blocks'  # the scanned stack's name; unscanned blocks are 'block_0', 'block_1', ...


def _stack(model: ModelHParams, block: type, call, x, *args):
  """x through model.num_layers blocks of class `block`: x ← call(block_i, x, *args).

  `call` closes over the static `deterministic` flag; `args` (masks, memory) are the
  same for every layer. With remat each call is wrapped in `nn.remat` (keeping what
  model.remat_policy saves); with scan_layers the loop is one `nn.scan` (params,
  intermediates and cache stacked on axis 0, a fresh params/dropout key per layer, `args`
  broadcast to every step).
  """
  check_choice('remat_policy', model.remat_policy, tuple(REMAT_POLICIES))
  if model.remat_policy != 'nothing' and not model.remat:
    raise ValueError(f'remat_policy={model.remat_policy!r} needs remat=True (a policy says '
                     'what a rematerialised block keeps)')
  fn = (nn.remat(call, prevent_cse=not model.scan_layers,
                 policy=REMAT_POLICIES[model.remat_policy]) if model.remat else call)
  if not model.scan_layers:
    for i in range(model.num_layers):
      x = fn(block(**_block_args(model), name=f'block_{i}'), x, *args)
    return x
  scan = nn.scan(lambda mdl, carry, *a: (fn(mdl, carry, *a), None),
                 variable_axes={'params': 0, 'intermediates': 0, 'cache': 0},
                 split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                 length=model.num_layers)
  x, _ = scan(block(**_block_args(model), name=STACKED), x, *args)
  return x


def unstack_layers(tree):
  """A scanned model's variables → the unscanned layout: every {'blocks': stacked} becomes
  {'block_0': ..., 'block_{N-1}': ...}, slicing the leading axis (N = its length).

  Works on any variable collection (params, cache, intermediates); other keys keep
  their place and order.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == STACKED:
      leaves = jax.tree.leaves(value)
      n = leaves[0].shape[0] if leaves else 0
      out.update({f'block_{i}': jax.tree.map(lambda a, i=i: a[i], value) for i in range(n)})
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(tree):
  """An unscanned model's variables → the scan_layers=True layout: every run of
  {'block_0': ..., 'block_{N-1}': ...} becomes {'blocks': the N trees stacked on a new
  leading axis}, placed where 'block_0' was. The inverse of `unstack_layers`.
  """
  if not isinstance(tree, Mapping):
    return tree
  if 'block_0' not in tree:
    return {key: stack_layers(value) for key, value in tree.items()}
  n = 0
  while f'block_{n}' in tree:
    n += 1
  blocks = [tree[f'block_{i}'] for i in range(n)]
  out = {}
  for key, value in tree.items():
    if key == 'block_0':
      out[STACKED] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    elif not (key.startswith('block_') and key[6:].isdigit() and int(key[6:]) < n):
      out[key] = stack_layers(value)
  return out


def _embedding_norm(model: ModelHParams, x):
  """LN(x) over the embedded inputs with model.embedding_norm (BERT), else x."""
  if not model.embedding_norm:
    return x
  return nn.LayerNorm(epsilon=model.layer_norm_epsilon, dtype=model.dtype,
                      param_dtype=model.param_dtype, name='embedding_norm')(x)


def _final_norm(model: ModelHParams, x):
  """LN(x) after the last block where model.final_norm says so (default: pre-LN stacks)."""
  if not (model.norm == 'pre' if model.final_norm is None else model.final_norm):
    return x
  return nn.LayerNorm(epsilon=model.layer_norm_epsilon, dtype=model.dtype,
                      param_dtype=model.param_dtype, name='final_norm')(x)


class Encoder(ModelHParams):
  """N encoder blocks over embedded inputs x [batch..., T, d_model], after the posemb.

  A final LayerNorm closes the stack with norm='pre' (as in ViT), or as `final_norm` says.
  `mask` and `key_lengths` (keys j >= key_lengths are padding) reach every self-attention
  (`MultiHeadAttention`).
  """

  @nn.compact
  def __call__(self, x, mask=None, *, key_lengths=None, deterministic: bool = True):
    x = AddPositionEmbs(self.posemb, self.num_positions, param_dtype=self.param_dtype,
                        name='posemb')(x)
    x = _embedding_norm(self, x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    call = lambda block, x, mask, key_lengths: block(x, mask, key_lengths=key_lengths,
                                                     deterministic=deterministic)
    return _final_norm(self, _stack(self, EncoderBlock, call, x, mask, key_lengths))


class Decoder(ModelHParams):
  """N decoder blocks with causal self-attention, over embedded inputs x [batch..., T, d_model].

  `mask` (e.g. padding) is combined with the causal mask; with `memory`
  (the encoder output) each block also cross-attends under `cross_mask`.
  In decode mode the causal mask comes from the KV cache, and `mask` covers the whole cache.
  `positions` [batch..., T]: the tokens' positions, added by the posemb or, with rope, given
  to every self-attention.
  """

  @nn.compact
  def __call__(self, x, memory=None, *, mask=None, cross_mask=None, positions=None,
               deterministic: bool = True):
    rope = self.posemb == 'rope'
    x = AddPositionEmbs(self.posemb, self.num_positions, decode=self.decode,
                        param_dtype=self.param_dtype, name='posemb')(
                            x, None if rope else positions)
    x = _embedding_norm(self, x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    self_mask = mask if self.decode else combine_masks(mask, causal_mask(x.shape[-2]))
    call = lambda block, x, memory, self_mask, cross_mask, positions: block(
        x, memory, self_mask=self_mask, cross_mask=cross_mask, positions=positions,
        deterministic=deterministic)
    return _final_norm(self, _stack(self, DecoderBlock, call, x, memory, self_mask, cross_mask,
                                    positions if rope else None))


class TokenEmbedding(nn.Module):
  """Token embedding scaled by sqrt(d_model) (Vaswani et al.; `scale=False`: unscaled, as GPT-2
  and BERT), and the output logits.

  The table is initialised N(0, 1/d_model), so embeddings start at unit scale.
  With `tie`, logits = x Eᵀ reuse the table (Press & Wolf, 2017).
  """
  vocab_size: int
  d_model: int
  tie: bool = True
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32
  scale: bool = True

  def setup(self):
    self.embedding = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              embedding_init=nn.initializers.normal(self.d_model ** -0.5))
    if not self.tie:
      self.head = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, tokens):
    x = self.embedding(tokens)
    return x * jnp.sqrt(jnp.asarray(self.d_model, self.dtype)) if self.scale else x

  def logits(self, x):
    """[batch..., T, d_model] -> float32 logits [batch..., T, vocab_size]."""
    return (self.embedding.attend(x) if self.tie else self.head(x)).astype(jnp.float32)


class DecoderLM(ModelHParams, kw_only=True):
  """GPT-style language model: tokens [batch..., T] -> next-token logits [batch..., T, V].

  With decode=True, call once with the full-length input through `init` to size
  the cache, then feed tokens chunk by chunk with mutable=['cache'].

  valid: [batch..., T] bool, False at padding (keys there are masked out); positions:
    [batch..., T] the positions the posemb adds ('learn', the sinusoids) or rope rotates q
    and k by. A left-padded batch, as transformers' attention_mask and position_ids =
    max(cumsum(valid) − 1, 0) describe it, gives each row's real tokens the outputs they have
    alone. Outputs at padding are meaningless.
    With decode=True, `valid` covers the whole cache, [batch..., cache length], the same at
    every call (key slot j is attended to iff valid[j] and j ≤ the query's slot), and
    `positions` are those of this call's T tokens (default: the cache slots).
  """
  vocab_size: int
  tie_embeddings: bool = True

  @nn.compact
  def __call__(self, tokens, *, valid=None, positions=None, deterministic: bool = True):
    embed = TokenEmbedding(self.vocab_size, self.d_model, self.tie_embeddings, self.dtype,
                           self.param_dtype, self.scale_embeddings, name='embed')
    x = Decoder(**hparams(self, ModelHParams), name='decoder')(
        embed(tokens), mask=None if valid is None else padding_mask(valid), positions=positions,
        deterministic=deterministic)
    return embed.logits(x)


class EncoderDecoder(ModelHParams, kw_only=True):
  """The Transformer of Vaswani et al.: encode(source), then decode_logits(targets | memory).

  Source and target share one vocabulary and embedding (tied with the output
  layer unless tie_embeddings=False). Source tokens equal to `pad_id` are masked
  out as keys in the encoder and in the cross-attention; the decoder's
  self-attention is causal only (outputs at target pads are ignored by the loss).
  Train with `shift_right(targets, bos_id)` as the decoder input (teacher forcing).
  """
  vocab_size: int
  pad_id: int = 0
  tie_embeddings: bool = True

  def setup(self):
    self.embed = TokenEmbedding(self.vocab_size, self.d_model, self.tie_embeddings, self.dtype,
                                self.param_dtype, self.scale_embeddings)
    # The encoder never caches: decode mode only concerns the decoder's self-attention.
    self.encoder = Encoder(**dict(hparams(self, ModelHParams), decode=False))
    self.decoder = Decoder(**hparams(self, ModelHParams))

  def encode(self, source, *, deterministic: bool = True):
    """source [batch..., S] -> memory [batch..., S, d_model]."""
    mask = padding_mask(source, pad_id=self.pad_id)
    return self.encoder(self.embed(source), mask, deterministic=deterministic)

  def decode_logits(self, decoder_input, memory, source, *, deterministic: bool = True):
    """decoder_input [batch..., T] and memory -> logits [batch..., T, V].

    `source` gives the encoder padding for the cross-attention mask.
    """
    # The decoder's self-attention needs only the causal mask: trailing target pads are
    # later positions, and a padding mask would also hide <bos> when bos_id == pad_id.
    cross_mask = padding_mask(source, pad_id=self.pad_id)
    x = self.decoder(self.embed(decoder_input), memory, cross_mask=cross_mask,
                     deterministic=deterministic)
    return self.embed.logits(x)

  def __call__(self, source, decoder_input, *, deterministic: bool = True):
    memory = self.encode(source, deterministic=deterministic)
    return self.decode_logits(decoder_input, memory, source, deterministic=deterministic)


class EncoderClassifier(ModelHParams, kw_only=True):
  """BERT-style sequence classifier: encoder, then pooling, then a linear head.

  logits = W_head p + b_head, where p is the pooled vector (after the pooler, if any);
  num_classes=0 drops the head and returns p [batch..., d_model] itself (as timm's
  num_classes=0; with pooler=True this is a BertModel's pooler_output).

  Inputs are token ids [batch..., T] when `vocab_size` is set (tokens equal to
  `pad_id` are masked out), or feature vectors [batch..., T, F] otherwise
  (projected to d_model; e.g. MNIST-1D as 1-D patches).

  pool: 'cls' (a learned token prepended to the inputs), 'first' (the first input's output:
    BERT's [CLS] is a token of the input) or 'mean' (over the unmasked positions).
  num_token_types: with T > 0, `token_types` [batch..., T] in 0..T−1 (BERT's segments; default
    all 0) select an embedding added to the tokens' (name 'token_type_embed').
  pooler: the pooled vector goes through tanh(W h + b) before the head (BERT; name 'pooler').
  """
  num_classes: int
  vocab_size: int | None = None
  pad_id: int = 0
  pool: str = 'cls'
  num_token_types: int = 0
  pooler: bool = False

  @nn.compact
  def __call__(self, inputs, token_types=None, *, deterministic: bool = True):
    check_choice('pool', self.pool, POOLS + ('first',))
    if self.num_classes < 0:
      raise ValueError(f'num_classes={self.num_classes}; it must be >= 0 (0: no head, the '
                       'pooled vector is the output)')
    if token_types is not None and not self.num_token_types:
      raise ValueError('token_types given to a model with num_token_types=0')
    if self.vocab_size is None:
      x = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='input_projection')(inputs)
      valid = jnp.ones(x.shape[:-1], bool)
    else:
      x = TokenEmbedding(self.vocab_size, self.d_model, dtype=self.dtype,
                         param_dtype=self.param_dtype, scale=self.scale_embeddings,
                         name='embed')(inputs)
      valid = valid_from_tokens(inputs, self.pad_id)
    if self.num_token_types:
      types = jnp.zeros(x.shape[:-1], jnp.int32) if token_types is None else token_types
      x = x + nn.Embed(self.num_token_types, self.d_model, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='token_type_embed')(types)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (self.d_model,), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), x.shape[:-2] + (1, x.shape[-1])),
                           x], axis=-2)
      valid = jnp.concatenate([jnp.ones(valid.shape[:-1] + (1,), bool), valid], axis=-1)
    x = Encoder(**hparams(self, ModelHParams), name='encoder')(
        x, padding_mask(valid), deterministic=deterministic)
    if self.pool in ('cls', 'first'):
      pooled = x[..., 0, :]
    else:
      w = valid[..., None].astype(x.dtype)
      pooled = (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1)
    if self.pooler:
      pooled = jnp.tanh(nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name='pooler')(pooled))
    if not self.num_classes:
      return pooled
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name='head')(
        pooled).astype(jnp.float32)
