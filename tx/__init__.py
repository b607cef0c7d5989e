"""tx: transformers for studying attention, in JAX and Flax Linen.

Pure functions (no state): attention with an explicit temperature β, masks,
alignment scores and positional encodings. Linen modules: multi-head attention,
encoder/decoder blocks and stacks, encoder-decoder, decoder-only LM, encoder
classifier and ViT. Decoding: greedy, sampling and beam search over a KV cache. Pretrained
weights: `tx.pretrained` (Hugging Face ViT, GPT-2 and BERT checkpoints). Importing tx has no side
effects and imports only jax, flax and numpy.
"""

from tx.analysis import (AttentionLayer, attention_entropy, attention_rollout, attention_weights,
                         mean_attention_distance, position_content_shares)
from tx.attention import attend, dot_product_attention, fused_is_valid, softargmax_beta
from tx.decoding import Beams, Decoded, beam_search, generate, length_penalty
from tx.layers import (DecoderBlock, EncoderBlock, FeedForward, MultiHeadAttention)
from tx.masks import (causal_mask, combine_masks, local_window_mask, padding_mask,
                      valid_from_lengths, valid_from_tokens)
from tx.models import (REMAT_POLICIES, Decoder, DecoderLM, Encoder, EncoderClassifier,
                       EncoderDecoder, TokenEmbedding, shift_right, stack_layers, unstack_layers)
from tx.posemb import (AddPositionEmbs, alibi_bias, alibi_slopes, resample_posemb, rope,
                       sincos_2d, sinusoidal_1d, sinusoidal_concat_1d)
from tx.scores import (AdditiveScore, GeneralScore, LocationScore, cosine_score, dot_score,
                       scaled_dot_score)
from tx import pretrained
from tx.vit import VARIANTS as VIT_VARIANTS
from tx.vit import ViT, vit_variant

__version__ = '0.1.0'
