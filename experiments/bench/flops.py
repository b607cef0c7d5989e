"""Analytic FLOP counts of a train step, counting one multiply-add as 2 FLOPs.

Only matrix products are counted (the convention of Kaplan et al. 2020 and of MFU in the
PaLM paper); LayerNorm, softmax, activations, the loss and the optimizer update are left
out, which makes the count slightly low and MFU slightly pessimistic. Attention is counted
as computed: the full T×T score matrix, also where a causal mask zeroes half of it.

For one sequence of T tokens, model width d, FFN width F, and S memory tokens:

  self-attention   Q, K, V, O projections        4 · 2·T·d²  = 8·T·d²
                   scores Q Kᵀ and weights · V    2 · 2·T²·d  = 4·T²·d
  cross-attention  Q, O on T; K, V on S           4·T·d² + 4·S·d²
                   scores and weights · V         4·T·S·d
  feed-forward     d → F → d                      2 · 2·T·d·F = 4·T·d·F

  ViT              patch convolution 2·(T−1)·p²·C·d, encoder layers, head 2·d·classes
  EncoderDecoder   N encoder layers (T = S), N decoder layers with cross-attention,
                   tied output logits 2·T·d·V
  DecoderLM        N decoder layers without cross-attention, output logits 2·T·d·V

A train step is forward + backward = 3 × forward: the backward pass computes two products
(with respect to the activations and to the weights) for every product of the forward pass.
Rematerialisation recomputes the forward pass but is not counted (model FLOPs, not
hardware FLOPs), so it lowers MFU by design.
"""

from __future__ import annotations

from experiments.bench.specs import Spec


def forward_per_example(spec: Spec) -> int:
  """Forward-pass FLOPs for one example of `spec` (formulas in the module docstring)."""
  t, d, f, n = spec.tokens, spec.d_model, spec.d_ff, spec.num_layers
  encoder_layer = (8 * t * d * d + 4 * t * t * d) + 4 * t * d * f  # self-attention + FFN
  if spec.kind == 'ViT':
    patch = 2 * (t - 1) * spec.patch_size ** 2 * spec.channels * d
    return patch + n * encoder_layer + 2 * d * spec.num_classes
  logits = 2 * t * d * spec.vocab_size
  if spec.kind == 'EncoderDecoder':
    s = t  # memory tokens: the encoder's output
    decoder_layer = encoder_layer + (4 * t * d * d + 4 * s * d * d + 4 * t * s * d)  # + cross
    return n * (encoder_layer + decoder_layer) + logits
  return n * encoder_layer + logits  # DecoderLM: causal self-attention + FFN per layer


def train_step(spec: Spec) -> int:
  """FLOPs of one train step on spec.batch examples: 3 × forward."""
  return 3 * spec.batch * forward_per_example(spec)
