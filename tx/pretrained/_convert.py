"""What every loader shares: torch ↔ flax parameter layouts, and the check that a converted tree
is exactly the model's.

A mapping is a list of pairs (name in the file, path in tx's params, to_tx, from_tx): torch's
Linear stores W [out, in] and computes x Wᵀ + b, tx's kernels are [in, ...out], so a Linear's
kernel is Wᵀ (reshaped to [d, h, d/h] for a query, key or value, to [h, d/h, d] for an
attention output); a LayerNorm's weight is its scale.
"""

from __future__ import annotations

import importlib
import json
import os
import re

import jax
import numpy as np

SAME = (lambda x: x, lambda x: x)


def safetensors_module(module: str):
  """safetensors.<module>, or an ImportError saying how to install it."""
  try:
    return importlib.import_module(f'safetensors.{module}')
  except ImportError:
    raise ImportError("safetensors files need the safetensors package: pip install "
                      "'tx[pretrained]'") from None


def read_config(directory: str, expected: str) -> dict:
  """The parsed config.json of a checkpoint directory; ValueError saying what was `expected`
  there when it has none."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{directory!r} has no config.json: give {expected}')
  with open(path) as f:
    return json.load(f)


def read_safetensors(path: str) -> dict:
  """{name: float32 NumPy array} of a .safetensors file. Read through safetensors' flax reader,
  as NumPy has no bfloat16, with jax on the CPU: a checkpoint never lands on an accelerator."""
  load_file = safetensors_module('flax').load_file
  with jax.default_device(jax.devices('cpu')[0]):
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}


def flatten(tree) -> dict:
  """{path (a tuple of keys): leaf} of a nested params dict."""
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def expected_shapes(model, example) -> dict:
  """{path: shape} of the model's parameters for an example input."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)
  return {path: leaf.shape for path, leaf in flatten(shapes['params']).items()}


def unconvert(pairs, flat: dict, where: str) -> dict:
  """The inverse of `convert`: {name in the file: float32 array} from tx's flattened params by
  `pairs` (name, tx path, to_tx, from_tx); ValueError for a parameter `where` (the format) has
  no place for."""
  left = sorted(set(flat) - {path for _, path, *_ in pairs})
  if left:
    raise ValueError(f'params has {"/".join(left[0])}, which {where} has no place for')
  return {name: np.ascontiguousarray(from_tx(np.asarray(flat[path], np.float32)))
          for name, path, _, from_tx in pairs}


def convert(pairs, weights: dict, expected: dict, directory: str, ignored=()) -> dict:
  """The params tree from `weights` by `pairs` (hf name, tx path, to_tx, ...), checked to be
  exactly `expected`: every path filled with its shape, every weight used (or `ignored`)."""
  params, used = {}, set()
  for hf, path, to_tx, *_ in pairs:
    if path not in expected:
      raise ValueError(f'{directory!r}: {hf} has no place in the model ({"/".join(path)})')
    if hf not in weights:
      raise ValueError(f'{directory!r} has no {hf} (tx needs it for {"/".join(path)})')
    value = np.asarray(to_tx(weights[hf]), np.float32)
    if value.shape != expected[path]:
      raise ValueError(f'{hf} is {weights[hf].shape} in {directory!r}; tx needs '
                       f'{"/".join(path)} of {expected[path]}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    used.add(hf)
  missing = sorted(set(expected) - {path for _, path, *_ in pairs})
  if missing:  # a mapping that forgot a parameter: a bug in this module, said plainly.
    raise ValueError(f'no mapping fills {"/".join(missing[0])}')
  left = sorted(k for k in set(weights) - used if not any(re.search(i, k) for i in ignored))
  if left:
    raise ValueError(f'{directory!r} has {left[0]} (and {len(left) - 1} more) that tx does not '
                     'use: an architecture this loader does not support')
  return params


def dense(hf: str, path: tuple) -> list:
  """torch Linear `hf` (W [out, in], b) ↔ a flax Dense at `path` (kernel [in, out], bias)."""
  return [(f'{hf}.weight', (*path, 'kernel'), lambda w: w.T, lambda k: k.T),
          (f'{hf}.bias', (*path, 'bias'), *SAME)]


def heads_in(hf: str, path: tuple, d: int, h: int) -> list:
  """A torch Linear d → d ↔ tx's query/key/value DenseGeneral (kernel [d, h, d/h])."""
  return [(f'{hf}.weight', (*path, 'kernel'), lambda w: w.T.reshape(d, h, d // h),
           lambda k: k.reshape(d, d).T),
          (f'{hf}.bias', (*path, 'bias'), lambda b: b.reshape(h, d // h),
           lambda b: b.reshape(d))]


def heads_out(hf: str, path: tuple, d: int, h: int) -> list:
  """A torch Linear d → d ↔ tx's attention output DenseGeneral (kernel [h, d/h, d])."""
  return [(f'{hf}.weight', (*path, 'kernel'), lambda w: w.T.reshape(h, d // h, d),
           lambda k: k.reshape(d, d).T),
          (f'{hf}.bias', (*path, 'bias'), *SAME)]


def patch_embedding(name: str, path: tuple) -> list:
  """A torch patch-embedding Conv2d `name` (weight [D, C, p, p], bias) ↔ tx's PatchEmbedding at
  `path` (kernel [p, p, C, D], bias)."""
  return [(f'{name}.weight', (*path, 'kernel'), lambda w: w.transpose(2, 3, 1, 0),
           lambda k: k.transpose(3, 2, 0, 1)),
          (f'{name}.bias', (*path, 'bias'), *SAME)]


def fused_qkv(name: str, path: tuple, d: int, h: int, stacked_on: int) -> list:
  """One fused projection `name` (weight, bias) holding W_q, W_k, W_v one after the other along
  axis `stacked_on` of the weight (0: torch Linear [3d, d], as timm's qkv and torch's in_proj;
  1: GPT-2's Conv1D [d, 3d]) ↔ tx's query, key, value DenseGeneral (kernel [d, h, d/h]) at
  `path`. Loading only."""
  pairs = []
  for j, part in enumerate(('query', 'key', 'value')):
    rows = slice(j * d, (j + 1) * d)
    kernel = ((lambda w, rows=rows: w[rows].T.reshape(d, h, d // h)) if stacked_on == 0 else
              (lambda w, rows=rows: w[:, rows].reshape(d, h, d // h)))
    pairs += [(f'{name}.weight', (*path, part, 'kernel'), kernel),
              (f'{name}.bias', (*path, part, 'bias'),
               lambda b, rows=rows: b[rows].reshape(h, d // h))]
  return pairs


def norm(hf: str, path: tuple) -> list:
  """A torch LayerNorm (weight, bias) ↔ a flax LayerNorm (scale, bias)."""
  return [(f'{hf}.weight', (*path, 'scale'), *SAME), (f'{hf}.bias', (*path, 'bias'), *SAME)]


def attention(hf_qkv: str, hf_out: str, names: tuple, path: tuple, d: int, h: int) -> list:
  """Separate torch query, key, value Linears `hf_qkv`.<name> and output `hf_out` ↔ a tx
  MultiHeadAttention at `path`."""
  pairs = heads_out(hf_out, (*path, 'out'), d, h)
  for hf_name, tx_name in zip(names, ('query', 'key', 'value')):
    pairs += heads_in(f'{hf_qkv}.{hf_name}', (*path, tx_name), d, h)
  return pairs
