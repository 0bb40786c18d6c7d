"""Subprocess body: Pallas kernels (interpret mode) under every 8-device mesh.

Run by tests/test_sharded_kernels.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts.

For each head layout, the public functions with implementation="pallas"
under `jax.set_mesh(mesh)` must give what implementation="xla" gives with no
mesh: outputs and gradients w.r.t. q, k, v of dsa_attention and of
gathered_attention (arbitrary indices: -1, out of range, duplicates), and the
selection of lightning_topk (as sets: the order within a row is unspecified).
The batch differs per layout so that the meshes cover every kind of split
(see SPLITS below): heads over tensor, batch over one axis, over several,
over an axis it only takes as a fallback, and replication (the gradient trap:
shard_map's transpose with replicated operands).

The XLA paths that pair query chunks in causal self-attention (dense
attention, the dense KL, the top-k; `chunking.map_causal_pairs`) must give
under each mesh what they give with no mesh, values and gradients.

Prints one line per mesh and "OK sharded pallas == xla" at the end.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import sharding as shd  # noqa: E402
from sparse_attn.ops import kernel_sharding  # noqa: E402

assert jax.device_count() == 8, jax.devices()

MESHES = [(2, 1, 4), (1, 1, 8), (4, 1, 2), (2, 2, 2), (1, 8, 1)]
# name: (B, H, G)
LAYOUTS = {"gqa": (2, 8, 2), "mqa": (4, 8, 1), "g3": (8, 6, 3)}
T = S = 16
D, DV, HI, DI, K = 8, 16, 2, 8, 4
# What plan_axes must choose (mesh -> layout -> (batch axes, heads axes)).
SPLITS = {
  (2, 1, 4): {
    "gqa": (("data",), ()),
    "mqa": (("data",), ()),
    "g3": (("data", "tensor"), ()),
  },
  (1, 1, 8): {"gqa": ((), ()), "mqa": ((), ()), "g3": (("tensor",), ())},
  (4, 1, 2): {
    "gqa": ((), ("tensor",)),
    "mqa": (("data",), ()),
    "g3": (("data", "tensor"), ()),
  },
  (2, 2, 2): {
    "gqa": (("data",), ("tensor",)),
    "mqa": (("data", "fsdp"), ()),
    "g3": (("data", "fsdp", "tensor"), ()),
  },
  (1, 8, 1): {"gqa": ((), ()), "mqa": ((), ()), "g3": (("fsdp",), ())},
}


def make_inputs(seed, B, H, G):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x = dict(q=mk(B, T, H, D), k=mk(B, S, G, D), v=mk(B, S, G, DV))
  # Positive indexer inputs: no relu zeros, hence no tied scores, so both
  # implementations select the same set and the gradients are comparable.
  x.update(
    qi=jnp.abs(mk(B, T, HI, DI)),
    ki=jnp.abs(mk(B, S, DI)),
    w=jnp.abs(mk(B, T, HI)),
  )
  # Integer-valued indexer inputs: exact ties everywhere (relu zeros, few
  # distinct values), for the tie rule of the selection (order included).
  ints = lambda *s: jnp.asarray(rng.integers(-1, 2, s), jnp.float32)
  x.update(
    qi_t=ints(B, T, HI, DI), ki_t=ints(B, S, DI), w_t=jnp.ones((B, T, HI))
  )
  x["cot"] = mk(B, T, H, DV)
  x["kv"] = jnp.asarray(rng.integers(S // 2, S + 1, B), jnp.int32)
  x["off"] = jnp.asarray(rng.integers(0, 3, B), jnp.int32)
  # -1, out-of-range (S) and duplicated indices for the direct call.
  x["idx"] = (
    jnp.asarray(rng.integers(-1, S + 1, (B, T, K + 2)), jnp.int32)
    .at[:, 0, :2]
    .set(3)
  )
  return x


def run_all(x, impl):
  """Everything compared, in one jitted program per mesh."""

  def dsa_loss(q, k, v):
    out = sa.dsa_attention(
      q,
      k,
      v,
      x["qi"],
      x["ki"],
      x["w"],
      top_k=K,
      kv_lengths=x["kv"],
      implementation=impl,
    )
    return jnp.sum(out * x["cot"]), out

  def ga_loss(q, k, v):
    out = sa.gathered_attention(q, k, v, x["idx"], implementation=impl)
    return jnp.sum(out * x["cot"]), out

  def f(q, k, v):
    dsa_grads, dsa_out = jax.grad(dsa_loss, (0, 1, 2), has_aux=True)(q, k, v)
    ga_grads, ga_out = jax.grad(ga_loss, (0, 1, 2), has_aux=True)(q, k, v)
    sel = sa.lightning_topk(
      x["qi"],
      x["ki"],
      x["w"],
      K,
      q_offset=x["off"],
      kv_lengths=x["kv"],
      implementation=impl,
    )
    sel_ties = sa.lightning_topk(
      x["qi_t"],
      x["ki_t"],
      x["w_t"],
      K,
      q_offset=x["off"],
      kv_lengths=x["kv"],
      implementation=impl,
    )
    return dict(
      sel_ties=sel_ties,
      dsa_out=dsa_out,
      dsa_grads=dsa_grads,
      ga_out=ga_out,
      ga_grads=ga_grads,
      sel=sel,
    )

  return f


def causal_pairs(x):
  """The XLA paths that pair query chunks (T == S, q_offset None, T past
  one chunk of 4 queries): dense attention, the dense KL and the top-k,
  values and gradients."""
  chunk = 4

  def attention_loss(q, k, v):
    out = sa.dense_attention(q, k, v, kv_lengths=x["kv"], query_chunk=chunk)
    return jnp.sum(out * x["cot"]), out

  def kl(qi, ki, w, q, k):
    return sa.dense_indexer_kl(
      q, k, qi, ki, w, kv_lengths=x["kv"], query_chunk=chunk
    )

  def f(q, k, v, qi, ki, w):
    grads, out = jax.grad(attention_loss, (0, 1, 2), has_aux=True)(q, k, v)
    loss, kl_grads = jax.value_and_grad(kl, (0, 1, 2))(qi, ki, w, q, k)
    sel = sa.lightning_topk(
      x["qi_t"], x["ki_t"], x["w_t"], K, kv_lengths=x["kv"], query_chunk=chunk
    )
    return dict(out=out, grads=grads, kl=loss, kl_grads=kl_grads, sel_ties=sel)

  return f


def check_pairs(name, got, want):
  np.testing.assert_array_equal(
    np.asarray(got["sel_ties"]), np.asarray(want["sel_ties"]), err_msg=name
  )
  for n in ("out", "grads", "kl", "kl_grads"):
    for a, b in zip(jax.tree.leaves(got[n]), jax.tree.leaves(want[n])):
      np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} pairs {n}"
      )


def check(name, got, want):
  np.testing.assert_array_equal(
    np.sort(np.asarray(got["sel"]), -1),
    np.sort(np.asarray(want["sel"]), -1),
    err_msg=f"{name} topk",
  )
  # The tie rule fixes the selection exactly, order included.
  np.testing.assert_array_equal(
    np.asarray(got["sel_ties"]),
    np.asarray(want["sel_ties"]),
    err_msg=f"{name} topk with ties",
  )
  for key in ("dsa", "ga"):
    np.testing.assert_allclose(
      got[f"{key}_out"],
      want[f"{key}_out"],
      rtol=1e-5,
      atol=1e-5,
      err_msg=f"{name} {key} out",
    )
    for n, a, b in zip("qkv", got[f"{key}_grads"], want[f"{key}_grads"]):
      np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} {key} d{n}"
      )


def main():
  t0 = time.perf_counter()
  inputs = {
    n: make_inputs(i, *layout) for i, (n, layout) in enumerate(LAYOUTS.items())
  }
  want = {
    n: jax.jit(run_all(x, "xla"))(x["q"], x["k"], x["v"])
    for n, x in inputs.items()
  }
  pair_args = lambda x, put_heads, put_batch: (
    *(put_heads(x[a]) for a in "qkv"),
    *(put_batch(x[a]) for a in ("qi", "ki", "w")),
  )
  same = lambda a: a
  want_pairs = {
    n: jax.jit(causal_pairs(x))(*pair_args(x, same, same))
    for n, x in inputs.items()
  }
  for mesh_shape in MESHES:
    t1 = time.perf_counter()
    mesh = shd.make_mesh(mesh_shape)
    for n, (B, H, G) in LAYOUTS.items():
      plan = kernel_sharding.plan_axes(mesh, {"batch": [B], "heads": [H, G]})
      assert (plan["batch"], plan["heads"]) == SPLITS[mesh_shape][n], (
        mesh_shape,
        n,
        plan,
      )
    # Inputs laid out as the model lays out activations (batch over data,
    # heads over tensor where they divide): the kernel call reshards them.
    place = lambda a, mesh=mesh: jax.device_put(
      a,
      NamedSharding(
        mesh, shd.logical_to_spec(("batch", None, "heads", None), a.shape, mesh)
      ),
    )
    with jax.set_mesh(mesh):
      f = jax.jit(
        lambda xs: {n: run_all(x, "pallas")(*xs[n]) for n, x in inputs.items()}
      )
      got = f({n: tuple(place(x[a]) for a in "qkv") for n, x in inputs.items()})
      # The XLA selection under the mesh too (GSPMD partitions it), its
      # inputs split over the batch as the model's activations are.
      by_batch = lambda a, mesh=mesh: jax.device_put(
        a,
        NamedSharding(
          mesh,
          shd.logical_to_spec(
            ("batch",) + (None,) * (a.ndim - 1), a.shape, mesh
          ),
        ),
      )
      ties = jax.jit(
        lambda xs: {
          n: sa.lightning_topk(
            *xs[n],
            K,
            q_offset=x["off"],
            kv_lengths=x["kv"],
            implementation="xla",
          )
          for n, x in inputs.items()
        }
      )(
        {
          n: tuple(by_batch(x[a]) for a in ("qi_t", "ki_t", "w_t"))
          for n, x in inputs.items()
        }
      )
      pairs = jax.jit(
        lambda xs: {n: causal_pairs(x)(*xs[n]) for n, x in inputs.items()}
      )({n: pair_args(x, place, by_batch) for n, x in inputs.items()})
    for n in LAYOUTS:
      check(f"mesh {mesh_shape} {n}", got[n], want[n])
      check_pairs(f"mesh {mesh_shape} {n}", pairs[n], want_pairs[n])
      np.testing.assert_array_equal(
        np.asarray(ties[n]),
        np.asarray(want[n]["sel_ties"]),
        err_msg=f"mesh {mesh_shape} {n} xla topk with ties",
      )
    print(
      f"mesh {mesh_shape}: ok in {time.perf_counter() - t1:.1f} s", flush=True
    )
  print(f"OK sharded pallas == xla ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
  main()
