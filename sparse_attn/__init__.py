"""sparse-attn: fine-grained sparse attention (DeepSeek Sparse Attention) in JAX.

Pure functions (jit/vmap/grad compatible) are the core API; Flax NNX layers
wrap them; a small Transformer, two-stage training and decoding are built on
those. The layers of the package, bottom up:

  kernels_pallas          Pallas kernels, one file per backend + reference
  sparse_attn.ops         pure functions of DSA (no Flax)
  sparse_attn.kinds       pure functions of the other sparse families
  sparse_attn.nn          NNX layers (one per kind, caches their own)
  sparse_attn.registry    the attention kinds: one spec each
  sparse_attn.models      the Transformer (one forward: training + decoding)
  sparse_attn.training    two-stage training loop (optax, orbax, a mesh)
  sparse_attn.inference   host-side decoding driver

Shapes and causality conventions: docs/api.md.
"""

from sparse_attn import compat as _compat

_compat.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
from sparse_attn import hf, registry
from sparse_attn.budgets import key_budget, keys_per_query, match_budget
from sparse_attn.config import Config, ModelConfig, TrainConfig
from sparse_attn.models import Cache, Transformer, build_model
from sparse_attn.nn import (
  AttentionKind,
  AttentionLayer,
  DenseAttention,
  DSAAttention,
  FixedAttention,
  LightningIndexer,
  LSHAttention,
  MoBAAttention,
  NSAAttention,
  SlidingWindowAttention,
  StridedAttention,
)
from sparse_attn.ops.attention import (
  dense_attention,
  dsa_attention,
  gathered_attention,
  gathered_attention_reference,
)
from sparse_attn.ops.hisa import hisa_attention, hisa_topk
from sparse_attn.ops.indexer import indexer_scores, lightning_topk, select_topk
from sparse_attn.ops.losses import dense_indexer_kl, lm_loss, sparse_indexer_kl
from sparse_attn.ops.rope import apply_rope
from sparse_attn.registry import (
  ATTENTION_KINDS,
  BASELINE_LAYERS,
  register_attention,
)

# Aliases named after the DeepSeek training stages.
indexer_warmup_kl = dense_indexer_kl
indexer_sparse_kl = sparse_indexer_kl

__version__ = "0.2.0"

__all__ = [
  "ATTENTION_KINDS",
  "AttentionKind",
  "AttentionLayer",
  "BASELINE_LAYERS",
  "Cache",
  "Config",
  "DSAAttention",
  "DenseAttention",
  "FixedAttention",
  "LSHAttention",
  "LightningIndexer",
  "MoBAAttention",
  "ModelConfig",
  "NSAAttention",
  "SlidingWindowAttention",
  "StridedAttention",
  "TrainConfig",
  "Transformer",
  "apply_rope",
  "build_model",
  "dense_attention",
  "dense_indexer_kl",
  "dsa_attention",
  "gathered_attention",
  "gathered_attention_reference",
  "hf",
  "hisa_attention",
  "hisa_topk",
  "indexer_scores",
  "indexer_sparse_kl",
  "indexer_warmup_kl",
  "key_budget",
  "keys_per_query",
  "lightning_topk",
  "lm_loss",
  "match_budget",
  "register_attention",
  "registry",
  "select_topk",
  "sparse_indexer_kl",
]
