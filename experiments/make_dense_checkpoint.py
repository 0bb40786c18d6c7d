"""Trains a small dense model with the library and exports it as an HF checkpoint.

The offline stand-in for a downloaded Llama / Qwen checkpoint (there is no
model hub here): a dense GQA transformer in the Llama layout (unscaled
embeddings, untied output; --qwen3 adds Qwen3's q/k norms) trained on the
built-in text (the Python standard library's sources, bytes as tokens)
mixed with the passkey and variable-tracking tasks (--dataset; rows of
each task 3x as often as text rows, since a task row has only its few answer
tokens in the loss: the model learns to retrieve at its training length,
and a retrofit has something to keep), written with
`sparse_attn.hf.save_pretrained`. `experiments/retrofit.py` then runs on
that directory exactly as on a real checkpoint.

  python experiments/make_dense_checkpoint.py --out /tmp/dense_llama
  python experiments/make_dense_checkpoint.py --out /tmp/d --smoke   # CI
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from sparse_attn import hf  # noqa: E402
from sparse_attn import training as T  # noqa: E402
from sparse_attn.config import Config, ModelConfig, TrainConfig  # noqa: E402
from sparse_attn.training import merge_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--steps", type=int, default=900)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--embed-dim", type=int, default=128)
  p.add_argument("--qwen3", action="store_true", help="q/k norms (Qwen3)")
  p.add_argument(
    "--dataset",
    default="text+passkey:3+vartrack:3",
    help="a dataset or mixture spec (text, text+passkey, text:2+passkey:1)",
  )
  p.add_argument("--data-path", default=None, help="text (default: stdlib)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny and fast (CI)")
  return p.parse_args(argv)


def config(a) -> Config:
  model = ModelConfig(
    vocab_size=256,
    embed_dim=a.embed_dim,
    num_layers=a.layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=a.embed_dim // 4,
    mlp_dim=3 * a.embed_dim,
    attention="dense",
    tie_embeddings=False,
    scale_embeddings=False,
    qk_norm=a.qwen3,
  )
  train = TrainConfig(
    dataset=a.dataset,
    dataset_options=C.task_options(a.dataset),
    data_path=a.data_path,
    seq_len=a.seq_len,
    batch_size=a.batch_size,
    seed=a.seed,
    warmup_stage_steps=0,
    sparse_stage_steps=a.steps,
    lr=3e-3,
    lr_warmup_steps=min(20, max(a.steps // 5, 1)),
    checkpoint_every=0,
    eval_every=0,
    eval_batches=8,
    log_every=max(a.steps // 10, 1),
    mesh_shape=None,
  )
  return Config(model=model, train=train, name="dense_checkpoint")


def main(argv=None):
  a = parse_args(argv)
  if a.smoke:
    a.steps, a.seq_len, a.batch_size = 20, 128, 4
    a.layers, a.embed_dim = 2, 64
  cfg = config(a)
  t0 = time.perf_counter()
  result = T.train(cfg, None)
  model = merge_model(result.setup, result.state)
  base = {"max_position_embeddings": 8 * a.seq_len}
  files = hf.save_pretrained(model, a.out, config=base)
  ev = result.final_eval or {}
  print(
    f"dense {hf.read_config(a.out)['model_type']} checkpoint "
    f"({sum(int(x.size) for x in _leaves(model)):,} params, held-out loss "
    f"{float(ev.get('loss', float('nan'))):.4f}) -> {a.out}: {files} "
    f"[{time.perf_counter() - t0:.0f} s]"
  )
  return dataclasses.asdict(cfg.model)


def _leaves(model):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return jax.tree.leaves(nnx.state(model, nnx.Param))


if __name__ == "__main__":
  main()
