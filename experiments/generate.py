"""Generate bytes from a trained checkpoint (chunked prefill + cached decode).

    python experiments/generate.py --run-dir runs/tiny --prompt "def main(" \
        --max-new-tokens 200 --temperature 0.8 --top-p 0.95
    python experiments/generate.py --smoke        # random-init tiny model (CI)

--run-dir is a directory written by experiments/train.py / sparse_attn.training
(config.json + checkpoints/<step>/); the latest checkpoint is loaded unless
--step is given. Prompts are bytes (vocab 256); several --prompt flags make a
batch of prompts of different lengths. Prints the continuations and the
prefill / decode throughput (tokens/s; the first decode step, which
compiles, is reported separately).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from sparse_attn import inference as D  # pylint: disable=g-import-not-at-top


def encode(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """UTF-8 bytes, right-padded with 0: (tokens int32[B, P], lengths int32[B])."""
  data = [p.encode("utf-8") or b" " for p in prompts]
  lens = np.array([len(b) for b in data], np.int32)
  tokens = np.zeros((len(data), int(lens.max())), np.int32)
  for i, b in enumerate(data):
    tokens[i, : len(b)] = np.frombuffer(b, np.uint8)
  return tokens, lens


def decode_bytes(tokens) -> str:
  return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


def load_model(run_dir: str, step: int | None):
  """(model, mesh, config) from a training run directory."""
  from sparse_attn import training as T  # pylint: disable=g-import-not-at-top

  s, state = T.load_checkpoint(run_dir, step)
  return T.merge_model(s, state), s.mesh, s.cfg


def smoke_model():
  from sparse_attn.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from sparse_attn.models import build_model  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig(
    embed_dim=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    top_k=8,
    indexer_heads=2,
    indexer_dim=8,
  )
  return build_model(cfg), None


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--run-dir", default=None)
  p.add_argument("--step", type=int, default=None)
  p.add_argument(
    "--prompt",
    action="append",
    default=None,
    help="prompt text (repeat for a batch)",
  )
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chunk-size", type=int, default=512)
  p.add_argument("--index-dtype", default="float32", choices=D.INDEX_DTYPES)
  p.add_argument(
    "--mode",
    default="sparse",
    choices=["sparse", "dense"],
    help="DSA layers: top-k (sparse) or dense attention",
  )
  p.add_argument(
    "--max-len",
    type=int,
    default=None,
    help="cache capacity (default prompt + new tokens)",
  )
  p.add_argument(
    "--smoke",
    action="store_true",
    help="no --run-dir: random-init tiny model, few tokens",
  )
  a = p.parse_args(argv)
  prompts = a.prompt or ["The quick brown fox"]
  if a.run_dir:
    model, mesh, cfg = load_model(a.run_dir, a.step)
    print(
      f"loaded {a.run_dir}: attention={cfg.model.attention} "
      f"layers={cfg.model.num_layers} embed={cfg.model.embed_dim}"
    )
  elif a.smoke:
    model, mesh = smoke_model()
    a.max_new_tokens = min(a.max_new_tokens, 8)
    print("smoke: random-init tiny DSA model")
  else:
    p.error("give --run-dir (or --smoke)")
  tokens, lens = encode(prompts)
  dec = D.Decoder(
    model,
    chunk_size=a.chunk_size,
    index_dtype=a.index_dtype,
    mode=a.mode,
    mesh=mesh,
  )
  out = dec.generate(
    tokens,
    lens,
    max_new_tokens=a.max_new_tokens,
    temperature=a.temperature,
    top_p=a.top_p,
    seed=a.seed,
    max_len=a.max_len,
  )
  for prompt, row in zip(prompts, out.tokens):
    print(f"--- {prompt!r}")
    print(prompt + decode_bytes(row))
  print(
    f"prefill: {out.prefill_tokens} tokens in {out.prefill_s:.3f} s "
    f"({out.prefill_tokens_per_s:.1f} tokens/s, incl. compilation)"
  )
  print(
    f"decode: first step {out.first_step_s:.3f} s (compiles); "
    f"{out.decode_steps} steps x {len(out.tokens)} rows in "
    f"{out.decode_s:.3f} s ({out.decode_tokens_per_s:.1f} tokens/s)"
  )
  return out


if __name__ == "__main__":
  main()
