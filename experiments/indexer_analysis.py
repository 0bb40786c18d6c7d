"""Indexer analysis: how well does the lightning indexer find the keys dense attention uses?

Trains a tiny DSA model with DeepSeek-V3.2-Exp's recipe (dense pretraining of
the main model, then the dense warm-up stage: main model frozen, indexer on
the dense KL, then the sparse stage: top-k attention, everything trains) and
evaluates, at checkpoints through the warm-up and sparse stages, for every
layer on held-out batches:

  recall     |S_index(t) & S_dense(t)| / K, where S_index is the indexer's
             top-k and S_dense the top-k of the layer's own dense attention
             (per-head softmax over all visible keys, averaged over heads);
  mass       sum of the dense attention probabilities over S_index (how much
             of the dense attention the selected set would capture);
  oracle     the same mass for S_dense (the best any K-subset can do);
  kl         KL(p || softmax(index scores)) over all visible keys (the
             warm-up loss, `sparse_attn.dense_indexer_kl`);
  hisa_overlap  |S_hisa(t) & S_index(t)| / K, where S_hisa is HISA's
             hierarchical top-k (`sparse_attn.hisa_topk`, blocks of
             --hisa-block-size keys, --hisa-blocks kept) on the same indexer:
             how much of DSA's selection the block filter keeps;
  hisa_mass  the dense attention mass over S_hisa.
Averages are over queries with more than K visible keys (earlier queries
select every key, trivially). The trunk is run in the mode of the stage
being analysed ("warmup": dense attention, "sparse": top-k), so in the
sparse stage each layer is measured on the hidden states the sparse model
actually produces.

Alternatively --run-dir analyses every checkpoint of a run saved by
experiments/train.py (DSA kinds only), without training.

  python experiments/indexer_analysis.py                 # ~5 min on 2 CPUs
  python experiments/indexer_analysis.py --run-dir runs/tiny_dsa
  python experiments/indexer_analysis.py --smoke --out-dir /tmp/ia   # CI

Writes <out-dir>/indexer_analysis.csv, .json, indexer_curves.png and
indexer_heatmaps.png (selection maps: indexer vs dense top-k, first and last
checkpoint, one row per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import retrieval as R  # noqa: E402  (shared training helpers)
from flax import nnx  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import training as T  # noqa: E402
from sparse_attn.config import Config, ModelConfig, TrainConfig  # noqa: E402
from sparse_attn.nn import DSAAttention  # noqa: E402
from sparse_attn.ops.attention import group_heads, masked_softmax  # noqa: E402

COLUMNS = (
  "step",
  "stage",
  "layer",
  "recall",
  "mass",
  "oracle_mass",
  "kl",
  "hisa_overlap",
  "hisa_mass",
  "num_queries",
  "top_k",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--task", default="passkey", help="mqar | passkey | niah | vartrack | text"
  )
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--top-k", type=int, default=16)
  p.add_argument("--num-layers", type=int, default=2)
  p.add_argument("--pretrain-steps", type=int, default=150)
  p.add_argument("--warmup-steps", type=int, default=40)
  p.add_argument("--sparse-steps", type=int, default=60)
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--eval-examples", type=int, default=16)
  p.add_argument("--hisa-block-size", type=int, default=16)
  p.add_argument(
    "--hisa-blocks",
    type=int,
    default=4,
    help="HISA's kept blocks (the defaults keep 4 x K candidates at K=16, "
    "the paper's 8192 for K=2048)",
  )
  p.add_argument("--run-dir", help="analyse this experiments/train.py run")
  p.add_argument("--out-dir", default="results/indexer")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  if a.smoke:
    a.task, a.seq_len, a.top_k, a.num_layers = "mqar", 64, 8, 2
    a.pretrain_steps, a.warmup_steps, a.sparse_steps = 2, 2, 2
    a.eval_every, a.batch_size, a.eval_examples = 2, 4, 4
  return a


def model_dims(a):
  if a.smoke:
    return dict(
      embed_dim=32,
      num_layers=a.num_layers,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      mlp_dim=64,
      indexer_heads=2,
      indexer_dim=8,
    )
  return dict(
    embed_dim=128,
    num_layers=a.num_layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_dim=256,
    indexer_heads=4,
    indexer_dim=32,
  )


# ---------------------------------------------------------------------------
# per-layer measurement


def layer_stats(layer: DSAAttention, h, positions, top_k, hisa):
  """Recall / mass / oracle / KL / HISA overlap of one DSA layer on
  normalised input h (hisa: HISA's block_size and num_blocks)."""
  q, k, _ = layer.project(h, positions)
  q_idx, k_idx, w = layer.index(h, positions)
  b, t, nh, d = q.shape
  logits = (
    jnp.einsum("btgrd,bsgd->btgrs", group_heads(q, k.shape[2]), k) * d**-0.5
  )
  valid = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, S]
  probs, _ = masked_softmax(logits, valid[None, :, None, None, :])
  p = jnp.mean(probs, axis=(2, 3))  # [B, T, S]
  idx = sa.lightning_topk(q_idx, k_idx, w, top_k, implementation="xla")
  dense_idx = sa.select_topk(jnp.where(valid[None], p, -jnp.inf), top_k)

  def as_mask(ix):
    hot = jax.nn.one_hot(jnp.where(ix >= 0, ix, t), t + 1, dtype=jnp.float32)
    return jnp.minimum(jnp.sum(hot, axis=2)[..., :t], 1.0)  # [B, T, S]

  hisa_idx = sa.hisa_topk(q_idx, k_idx, w, top_k, **hisa)
  sel, ref, hsel = as_mask(idx), as_mask(dense_idx), as_mask(hisa_idx)
  recall = jnp.sum(sel * ref, -1) / top_k
  mass = jnp.sum(sel * p, -1)
  oracle = jnp.sum(ref * p, -1)
  scores = sa.indexer_scores(q_idx, k_idx, w)
  log_q = jax.nn.log_softmax(jnp.where(valid[None], scores, -jnp.inf), -1)
  kl = jnp.sum(
    jnp.where(
      valid[None] & (p > 0),
      p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q),
      0.0,
    ),
    -1,
  )
  use = jnp.broadcast_to(jnp.arange(t)[None, :] >= top_k, (b, t))  # > K visible
  n = jnp.maximum(jnp.sum(use), 1)
  mean = lambda x: jnp.sum(jnp.where(use, x, 0.0)) / n
  return (
    {
      "recall": mean(recall),
      "mass": mean(mass),
      "oracle_mass": mean(oracle),
      "kl": mean(kl),
      "hisa_overlap": mean(jnp.sum(hsel * sel, -1) / top_k),
      "hisa_mass": mean(jnp.sum(hsel * p, -1)),
      "num_queries": jnp.sum(use).astype(jnp.float32),
    },
    {"sel": sel[0], "ref": ref[0]},
  )


def make_analyse_fn(s, top_k, a):
  hisa = dict(block_size=a.hisa_block_size, num_blocks=a.hisa_blocks)

  def fn(params, tokens, mode):
    model = nnx.merge(s.graphdef, params["indexer"], params["main"])
    bsz, length = tokens.shape
    positions = jnp.broadcast_to(
      jnp.arange(length, dtype=jnp.int32), (bsz, length)
    )
    x = model.embed[...][tokens] * jnp.asarray(
      model.cfg.embed_dim**0.5, jnp.float32
    )
    stats, maps = [], []
    for block in model.blocks:
      st, mp = layer_stats(
        block.attn, block.attn_norm(x), positions, top_k, hisa
      )
      stats.append(st)
      maps.append(mp)
      x, _ = block(x, positions=positions, kv_lengths=None, mode=mode)
    return stats, maps

  return jax.jit(fn, static_argnums=2)


def analyse(s, state, fn, batches, mode):
  tot = None
  for b in batches:
    stats, maps = fn(state["params"], b, mode)
    stats = jax.tree.map(float, stats)
    if tot is None:
      tot, first_maps = stats, jax.tree.map(np.asarray, maps)
    else:
      tot = jax.tree.map(lambda x, y: x + y, tot, stats)
  n = len(batches)
  out = []
  for i, st in enumerate(tot):
    row = {k: v / n for k, v in st.items()}
    row["num_queries"] = st["num_queries"]
    row["layer"] = i
    out.append(row)
  return out, first_maps


# ---------------------------------------------------------------------------
# training with checkpoints along the way


def dsa_config(a, warmup, sparse, lr):
  model = ModelConfig(
    attention="dsa",
    top_k=a.top_k,
    implementation="xla" if jax.default_backend() == "cpu" else None,
    **model_dims(a),
  )
  train = TrainConfig(
    dataset=a.task,
    seq_len=a.seq_len,
    batch_size=a.batch_size,
    warmup_stage_steps=warmup,
    sparse_stage_steps=sparse,
    lr=lr,
    indexer_lr=lr,
    lr_warmup_steps=min(10, max(1, (warmup + sparse) // 4)),
    checkpoint_every=0,
    eval_every=0,
    log_every=10**9,
    max_bytes=2_000_000,
    eval_max_bytes=200_000,
  )
  return Config(model=model, train=train, name="indexer_analysis")


def eval_tokens(a, cfg):
  _, ev = (
    T.make_datasets(cfg)
    if a.task == "text"
    else (None, R.dataset(a.task, a.seq_len, "validation"))
  )
  bsz = min(a.eval_examples, 8)
  return [
    jnp.asarray(ev.eval_batch(i, bsz).inputs)
    for i in range(-(-a.eval_examples // bsz))
  ]


def train_and_analyse(a, log):
  rows, maps = [], {}
  # 1. dense pretraining of the main model (a dense model of the same dims).
  dense_cfg = dsa_config(a, 0, a.pretrain_steps, 3e-3)
  dense_cfg = dense_cfg.replace(**{"model.attention": "dense"})
  s = T.setup(dense_cfg)
  ds, _ = (
    T.make_datasets(s.cfg)
    if a.task == "text"
    else (R.dataset(a.task, a.seq_len, "train"), None)
  )
  t0 = time.perf_counter()
  pre, _ = R.train_steps(s, T.init_state(s), ds, 0, log, "pretrain")
  log(
    f"dense pretraining: {a.pretrain_steps} steps, "
    f"{time.perf_counter() - t0:.0f} s"
  )
  # 2. DSA from the dense checkpoint, warm-up then sparse, in segments.
  cfg = dsa_config(a, a.warmup_steps, a.sparse_steps, 1e-3)
  s = T.setup(cfg)
  state = T.init_state(s)
  state, _ = T.init_from(state, pre["params"]["main"])
  fn = make_analyse_fn(s, a.top_k, a)
  batches = eval_tokens(a, cfg)
  # The DSA steps continue the dense run's data stream.
  runner = T.StageRunner(s, ds, first_step=a.pretrain_steps)
  total = cfg.train.total_steps
  checkpoints = sorted(
    set(range(0, total + 1, a.eval_every)) | {0, a.warmup_steps, total}
  )
  done = 0
  # A segment costs its steps plus one analysis (about a few steps' worth).
  eta = C.Eta(
    [ck - prev + 2 for prev, ck in zip([0, *checkpoints], checkpoints)]
  )
  for i_ck, ck in enumerate(checkpoints):
    state = runner.run(state, start=done, stop=ck)
    done = ck
    stage = "warmup" if ck <= a.warmup_steps else "sparse"
    mode = "warmup" if stage == "warmup" else "sparse"
    stats, mp = analyse(s, state, fn, batches, mode)
    for r in stats:
      rows.append({"step": ck, "stage": stage, "top_k": a.top_k, **r})
    maps[ck] = mp
    log(
      f"  step {ck:4d} ({stage}): "
      + "  ".join(
        f"L{r['layer']} recall {r['recall']:.3f} mass {r['mass']:.3f}/"
        f"{r['oracle_mass']:.3f} kl {r['kl']:.3f} hisa overlap "
        f"{r['hisa_overlap']:.3f}"
        for r in stats
      )
    )
    eta.done(i_ck)
    log(f"  [{i_ck + 1}/{len(checkpoints)} analyses]{eta.text()}")
  return rows, maps


def analyse_run_dir(a, log):
  cfg = T.read_config(a.run_dir)
  if cfg.model.attention != "dsa":
    raise ValueError(f"run {a.run_dir!r} is {cfg.model.attention!r}, not dsa")
  a.top_k, a.seq_len, a.task = (
    cfg.model.top_k,
    cfg.train.seq_len,
    cfg.train.dataset,
  )
  mngr = T.checkpoint_manager(a.run_dir, cfg)
  ckpts = list(mngr.all_steps())
  mngr.close()
  rows, maps = [], {}
  for ck in sorted(ckpts):
    s, state = T.load_checkpoint(a.run_dir, ck)
    fn = make_analyse_fn(s, a.top_k, a)
    stage = "warmup" if ck <= cfg.train.warmup_stage_steps else "sparse"
    stats, mp = analyse(
      s,
      state,
      fn,
      eval_tokens(a, s.cfg),
      "warmup" if stage == "warmup" else "sparse",
    )
    for r in stats:
      rows.append({"step": ck, "stage": stage, "top_k": a.top_k, **r})
    maps[ck] = mp
    log(
      f"  checkpoint {ck}: "
      + "  ".join(
        f"L{r['layer']} recall {r['recall']:.3f} mass {r['mass']:.3f}"
        for r in stats
      )
    )
  return rows, maps


# ---------------------------------------------------------------------------
# plots


def plot_curves(rows, warmup_steps, path):
  plt = C.pyplot()
  if plt is None:
    return
  layers = sorted({r["layer"] for r in rows})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key, ax in zip(("recall", "mass", "kl"), axes):
    for l in layers:
      pts = sorted((r["step"], r[key]) for r in rows if r["layer"] == l)
      ax.plot(*zip(*pts), marker="o", ms=3, label=f"layer {l}")
      if key == "mass":
        pts = sorted(
          (r["step"], r["oracle_mass"]) for r in rows if r["layer"] == l
        )
        ax.plot(*zip(*pts), ls=":", label=f"layer {l} oracle")
    if warmup_steps is not None:
      ax.axvline(warmup_steps, color="k", lw=0.8, ls="--")
    ax.set_title(
      {
        "recall": "recall of dense top-k",
        "mass": "dense attention mass captured",
        "kl": "KL(p || indexer)",
      }[key]
    )
    ax.set_xlabel("DSA step (warm-up | sparse)")
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_heatmaps(maps, path):
  plt = C.pyplot()
  if plt is None or not maps:
    return
  steps = sorted(maps)
  steps = [steps[0], steps[-1]] if len(steps) > 1 else steps
  layers = len(maps[steps[0]])
  fig, axes = plt.subplots(
    layers, len(steps), figsize=(5 * len(steps), 4.5 * layers), squeeze=False
  )
  for j, st in enumerate(steps):
    for l in range(layers):
      sel, ref = maps[st][l]["sel"], maps[st][l]["ref"]
      img = np.ones(sel.shape + (3,))
      both = (sel > 0) & (ref > 0)
      img[(sel > 0) & ~both] = (0.85, 0.1, 0.1)  # indexer only: red
      img[(ref > 0) & ~both] = (0.1, 0.3, 0.9)  # dense top-k only: blue
      img[both] = (0.1, 0.6, 0.1)  # both: green
      ax = axes[l][j]
      ax.imshow(img, interpolation="nearest", aspect="auto")
      ax.set_title(
        f"step {st}, layer {l}: green both, red indexer only, blue dense only",
        fontsize=8,
      )
      ax.set_xlabel("key")
      ax.set_ylabel("query")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  a = parse_args(argv)
  os.makedirs(a.out_dir, exist_ok=True)
  log = lambda s: print(s, flush=True)
  log(f"indexer_analysis: {vars(a)}; {C.env_line()}")
  t0 = time.perf_counter()
  if a.run_dir:
    rows, maps = analyse_run_dir(a, log)
    warm = None
  else:
    rows, maps = train_and_analyse(a, log)
    warm = a.warmup_steps
  C.write_csv(os.path.join(a.out_dir, "indexer_analysis.csv"), rows, COLUMNS)
  with open(
    os.path.join(a.out_dir, "indexer_analysis.json"), "w", encoding="utf-8"
  ) as f:
    json.dump(
      {"args": vars(a), "rows": rows, "seconds": time.perf_counter() - t0},
      f,
      indent=1,
    )
  plot_curves(rows, warm, os.path.join(a.out_dir, "indexer_curves.png"))
  plot_heatmaps(maps, os.path.join(a.out_dir, "indexer_heatmaps.png"))
  log(f"wrote {a.out_dir} ({time.perf_counter() - t0:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
