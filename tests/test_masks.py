"""Masks against their definitions, written as explicit loops."""

import numpy as np
import pytest

import tx


def test_causal_mask():
  m = np.asarray(tx.causal_mask(4))
  assert m.shape == (4, 4)
  assert all(m[i, j] == (j <= i) for i in range(4) for j in range(4))
  # Queries that extend a 3-token prefix: query i sits at position i + 3.
  m = np.asarray(tx.causal_mask(2, 5))
  assert all(m[i, j] == (j <= i + 3) for i in range(2) for j in range(5))


@pytest.mark.parametrize('window', [0, 1, 3, (2, 0), (0, 1)])
def test_local_window_mask(window):
  left, right = (window, window) if isinstance(window, int) else window
  m = np.asarray(tx.local_window_mask(7, window))
  assert all(m[i, j] == (i - left <= j <= i + right) for i in range(7) for j in range(7))


def test_padding_masks_for_self_and_cross_attention():
  src_valid = tx.valid_from_lengths(np.array([2, 4]), 4)
  np.testing.assert_array_equal(src_valid, [[1, 1, 0, 0], [1, 1, 1, 1]])
  tgt = np.array([[5, 6, 0], [7, 0, 0]])
  tgt_valid = tx.valid_from_tokens(tgt, pad_id=0)
  np.testing.assert_array_equal(tgt_valid, [[1, 1, 0], [1, 0, 0]])
  self_mask = np.asarray(tx.padding_mask(src_valid, src_valid))  # [B, 1, Tq, Tk]
  cross = np.asarray(tx.padding_mask(src_valid, tgt_valid))  # decoder queries x encoder keys.
  assert self_mask.shape == (2, 1, 4, 4) and cross.shape == (2, 1, 3, 4)
  for b in range(2):
    for i in range(3):
      for j in range(4):
        assert cross[b, 0, i, j] == (bool(tgt_valid[b, i]) and bool(src_valid[b, j]))
  # The same masks straight from token ids or from lengths.
  np.testing.assert_array_equal(tx.padding_mask(tgt, pad_id=0), tx.padding_mask(tgt_valid))
  np.testing.assert_array_equal(
      tx.padding_mask(np.array([2, 4]), np.array([2, 1]), kv_len=4, q_len=3),
      tx.padding_mask(src_valid, tgt_valid))
  keys_only = np.asarray(tx.padding_mask(src_valid))
  assert keys_only.shape == (2, 1, 1, 4)
  np.testing.assert_array_equal(keys_only[:, 0, 0], src_valid)


def test_combine_masks():
  c, w = tx.causal_mask(5), tx.local_window_mask(5, 1)
  np.testing.assert_array_equal(tx.combine_masks(c, None, w), np.asarray(c) & np.asarray(w))
  assert tx.combine_masks(None, None) is None
  pad = tx.padding_mask(tx.valid_from_lengths(np.array([3, 5]), 5))
  assert tx.combine_masks(c, pad).shape == (2, 1, 5, 5)
