"""Subprocess body: context-parallel attention on 8 CPU devices == one device.

Run by tests/test_context_parallel.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts.

On meshes (data, fsdp, tensor, context) = (1,1,1,8), (2,1,1,4), (1,2,2,2),
with the sequence sharded over context in the zigzag layout (and the
contiguous one on (2,1,1,4))
(only context manual in shard_map; the batch stays sharded over data x fsdp
by XLA), every `sparse_attn.ops.context_parallel` function must give what
its unsharded op gives on the natural-order sequence:

* the top-k selection exactly (random scores, and inputs full of exact ties);
* fetch_rows (-1, out-of-range and duplicate indices) and its gradient;
* DSA attention, both strategies: outputs and gradients w.r.t. q, k, v;
* dense attention, ring and all-gather: outputs and gradients;
* the dense and sparse indexer KLs: values and gradients w.r.t. the indexer
  inputs (q_idx, k_idx, weights);
* the Pallas kernels (interpret mode) inside the context shard_map.

f32 throughout; tolerance 2e-5 absolute + relative (observed differences are
float reassociation, ~1e-6). Prints one line per mesh and "OK context
parallel" at the end.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sparse_attn import sharding as shd  # noqa: E402
from sparse_attn.ops import attention as att  # noqa: E402
from sparse_attn.ops import context_layout as cl  # noqa: E402
from sparse_attn.ops import context_parallel as cp  # noqa: E402
from sparse_attn.ops import indexer as ix  # noqa: E402
from sparse_attn.ops import losses  # noqa: E402

assert jax.device_count() == 8, jax.devices()

MESHES = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)]
B, S, H, G, D, DV, HI, DI, K = 2, 48, 4, 2, 8, 16, 2, 8, 5
TOL = 2e-5
AXIS = shd.CONTEXT_AXIS


def inputs(seed=0, ties=False):
  ks = jax.random.split(jax.random.key(seed), 6)
  n = jax.random.normal
  x = dict(
    q=n(ks[0], (B, S, H, D)),
    k=n(ks[1], (B, S, G, D)),
    v=n(ks[2], (B, S, G, DV)),
    qi=n(ks[3], (B, S, HI, DI)),
    ki=n(ks[4], (B, S, DI)),
    w=n(ks[5], (B, S, HI)),
  )
  if ties:  # integer-valued indexer inputs, unit weights: many equal scores
    x["qi"] = jnp.round(x["qi"])
    x["ki"] = jnp.round(x["ki"])
    x["w"] = jnp.ones_like(x["w"])
  return x


def check(name, got, want):
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL, err_msg=name
  )


class Ctx:
  """shard_map over the context axis for one mesh and layout."""

  def __init__(self, mesh, layout):
    self.mesh, self.layout = mesh, layout
    self.c = mesh.shape[AXIS]
    self.seq = NamedSharding(mesh, P(shd.BATCH_AXES, AXIS))

  def lay(self, x):
    return jax.device_put(cl.to_layout(x, self.c, self.layout), self.seq)

  def nat(self, x):
    return cl.from_layout(x, self.c, self.layout)

  def run(self, fn, n_seq, scalar=False):
    """fn(*per_shard) as a global function of n_seq sequence arrays."""
    spec = P(None, AXIS)
    return jax.shard_map(
      fn,
      mesh=self.mesh,
      in_specs=(spec,) * n_seq,
      out_specs=P() if scalar else spec,
      axis_names={AXIS},
      check_vma=False,
    )


def grads(fn, args, argnums):
  return jax.jit(jax.grad(fn, argnums))(*args)


def run_mesh(mesh_shape, layout):
  mesh = shd.make_mesh(mesh_shape)
  c = Ctx(mesh, layout)
  x = inputs()
  L = {n: c.lay(a) for n, a in x.items()}
  with jax.set_mesh(mesh):
    # -- top-k: exact, random and tie-heavy inputs
    for ties in (False, True):
      xt = inputs(1, ties) if ties else x
      want = ix.select_topk(ix.indexer_scores(xt["qi"], xt["ki"], xt["w"]), K)
      f = c.run(
        lambda a, b, w: cp.context_topk(
          a, b, w, K, axis_name=AXIS, layout=layout
        ),
        3,
      )
      got = c.nat(jax.jit(f)(*(c.lay(xt[n]) for n in ("qi", "ki", "w"))))
      np.testing.assert_array_equal(
        np.asarray(got), np.asarray(want), err_msg=f"topk ties={ties}"
      )
    idx = ix.lightning_topk(x["qi"], x["ki"], x["w"], K)
    L["idx"] = c.lay(idx)

    # -- fetch_rows: -1, out of range, duplicates
    odd = idx.at[:, :, 0].set(-1).at[:, :, 1].set(S + 3)
    odd = odd.at[:, :, 2].set(odd[:, :, 3])
    safe = jnp.where((odd >= 0) & (odd < S), odd, 0)
    want = jnp.where(
      ((odd >= 0) & (odd < S))[..., None, None],
      att.gather_rows(x["v"], safe),
      0,
    )
    f = c.run(lambda v, i: cp.fetch_rows(v, i, AXIS, layout), 2)
    check("fetch", c.nat(jax.jit(f)(L["v"], c.lay(odd))), want)
    cot = jax.random.normal(jax.random.key(9), want.shape)
    gw = jax.grad(
      lambda v: jnp.sum(
        jnp.where(
          ((odd >= 0) & (odd < S))[..., None, None], att.gather_rows(v, safe), 0
        )
        * cot
      )
    )(x["v"])
    gg = grads(lambda v: jnp.sum(f(v, c.lay(odd)) * c.lay(cot)), (L["v"],), 0)
    check("fetch grad", c.nat(gg), gw)

    # -- DSA attention, both strategies
    def dsa_ref(q, k, v):
      return att.dsa_attention(q, k, v, x["qi"], x["ki"], x["w"], top_k=K)

    want = dsa_ref(x["q"], x["k"], x["v"])
    gw = jax.grad(lambda *a: jnp.sum(dsa_ref(*a) ** 2), (0, 1, 2))(
      x["q"], x["k"], x["v"]
    )
    rest = (L["qi"], L["ki"], L["w"])
    qkv = (L["q"], L["k"], L["v"])
    for strategy in cp.STRATEGIES:
      f = c.run(
        lambda q, k, v, a, b, w, s=strategy: cp.context_dsa_attention(
          q, k, v, a, b, w, top_k=K, strategy=s, axis_name=AXIS, layout=layout
        ),
        6,
      )
      check(f"dsa {strategy}", c.nat(jax.jit(f)(*qkv, *rest)), want)
      g = grads(lambda *a, f=f: jnp.sum(f(*a, *rest) ** 2), qkv, (0, 1, 2))
      for n, a, b in zip("qkv", g, gw):
        check(f"dsa {strategy} d{n}", c.nat(a), b)

    # -- dense attention, ring and all-gather
    want = att.dense_attention(x["q"], x["k"], x["v"])
    gw = jax.grad(lambda *a: jnp.sum(att.dense_attention(*a) ** 2), (0, 1, 2))(
      x["q"], x["k"], x["v"]
    )
    for strategy in cp.DENSE_STRATEGIES:
      f = c.run(
        lambda q, k, v, s=strategy: cp.context_dense_attention(
          q, k, v, strategy=s, axis_name=AXIS, layout=layout
        ),
        3,
      )
      qkv = (L["q"], L["k"], L["v"])
      check(f"dense {strategy}", c.nat(jax.jit(f)(*qkv)), want)
      g = grads(lambda *a, f=f: jnp.sum(f(*a) ** 2), qkv, (0, 1, 2))
      for n, a, b in zip("qkv", g, gw):
        check(f"dense {strategy} d{n}", c.nat(a), b)

    # -- the indexer KLs: values and gradients w.r.t. the indexer inputs
    ind = (L["qi"], L["ki"], L["w"])
    want = losses.dense_indexer_kl(x["q"], x["k"], x["qi"], x["ki"], x["w"])
    gw = jax.grad(
      lambda a, b, w: losses.dense_indexer_kl(x["q"], x["k"], a, b, w),
      (0, 1, 2),
    )(x["qi"], x["ki"], x["w"])
    f = c.run(
      lambda q, k, a, b, w: cp.context_dense_indexer_kl(
        q, k, a, b, w, axis_name=AXIS, layout=layout
      ),
      5,
      scalar=True,
    )
    check("dense kl", jax.jit(f)(L["q"], L["k"], *ind), want)
    g = grads(lambda *a: f(L["q"], L["k"], *a), ind, (0, 1, 2))
    for n, a, b in zip(("q_idx", "k_idx", "w"), g, gw):
      check(f"dense kl d{n}", c.nat(a), b)
    want = losses.sparse_indexer_kl(
      x["q"], x["k"], x["qi"], x["ki"], x["w"], idx
    )
    gw = jax.grad(
      lambda a, b, w: losses.sparse_indexer_kl(x["q"], x["k"], a, b, w, idx),
      (0, 1, 2),
    )(x["qi"], x["ki"], x["w"])
    for strategy in cp.STRATEGIES:
      f = c.run(
        lambda q, k, a, b, w, i, s=strategy: cp.context_sparse_indexer_kl(
          q, k, a, b, w, i, strategy=s, axis_name=AXIS, layout=layout
        ),
        6,
        scalar=True,
      )
      check(
        f"sparse kl {strategy}",
        jax.jit(f)(L["q"], L["k"], *ind, L["idx"]),
        want,
      )
      g = grads(lambda *a, f=f: f(L["q"], L["k"], *a, L["idx"]), ind, (0, 1, 2))
      for n, a, b in zip(("q_idx", "k_idx", "w"), g, gw):
        check(f"sparse kl {strategy} d{n}", c.nat(a), b)


def run_pallas(mesh_shape):
  """The kernels inside the context shard_map give the XLA result."""
  mesh = shd.make_mesh(mesh_shape)
  c = Ctx(mesh, "zigzag")
  x = inputs(2)
  L = {n: c.lay(a) for n, a in x.items()}
  args = [L[n] for n in ("q", "k", "v", "qi", "ki", "w")]
  with jax.set_mesh(mesh):
    for strategy in cp.STRATEGIES:
      out = {}
      for impl in ("xla", "pallas"):
        f = c.run(
          lambda q, k, v, a, b, w, i=impl, s=strategy: cp.context_dsa_attention(
            q,
            k,
            v,
            a,
            b,
            w,
            top_k=K,
            axis_name=AXIS,
            strategy=s,
            implementation=i,
          ),
          6,
        )
        out[impl] = (
          jax.jit(f)(*args),
          grads(
            lambda *a, f=f: jnp.sum(f(*a, *args[3:]) ** 2), args[:3], (0, 1, 2)
          ),
        )
      check(f"pallas {strategy}", out["pallas"][0], out["xla"][0])
      for n, a, b in zip("qkv", out["pallas"][1], out["xla"][1]):
        check(f"pallas {strategy} d{n}", a, b)


t0 = time.perf_counter()
# The contiguous layout differs only in its positions: one mesh covers it.
RUNS = [(m, "zigzag") for m in MESHES] + [((2, 1, 1, 4), "contiguous")]
for mesh_shape, layout in RUNS:
  t1 = time.perf_counter()
  run_mesh(mesh_shape, layout)
  print(
    f"mesh {mesh_shape} {layout}: ok in {time.perf_counter() - t1:.1f} s",
    flush=True,
  )
t1 = time.perf_counter()
run_pallas((2, 1, 1, 4))
print(
  f"pallas kernels in the context shard_map: ok in "
  f"{time.perf_counter() - t1:.1f} s",
  flush=True,
)
print(f"OK context parallel ({time.perf_counter() - t0:.0f} s)")
