"""Pallas kernels for DeepSeek Sparse Attention: fused indexer top-k and
gathered sparse attention (fwd + bwd).

Each kernel is a package with one module per backend and its XLA reference:
``topk/{reference,tpu,gpu_triton}.py``,
``gathered_attention/{reference,tpu,gpu_triton}.py``; the package's
``__init__`` holds its ``BlockSizes``, the public function and the
``BACKENDS`` table (formulation -> module).

``interpret=None`` runs the Pallas interpreter on CPU and native kernels on
GPU (Triton) / TPU (Mosaic); see :mod:`kernels_pallas.backend`.
"""

from kernels_pallas.backend import detected_platform, resolve
from kernels_pallas.gathered_attention import (
  BlockSizes as GatheredAttentionBlockSizes,
)
from kernels_pallas.gathered_attention import (
  gathered_attention,
  gathered_attention_reference,
)
from kernels_pallas.topk import (
  BlockSizes as TopkBlockSizes,
)
from kernels_pallas.topk import (
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
