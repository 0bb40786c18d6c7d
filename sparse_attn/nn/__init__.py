"""Flax NNX layers: one attention layer per kind, the indexer, norms, MLP.

Every attention layer subclasses `AttentionLayer` and shares one call,

    y, aux = layer(x, positions=None, kv_lengths=None, mode="sparse")
    y, aux, cache = layer(x, positions=..., kv_lengths=..., cache=cache)

with the cache its own (`layer.init_cache(batch_size, max_len)`).
"""

from sparse_attn.nn.base import (
  MODES,
  AttentionLayer,
  Context,
  KVCache,
  counts_aux,
  default_positions,
  dense_key_counts,
  write_rows,
)
from sparse_attn.nn.compressed import (
  CompressedCache,
  CSAAttention,
  CSAParams,
  HCAAttention,
  HCAParams,
)
from sparse_attn.nn.dense import DenseAttention, DenseParams
from sparse_attn.nn.dsa import DSAAttention, DSACache, DSAParams
from sparse_attn.nn.hisa import HISAAttention, HISAParams
from sparse_attn.nn.index_share import SharedIndex
from sparse_attn.nn.indexcache import IndexCacheAttention, IndexCacheParams
from sparse_attn.nn.indexer import LightningIndexer
from sparse_attn.nn.kind import AttentionKind, pure_form
from sparse_attn.nn.lsh import LSHAttention, LSHCache, LSHParams
from sparse_attn.nn.mla import MLAAttention, MLACache, MLAParams
from sparse_attn.nn.mla_dsa import MLADSAAttention, MLADSACache, MLADSAParams
from sparse_attn.nn.mlp import SwiGLU
from sparse_attn.nn.moba import MoBAAttention, MoBAParams
from sparse_attn.nn.moe import MoE, MoEParams
from sparse_attn.nn.norm import RMSNorm
from sparse_attn.nn.nsa import NSAAttention, NSAParams
from sparse_attn.nn.params import param, tag
from sparse_attn.nn.sliding_window import (
  SlidingWindowAttention,
  SlidingWindowParams,
)
from sparse_attn.nn.sparse_transformer import (
  FixedAttention,
  FixedParams,
  StridedAttention,
  StridedParams,
)

__all__ = [
  "MODES",
  "AttentionKind",
  "AttentionLayer",
  "CSAAttention",
  "CSAParams",
  "CompressedCache",
  "Context",
  "DSAAttention",
  "HCAAttention",
  "HCAParams",
  "DSACache",
  "DSAParams",
  "DenseAttention",
  "DenseParams",
  "FixedAttention",
  "FixedParams",
  "HISAAttention",
  "HISAParams",
  "IndexCacheAttention",
  "IndexCacheParams",
  "KVCache",
  "LSHAttention",
  "LSHCache",
  "LSHParams",
  "LightningIndexer",
  "MLAAttention",
  "MLACache",
  "MLADSAAttention",
  "MLADSACache",
  "MLADSAParams",
  "MLAParams",
  "MoBAAttention",
  "MoBAParams",
  "MoE",
  "MoEParams",
  "NSAAttention",
  "NSAParams",
  "RMSNorm",
  "SlidingWindowAttention",
  "SharedIndex",
  "SlidingWindowParams",
  "StridedAttention",
  "StridedParams",
  "SwiGLU",
  "counts_aux",
  "default_positions",
  "dense_key_counts",
  "param",
  "pure_form",
  "tag",
  "write_rows",
]
