"""Pallas kernels for DeepSeek Sparse Attention: fused indexer top-k and
gathered sparse attention (fwd + bwd), each with its XLA reference beside it.

``interpret=None`` runs the Pallas interpreter on CPU and native kernels on
GPU (Triton) / TPU (Mosaic); see :mod:`kernels_pallas.backend`.
"""
from kernels_pallas.backend import detected_platform, resolve
from kernels_pallas.gathered_attention import (
    BlockSizes as GatheredAttentionBlockSizes,
    gathered_attention,
    gathered_attention_reference,
)
from kernels_pallas.topk import (
    BlockSizes as TopkBlockSizes,
    indexer_scores_reference,
    lightning_topk,
    lightning_topk_reference,
    select_topk_reference,
)

__all__ = [
    "GatheredAttentionBlockSizes",
    "TopkBlockSizes",
    "detected_platform",
    "gathered_attention",
    "gathered_attention_reference",
    "indexer_scores_reference",
    "lightning_topk",
    "lightning_topk_reference",
    "resolve",
    "select_topk_reference",
]
