"""Subprocess worker for tests that need their own JAX process.

  python tests/_train_worker.py mesh_equiv [deepseek_v32|hisa|csa]   (XLA_FLAGS: 8 host devices)
  python tests/_train_worker.py context_equiv                (XLA_FLAGS: 8 host devices)
  python tests/_train_worker.py context_prefill              (XLA_FLAGS: 8 host devices)
  python tests/_train_worker.py multihost OUT PROCESS_ID NUM_PROCESSES PORT [RUN_DIR]
  python tests/_train_worker.py single OUT [RUN_DIR]

Prints / writes JSON results; the tests compare them.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A few-second config shared by the subprocess tests.
SMALL = (
  "model.num_layers=1",
  "model.embed_dim=32",
  "model.num_heads=4",
  "model.num_kv_heads=2",
  "model.head_dim=8",
  "model.mlp_dim=64",
  "model.top_k=8",
  "model.indexer_heads=2",
  "model.indexer_dim=8",
  "train.seq_len=32",
  "train.batch_size=8",
  "train.max_bytes=100000",
  "train.eval_max_bytes=20000",
  "train.eval_batches=1",
  "train.lr_warmup_steps=1",
  "train.log_every=1",
  "train.eval_every=0",
)


def small_config(*extra):
  from sparse_attn.config import override, tiny

  return override(tiny(), *SMALL, *extra)


# The deepseek_v32 family at a few-second size: MLA + DSA on the q latent,
# a dense block then an MoE block, the kernels (interpret mode) in MLA's
# absorbed shape.
DEEPSEEK = (
  "model.num_layers=2",
  "model.embed_dim=32",
  "model.mlp_dim=64",
  "model.top_k=8",
  "model.indexer_heads=2",
  "model.indexer_dim=8",
  "model.indexer_rope_dim=4",
  'model.implementation="pallas"',
  "train.seq_len=32",
  "train.batch_size=8",
  "train.max_bytes=100000",
  "train.eval_max_bytes=20000",
  "train.eval_batches=1",
  "train.lr_warmup_steps=1",
  "train.log_every=1",
  "train.eval_every=0",
)


def deepseek_config(*extra):
  from sparse_attn.config import deepseek_v32_tiny, override

  cfg = deepseek_v32_tiny()
  mla = {
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
  }
  moe = {**dict(cfg.model.moe), "expert_dim": 16}
  return override(
    cfg,
    *DEEPSEEK,
    *extra,
    **{"model.attention_params": mla, "model.moe": moe},
  )


# HISA's hierarchical top-k at the small config's length (8 blocks, 3 kept).
HISA = (
  'model.attention="hisa"',
  'model.attention_params={"hisa_block_size": 4, "hisa_blocks": 3}',
)


# DeepSeek-V4's CSA: groups of 4 pooled, a window of 4, top-k entries.
CSA = (
  'model.attention="csa"',
  'model.attention_params={"ratio": 4, "window": 4}',
)
FAMILY_OVERRIDES = {"hisa": HISA, "csa": CSA}


def _flat(tree):
  import jax
  import numpy as np

  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def mesh_equiv(family="transformer"):
  """One warm-up and one sparse step on mesh (1,1,1) vs (2,2,2)."""
  import jax
  import numpy as np

  from sparse_attn import sharding as shd
  from sparse_attn import training as T

  assert jax.device_count() == 8, jax.devices()
  out = {}
  results = {}
  for name, devices, mesh in (
    ("one", jax.devices()[:1], [1, 1, 1]),
    ("eight", jax.devices(), [2, 2, 2]),
  ):
    make = deepseek_config if family == "deepseek_v32" else small_config
    extra = FAMILY_OVERRIDES.get(family, ())
    cfg = make(f"train.mesh_shape={json.dumps(mesh)}", *extra)
    s = T.setup(cfg, devices)
    state = T.init_state(s)
    ds, _ = T.make_datasets(s.cfg)
    loader = T.BatchLoader(ds, s)
    losses = []
    for i, stage in enumerate(("warmup", "sparse")):
      state, m = T.make_train_step(s, stage)(state, loader.train(i))
      losses.append([float(m["loss"]), float(m["indexer_kl"])])
    results[name] = (losses, _flat(state["params"]))
    if name == "eight":
      attn = state["params"]["main"]["blocks"][0]["attn"]
      wq = attn["wq_b"] if family == "deepseek_v32" else attn["wq"]
      out["wq_spec"] = str(wq.get_value().sharding.spec)
      out["wq_shards"] = len(
        {
          tuple((s.start, s.stop) for s in idx)
          for idx in wq.get_value()
          .sharding.devices_indices_map(wq.shape)
          .values()
        }
      )
      out["batch_spec"] = str(s.batch_sharding.spec)
      if family == "deepseek_v32":
        gate = state["params"]["main"]["blocks"][1]["mlp"]["gate"]
        out["experts_spec"] = str(gate.get_value().sharding.spec)
      out["rows"] = shd.local_batch_rows(s.batch_sharding, 8)
  (l1, p1), (l8, p8) = results["one"], results["eight"]
  out["losses_one"], out["losses_eight"] = l1, l8
  out["max_param_diff"] = max(float(np.max(np.abs(p1[k] - p8[k]))) for k in p1)
  out["param_entries"] = int(sum(p1[k].size for k in p1))
  out["entries_over_1e-6"] = int(
    sum(int(np.sum(np.abs(p1[k] - p8[k]) > 1e-6)) for k in p1)
  )
  out["same_keys"] = sorted(p1) == sorted(p8)
  print("RESULT " + json.dumps(out))


# (family, model overrides, mesh, train overrides) of the context-parallel
# runs: the three issue meshes with the default zigzag + fetch + ring, the
# all-gather strategies, dense attention, and DeepSeek-V3.2's family (MLA +
# DSA on the q latent, MoE, the Pallas kernels in interpret mode).
AG = (
  'train.context_strategy="all_gather"',
  'train.context_dense_strategy="all_gather"',
)
CONTEXT_RUNS = (
  ("transformer", (), [1, 1, 1, 8], ()),
  ("transformer", (), [2, 1, 1, 4], ()),
  ("transformer", (), [1, 2, 2, 2], ()),
  ("transformer", (), [1, 2, 1, 4], AG),
  ("transformer", ('model.attention="dense"',), [2, 1, 1, 4], ()),
  ("deepseek_v32", (), [2, 1, 1, 4], ()),
)


def context_equiv():
  """Train steps with the sequence sharded over the context axis == the
  same steps on one device, for each CONTEXT_RUNS entry: losses, KLs and
  every parameter after one warm-up and one sparse step (dense: one step)."""
  import jax
  import numpy as np

  from sparse_attn import training as T

  assert jax.device_count() == 8, jax.devices()

  def steps(family, model, mesh, train, devices):
    make = deepseek_config if family == "deepseek_v32" else small_config
    cfg = make(f"train.mesh_shape={json.dumps(mesh)}", *model, *train)
    s = T.setup(cfg, devices)
    state = T.init_state(s)
    ds, _ = T.make_datasets(s.cfg)
    loader = T.BatchLoader(ds, s)
    metrics = []
    dense = s.cfg.model.attention == "dense"
    for i, stage in enumerate(("sparse",) if dense else ("warmup", "sparse")):
      state, m = T.make_train_step(s, stage)(state, loader.train(i))
      metrics.append([float(m["loss"]), float(m["indexer_kl"])])
    return metrics, _flat(state["params"])

  refs, out = {}, []
  for family, model, mesh, train in CONTEXT_RUNS:
    if (family, model) not in refs:  # the context choices do not change it
      refs[family, model] = steps(
        family, model, [1, 1, 1], (), jax.devices()[:1]
      )
    m1, p1 = refs[family, model]
    m8, p8 = steps(family, model, mesh, train, jax.devices())
    diff = {k: np.abs(p1[k] - p8[k]) for k in p1 if k in p8}
    out.append(
      {
        "run": f"{family} {list(model)} {mesh} {list(train)}",
        "metrics_one": m1,
        "metrics_sharded": m8,
        "max_param_diff": max(float(np.max(d)) for d in diff.values()),
        "entries_over_1e-6": int(
          sum(int(np.sum(d > 1e-6)) for d in diff.values())
        ),
        "param_entries": int(sum(p1[k].size for k in p1)),
        "same_keys": sorted(p1) == sorted(p8),
      }
    )
    print(out[-1]["run"], out[-1]["max_param_diff"], flush=True)
  print("RESULT " + json.dumps(out))


# (kind, attention params, implementation, index_dtype, mesh): DSA over the
# three context meshes, dense, and DSA on MLA with the Pallas kernels and
# an fp8 index cache.
MLA = {
  "q_lora_rank": 16,
  "kv_lora_rank": 16,
  "qk_nope_head_dim": 8,
  "qk_rope_head_dim": 4,
  "v_head_dim": 8,
}
PREFILL_RUNS = [
  ("dsa", {}, "xla", "float32", (1, 1, 1, 8)),
  ("dsa", {}, "xla", "float32", (2, 1, 1, 4)),
  ("dsa", {}, "xla", "bfloat16", (1, 2, 2, 2)),
  ("dense", {}, "xla", "float32", (2, 1, 1, 4)),
  ("mla_dsa", MLA, "pallas", "float8_e4m3fn", (2, 1, 1, 4)),
]


def context_prefill():
  """Chunked prefill with each chunk split over the context axis == the
  plain Decoder on one device: every chunk's logits, the cache rows of
  every leaf, then decode steps (greedy tokens and their logits)."""
  import jax
  import numpy as np

  from sparse_attn import inference as D
  from sparse_attn import sharding as shd
  from sparse_attn.config import ModelConfig
  from sparse_attn.models import build_model
  from sparse_attn.nn.context_parallel import ContextParallel

  assert jax.device_count() == 8, jax.devices()
  prompts = np.random.default_rng(0).integers(0, 256, (2, 40))
  lens = [40, 27]  # 16 + 16 + 8 tokens; row 1 ends inside chunk 2

  def run(dec):
    cache = dec.init_cache(2, 48)
    every, cache = dec.prefill(cache, prompts, lens, return_all=True)
    last, _ = dec.prefill(dec.init_cache(2, 48), prompts, lens)
    steps, tokens = [], np.argmax(np.asarray(last), -1)
    for _ in range(3):
      logits, cache = dec.step(cache, tokens)
      steps.append(np.asarray(logits))
      tokens = np.argmax(steps[-1], -1)
    rows = {
      f"{i}.{name}": np.asarray(getattr(lc, name)).astype(np.float32)
      for i, lc in enumerate(cache.layers)
      for name in type(lc).axes
      if getattr(lc, name) is not None
    }
    valid = np.arange(40)[None, :] < np.asarray(lens)[:, None]
    # Rows past each row's length (+ the 3 steps) hold padding, which a
    # context-parallel chunk pads further; nothing ever attends them.
    written = np.arange(48)[None, :] < np.asarray(lens)[:, None] + 3
    rows = {k: v[written] for k, v in rows.items()}
    return np.asarray(every)[valid], np.asarray(last), rows, np.stack(steps)

  out = []
  for kind, params, impl, index_dtype, mesh_shape in PREFILL_RUNS:
    cfg = ModelConfig(
      embed_dim=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      mlp_dim=64,
      top_k=6,
      indexer_heads=2,
      indexer_dim=8,
      attention=kind,
      attention_params=params,
      implementation=impl,
    )
    model = build_model(cfg, seed=1)
    one = run(D.Decoder(model, chunk_size=16, index_dtype=index_dtype))
    cp = ContextParallel(shd.make_mesh(mesh_shape))
    sharded = run(
      D.Decoder(
        model, chunk_size=16, index_dtype=index_dtype, context_parallel=cp
      )
    )
    diffs = {
      "prefill_all": float(np.max(np.abs(one[0] - sharded[0]))),
      "prefill_last": float(np.max(np.abs(one[1] - sharded[1]))),
      "cache": max(
        float(np.max(np.abs(one[2][k] - sharded[2][k]))) for k in one[2]
      ),
      "steps": float(np.max(np.abs(one[3] - sharded[3]))),
    }
    out.append(
      {
        "run": f"{kind} {impl} {index_dtype} {list(mesh_shape)}",
        "same_leaves": sorted(one[2]) == sorted(sharded[2]),
        **diffs,
      }
    )
    print(out[-1], flush=True)
  print("RESULT " + json.dumps(out))


def _run(out_path, run_dir, steps, mesh=None):
  import numpy as np

  from sparse_attn import training as T

  cfg = small_config(
    "train.warmup_stage_steps=2",
    f"train.sparse_stage_steps={steps - 2}",
    "train.checkpoint_every=2",
    *([f"train.mesh_shape={mesh}"] if mesh else []),
  )
  r = T.train(cfg, run_dir, resume=False, echo=None)
  import jax

  if jax.process_index() == 0:
    res = {
      "losses": [h["loss"] for h in r.history],
      "kls": [h["indexer_kl"] for h in r.history],
      "eval": r.final_eval["loss"],
      "processes": jax.process_count(),
      "mesh": dict(r.setup.mesh.shape),
      "param_sum": float(
        sum(np.sum(np.abs(v)) for v in _flat(r.state["params"]).values())
      )
      if jax.process_count() == 1
      else None,
    }
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(res, f)


def multihost(
  out_path, process_id, num_processes, port, run_dir=None, mesh=None
):
  """mesh: a JSON list, e.g. [1,1,1,2] (default: data over the processes)."""
  from sparse_attn import training as T

  T.init_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id))
  _run(out_path, run_dir, 5, mesh or None)


def single(out_path, run_dir=None):
  _run(out_path, run_dir, 5)


if __name__ == "__main__":
  cmd, *rest = sys.argv[1:]
  {
    "mesh_equiv": mesh_equiv,
    "context_equiv": context_equiv,
    "context_prefill": context_prefill,
    "multihost": multihost,
    "single": single,
  }[cmd](*rest)
