"""The module paths and names of the first, flat layout keep working."""

import importlib
import sys
import warnings

import pytest

import sparse_attn as sa
from sparse_attn import compat

# old module -> names code written against the first layout imports from it
OLD_NAMES = {
  "sparse_attn.attention": [
    "dense_attention",
    "gathered_attention",
    "dsa_attention",
    "masked_softmax",
  ],
  "sparse_attn.indexer": [
    "LightningIndexer",
    "indexer_scores",
    "lightning_topk",
    "select_topk",
  ],
  "sparse_attn.losses": ["dense_indexer_kl", "sparse_indexer_kl", "lm_loss"],
  "sparse_attn.rope": ["apply_rope"],
  "sparse_attn.masking": ["visible", "num_visible"],
  "sparse_attn.chunking": ["map_query_chunks"],
  "sparse_attn.patterns": [
    "sliding_window_attention",
    "sparse_transformer_attention",
  ],
  "sparse_attn.lsh": ["lsh_attention"],
  "sparse_attn.nsa": ["nsa_attention"],
  "sparse_attn.moba": ["moba_attention"],
  "sparse_attn.params": ["param", "tag"],
  "sparse_attn.layers": [
    "AttentionLayer",
    "DenseAttention",
    "DSAAttention",
    "MODES",
    "default_positions",
    "dense_key_counts",
  ],
  "sparse_attn.baseline_layers": [
    "BASELINE_LAYERS",
    "DEFAULTS",
    "BUDGET_PARAM",
    "key_budget",
    "keys_per_query",
    "match_budget",
    "SlidingWindowAttention",
    "LSHAttention",
    "NSAAttention",
    "MoBAAttention",
  ],
  "sparse_attn.model": [
    "Transformer",
    "build_model",
    "ATTENTION_KINDS",
    "register_attention",
    "kind_has_indexer",
    "INDEXER",
    "MAIN",
    "count_params",
    "RMSNorm",
    "SwiGLU",
    "Block",
  ],
  "sparse_attn.decode": [
    "Decoder",
    "generate",
    "init_cache",
    "Cache",
    "cache_shardings",
    "cache_shapes",
    "quantize_index_keys",
    "dequantize_index_keys",
    "sample_logits",
    "write_rows",
    "INDEX_DTYPES",
  ],
  "sparse_attn.train": [
    "setup",
    "init_state",
    "make_train_step",
    "train",
    "load_checkpoint",
    "evaluate",
    "read_metrics",
    "init_distributed",
    "merge_model",
  ],
}


def test_every_moved_module_is_covered():
  assert set(OLD_NAMES) <= set(compat.MOVED)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_module_paths_import_with_a_warning(old):
  sys.modules.pop(old, None)
  with pytest.warns(DeprecationWarning, match="moved to"):
    module = importlib.import_module(old)
  for name in OLD_NAMES[old]:
    assert getattr(module, name) is not None, (old, name)
  assert not hasattr(module, "no_such_name")
  with pytest.raises(AttributeError, match="moved to"):
    getattr(module, "no_" + "such_name")


def test_top_level_names_of_the_first_api():
  for name in (
    "ATTENTION_KINDS",
    "AttentionLayer",
    "BASELINE_LAYERS",
    "Config",
    "ModelConfig",
    "TrainConfig",
    "Transformer",
    "build_model",
    "key_budget",
    "keys_per_query",
    "match_budget",
    "register_attention",
    "DSAAttention",
    "DenseAttention",
    "LightningIndexer",
    "apply_rope",
    "dense_attention",
    "dense_indexer_kl",
    "dsa_attention",
    "gathered_attention",
    "gathered_attention_reference",
    "indexer_scores",
    "indexer_sparse_kl",
    "indexer_warmup_kl",
    "lightning_topk",
    "lm_loss",
    "select_topk",
    "sparse_indexer_kl",
  ):
    assert name in sa.__all__ and getattr(sa, name) is not None, name
  assert sa.indexer_warmup_kl is sa.dense_indexer_kl
  assert sorted(sa.ATTENTION_KINDS) == sorted(sa.registry.names())


def test_new_paths_do_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    for name in (
      "sparse_attn.ops.attention",
      "sparse_attn.nn",
      "sparse_attn.models",
      "sparse_attn.inference",
      "sparse_attn.registry",
      "sparse_attn.budgets",
    ):
      importlib.import_module(name)
