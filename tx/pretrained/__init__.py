"""Pretrained weights in and out of tx. Each loader returns (model, params): a tx Linen module
and float32 NumPy params, checked to be exactly the model's tree.

- `tx.pretrained.hf`: Hugging Face ViT, GPT-2 and BERT directories (config.json and
  model.safetensors, as the Hub and save_pretrained write them), and ViT back to that layout.

The loaders import safetensors only when called: `import tx` does not need it
(`pip install 'tx[pretrained]'`).
"""

from tx.pretrained.hf import (bert_from_hf_config, gpt2_from_hf_config, load_hf_bert,
                              load_hf_gpt2, load_hf_vit, save_hf_vit, vit_from_hf_config)
