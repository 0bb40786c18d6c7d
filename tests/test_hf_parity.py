"""Live parity with transformers (the `hf` extra: torch CPU + transformers).

Rebuilds the cases of experiments/hf_parity.py (tiny random
DeepseekV32ForCausalLM: plain RoPE and YaRN, dense + MoE layers; Llama,
Mistral, Qwen2, Qwen3 with their options and bf16/f16 tensors; one
right-padded row), and checks the other direction too: a checkpoint that
this library writes loads in transformers with the same logits, DSA
retrofits of the Llama family included (transformers loads them as the
dense model, ignoring the indexer tensors).
Skipped, saying why, without the extra (`pip install -e ".[hf]"`).
"""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparse_attn import hf  # noqa: E402
from sparse_attn.hf import parity  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
    "hf_parity", os.path.join(ROOT, "experiments", "hf_parity.py")
  )
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


S = _script()


@pytest.mark.parametrize("case", sorted(S.CASES))
def test_live_parity(tmp_path, case):
  path = S.write_case(str(tmp_path), case, seed=0)
  r = S.compare_case(path)
  assert r["rel_err"] <= 1e-4, r
  assert r["agree"] == r["queries"] and r["ties"] == 0, r
  assert r["queries"] > 0 or not S.has_indexer(case)


@pytest.mark.parametrize("case", sorted(S.CASES))
def test_saved_checkpoint_loads_in_transformers(tmp_path, case):
  """load_pretrained -> save_pretrained -> transformers' from_pretrained:
  the same logits (the round trip through the other library)."""
  src = S.write_case(str(tmp_path), case, seed=1)
  model, _ = hf.load_pretrained(src)
  out = str(tmp_path / "ours")
  hf.save_pretrained(model, out)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager", dtype=torch.float32
  ).eval()
  tokens, lengths = S.inputs(1)
  logits, topk = S.hf_reference(theirs, tokens, lengths)
  run = parity.indexer_run(model, tokens, lengths)
  err, scale = parity.max_abs_error(run.logits, logits, lengths)
  assert err <= 1e-4 * scale, (err, scale)
  assert len(run.scores) == (len(topk) if S.has_indexer(case) else 0)
  for s, mine, other in zip(run.scores, run.indices, topk):
    assert parity.selection_agreement(s, mine, other, lengths).ok
  np.testing.assert_array_equal(
    np.load(os.path.join(src, S.REFERENCE))["tokens"], tokens
  )


@pytest.mark.parametrize(
  "case", sorted(c for c in S.CASES if not S.has_indexer(c))
)
def test_retrofitted_checkpoint_loads_in_transformers_as_the_dense_model(
  tmp_path, case
):
  """A DSA retrofit saved in its source format: transformers loads the
  dense model from it (the indexer tensors unused), with the logits of the
  retrofit's dense mode."""
  import jax.numpy as jnp

  src = S.write_case(str(tmp_path), case, seed=2)
  fields = {"sliding_window": None} if case.startswith("mistral") else {}
  model, _ = hf.retrofit_from(
    src, top_k=4, indexer_heads=2, indexer_dim=16, **fields
  )
  out = str(tmp_path / "dsa")
  hf.save_pretrained(model, out)
  assert hf.read_config(out)["index_topk"] == 4
  theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager", dtype=torch.float32,
    output_loading_info=True,
  )  # fmt: skip
  assert not info["missing_keys"]
  assert any(".indexer." in k for k in info["unexpected_keys"])
  tokens, lengths = S.inputs(2)
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(int)
  with torch.no_grad():
    want = theirs.eval()(
      input_ids=torch.as_tensor(tokens, dtype=torch.long),
      attention_mask=torch.as_tensor(mask),
    ).logits.numpy()
  got = np.asarray(
    model(jnp.asarray(tokens), mode="dense", kv_lengths=jnp.asarray(lengths))[0]
  )
  err, scale = parity.max_abs_error(got, want, lengths)
  if case.startswith("mistral"):  # saved without its window
    assert hf.read_config(out)["sliding_window"] is None
  assert err <= 1e-4 * scale, (err, scale)


def test_dense_only_model_loads_in_transformers(tmp_path):
  """A model without MoE (every layer a dense SwiGLU) saves a config that
  transformers accepts, with the same logits."""
  import dataclasses

  import jax.numpy as jnp

  from sparse_attn.models import build_model

  src = S.write_case(str(tmp_path), "deepseek_v32_rope", seed=0)
  cfg = hf.config_from_pretrained(src)
  model = build_model(dataclasses.replace(cfg, moe=()), seed=0)
  out = str(tmp_path / "dense")
  hf.save_pretrained(model, out)
  theirs = transformers.DeepseekV32ForCausalLM.from_pretrained(
    out, attn_implementation="eager"
  ).eval()
  tokens, _ = S.inputs(0)
  with torch.no_grad():
    want = theirs(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits
  got = np.asarray(model(jnp.asarray(tokens))[0])
  assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
