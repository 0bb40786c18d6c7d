"""Retrofit DSA onto a pretrained dense HF checkpoint (DeepSeek's V3.1 -> V3.2-Exp move).

Loads a Llama / Mistral / Qwen2 / Qwen3 (or DeepSeek dense-twin) checkpoint
with `sparse_attn.hf`, adds a freshly initialised lightning indexer to the
chosen layers (`hf.retrofit_from`: query from the hidden state), then runs
the library's two stages with `training.train` (orbax checkpoints in
<out>/run, resumed when rerun):

  1. dense warm-up: dense attention, the main model frozen, the indexer
     learns the dense attention distribution (KL), lr --warmup-lr (1e-3 as
     in DeepSeek's report);
  2. sparse stage: top-k attention, everything trains; the main model at
     the much lower --sparse-lr, the indexer on the sparse KL.

Both stages train on --dataset (default: the text; a mixture such as
text+passkey+vartrack keeps the retrieval skills a model was pretrained
with). A dense twin (the dense original trained for the sparse stage's
steps at its learning rate, on the same data) separates the cost of DSA
from the effect of the extra training; --no-dense-twin skips it.

Evaluates the dense original, the dense twin and the retrofitted model:
held-out perplexity on the text and exact match on retrieval tasks
(byte-level models: passkey, vartrack) at 1x/2x/4x the training length, and
each DSA layer's recall of the dense attention's top-k keys before and
after training. Writes <out>/hf (the retrofit in the source format: indexer
tensors + index_topk / index_n_heads / index_head_dim), report.json,
report.md and retrofit.png (loss curves, indexer KL, recall per layer).

  python experiments/make_dense_checkpoint.py --out /tmp/dense_llama
  python experiments/retrofit.py --hf-checkpoint /tmp/dense_llama --top-k 16 \
      --dataset text+passkey:3+vartrack:3
  python experiments/retrofit.py --hf-checkpoint DIR --top-k 64 --layers 2,3 \
      --indexer-heads 4 --indexer-dim 32 --seq-len 512 --data-path my_texts/
  python experiments/retrofit.py --hf-checkpoint DIR --smoke --out-dir /tmp/r
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
from flax import nnx  # noqa: E402

from sparse_attn import hf, registry  # noqa: E402
from sparse_attn import training as T  # noqa: E402
from sparse_attn.config import Config, TrainConfig  # noqa: E402
from sparse_attn.data import make_dataset  # noqa: E402
from sparse_attn.models import INDEXER, MAIN  # noqa: E402
from sparse_attn.ops.attention import group_heads, masked_softmax  # noqa: E402
from sparse_attn.ops.indexer import lightning_topk  # noqa: E402
from sparse_attn.ops.losses import lm_loss  # noqa: E402

TASKS = ("passkey", "vartrack")  # options: _common.TASK_OPTIONS
LENGTH_FACTORS = (1, 2, 4)
# report keys, in table order, and their labels
MODELS = {"dense": "dense original", "dense_twin": "dense twin", "dsa": "DSA"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--hf-checkpoint", required=True, help="HF checkpoint dir")
  p.add_argument("--top-k", type=int, default=16, help="keys per query (K)")
  p.add_argument(
    "--layers", default="all", help="layers with an indexer: all or 0,2,..."
  )
  p.add_argument("--indexer-heads", type=int, default=4)
  p.add_argument("--indexer-dim", type=int, default=32)
  p.add_argument(
    "--dataset",
    default="text",
    help="training data of both stages: text, or a mixture such as "
    "text+passkey:3+vartrack:3 (perplexity is always on the text)",
  )
  p.add_argument("--data-path", default=None, help="text (default: stdlib)")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--warmup-steps", type=int, default=100)
  p.add_argument("--sparse-steps", type=int, default=200)
  p.add_argument("--warmup-lr", type=float, default=1e-3)
  p.add_argument("--sparse-lr", type=float, default=3e-4)
  p.add_argument(
    "--indexer-lr", type=float, default=None, help="default: --warmup-lr"
  )
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--task-examples", type=int, default=64)
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument(
    "--no-dense-twin",
    dest="dense_twin",
    action="store_false",
    help="skip the dense twin (the original trained as long as the sparse "
    "stage)",
  )
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor")
  p.add_argument(
    "--drop-window",
    action="store_true",
    help="load a sliding-window checkpoint with full attention",
  )
  p.add_argument("--out-dir", default="results/retrofit")
  p.add_argument("--no-resume", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny and fast (CI)")
  return p.parse_args(argv)  # fmt: skip


def retrofit_config(a, model_cfg, warmup_steps: int, name: str) -> Config:
  """Both stages of the retrofit (warmup_steps 0: the dense twin's run)."""
  mesh = None if a.mesh is None else tuple(int(x) for x in a.mesh.split(","))
  total = warmup_steps + a.sparse_steps
  train = TrainConfig(
    dataset=a.dataset,
    dataset_options=C.task_options(a.dataset),
    data_path=a.data_path,
    seq_len=a.seq_len,
    batch_size=a.batch_size,
    seed=a.seed,
    warmup_stage_steps=warmup_steps,
    sparse_stage_steps=a.sparse_steps,
    lr=a.sparse_lr,
    indexer_lr=a.indexer_lr or a.warmup_lr,
    # The main model's schedule spans the sparse stage (or the twin's run):
    # the same linear warm-up in both.
    lr_warmup_steps=min(20, max(a.sparse_steps // 10, 1)),
    checkpoint_every=max(total // 4, 1),
    # Held-out loss a few times per run: with a mixture, the train loss of
    # a batch mostly says how many task rows it drew.
    eval_every=max(total // 6, 1),
    eval_batches=a.eval_batches,
    log_every=max(total // 20, 1),
    mesh_shape=mesh,
  )
  return Config(model=model_cfg, train=train, name=name)


# -- evaluation --------------------------------------------------------------


def _forward_fn(model, mode):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, inputs, targets, mask):
    m = nnx.merge(graphdef, state)
    logits, aux = m(inputs, mode=mode)
    nll, count = lm_loss(logits, targets, mask)
    ok = (jnp.argmax(logits, -1) == targets) & (mask > 0)
    exact = jnp.all(ok | (mask == 0), -1) & (jnp.sum(mask, -1) > 0)
    return {
      "nll": nll * count,
      "tokens": count,
      "exact": jnp.sum(exact),
      "attended": aux["attended_keys"],
      "visible": aux["visible_keys"],
    }

  return lambda *b: fn(state, *b)


def evaluate(model, mode, a, lengths, log):
  """{length: perplexity / exact match / attended fraction} of `model`."""
  fn = _forward_fn(model, mode)
  out = {}
  bsz = a.batch_size
  for length in lengths:
    text = make_dataset(
      "text", seq_len=length, split="validation", path=a.data_path,
      max_bytes=2_000_000,
    )  # fmt: skip
    tot = {}
    for i in range(a.eval_batches):
      b = text.eval_batch(i, bsz)
      r = fn(*(jnp.asarray(x) for x in (b.inputs, b.targets, b.loss_mask)))
      tot = {k: tot.get(k, 0.0) + float(v) for k, v in r.items()}
    row = {
      "ppl": float(np.exp(tot["nll"] / tot["tokens"])),
      "attended_fraction": tot["attended"] / max(tot["visible"], 1.0),
    }
    for task in a.task_list:
      try:
        ds = make_dataset(
          task, seq_len=length, split="validation", **C.TASK_OPTIONS[task]
        )
      except ValueError as e:  # too short for the task: no figure
        log(f"    {task} at L={length}: {e}")
        row[task] = None
        continue
      hits, n = 0.0, 0
      for i in range(-(-a.task_examples // bsz)):
        b = ds.eval_batch(i, bsz)
        r = fn(*(jnp.asarray(x) for x in (b.inputs, b.targets, b.loss_mask)))
        hits, n = hits + float(r["exact"]), n + bsz
      row[task] = hits / n
    out[length] = row
    log(f"    {mode:6s} L={length}: " + ", ".join(
      f"{k} {C.fmt(v)}" for k, v in row.items()
    ))  # fmt: skip
  return out


def dense_topk_recall(model, a) -> list[float | None]:
  """Per layer: the fraction of the dense attention's top-k keys (weights
  averaged over heads) that the layer's indexer selects (None: no indexer).
  On one validation batch at the training length, queries with > K keys."""
  text = make_dataset(
    "text", seq_len=a.seq_len, split="validation", path=a.data_path,
    max_bytes=2_000_000,
  )  # fmt: skip
  tokens = jnp.asarray(text.eval_batch(0, a.batch_size).inputs)
  batch, length = tokens.shape
  k_keep = model.cfg.top_k
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  x = model.embed_tokens(tokens)
  causal = jnp.tril(jnp.ones((length, length), bool))
  rows = jnp.arange(length) >= k_keep  # queries that must choose
  out: list[float | None] = []
  for i, block in enumerate(model.blocks):
    if registry.has_indexer(model.cfg.layer_attention(i)):
      attn = block.attn
      h = block.attn_norm(x)
      q, k, _ = attn.project(h, positions)
      qg = group_heads(q, k.shape[2])
      s = jnp.einsum("btgrd,bsgd->btgrs", qg, k) * q.shape[-1] ** -0.5
      p = masked_softmax(s, causal[None, :, None, None])[0].mean((2, 3))
      dense_top = jax.lax.top_k(jnp.where(causal, p, -1.0), k_keep)[1]
      q_idx, k_idx, w = attn.index(h, positions)
      mine = lightning_topk(q_idx, k_idx, w, k_keep, implementation="xla")
      hit = (dense_top[..., :, None] == mine[..., None, :]).any(-1)
      out.append(float(hit[:, rows].mean()))
    else:
      out.append(None)
    x, _ = block(x, positions=positions, kv_lengths=None, mode="dense")
  return out


# -- report ------------------------------------------------------------------


def write_report(a, report, history, evals, out_dir):
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  lengths = sorted(int(x) for x in report["dense"])
  models = [m for m in MODELS if m in report]
  names = " / ".join(MODELS[m] for m in models)
  cols = ["ppl"] + a.task_list
  rows = []
  for length in lengths:
    got = [report[m][str(length)] for m in models]
    rows.append(
      [f"{length} ({length // a.seq_len}x)"]
      + [" / ".join(C.fmt(g[c]) for g in got) for c in cols]
      + [f"{report['dsa'][str(length)]['attended_fraction']:.3f}"]
    )
  table = C.markdown_table(
    rows, ["length"] + [f"{c} {names}" for c in cols] + ["DSA keys attended"]
  )
  recall = C.markdown_table(
    [
      [i, C.fmt(b), C.fmt(e)]
      for i, (b, e) in enumerate(
        zip(report["recall_before"], report["recall_after"])
      )
    ],
    ["layer", "recall of dense top-k before", "after"],
  )
  twin = (
    f"The dense twin is the original trained {a.sparse_steps} steps at lr "
    f"{a.sparse_lr:g} on the same data distribution, dense.\n\n"
    if "dense_twin" in report
    else ""
  )
  md = (
    f"# DSA retrofit of {report['checkpoint']} ({report['model_type']})\n\n"
    f"top_k {report['top_k']}, indexer {report['indexer_heads']} heads x "
    f"{report['indexer_dim']}, layers {report['layers']}; "
    f"{a.warmup_steps} warm-up steps (lr {a.warmup_lr:g}) + "
    f"{a.sparse_steps} sparse steps (lr {a.sparse_lr:g}) on {a.dataset}, "
    f"seq_len {a.seq_len}, batch {a.batch_size}; {report['wall_s']:.0f} s. "
    f"Perplexity on held-out text; exact match on the tasks.\n\n"
    f"{table}\n\n{twin}{recall}\n\n`{report['command']}`\n"
  )
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(md)
  plt = C.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for stage in ("warmup", "sparse"):
      h = [r for r in history if r["stage"] == stage]
      e = [r for r in evals if r["stage"] == stage]
      if h:
        (line,) = ax[0].plot(
          [r["step"] for r in h],
          [r["loss"] for r in h],
          alpha=0.35,
          label=f"{stage} train batch",
        )
        ax[0].plot(
          [r["step"] for r in e],
          [r["loss"] for r in e],
          "o-",
          color=line.get_color(),
          label=f"{stage} held-out",
        )
        ax[1].plot(
          [r["step"] for r in h], [r["indexer_kl"] for r in h], label=stage
        )
    ax[0].set(title="LM loss", xlabel="step")
    ax[1].set(title="indexer KL", xlabel="step", yscale="log")
    layers = [i for i, r in enumerate(report["recall_after"]) if r is not None]
    for off, key in ((-0.2, "recall_before"), (0.2, "recall_after")):
      ax[2].bar(
        [i + off for i in layers],
        [report[key][i] for i in layers],
        width=0.4,
        label=key.split("_")[1],
      )
    ax[2].set(title=f"recall of the dense top-{report['top_k']}",
              xlabel="layer", ylim=(0, 1), xticks=layers)  # fmt: skip
    for x in ax:
      x.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "retrofit.png"), dpi=110)
  return md


def main(argv=None):
  a = parse_args(argv)
  if a.smoke:
    a.warmup_steps, a.sparse_steps, a.seq_len = 4, 4, 128
    a.batch_size, a.eval_batches, a.task_examples = 2, 1, 2
  a.task_list = [t for t in a.tasks.split(",") if t]
  t_start = time.perf_counter()
  log = print
  os.makedirs(a.out_dir, exist_ok=True)
  src = hf.read_config(a.hf_checkpoint)
  fields = {"sliding_window": None} if a.drop_window else {}
  kind = hf.config_from_pretrained(a.hf_checkpoint, **fields).attention
  if registry.has_indexer(kind):  # e.g. DeepSeek-V3.2: its dense twin
    fields["attention"] = registry.dense_twin(kind)
  dense, dense_cfg = hf.load_pretrained(a.hf_checkpoint, **fields)
  if dense_cfg.vocab_size < 256 and a.task_list:
    log(f"vocab {dense_cfg.vocab_size} < 256: no byte-level retrieval tasks")
    a.task_list = []
  layers = None if a.layers == "all" else [int(x) for x in a.layers.split(",")]
  fields.pop("attention", None)
  model, model_cfg = hf.retrofit_from(
    a.hf_checkpoint,
    attention="mla_dsa" if dense_cfg.attention == "mla" else "dsa",
    top_k=a.top_k,
    indexer_heads=a.indexer_heads,
    indexer_dim=a.indexer_dim,
    sparse_layers=layers,
    seed=a.seed,
    **fields,
  )
  lengths = [a.seq_len * f for f in LENGTH_FACTORS]
  log(f"dense original ({src.get('model_type')}, {a.hf_checkpoint}):")
  evals = {"dense": evaluate(dense, "dense", a, lengths, log)}
  recall_before = dense_topk_recall(model, a)
  _, idx, main_params = nnx.split(model, INDEXER, MAIN)
  result = T.train(
    retrofit_config(a, model_cfg, a.warmup_steps, "retrofit"),
    os.path.join(a.out_dir, "run"),
    resume=not a.no_resume,
    init_params={"main": main_params, "indexer": idx},
  )
  trained = T.merge_model(result.setup, result.state)
  trained.hf_config_json = model.hf_config_json
  recall_after = dense_topk_recall(trained, a)
  log("DSA retrofit:")
  evals["dsa"] = evaluate(trained, "sparse", a, lengths, log)
  if a.dense_twin:
    # The same LM steps, learning-rate schedule and data distribution as
    # the sparse stage, dense.
    twin = T.train(
      retrofit_config(a, dense_cfg, 0, "dense_twin"),
      os.path.join(a.out_dir, "dense_twin"),
      resume=not a.no_resume,
      init_params={"main": nnx.split(dense, INDEXER, MAIN)[2]},
    )
    log("dense twin:")
    evals["dense_twin"] = evaluate(
      T.merge_model(twin.setup, twin.state), "dense", a, lengths, log
    )
  hf_dir = os.path.join(a.out_dir, "hf")
  hf.save_pretrained(trained, hf_dir)
  run_dir = os.path.join(a.out_dir, "run")
  history = T.read_metrics(run_dir)
  held_out = T.read_metrics(run_dir, event="eval")
  report = {
    "checkpoint": a.hf_checkpoint,
    "model_type": src.get("model_type"),
    "top_k": a.top_k,
    "indexer_heads": a.indexer_heads,
    "indexer_dim": a.indexer_dim,
    "layers": a.layers,
    "seq_len": a.seq_len,
    "warmup_steps": a.warmup_steps,
    "sparse_steps": a.sparse_steps,
    "warmup_lr": a.warmup_lr,
    "sparse_lr": a.sparse_lr,
    "resumed_from": result.resumed_from,
    "dataset": a.dataset,
    **{m: {str(k): v for k, v in evals[m].items()} for m in evals},
    "recall_before": recall_before,
    "recall_after": recall_after,
    "hf_output": hf_dir,
    "wall_s": time.perf_counter() - t_start,
    "command": "python experiments/retrofit.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "env": C.env_line(),
  }
  md = write_report(
    a, report, list(history.values()), list(held_out.values()), a.out_dir
  )
  log(md)
  return report


if __name__ == "__main__":
  main()
