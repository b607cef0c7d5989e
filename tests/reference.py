"""Independent float64 NumPy references for the math under test."""

import numpy as np


def attention(q, k, v, mask=None, bias=None, beta=None):
  """softargmax_β(q·k + bias) v with masked keys removed; all-masked rows give 0.

  q [..., Tq, H, D], k [..., Tk, H, D], v [..., Tk, H, Dv]; returns (out, weights).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if beta is None:
    beta = 1.0 / np.sqrt(q.shape[-1])
  beta = np.asarray(beta, np.float64)
  if beta.ndim == 1:
    beta = beta[:, None, None]
  logits = beta * np.einsum('...qhd,...khd->...hqk', q, k)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  shape = logits.shape
  mask = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), shape)
  logits = np.where(mask, logits, -np.inf)
  row_max = np.max(np.where(mask, logits, -np.inf), axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(mask, np.exp(logits - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  w = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
  return np.einsum('...hqk,...khd->...qhd', w, v), w


def sinusoid(length, d_model, base=10000.0):
  """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d)), by loops."""
  pe = np.zeros((length, d_model))
  for pos in range(length):
    for j in range(d_model):
      i2 = j - (j % 2)  # the even index 2i of the pair.
      angle = pos / base ** (i2 / d_model)
      pe[pos, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
  return pe


def rope(x, positions, base=10000.0):
  """Rotates each pair (x_2i, x_2i+1) by the 2x2 matrix R(p / base^(2i/D)). x [T, H, D]."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  d = x.shape[-1]
  for t, p in enumerate(positions):
    for i in range(d // 2):
      theta = p / base ** (2 * i / d)
      rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
      out[t, :, 2 * i:2 * i + 2] = x[t, :, 2 * i:2 * i + 2] @ rot.T
  return out
