"""DeepSeek-V4's compressed attention layers: CSA and HCA (2026, sec. 2.3).

Both attend a sliding window of tokens plus compressed entries (groups of
`ratio` tokens pooled by a learned softmax gate, `sparse_attn.ops.
compressed`), with a per-head attention sink:

- `CSAAttention` (kind "csa"): overlapping groups (two series per token),
  a lightning indexer with its own compressor scores the entries and each
  query keeps its top-k. The indexer trains as DSA's does: "warmup" attends
  every visible entry and returns the dense KL of the indexer to the main
  attention over the entries; "sparse" attends the top-k and returns the
  sparse KL; "dense" attends every entry without a loss.
- `HCAAttention` (kind "hca"): non-overlapping groups of many tokens, no
  indexer, every visible entry attended (all modes alike).

The projections are the library's GQA ones (wq, wk, wv, wo), as for every
kind compared at equal budgets; an entry is a key (RoPE at its group's
first position) and, without RoPE, a value. DeepSeek-V4 also shares K = V
in one MQA head, de-rotates the output and groups its output projection:
those are projection choices, left out here (docs/dsa_variants.md).

Without a cache, x holds whole sequences from position 0 (the groups align
to absolute positions). The decode cache (`CompressedCache`) keeps each
token's K/V (the window), the pooled entries, and a ring of the compressor
inputs of the last few tokens (those of the groups still filling): a call
pools only the groups its tokens fall in (one group per decode step, from
its 2 * ratio tokens with overlap) and reads the other entries back, so
decoding attends exactly what the forward does without pooling the
context again.

The defaults are CPU-sized (CSA: ratio 4, window 4, top-k 8 entries;
HCA: ratio 16, window 4: the window is a quarter of CSA's entries, as in
the paper, so a matched key budget is mostly entries); the paper's are `ops.compressed.PAPER_*`
(ratios 4 and 128, window 128, 512 entries).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sparse_attn.nn.base import (
  AttentionLayer,
  Context,
  KVCache,
  counts_aux,
  write_rows,
)
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.nn.norm import RMSNorm
from sparse_attn.nn.params import param
from sparse_attn.ops import checks, masking
from sparse_attn.ops import compressed as comp
from sparse_attn.ops.pooling import mean_pool_blocks
from sparse_attn.ops.rope import apply_rope


@dataclasses.dataclass(frozen=True)
class HCAParams:
  """ratio: tokens per entry (m'); window: tokens of the sliding window
  (the query included); sinks: a learned sink logit per head."""

  ratio: int = 16
  window: int = 4
  sinks: bool = True

  def __post_init__(self):
    comp.check_compress_sizes(self.ratio, self.window)


@dataclasses.dataclass(frozen=True)
class CSAParams:
  """top_k: entries kept per query; ratio (m), window, sinks as in
  `HCAParams`; indexer_heads / indexer_dim / indexer_rope_dim: the
  indexer's HI, DI and RoPE dims (None: DI // 2); detach_indexer_input:
  the indexer reads a stop-gradient copy of x (its loss stays off the
  trunk, as in DSA)."""

  top_k: int = 8
  ratio: int = 4
  window: int = 4
  sinks: bool = True
  indexer_heads: int = 4
  indexer_dim: int = 32
  indexer_rope_dim: int | None = None
  detach_indexer_input: bool = True

  def __post_init__(self):
    comp.check_compress_sizes(self.ratio, self.window, self.top_k)
    checks.check_positive_int("indexer_heads", self.indexer_heads)
    checks.check_positive_int("indexer_dim", self.indexer_dim)
    rd = self.indexer_rope_dim
    if rd is not None and (rd % 2 or not 0 <= rd <= self.indexer_dim):
      raise ValueError(
        f"indexer_rope_dim must be even and in [0, indexer_dim="
        f"{self.indexer_dim}], got {rd}."
      )


class Compressor(nnx.Module):
  """x [B, T, E] -> per-token contents and gate logits [B, T, G, P, D];
  pooled, RMS-normalised entries [B, N, G, D] (eqs. 9-12 / 20-22)."""

  def __init__(
    self,
    embed_dim: int,
    num_kv_heads: int,
    series: int,
    head_dim: int,
    ratio: int,
    *,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
  ):
    shape = (embed_dim, num_kv_heads, series, head_dim)
    axes = ("embed", "kv_heads", "series", "head_dim")
    self.w_kv = param(rngs, shape, axes, param_dtype)
    self.w_gate = param(rngs, shape, axes, param_dtype)
    self.bias = param(
      rngs,
      (ratio, num_kv_heads, series, head_dim),
      ("group_offset", "kv_heads", "series", "head_dim"),
      param_dtype,
      nnx.initializers.zeros_init(),
    )
    self.norm = RMSNorm(head_dim, param_dtype=param_dtype, axis_name="head_dim")
    self.ratio, self.dtype = ratio, dtype

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x.astype(self.dtype)
    kv = jnp.einsum("bte,egpd->btgpd", x, self.w_kv[...].astype(self.dtype))
    gate = jnp.einsum("bte,egpd->btgpd", x, self.w_gate[...].astype(self.dtype))
    return kv, gate

  def entries(self, kv: jax.Array, gate: jax.Array) -> jax.Array:
    pooled = comp.pool_groups(kv, gate, self.bias[...], self.ratio)
    return self.norm(pooled)

  def span_entries(
    self, kv: jax.Array, gate: jax.Array, valid: jax.Array
  ) -> jax.Array:
    """The entries [B, count, G, D] of a `comp.group_span` of tokens
    (those `entries` would give for the same groups)."""
    return self.norm(
      comp.pool_span(kv, gate, valid, self.bias[...], self.ratio)
    )


class CompressedIndexer(nnx.Module):
  """CSA's lightning indexer: queries and head weights from x, keys from
  its own overlapping compressor at indexer_dim (eqs. 13-17)."""

  def __init__(
    self,
    embed_dim: int,
    p: CSAParams,
    *,
    rope_base: float,
    rope_scaling: Any,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
  ):
    hi, di = p.indexer_heads, p.indexer_dim
    self.wq = param(
      rngs,
      (embed_dim, hi, di),
      ("embed", "indexer_heads", "indexer_dim"),
      param_dtype,
    )
    self.w_weights = param(
      rngs, (embed_dim, hi), ("embed", "indexer_heads"), param_dtype
    )
    self.compressor = Compressor(
      embed_dim,
      1,
      2,
      di,
      p.ratio,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.num_heads, self.head_dim = hi, di
    self.rope_dim = (
      di // 2 if p.indexer_rope_dim is None else p.indexer_rope_dim
    )
    self.rope_base, self.rope_scaling, self.dtype = (
      rope_base,
      rope_scaling,
      dtype,
    )

  def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return apply_rope(
      x,
      positions,
      rope_dim=self.rope_dim,
      base=self.rope_base,
      scaling=self.rope_scaling,
    )

  def query(self, x: jax.Array, positions: jax.Array):
    """(q_idx [B, T, HI, DI] with RoPE, weights [B, T, HI] * HI^-.5 DI^-.5)."""
    x = x.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(self.dtype))
    w = jnp.einsum("bte,eh->bth", x, self.w_weights[...].astype(self.dtype))
    scale = (self.num_heads**-0.5) * (self.head_dim**-0.5)
    return self.rope(q, positions), w * scale


def entry_rope_positions(
  entries: jax.Array, ratio: int, first: Any = 0
) -> jax.Array:
  """int32[B, N]: the RoPE position of entries [B, N, ...] for the groups
  first[b] .. first[b] + N - 1 (each group's first token)."""
  groups = jnp.asarray(first, jnp.int32).reshape(-1, 1) + jnp.arange(
    entries.shape[1], dtype=jnp.int32
  )
  return jnp.broadcast_to(groups * ratio, entries.shape[:2])


@struct.dataclass
class CompressedCache:
  """K/V rows [B, S_max, G, D] (the window); the pooled, normalised entries
  c_entries [B, S_max // ratio + 1, G, D]; and a ring of the compressor
  inputs of the last R = P * ratio tokens, c_kv / c_gate [B, R, G, P, D]
  (position p in slot p % R), the tokens a group still filling and the
  group before it need; c_keys, the entries with RoPE (the keys; the
  entries themselves are the values) (+ the indexer's i_keys [B, S_max //
  ratio + 1, 1, DI], with RoPE, and ring i_kv / i_gate [B, 2 * ratio, 1,
  2, DI] for CSA).

  A call pools only the groups its tokens fall in (a group still filling
  is pooled from the tokens it has, invisible until complete, and pooled
  again when it is; the extra entry row takes a partial last group), so a
  decode step pools one group and reads the other entries back. RoPE is
  applied once, when an entry is written, not to every entry at every
  step. Only the
  tokens inside kv_lengths enter the ring (padding never overwrites a
  token a later group needs). The entries are stored in the cache dtype
  (a bf16 cache rounds them once more, after the norm).

  The ring holds the tokens just before where the row's last call ended,
  so each call must continue there (or restart the row at 0): rewinding a
  row to an earlier position (e.g. rejected speculative tokens) needs the
  compressor inputs the later tokens overwrote, and gives wrong entries.
  The Decoder always continues."""

  k: jax.Array
  v: jax.Array
  c_kv: jax.Array
  c_gate: jax.Array
  c_entries: jax.Array
  c_keys: jax.Array
  i_kv: jax.Array | None = None
  i_gate: jax.Array | None = None
  i_keys: jax.Array | None = None

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    **KVCache.axes,
    "c_kv": ("batch", "ring", "kv_heads", "series", "head_dim"),
    "c_gate": ("batch", "ring", "kv_heads", "series", "head_dim"),
    "c_entries": ("batch", "entries", "kv_heads", "head_dim"),
    "c_keys": ("batch", "entries", "kv_heads", "head_dim"),
    "i_kv": ("batch", "ring", "indexer_kv", "series", "indexer_dim"),
    "i_gate": ("batch", "ring", "indexer_kv", "series", "indexer_dim"),
    "i_keys": ("batch", "entries", "indexer_kv", "indexer_dim"),
  }


class CompressedAttention(AttentionLayer):
  """The shared body of CSA and HCA: GQA q/k/v + a compressor + sinks."""

  series: ClassVar[int] = 1

  def init_compressed(self, rngs: nnx.Rngs, param_dtype: Any) -> None:
    p = self.params
    self.compressor = Compressor(
      self.embed_dim,
      self.num_kv_heads,
      self.series,
      self.head_dim,
      p.ratio,
      dtype=self.dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.sinks = nnx.data(
      param(
        rngs,
        (self.num_heads,),
        ("heads",),
        param_dtype,
        nnx.initializers.zeros_init(),
      )
      if p.sinks
      else None
    )

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> CompressedCache:
    del index_dtype
    kv = super().init_cache(batch_size, max_len, dtype=dtype)
    dt = self.dtype if dtype is None else dtype
    ratio = self.params.ratio
    slots = max_len // ratio + 1
    ring = self.series * ratio
    shape = (batch_size, ring, self.num_kv_heads, self.series, self.head_dim)
    extra = {}
    indexer = getattr(self, "indexer", None)
    if indexer is not None:
      ishape = (batch_size, 2 * ratio, 1, 2, indexer.head_dim)
      extra = {
        "i_kv": jnp.zeros(ishape, dt),
        "i_gate": jnp.zeros(ishape, dt),
        "i_keys": jnp.zeros((batch_size, slots, 1, indexer.head_dim), dt),
      }
    entries = (batch_size, slots, self.num_kv_heads, self.head_dim)
    return CompressedCache(
      k=kv.k,
      v=kv.v,
      c_kv=jnp.zeros(shape, dt),
      c_gate=jnp.zeros(shape, dt),
      c_entries=jnp.zeros(entries, dt),
      c_keys=jnp.zeros(entries, dt),
      **extra,
    )

  def compressed_entries(
    self,
    compressor: Compressor,
    x: jax.Array,
    ctx: Context,
    name: str,
    rope: Any,
    *,
    values: bool = True,
  ) -> tuple[jax.Array, jax.Array | None, Any]:
    """(keys [B, N, G, D]: the entries of every complete group attention
    reads with rope(entries, positions) at each group's first position;
    the entries themselves (values), or None with values=False; the
    cache). Without a cache, x's own. With one, the groups this call's
    tokens fall in are pooled from x's compressor inputs and the ring's
    earlier tokens, RoPE'd once and written into the entry cache, and the
    view's N = view // ratio entries are read back: a step pools and
    rotates O(T + ratio) tokens, not O(view)."""
    kv, gate = compressor.project(x)
    ratio = compressor.ratio
    if not ctx.decoding:
      entries = compressor.entries(kv, gate)
      keys = rope(entries, entry_rope_positions(entries, ratio))
      return keys, entries if values else None, None
    cache = ctx.cache
    assert ctx.q_offset is not None and ctx.view is not None
    ring_kv, ring_gate = (
      getattr(cache, f"{name}_kv"),
      getattr(cache, f"{name}_gate"),
    )
    num_new = x.shape[1]
    start = jnp.asarray(ctx.q_offset, jnp.int32)
    # The first group a new token falls in, and every group the call can
    # complete: at most T // ratio + 1 (first + count <= S_max // ratio + 1,
    # the entry cache's rows).
    first = start // ratio
    # The row's tokens end here (padding past kv_lengths is no token).
    end = start + num_new
    if ctx.kv_lengths is not None:
      end = jnp.clip(jnp.asarray(ctx.kv_lengths, jnp.int32), start, end)
    t = comp.group_span(first, num_new // ratio + 1, ratio, kv.shape[3])
    new = compressor.span_entries(
      ring_rows(ring_kv, kv, start, t),
      ring_rows(ring_gate, gate, start, t),
      (t >= 0) & (t < end[:, None]),
    )
    n = ctx.view // ratio
    written = {
      f"{name}_kv": ring_write(ring_kv, kv, start, end),
      f"{name}_gate": ring_write(ring_gate, gate, start, end),
      f"{name}_keys": write_rows(
        getattr(cache, f"{name}_keys"),
        rope(new, entry_rope_positions(new, ratio, first)),
        first,
      ),
    }
    entries = None
    if values:
      written[f"{name}_entries"] = write_rows(
        getattr(cache, f"{name}_entries"), new, first
      )
      entries = written[f"{name}_entries"][:, :n].astype(new.dtype)
    keys = written[f"{name}_keys"][:, :n].astype(new.dtype)
    return keys, entries, cache.replace(**written)

  def main_entries(self, ctx: Context) -> tuple[jax.Array, jax.Array, Any]:
    """(ck with RoPE, cv [B, N, G, D], the cache with this call's
    compressor rows)."""
    ck, cv, cache = self.compressed_entries(
      self.compressor, ctx.x, ctx, "c", self.rope
    )
    assert cv is not None
    return ck, cv, cache

  def sink_logits(self) -> jax.Array | None:
    return None if self.sinks is None else self.sinks[...]

  def check_sequence(self, ctx: Context) -> None:
    if ctx.context_parallel is not None:
      raise ValueError(
        f"{type(self).__name__} pools groups of whole sequences: no "
        "context parallelism."
      )


class HCAAttention(CompressedAttention):
  """Heavily compressed attention: window + every visible entry + sinks."""

  series = 1

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    ratio: int = HCAParams.ratio,
    window: int = HCAParams.window,
    sinks: bool = HCAParams.sinks,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
    **kw: Any,
  ):
    self.params = HCAParams(ratio=ratio, window=window, sinks=sinks)
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      rngs=rngs,
      param_dtype=param_dtype,
      **kw,
    )
    self.init_compressed(rngs, param_dtype)

  def attend(self, q, k, v, ctx: Context):
    self.check_sequence(ctx)
    ck, cv, cache = self.main_entries(ctx)
    p = self.params
    o, counts = comp.compressed_attention(
      q,
      k,
      v,
      ck,
      cv,
      ratio=p.ratio,
      window=p.window,
      sinks=self.sink_logits(),
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
      return_counts=True,
    )
    aux = counts_aux(counts, ctx.positions, k.shape[1], ctx.kv_lengths)
    return o, aux, ctx.cache if cache is None else cache


class CSAAttention(CompressedAttention):
  """Compressed sparse attention: window + the indexer's top-k entries."""

  series = 2

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    top_k: int = CSAParams.top_k,
    ratio: int = CSAParams.ratio,
    window: int = CSAParams.window,
    sinks: bool = CSAParams.sinks,
    indexer_heads: int = CSAParams.indexer_heads,
    indexer_dim: int = CSAParams.indexer_dim,
    indexer_rope_dim: int | None = CSAParams.indexer_rope_dim,
    detach_indexer_input: bool = CSAParams.detach_indexer_input,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
    **kw: Any,
  ):
    self.params = p = CSAParams(
      top_k=top_k,
      ratio=ratio,
      window=window,
      sinks=sinks,
      indexer_heads=indexer_heads,
      indexer_dim=indexer_dim,
      indexer_rope_dim=indexer_rope_dim,
      detach_indexer_input=detach_indexer_input,
    )
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      rngs=rngs,
      param_dtype=param_dtype,
      **kw,
    )
    self.init_compressed(rngs, param_dtype)
    self.indexer = CompressedIndexer(
      embed_dim,
      p,
      rope_base=self.rope_base,
      rope_scaling=self.rope_scaling,
      dtype=self.dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def index(self, ctx: Context, cache: Any):
    """(q_idx [B, T, HI, DI], k_idx [B, N, DI], weights [B, T, HI], cache)."""
    x = ctx.x
    if self.params.detach_indexer_input:
      x = jax.lax.stop_gradient(x)
    q_idx, w = self.indexer.query(x, ctx.positions)
    keys, _, written = self.compressed_entries(
      self.indexer.compressor,
      x,
      ctx if cache is None else _with(ctx, cache),
      "i",
      self.indexer.rope,
      values=False,
    )
    return q_idx, keys[:, :, 0], w, written

  def attend(self, q, k, v, ctx: Context):
    self.check_sequence(ctx)
    ck, cv, cache = self.main_entries(ctx)
    q_idx, k_idx, w, cache2 = self.index(ctx, cache)
    cache = cache2 if cache2 is not None else cache
    p = self.params
    train = not ctx.decoding
    indices = None
    if ctx.mode == "sparse":
      q_pos = ctx.positions
      indices = comp.compressed_topk(
        q_idx,
        k_idx,
        w,
        p.top_k,
        ratio=p.ratio,
        q_pos=q_pos,
        kv_lengths=ctx.kv_lengths,
      )
    o, counts = comp.compressed_attention(
      q,
      k,
      v,
      ck,
      cv,
      ratio=p.ratio,
      window=p.window,
      indices=indices,
      sinks=self.sink_logits(),
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
      return_counts=True,
    )
    kl = None
    if train and ctx.mode != "dense":
      kl = comp.compressed_indexer_kl(
        q,
        ck,
        q_idx,
        k_idx,
        w,
        ratio=p.ratio,
        indices=indices,
        q_offset=ctx.q_offset,
        kv_lengths=ctx.kv_lengths,
        num_tokens=k.shape[1],
      )
    aux = counts_aux(counts, ctx.positions, k.shape[1], ctx.kv_lengths, kl)
    return o, aux, ctx.cache if cache is None else cache


def ring_rows(
  ring: jax.Array, new: jax.Array, start: jax.Array, positions: jax.Array
) -> jax.Array:
  """The rows [B, L, ...] at positions int32[B, L]: from new [B, T, ...]
  (positions start[b] .. start[b] + T - 1), else from the ring [B, R, ...]
  (position p in slot p % R; the caller reads only the R positions before
  start, or rows it masks)."""
  num_new, size = new.shape[1], ring.shape[1]
  tail = (1,) * (new.ndim - 2)
  rel = positions - start[:, None]
  from_new = ((rel >= 0) & (rel < num_new)).reshape(rel.shape + tail)
  got_new = jnp.take_along_axis(
    new, jnp.clip(rel, 0, num_new - 1).reshape(rel.shape + tail), axis=1
  )
  got_ring = jnp.take_along_axis(
    ring, jnp.mod(positions, size).reshape(rel.shape + tail), axis=1
  )
  return jnp.where(from_new, got_new.astype(ring.dtype), got_ring)


def ring_write(
  ring: jax.Array, new: jax.Array, start: jax.Array, end: jax.Array
) -> jax.Array:
  """The ring [B, R, ...] after the tokens start[b] .. end[b] - 1 of new
  [B, T, ...] (at positions start[b] + i): each slot takes the last of
  them that maps to it, or keeps its row (a gather, no colliding writes)."""
  num_new, size = new.shape[1], ring.shape[1]
  tail = (1,) * (new.ndim - 2)
  slot = jnp.arange(size, dtype=jnp.int32)
  # The last position below end in each slot.
  last = end[:, None] - 1 - jnp.mod(end[:, None] - 1 - slot, size)
  take = (last >= start[:, None]).reshape(last.shape + tail)
  rows = jnp.clip(last - start[:, None], 0, num_new - 1).reshape(
    last.shape + tail
  )
  got = jnp.take_along_axis(new, rows, axis=1).astype(ring.dtype)
  return jnp.where(take, got, ring)


def _with(ctx: Context, cache: Any) -> Context:
  return dataclasses.replace(ctx, cache=cache)


def hca_keys_per_query(seq_len: int, params: HCAParams, **_: Any) -> np.ndarray:
  return comp.compressed_keys_per_query(
    seq_len, ratio=params.ratio, window=params.window
  )


def csa_keys_per_query(seq_len: int, params: CSAParams, **_: Any) -> np.ndarray:
  return comp.compressed_keys_per_query(
    seq_len, ratio=params.ratio, window=params.window, top_k=params.top_k
  )


def mean_entries(x: jax.Array, ratio: int) -> jax.Array:
  """[B, S, ...] -> [B, S // ratio, ...]: each complete group's mean (the
  pure forms' parameter-free compressor when no entries are given)."""
  return mean_pool_blocks(x, ratio)[:, : x.shape[1] // ratio]


def hca_attention(
  q, k, v, params: HCAParams, *, ck=None, cv=None, **kw: Any
) -> jax.Array:
  """HCA's pure form: `compressed_attention` over every visible entry of
  ck / cv [B, N, G, D] (the layer's compressor output; None: the groups of
  k / v mean-pooled, for benchmarks and pure-function use)."""
  return _pure_form(q, k, v, params, ck, cv, None, **kw)


def csa_attention(
  q,
  k,
  v,
  params: CSAParams,
  *,
  q_idx,
  k_idx,
  weights,
  ck=None,
  cv=None,
  q_offset=None,
  kv_lengths=None,
  **kw: Any,
) -> jax.Array:
  """CSA's pure form: the top params.top_k entries by index score (q_idx
  [B, T, HI, DI], entry keys k_idx [B, N, DI], weights [B, T, HI]), then
  `compressed_attention` over them and the window. Without ck / cv, the
  entries are k / v's groups mean-pooled and k_idx is per token
  ([B, S, DI], pooled the same way)."""
  if ck is None or cv is None:
    k_idx = mean_entries(k_idx, params.ratio)
  batch, num_q = q.shape[:2]
  indices = comp.compressed_topk(
    q_idx,
    k_idx,
    weights,
    params.top_k,
    ratio=params.ratio,
    q_pos=masking.query_positions(batch, num_q, k.shape[1], q_offset),
    kv_lengths=kv_lengths,
  )
  return _pure_form(
    q,
    k,
    v,
    params,
    ck,
    cv,
    indices,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    **kw,
  )


def _pure_form(
  q,
  k,
  v,
  params,
  ck,
  cv,
  indices,
  *,
  sinks=None,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  **_: Any,
) -> jax.Array:
  if ck is None or cv is None:
    ck, cv = mean_entries(k, params.ratio), mean_entries(v, params.ratio)
  return comp.compressed_attention(
    q,
    k,
    v,
    ck,
    cv,
    ratio=params.ratio,
    window=params.window,
    indices=indices,
    sinks=sinks,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
  )


V4_REFERENCE = "DeepSeek-V4, 2026 (sec. 2.3)"

HCA_KIND = AttentionKind(
  name="hca",
  layer=HCAAttention,
  params=HCAParams,
  keys_per_query=hca_keys_per_query,
  attention=hca_attention,
  budget_param="ratio",
  reference=f"{V4_REFERENCE}: heavily compressed attention",
)

CSA_KIND = AttentionKind(
  name="csa",
  layer=CSAAttention,
  params=CSAParams,
  keys_per_query=csa_keys_per_query,
  attention=csa_attention,
  budget_param="top_k",
  has_indexer=True,
  config_fields=("top_k", "indexer_heads", "indexer_dim", "indexer_rope_dim"),
  reference=f"{V4_REFERENCE}: compressed sparse attention",
)
