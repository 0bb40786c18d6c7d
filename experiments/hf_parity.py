"""Parity with transformers on tiny random checkpoints of every HF format.

Builds tiny random models (transformers 5.24, torch CPU) of each format
`sparse_attn.hf` reads -- DeepseekV32ForCausalLM (plain RoPE and YaRN,
dense + MoE layers), LlamaForCausalLM (GQA, q/k/v/o biases, llama3 RoPE
scaling; tied MQA), MistralForCausalLM (a sliding window shorter than the
sequence), Qwen2ForCausalLM (q/k/v biases, tied), Qwen3ForCausalLM
(q/k norms, head_dim != hidden / heads, YaRN) -- with tensors saved in
f32, bf16 or f16, a batch with one right-padded row; records HF's logits
(and DeepSeek's indexer top-k per layer), then loads the directory with
`sparse_attn.hf.load_pretrained` (no torch) and compares.

  pip install -e ".[hf]"
  python experiments/hf_parity.py                    # build, compare, print
  python experiments/hf_parity.py --out results/hf_parity   # keep the dirs
  python experiments/hf_parity.py --write-goldens    # refresh tests/goldens/

Each case directory holds the checkpoint (config.json, model.safetensors)
and reference.npz (tokens, lengths, logits, topk [L, B, T, K]); the goldens
under tests/goldens/ keep a parity check in the plain test suite.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

GOLDENS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "tests",
  "goldens",
)
REFERENCE = "reference.npz"

# Small enough to commit (about 0.4 MB a case in f32), large enough for
# every path: q LoRA, 3 layers (1 dense MLP, 2 MoE with 2 groups of 4
# experts, a shared expert), 8 indexer heads, top-k 8 of up to 24 keys.
BASE = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  moe_intermediate_size=16,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=4,
  n_shared_experts=1,
  n_routed_experts=8,
  num_experts_per_tok=2,
  n_group=2,
  topk_group=1,
  routed_scaling_factor=2.5,
  kv_lora_rank=16,
  q_lora_rank=24,
  qk_nope_head_dim=16,
  qk_rope_head_dim=8,
  v_head_dim=12,
  first_k_dense_replace=1,
  index_topk=8,
  index_head_dim=16,
  index_n_heads=8,
  max_position_embeddings=256,
  tie_word_embeddings=False,
  initializer_range=0.1,  # larger than HF's 0.02: logits and scores far from 0
)
#: The Llama-family cases' shared sizes: GQA 4 heads on 2 kv heads.
LLAMA_BASE = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  tie_word_embeddings=False,
  initializer_range=0.1,
)
#: case -> the tensor dtype of its checkpoint (default float32); the
#: reference logits are HF's in f32 of the rounded weights.
CASE_DTYPE = {
  "llama_tied_mqa_bf16": "bfloat16",
  "mistral_window_f16": "float16",
  "qwen2_bias_tied_bf16": "bfloat16",
}
CASES = {
  "deepseek_v32_rope": dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
  ),
  # YaRN with both mscales != 1, so cos/sin carry an attention factor and
  # the softmax scale an mscale**2.
  "deepseek_v32_yarn": dict(
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 8,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 0.9,
      "mscale_all_dim": 0.8,
    },
    max_position_embeddings=32,
  ),
  "llama_gqa_bias_llama3": dict(
    model_type="llama",
    attention_bias=True,
    rope_parameters={
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8,
    },
  ),
  "llama_tied_mqa_bf16": dict(
    model_type="llama", num_key_value_heads=1, tie_word_embeddings=True
  ),
  "mistral_window_f16": dict(model_type="mistral", sliding_window=8),
  "qwen2_bias_tied_bf16": dict(
    model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0
  ),
  "qwen3_qknorm_yarn": dict(
    model_type="qwen3",
    head_dim=12,
    max_position_embeddings=32,
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 8,
    },
  ),
}
BATCH, SEQ_LEN, PAD_TO = 2, 24, 17  # row 1 holds 17 real tokens


def has_indexer(case: str) -> bool:
  return "model_type" not in CASES[case]


def hf_model(case: str, seed: int = 0):
  """A random HF model of `case` (eval mode, eager attention, f32)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  fields = dict(CASES[case])
  model_type = fields.pop("model_type", "deepseek_v32")
  if model_type == "deepseek_v32":
    cfg = transformers.DeepseekV32Config(**{**BASE, **fields})
  else:
    cfg = transformers.AutoConfig.for_model(
      model_type, **{**LLAMA_BASE, **fields}
    )
  cfg._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # values HF initialises to constants
    for name, p in model.named_parameters():
      if name.endswith(
        ("k_norm.bias", "layernorm.weight", "norm.weight", "proj.bias")
      ):
        p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.05 * torch.randn_like(b))
  return model


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, BASE["vocab_size"], (BATCH, SEQ_LEN))
  lengths = np.array([SEQ_LEN, PAD_TO], np.int32)
  tokens[1, PAD_TO:] = 0
  return tokens.astype(np.int32), lengths


def hf_reference(model, tokens: np.ndarray, lengths: np.ndarray):
  """(logits f32[B, T, V], topk int32[L, B, T, K]) of the HF model (topk
  [0] for models without an indexer)."""
  import torch  # pylint: disable=g-import-not-at-top

  selections = []
  hooks = [
    layer.self_attn.indexer.register_forward_hook(
      lambda mod, args, out: selections.append(out.numpy().copy())
    )
    for layer in model.model.layers
    if hasattr(layer.self_attn, "indexer")
  ]
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
  try:
    with torch.no_grad():
      out = model(
        input_ids=torch.as_tensor(tokens, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
      )
  finally:
    for h in hooks:
      h.remove()
  topk = np.stack(selections) if selections else np.zeros((0,))
  return out.logits.float().numpy(), topk.astype(np.int32)


def write_case(out_dir: str, case: str, seed: int = 0) -> str:
  """Builds, saves and runs one case; returns its directory."""
  path = os.path.join(out_dir, case)
  if os.path.exists(path):
    shutil.rmtree(path)
  model = hf_model(case, seed)
  dtype = CASE_DTYPE.get(case)
  if dtype is not None:
    import torch  # pylint: disable=g-import-not-at-top

    # Saved in the low dtype; the reference runs in f32 on the same
    # rounded weights (and f32 RoPE buffers), so the comparison measures
    # the model, not the rounding.
    low = getattr(torch, dtype)
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(p.to(low).float())
    copy.deepcopy(model).to(low).save_pretrained(path)
  else:
    model.save_pretrained(path)
  generation = os.path.join(path, "generation_config.json")  # not needed
  if os.path.exists(generation):
    os.remove(generation)
  tokens, lengths = inputs(seed)
  logits, topk = hf_reference(model, tokens, lengths)
  np.savez_compressed(
    os.path.join(path, REFERENCE),
    tokens=tokens,
    lengths=lengths,
    logits=logits,
    topk=topk,
  )
  return path


def compare_case(path: str) -> dict:
  """This library on a case directory vs its reference.npz."""
  from sparse_attn import hf  # pylint: disable=g-import-not-at-top
  from sparse_attn.hf import parity  # pylint: disable=g-import-not-at-top

  ref = np.load(os.path.join(path, REFERENCE))
  model, _ = hf.load_pretrained(path, implementation="xla")
  run = parity.indexer_run(model, ref["tokens"], ref["lengths"])
  err, scale = parity.max_abs_error(run.logits, ref["logits"], ref["lengths"])
  layers = [
    parity.selection_agreement(s, i, t, ref["lengths"])
    for s, i, t in zip(run.scores, run.indices, ref["topk"])
    if ref["topk"].size
  ]
  return {
    "max_abs_err": err,
    "logit_scale": scale,
    "rel_err": err / scale,
    "queries": sum(a.queries for a in layers),
    "agree": sum(a.agree for a in layers),
    "identical": sum(a.identical for a in layers),
    "ties": sum(a.ties for a in layers),
  }


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", help="keep the case directories here")
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--write-goldens",
    action="store_true",
    help=f"write the cases into {os.path.relpath(GOLDENS)} (committed)",
  )
  a = p.parse_args(argv)
  out = GOLDENS if a.write_goldens else a.out or tempfile.mkdtemp()
  rows = []
  for case in a.cases.split(","):
    t0 = time.perf_counter()
    path = write_case(out, case, a.seed)
    r = compare_case(path)
    rows.append((case, r))
    topk = (
      f"; top-k sets agree up to ties {r['agree']}/{r['queries']} "
      f"(identical {r['identical']}, ties at the k-th score {r['ties']})"
      if r["queries"]
      else ""
    )
    print(
      f"{case}: logits max|diff| {r['max_abs_err']:.2e} of scale "
      f"{r['logit_scale']:.3f} (rel {r['rel_err']:.1e}){topk} "
      f"[{time.perf_counter() - t0:.1f} s]",
      flush=True,
    )
  if not a.out and not a.write_goldens:
    shutil.rmtree(out)
  bad = [
    c for c, r in rows if r["rel_err"] > 1e-4 or r["agree"] != r["queries"]
  ]
  if bad:
    raise SystemExit(f"parity failed: {bad}")
  return rows


if __name__ == "__main__":
  main()
