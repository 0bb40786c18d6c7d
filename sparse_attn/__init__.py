"""sparse-attn: fine-grained sparse attention (DeepSeek Sparse Attention) in JAX.

Pure functions (jit/vmap/grad compatible) are the core API; Flax NNX layers
wrap them. See DESIGN.md for the shape and causality conventions.
"""

from sparse_attn.attention import (dense_attention, dsa_attention,
                                   gathered_attention,
                                   gathered_attention_reference)
from sparse_attn.indexer import (LightningIndexer, indexer_scores,
                                 lightning_topk, select_topk)
from sparse_attn.layers import AttentionLayer, DenseAttention, DSAAttention
from sparse_attn.losses import dense_indexer_kl, lm_loss, sparse_indexer_kl
from sparse_attn.rope import apply_rope
from sparse_attn.baseline_layers import (BASELINE_LAYERS, key_budget,
                                         keys_per_query, match_budget)
from sparse_attn.config import Config, ModelConfig, TrainConfig
from sparse_attn.model import (ATTENTION_KINDS, Transformer, build_model,
                               register_attention)

# Aliases named after the DeepSeek training stages.
indexer_warmup_kl = dense_indexer_kl
indexer_sparse_kl = sparse_indexer_kl

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KINDS",
    "AttentionLayer",
    "BASELINE_LAYERS",
    "Config",
    "ModelConfig",
    "TrainConfig",
    "Transformer",
    "build_model",
    "key_budget",
    "keys_per_query",
    "match_budget",
    "register_attention",
    "DSAAttention",
    "DenseAttention",
    "LightningIndexer",
    "apply_rope",
    "dense_attention",
    "dense_indexer_kl",
    "dsa_attention",
    "gathered_attention",
    "gathered_attention_reference",
    "indexer_scores",
    "indexer_sparse_kl",
    "indexer_warmup_kl",
    "lightning_topk",
    "lm_loss",
    "select_topk",
    "sparse_indexer_kl",
]
