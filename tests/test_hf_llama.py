"""The Llama-family HF formats (llama, mistral, qwen2, qwen3) without torch:
parity against committed goldens, lossless round trips, shards and dtypes,
Mistral's window, DSA retrofits (`hf.retrofit_from`) and their checkpoints.

Goldens (tests/goldens/README.md; transformers 5.24, f32 reference logits
of the checkpoint's own, possibly bf16/f16-rounded, weights). Measured:
logits max |diff| 0.9e-6 .. 1.4e-6 of a logit scale ~2 in all five cases
(relative 5-7e-7). Asserted: 1e-5 of the logit scale.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _goldens import GOLDENS, assert_same_params, assert_same_tensors
from _goldens import golden_case as _case
from _goldens import param_arrays as _params
from sparse_attn import hf, inference
from sparse_attn.config import ModelConfig
from sparse_attn.hf import llama, parity
from sparse_attn.hf.safetensors_io import CheckpointTensors
from sparse_attn.models import Transformer, build_model
from sparse_attn.ops.rope import RopeScaling

CASES = [
  "llama_gqa_bias_llama3",
  "llama_tied_mqa_bf16",
  "mistral_window_f16",
  "qwen2_bias_tied_bf16",
  "qwen3_qknorm_yarn",
]
DTYPES = {
  "llama_tied_mqa_bf16": "BF16",
  "mistral_window_f16": "F16",
  "qwen2_bias_tied_bf16": "BF16",
}


def _logits(model, ref, **kw):
  return np.asarray(
    model(
      jnp.asarray(ref["tokens"]), kv_lengths=jnp.asarray(ref["lengths"]), **kw
    )[0]
  )


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_goldens(name):
  path, ref = _case(name)
  model, cfg = hf.load_pretrained(path)
  assert not cfg.scale_embeddings
  err, scale = parity.max_abs_error(
    _logits(model, ref), ref["logits"], ref["lengths"]
  )
  assert err <= 1e-5 * scale, (err, scale)


def test_the_goldens_exercise_each_option():
  """Each case loads into the options it is meant to test."""
  got = {n: hf.config_from_pretrained(_case(n)[0]) for n in CASES}
  c = got["llama_gqa_bias_llama3"]
  assert (c.qkv_bias, c.out_bias, c.num_kv_heads, c.tie_embeddings) == (
    True,
    True,
    2,
    False,
  )
  assert c.rope_scaling_config.type == "llama3"
  c = got["llama_tied_mqa_bf16"]
  assert c.tie_embeddings and c.num_kv_heads == 1
  c = got["mistral_window_f16"]
  assert c.attention == "sliding_window" and c.attention_kwargs == {"window": 8}
  c = got["qwen2_bias_tied_bf16"]
  assert c.qkv_bias and not c.out_bias and c.tie_embeddings
  assert c.rope_base == 1e6
  c = got["qwen3_qknorm_yarn"]
  assert c.qk_norm and c.head_dim == 12 and c.embed_dim == 32
  assert c.rope_scaling_config.type == "yarn"
  for name, dtype in DTYPES.items():
    tensors = CheckpointTensors(_case(name)[0])
    assert tensors.dtype("model.embed_tokens.weight") == dtype


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_lossless(tmp_path, name):
  """load -> save (in the checkpoint's dtype) -> the same tensors, bit for
  bit, and the same config fields."""
  path, _ = _case(name)
  model, cfg = hf.load_pretrained(path)
  dtype = {"BF16": "bfloat16", "F16": "float16"}.get(DTYPES.get(name, ""))
  out = str(tmp_path / "copy")
  hf.save_pretrained(model, out, dtype=dtype)
  assert_same_tensors(path, out, dtypes=True)
  a, b = hf.read_config(path), hf.read_config(out)
  rope = "rope_parameters"  # ours spells out YaRN's default betas
  for key in set(a) - {"transformers_version", "max_window_layers", rope}:
    assert a[key] == b[key], key
  assert RopeScaling.from_dict(a[rope]) == RopeScaling.from_dict(b[rope])
  assert a[rope]["rope_theta"] == b[rope]["rope_theta"]
  again, cfg2 = hf.load_pretrained(out)
  assert cfg2 == cfg
  assert_same_params(model, again)


def test_shards_and_parameter_dtypes(tmp_path):
  path, ref = _case("llama_gqa_bias_llama3")
  model, _ = hf.load_pretrained(path)
  files = hf.save_pretrained(model, str(tmp_path), max_shard_size=40_000)
  assert "model.safetensors.index.json" in files and len(files) > 3
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(CheckpointTensors(path))
  again, _ = hf.load_pretrained(str(tmp_path))
  np.testing.assert_array_equal(_logits(model, ref), _logits(again, ref))
  m16, cfg16 = hf.load_pretrained(path, param_dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in _params(m16).values())


def test_mistral_window_is_honoured_or_dropped_on_request():
  path, ref = _case("mistral_window_f16")
  full, cfg = hf.load_pretrained(path, sliding_window=None)
  assert cfg.attention == "dense"
  want, got = ref["logits"], _logits(full, ref)
  w = 8  # the case's window: positions < 8 see no difference
  np.testing.assert_allclose(got[:, :w], want[:, :w], atol=1e-5)
  assert np.abs(got[0, w:] - want[0, w:]).max() > 1e-2
  with pytest.raises(ValueError, match="sliding_window=None"):
    hf.load_pretrained(path, attention="dsa")
  dsa = hf.config_from_pretrained(path, attention="dsa", sliding_window=None)
  assert dsa.attention == "dsa"


def test_unsupported_settings_are_refused(tmp_path):
  path, _ = _case("qwen3_qknorm_yarn")
  base = hf.read_config(path)

  def load(**fields):
    d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**base, **fields}))
    return hf.config_from_pretrained(str(d))

  with pytest.raises(ValueError, match="some layers only"):
    load(
      use_sliding_window=True,
      sliding_window=4,
      layer_types=["full_attention", "sliding_attention", "full_attention"],
    )
  assert load(
    use_sliding_window=True,
    sliding_window=4,
    layer_types=["sliding_attention"] * 3,
  ).attention_kwargs == {"window": 4}
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    load(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5})
  with pytest.raises(ValueError, match="hidden_act"):
    load(hidden_act="gelu")
  with pytest.raises(ValueError, match="mlp_bias"):
    load(mlp_bias=True)
  with pytest.raises(ValueError, match="unknown overrides"):
    hf.config_from_pretrained(path, windw=3)
  with pytest.raises(ValueError, match="MLA"):
    hf.config_from_pretrained(_case("deepseek_v32_rope")[0], attention="dsa")
  with pytest.raises(ValueError, match="GQA"):
    hf.config_from_pretrained(path, attention="mla")


def test_save_format_follows_the_model_and_refuses_what_it_cannot_hold(
  tmp_path,
):
  def model(**kw):
    cfg = ModelConfig(
      attention="dense", num_layers=1, scale_embeddings=False, **kw
    )
    return build_model(cfg, seed=0)

  assert hf.format_of(model()).MODEL_TYPE == "llama"
  assert hf.format_of(model(qkv_bias=True)).MODEL_TYPE == "qwen2"
  assert hf.format_of(model(qk_norm=True)).MODEL_TYPE == "qwen3"
  win = ModelConfig(
    attention="sliding_window",
    attention_params={"window": 4},
    num_layers=1,
    scale_embeddings=False,
  )
  assert hf.format_of(build_model(win, seed=0)).MODEL_TYPE == "mistral"
  with pytest.raises(ValueError, match="qk_norm"):
    hf.save_pretrained(model(qk_norm=True), str(tmp_path), model_type="qwen2")
  with pytest.raises(ValueError, match="scale_embeddings"):
    cfg = ModelConfig(attention="dense", num_layers=1)
    hf.save_pretrained(build_model(cfg, seed=0), str(tmp_path))
  with pytest.raises(ValueError, match="no HF format"):
    cfg = ModelConfig(attention="moba", num_layers=1, scale_embeddings=False)
    hf.save_pretrained(build_model(cfg, seed=0), str(tmp_path))
  # A llama checkpoint saved as qwen3 keeps token ids, not llama's fields.
  path, _ = _case("llama_gqa_bias_llama3")
  src, _ = hf.load_pretrained(path)
  with pytest.raises(ValueError, match="qk_norm"):
    hf.save_pretrained(src, str(tmp_path / "q3"), model_type="qwen3")


def test_projection_options_are_refused_by_layers_that_lack_them():
  for kind in ("lsh", "mla"):
    cfg = ModelConfig(attention=kind, num_layers=1, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
      build_model(cfg, seed=0)


@pytest.mark.parametrize("name", ["qwen2_bias_tied_bf16", "qwen3_qknorm_yarn"])
def test_retrofit_adds_a_fresh_indexer_and_keeps_the_dense_model(
  tmp_path, name
):
  path, ref = _case(name)
  dense, _ = hf.load_pretrained(path)
  with pytest.raises(ValueError, match="retrofit_from"):
    hf.load_pretrained(path, attention="dsa")
  model, cfg = hf.retrofit_from(
    path, top_k=4, indexer_heads=2, indexer_dim=16, sparse_layers=[0, 2]
  )
  assert cfg.attention == "dsa" and cfg.sparse_layers == (0, 2)
  assert [type(b.attn).__name__ for b in model.blocks] == [
    "DSAAttention",
    "DenseAttention",
    "DSAAttention",
  ]
  # The dense warm-up attends densely: the logits are the dense model's.
  np.testing.assert_array_equal(
    _logits(model, ref, mode="warmup"), _logits(dense, ref)
  )
  out = str(tmp_path / "dsa")
  hf.save_pretrained(model, out)
  saved = hf.read_config(out)
  assert saved["model_type"] == hf.read_config(path)["model_type"]
  assert (saved["index_topk"], saved["index_n_heads"]) == (4, 2)
  assert (saved["index_head_dim"], saved["index_layers"]) == (16, [0, 2])
  names = set(CheckpointTensors(out))
  indexer = {n for n in names if ".indexer." in n}
  assert {n.split(".")[2] for n in indexer} == {"0", "2"}
  assert "model.layers.0.self_attn.indexer.weights_proj.weight" in indexer
  assert names - indexer == set(CheckpointTensors(path))
  again, cfg2 = hf.load_pretrained(out)
  assert cfg2 == cfg
  assert_same_params(model, again)
  twin, tcfg = hf.load_pretrained(out, attention="dense")
  assert tcfg.sparse_layers is None
  np.testing.assert_array_equal(_logits(twin, ref), _logits(dense, ref))


def test_decode_on_a_retrofitted_qwen3():
  """Prefill + decode steps of a DSA retrofit (q/k norms, YaRN, GQA, a
  dense layer between DSA layers) == its full forward."""
  path, ref = _case("qwen3_qknorm_yarn")
  model, _ = hf.retrofit_from(
    path, top_k=5, indexer_heads=2, indexer_dim=16, sparse_layers=[1]
  )
  tokens = ref["tokens"]
  full = np.asarray(model(jnp.asarray(tokens))[0])
  dec = inference.Decoder(model, chunk_size=8)
  cache = dec.init_cache(2, 32)
  logits, cache = dec.prefill(cache, tokens[:, :13], [13, 13], return_all=True)
  np.testing.assert_allclose(
    np.asarray(logits), full[:, :13], atol=1e-4, rtol=1e-4
  )
  for t in range(13, 18):
    step, cache = dec.step(cache, tokens[:, t])
    np.testing.assert_allclose(
      np.asarray(step), full[:, t], atol=1e-4, rtol=1e-4
    )


def test_sparse_layers_config():
  cfg = ModelConfig(attention="dsa", num_layers=3, sparse_layers=[2, 0, 2])
  assert cfg.sparse_layers == (0, 2)
  assert [cfg.layer_attention(i) for i in range(3)] == ["dsa", "dense", "dsa"]
  assert ModelConfig(attention="mla_dsa", sparse_layers=[]).layer_attention(
    0
  ) == ("mla")
  from sparse_attn.config import Config, validate

  with pytest.raises(ValueError, match="sparse_layers"):
    validate(Config(model=dataclasses.replace(cfg, sparse_layers=(3,))), 1)
  with pytest.raises(ValueError, match="sparse_layers"):
    ModelConfig(sparse_layers="all")
  model = Transformer(cfg, rngs=nnx.Rngs(params=0))
  assert not hasattr(model.blocks[1].attn, "indexer")


def test_goldens_readme_lists_every_case():
  text = open(f"{GOLDENS}/README.md", encoding="utf-8").read()
  for name in CASES:
    assert name in text
  assert set(llama.FORMATS) == {"llama", "mistral", "qwen2", "qwen3"}


def test_retrofit_to_nsa_starts_every_branch_from_the_checkpoints_kv():
  """Other kinds retrofit the same way: NSA's per-branch K/V (group-major
  [E, 3G, D]) each start as the checkpoint's K/V; q / o are loaded."""
  path, _ = _case("llama_gqa_bias_llama3")
  dense, _ = hf.load_pretrained(path)
  model, cfg = hf.retrofit_from(path, attention="nsa", compress="mean")
  assert cfg.attention == "nsa"
  for blk, ref_blk in zip(model.blocks, dense.blocks):
    for name in ("wk", "wv", "bk", "bv"):
      got = np.asarray(getattr(blk.attn, name)[...])
      want = np.asarray(getattr(ref_blk.attn, name)[...])
      axis = got.ndim - 2  # the kv-head axis
      for branch in range(3):
        np.testing.assert_array_equal(
          np.take(got, np.arange(branch, got.shape[axis], 3), axis=axis), want
        )
    np.testing.assert_array_equal(blk.attn.wq[...], ref_blk.attn.wq[...])
