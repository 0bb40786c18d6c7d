"""Top-k reuse across layers (IndexCache, Bai et al. 2026): which layers own an indexer.

IndexCache splits a DSA model's layers into "full" layers, which keep
their lightning indexer, and "shared" layers, which have none and attend
the keys the nearest preceding full layer selected (the first DSA layer is
always full). A shared layer saves the indexer's O(L^2) scoring and, when
decoding, its indexer key cache.

The pattern is a DSA parameter (`DSAParams.indexer_layers` /
`indexer_every`); each layer reads its role from its own layer index.
`SharedIndex` is what a full layer hands the layers after it through the
model: its selection and its indexer's outputs, so that shared layers can
add their term of the multi-layer distillation loss (the paper's
training-aware variant: the full layer's indexer learns from the attention
of every layer it serves, the KL of each averaged over the group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import struct

from sparse_attn.ops import checks


@struct.dataclass
class SharedIndex:
  """A full layer's selection and indexer outputs, for the layers it serves.

  indices int32[B, T, K] (the -1 sentinel as `lightning_topk`; None in the
  dense stages, where nothing is selected); q_idx [B, T, HI, DI], k_idx
  [B, S, DI], weights [B, T, HI]: its indexer's inputs of the same call.
  """

  q_idx: jax.Array
  k_idx: jax.Array
  weights: jax.Array
  indices: jax.Array | None = None


def check_index_share_params(p: Any) -> None:
  """Validates indexer_layers / indexer_every of a DSA params dataclass."""
  checks.check_positive_int("indexer_every", p.indexer_every)
  layers = p.indexer_layers
  if layers is None:
    return
  if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
    raise ValueError(
      f"indexer_layers must be a tuple of layer indices or None, got "
      f"{layers!r}."
    )
  for i in layers:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
      raise ValueError(
        f"indexer_layers must hold layer indices >= 0, got {list(layers)}."
      )


def owns_indexer(p: Any, layer_index: int) -> bool:
  """Whether the DSA layer at `layer_index` is a full layer under params p."""
  if p.indexer_layers is not None:
    return layer_index in tuple(p.indexer_layers)
  return layer_index % p.indexer_every == 0


def every_n_pattern(num_layers: int, every: int) -> tuple[int, ...]:
  """The fixed pattern: one full layer every `every` layers, from layer 0."""
  checks.check_positive_int("num_layers", num_layers)
  checks.check_positive_int("every", every)
  return tuple(range(0, num_layers, every))


def group_sizes(roles: Sequence[str | None]) -> list[int]:
  """Per layer, the size of its sharing group (the full layer + the shared
  layers it serves); 0 for layers that take no part (role None).

  roles[i]: "full", "shared" or None (a layer without DSA). ValueError if
  a shared layer has no full layer before it.
  """
  owner: list[int | None] = []
  last = None
  for i, role in enumerate(roles):
    if role == "full":
      last = i
    elif role == "shared" and last is None:
      raise ValueError(
        f"layer {i} reuses the top-k of an earlier full DSA layer, but "
        f"none precedes it (roles {list(roles)}): make the first DSA layer "
        f"full (indexer_layers must include it)."
      )
    owner.append(last if role is not None else None)
  count = {o: owner.count(o) for o in set(owner) if o is not None}
  return [0 if o is None else count[o] for o in owner]
