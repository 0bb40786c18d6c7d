"""Fused lightning-indexer scores + top-k selection in Pallas.

I[b,t,s] = sum_j w[b,t,j] * relu(q_idx[b,t,j] . k_idx[b,s])  for visible s
(s <= q_offset[b] + t and s < kv_lengths[b]), -inf otherwise. The kernel
returns the indices of the K largest visible scores (int32[B,T,K]); slots
beyond the number of visible keys hold -1. Ties: among equal scores the
more recent key (larger index) wins, and a row lists its keys by descending
score, the more recent first among equals, on both formulations and the
reference (the selection rule of sparse_attn's select_topk).

Layout of the package:
* ``reference.py``: :func:`indexer_scores_reference`,
  :func:`select_topk_reference`, :func:`lightning_topk_reference` and the
  input checks.
* ``tpu.py``: one Mosaic kernel, scores kept in VMEM, top-k by iterative max
  extraction. ``gpu_triton.py``: a Triton kernel for score tiles of a chunk
  of queries, then XLA's lax.top_k. Found through :data:`BACKENDS`.
* this module: :class:`BlockSizes` and the public :func:`lightning_topk`.

A formulation module provides ``DEFAULTS`` (its BlockSizes defaults),
``fill_defaults(bs)``, ``check_block_sizes(bs)`` and
``topk(q_idx, k_idx, weights, q_off, kv_len, K, *, bs, interpret)``.
"""

from __future__ import annotations

import dataclasses

import jax

from kernels_pallas import backend as bk_
from kernels_pallas.topk.reference import (
  check_inputs,
  indexer_scores_reference,
  lightning_topk_reference,
  select_topk_reference,
)

__all__ = [
  "BACKENDS",
  "BlockSizes",
  "backend_module",
  "indexer_scores_reference",
  "lightning_topk",
  "lightning_topk_reference",
  "select_topk_reference",
]

# Formulation -> module of this package; a new backend is one more entry.
BACKENDS = {"tpu": "tpu", "gpu": "gpu_triton"}


def backend_module(platform: str):
  """The module implementing formulation ``platform`` (a key of BACKENDS)."""
  return bk_.backend_module(__name__, BACKENDS, platform)


@dataclasses.dataclass(frozen=True)
class BlockSizes(bk_.PositiveSizes):
  """Tiling of the top-k kernels; None = the platform default.

  block_t: queries per tile (TPU: multiple of 8, default 8; GPU: power of two
    >= 16, default 16).
  block_s: keys per score tile (TPU: multiple of 128, default 128; GPU: power
    of two >= 16, default 64).
  gpu_chunk_t: queries per score chunk on GPU (bounds memory; default 256).
  num_warps / num_stages: Triton launch parameters (default 4 / 2).

  `get_default(platform, q_idx, k_idx, weights, k)` gives every field for a
  platform and problem shape; `with_defaults` fills only the None fields of
  an instance. Plain dicts of these fields are accepted wherever a BlockSizes
  is (model configs are JSON).
  """

  block_t: int | None = None
  block_s: int | None = None
  gpu_chunk_t: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  @classmethod
  def get_default(
    cls, platform: str, q_idx, k_idx, weights, k: int
  ) -> BlockSizes:
    """Every field for formulation ``platform`` ("tpu" | "gpu") at this shape.

    The defaults do not depend on the shape today; the arguments (arrays or
    ShapeDtypeStructs, as passed to :func:`lightning_topk`) keep the
    signature that of the gathered-attention BlockSizes.
    """
    return cls().with_defaults(platform, q_idx, k_idx, weights, k)

  def with_defaults(
    self, platform: str, q_idx, k_idx, weights, k: int
  ) -> BlockSizes:
    """Copy with the None fields resolved for ``platform`` and this shape."""
    del q_idx, k_idx, weights, k
    return backend_module(platform).fill_defaults(self)

  def validate(self, platform: str) -> None:
    """Raises ValueError if these sizes (None fields: defaults) do not suit ``platform``."""
    mod = backend_module(platform)
    mod.check_block_sizes(mod.fill_defaults(self))


def lightning_topk(
  q_idx,
  k_idx,
  weights,
  k: int,
  *,
  q_offset=None,
  kv_lengths=None,
  block_sizes: BlockSizes | dict | None = None,
  interpret: bool | None = None,
  platform: str | None = None,
):
  """Fused indexer scores + top-k. Returns int32[B, T, k] (-1 past the visible keys).

  Args:
    q_idx: [B, T, HI, DI]; k_idx: [B, S, DI] (same float dtype); weights: [B, T, HI].
    k: number of keys to select (>= 1; may exceed the visible count).
    q_offset: int or int32[B]; query i sits at q_offset + i (default S - T).
    kv_lengths: int32[B] or None; keys >= kv_lengths[b] are padding.
    block_sizes: :class:`BlockSizes` or a dict of its fields; None fields take
      the platform defaults (:meth:`BlockSizes.get_default`).
    interpret: None -> interpret on CPU.
    platform: formulation, a key of :data:`BACKENDS` ("tpu" | "gpu"); None ->
      from the default backend.
  """
  check_inputs(q_idx, k_idx, weights, k)
  block_sizes = bk_.coerce_block_sizes(BlockSizes, block_sizes, "block_sizes")
  platform, interpret = bk_.resolve(interpret, platform, BACKENDS)
  mod = backend_module(platform)
  bs = (block_sizes or BlockSizes()).with_defaults(
    platform, q_idx, k_idx, weights, k
  )
  mod.check_block_sizes(bs)
  B, T = q_idx.shape[:2]
  S = k_idx.shape[1]
  q_off, kv_len = bk_.normalize_positions(
    "lightning_topk", q_offset, kv_lengths, B, T, S
  )
  q_idx = jax.lax.stop_gradient(q_idx)
  k_idx = jax.lax.stop_gradient(k_idx)
  weights = jax.lax.stop_gradient(weights)
  return mod.topk(
    q_idx, k_idx, weights, q_off, kv_len, k, bs=bs, interpret=interpret
  )
