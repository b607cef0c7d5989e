"""Statistics of attention layers: per-head entropy, distance and the position/content split,
the seq2seq alignment mass, and the ViT rollout and per-head maps over the patch grid."""

from __future__ import annotations

import numpy as np

import tx
from experiments.inspect.streams import Layer, Stream


def head_statistics(layer: Layer) -> dict:
  """Per head: entropy (nats), mean attention distance (self-attention; input units), and the
  relative-position / absolute-position / content shares, with the offset profile: (offset
  k − q in grid units, a (dy, dx) pair for image patches; [H] mean weight), offsets increasing.
  [CLS] is off the grid: it is left out of distances (rows renormalised) and of the split."""
  w, queries = layer.weights, layer.query.valid
  out = {'entropy': np.asarray(tx.attention_entropy(w, queries)).mean(0)}
  keep_q, keep_k = ~layer.query.special, ~layer.key.special
  if not layer.path.is_cross:
    plain = w[:, :, keep_q][:, :, :, keep_k]
    plain = plain / np.maximum(plain.sum(-1, keepdims=True), 1e-30)
    positions = (layer.query.grid[keep_q] + 0.5) * layer.query.unit
    out['mean_distance'] = np.asarray(tx.mean_attention_distance(
        plain, positions, queries[:, keep_q])).mean(0)
  diff = layer.key.grid[None, :, :] - layer.query.grid[:, None, :]  # [Tq, Tk, d]: k − q
  offsets, ids = np.unique(diff.reshape(-1, diff.shape[-1]), axis=0, return_inverse=True)
  valid = layer.valid() & keep_q[None, :, None] & keep_k[None, None, :]
  shares = tx.position_content_shares(w, ids.reshape(diff.shape[:2]), valid)
  out.update({k: shares[k] for k in ('relative', 'absolute', 'content')})
  out['offset_profile'] = [(tuple(int(v) for v in offsets[i]), m)
                           for i, m in shares['profile'].items()]
  return out


def alignment_mass(data_task: str, layers: list[Layer], lengths) -> dict:
  """copy / reverse: the mean head-averaged cross-attention each output position puts on the
  source token it copies (position j, or n − 1 − j in reverse; </s> on </s> at n), per
  cross-attention layer, over its examples (`lengths` may run longer); {} for other tasks or
  without lengths."""
  if data_task not in ('copy', 'reverse') or lengths is None:
    return {}
  out = {}
  for layer in [layer for layer in layers if layer.path.is_cross]:
    hits = [mean[j, (n - 1 - j if data_task == 'reverse' else j) if j < n else n]
            for mean, n in zip(layer.weights.mean(1), np.asarray(lengths)) for j in range(n + 1)]
    out[layer.path] = float(np.mean(hits))
  return out


def rollout_maps(layers: list[Layer], cls_pooled: bool) -> np.ndarray:
  """[N, rows, cols]: the attention rollout (tx.attention_rollout) over the patch grid of the
  output token: [CLS]'s row (`cls_pooled`), or the mean of the patch rows with mean pooling."""
  maps = np.asarray(tx.attention_rollout([layer.weights for layer in layers]))  # [N, T, T]
  return _output_row_on_grid(maps, layers[0].query, cls_pooled)


def output_token_maps(layer: Layer, cls_pooled: bool) -> np.ndarray:
  """[N, H, rows, cols]: each head's attention weights w[q*, k] from the output token q* to
  every patch k of the grid: [CLS]'s row (`cls_pooled`, as in rollout_maps; the weights on
  [CLS] and other tokens off the grid are left out, so a map sums to less than 1), or with
  mean pooling the mean of the P patch rows, (1/P) Σ_q w[q, k]."""
  return _output_row_on_grid(layer.weights, layer.query, cls_pooled)


def _output_row_on_grid(maps: np.ndarray, stream: Stream, cls_pooled: bool) -> np.ndarray:
  """[..., rows, cols] of maps [..., T, T]: the output token's row over the patch grid."""
  patches = ~stream.special
  rows = maps[..., 0, :] if cls_pooled else maps[..., patches, :].mean(-2)
  gh, gw = stream.grid[patches].max(0) + 1
  return rows[..., patches].reshape(*rows.shape[:-1], gh, gw)
