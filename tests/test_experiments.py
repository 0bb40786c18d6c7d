"""Smoke tests of the experiment scripts: each runs as a user runs it
(`python experiments/<script>.py --smoke --out-dir DIR`, a fresh process)
at tiny size; only the structure of the outputs is checked (columns, one
row per kind and length, finite numbers), never a training result. The
modules are imported for their constants and argument parsing, and the
study's for loading a dense model it saved."""

import copy
import csv
import dataclasses
import importlib
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from _testutil import run_script

EXP = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


def _module(name):
  if EXP not in sys.path:
    sys.path.insert(0, EXP)
  return importlib.import_module(name)


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _finite(row, keys):
  for k in keys:
    assert row[k] != "", (k, row)
    assert math.isfinite(float(row[k])), (k, row)


def test_retrieval_smoke(tmp_path):
  run_script("retrieval", "--smoke", "--out-dir", tmp_path)
  mod = _module("retrieval")
  rows = _rows(tmp_path / "retrieval.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  _, pr = mod.parse_args(["--smoke"])
  labels = [label for label, *_ in mod.runs_for(pr)]
  for task in pr.tasks:
    for label in labels:
      got = sorted(
        int(r["eval_len"])
        for r in rows
        if r["task"] == task and r["label"] == label
      )
      assert got == sorted(pr.eval_lens), (task, label, got)
  for r in rows:
    _finite(
      r,
      (
        "exact_match",
        "token_acc",
        "keys_per_query",
        "train_time_s",
        "budget_nominal",
      ),
    )
    assert (
      0.0
      <= float(r["exact_match"])
      <= float(r["token_acc"]) + 1e-9
      <= 1.0 + 1e-9
    )
  sparse = [r for r in rows if r["kind"] != "dense"]
  dense = [r for r in rows if r["kind"] == "dense"]
  # Sparse kinds attend fewer keys than dense at the longest length.
  longest = max(pr.eval_lens)
  kd = [
    float(r["keys_per_query"]) for r in dense if int(r["eval_len"]) == longest
  ]
  for r in sparse:
    if int(r["eval_len"]) == longest:
      assert float(r["keys_per_query"]) < kd[0]
  assert (tmp_path / "retrieval.md").exists()
  assert (tmp_path / "retrieval.png").exists()


def test_bench_attention_smoke(tmp_path):
  run_script("bench_attention", "--smoke", "--out-dir", tmp_path)
  mod = _module("bench_attention")
  rows = _rows(tmp_path / "bench_attention.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  a = mod.parse_args(["--smoke"])
  lengths = [int(x) for x in a.lengths.split(",")]
  for mode in mod.MODES:
    for kind in mod.KINDS:
      got = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
      assert sorted(int(r["L"]) for r in got) == lengths, (mode, kind)
      for r in got:
        if kind == "lsh" and mode == "decode":
          assert r["status"].startswith("n/a")
          continue
        assert r["status"] == "ok", r
        _finite(r, ("time_s", "ratio", "model_ratio", "budget", "peak_bytes"))
        assert float(r["time_s"]) > 0
  assert (tmp_path / "bench_attention.png").exists()


def test_indexer_analysis_smoke(tmp_path):
  run_script("indexer_analysis", "--smoke", "--out-dir", tmp_path)
  mod = _module("indexer_analysis")
  rows = _rows(tmp_path / "indexer_analysis.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  a = mod.parse_args(["--smoke"])
  steps = sorted({int(r["step"]) for r in rows})
  assert steps[0] == 0 and steps[-1] == a.warmup_steps + a.sparse_steps
  assert {r["stage"] for r in rows} == {"warmup", "sparse"}
  for s in steps:
    assert sorted(int(r["layer"]) for r in rows if int(r["step"]) == s) == list(
      range(a.num_layers)
    )
  for r in rows:
    _finite(r, ("recall", "mass", "oracle_mass", "kl", "hisa_overlap"))
    assert 0.0 <= float(r["recall"]) <= 1.0 + 1e-6
    assert 0.0 <= float(r["hisa_overlap"]) <= 1.0 + 1e-6
    assert float(r["mass"]) <= float(r["oracle_mass"]) + 1e-5
  with open(tmp_path / "indexer_analysis.json", encoding="utf-8") as f:
    assert len(json.load(f)["rows"]) == len(rows)
  assert (tmp_path / "indexer_curves.png").exists()
  assert (tmp_path / "indexer_heatmaps.png").exists()


def test_bench_hisa_smoke(tmp_path):
  run_script("bench_hisa", "--smoke", "--out-dir", tmp_path)
  mod = _module("bench_hisa")
  rows = _rows(tmp_path / "bench_hisa.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  a = mod.parse_args(["--smoke"])
  want = sorted(
    (int(L), kind) for L in a.lengths.split(",") for kind in a.inputs.split(",")
  )
  assert sorted((int(r["L"]), r["input"]) for r in rows) == want
  for r in rows:
    _finite(r, ("flat_ms", "hisa_ms", "speedup", "overlap_mean", "same_set"))
    assert 0.0 <= float(r["overlap_p5"]) <= float(r["overlap_mean"]) <= 1.0
  assert (tmp_path / "bench_hisa.md").exists()


def test_index_share_smoke(tmp_path):
  run_script("index_share", "--smoke", "--out-dir", tmp_path)
  mod = _module("index_share")
  rows = _rows(tmp_path / "index_share.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  variants = [r["variant"] for r in rows]
  assert variants[0] == "DSA, every layer" and len(variants) == 6
  for r in rows:
    _finite(r, ("calib_loss", "eval_loss", "indexer_params"))
  full = int(rows[0]["indexer_params"])
  assert int(rows[1]["indexer_params"]) < full  # the shared layer has none
  assert (tmp_path / "index_share.md").exists()


def test_bench_mla_smoke(tmp_path):
  run_script("bench_mla", "--smoke", "--out-dir", tmp_path)
  mod = _module("bench_mla")
  rows = _rows(tmp_path / "bench_mla.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  assert sorted(r["op"] for r in rows) == ["decode", "dense", "sparse"]
  for r in rows:
    _finite(r, ("mha_ms", "absorbed_ms", "ratio", "max_abs_diff"))
    assert float(r["max_abs_diff"]) < 1e-4  # the two forms agree
  assert (tmp_path / "bench_mla.md").exists()


def test_indexer_precision_smoke(tmp_path):
  run_script("indexer_precision", "--smoke", "--out-dir", tmp_path)
  mod = _module("indexer_precision")
  rows = _rows(tmp_path / "indexer_precision.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  assert {r["variant"] for r in rows} == set(mod.VARIANTS)
  assert {r["inputs"] for r in rows} == {"gaussian", "outliers"}
  for r in rows:
    _finite(r, ("mean_overlap", "identical"))
    assert 0.5 < float(r["mean_overlap"]) <= 1.0
  assert (tmp_path / "indexer_precision.md").exists()


def test_train_script_deepseek_v32(tmp_path):
  """--model deepseek_v32: both stages, a checkpoint, resumable."""
  args = (
    "train",
    "--model",
    "deepseek_v32",
    "--preset",
    "tiny",
    "--warmup-steps",
    "2",
    "--sparse-steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--run-dir",
    tmp_path,
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.max_bytes=100000",
    "--set",
    "train.eval_max_bytes=20000",
  )
  text = run_script(*args)
  assert "deepseek_v32_tiny: attention=mla_dsa" in text
  assert "[mla_dsa:warmup]" in text and "[mla_dsa:sparse]" in text
  assert "final: validation loss" in text
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["model"]["moe"]["num_experts"] == 8
  assert "resumed from checkpoint at step 4" in run_script(*args)


def test_retrofit_demo_smoke(tmp_path):
  """The README demo at smoke size: a dense checkpoint written with
  save_pretrained, retrofitted with DSA on a text + task mixture, with the
  dense original, its dense twin and the retrofit evaluated at 1x/2x/4x;
  a rerun resumes both training runs from their orbax checkpoints."""
  from sparse_attn import hf

  dense_dir, out = tmp_path / "dense", tmp_path / "rf"
  made = run_script("make_dense_checkpoint", "--out", dense_dir, "--smoke")
  assert "dense llama checkpoint" in made
  assert hf.read_config(dense_dir)["model_type"] == "llama"
  args = (
    "retrofit", "--hf-checkpoint", dense_dir, "--smoke", "--top-k", "8",
    "--dataset", "text+passkey", "--out-dir", out,
  )  # fmt: skip
  first = run_script(*args)
  assert "[dsa:warmup]" in first and "[dsa:sparse]" in first
  report = json.loads((out / "report.json").read_text())
  lengths = {"128", "256", "512"}
  for model in ("dense", "dense_twin", "dsa"):
    assert set(report[model]) == lengths, model
    for row in report[model].values():
      assert math.isfinite(row["ppl"]) and row["ppl"] > 1
      assert all(0 <= row[t] <= 1 for t in ("passkey", "vartrack"))
  assert report["dense"]["512"]["attended_fraction"] == 1.0
  assert report["dsa"]["512"]["attended_fraction"] < 0.1  # 8 of <= 512 keys
  layers = hf.read_config(dense_dir)["num_hidden_layers"]
  for key in ("recall_before", "recall_after"):
    assert len(report[key]) == layers
    assert all(0 <= r <= 1 for r in report[key])
  saved = hf.read_config(out / "hf")
  assert saved["model_type"] == "llama" and saved["index_topk"] == 8
  model, cfg = hf.load_pretrained(out / "hf")
  assert cfg.attention == "dsa" and cfg.top_k == 8
  assert "dense original / dense twin / DSA" in (out / "report.md").read_text()
  assert (out / "retrofit.png").exists()

  again = run_script(*args)  # both runs resume at their last step
  assert "resumed from checkpoint at step 8" in again
  assert "resumed from checkpoint at step 4" in again
  rerun = json.loads((out / "report.json").read_text())
  assert rerun["resumed_from"] == 8
  for model in ("dense_twin", "dsa"):
    assert rerun[model] == report[model], model


def test_retrieval_pretrain_short_flag():
  mod = _module("retrieval")
  _, pr = mod.parse_args(["--smoke", "--pretrain-short", "128,600,3e-3"])
  assert pr.pretrain_short == (128, 600, 3e-3)
  _, pr = mod.parse_args(["--smoke"])
  assert pr.pretrain_short is None
  with pytest.raises(ValueError, match="--pretrain-short"):
    mod.parse_args(["--smoke", "--pretrain-short", "128,600"])


class _Killed(Exception):
  pass


def test_retrieval_pretraining_resumes_exactly(tmp_path):
  """A dense pretraining killed in its short phase and again in its main
  phase, each time resumed from its checkpoint, ends with the model of an
  uninterrupted run, bit for bit."""
  import dataclasses

  import jax
  import numpy as np

  mod = _module("retrieval")
  pr = dataclasses.replace(
    mod.PRESETS["smoke"], pretrain_steps=5, pretrain_short=(32, 5, 3e-3)
  )
  whole, _ = mod.pretrain_dense(pr, "mqar", 0, lambda m: None)

  def killer(after):
    lines = []

    def log(msg):
      lines.append(msg)
      if "] step " in msg and len([m for m in lines if "] step " in m]) > after:
        raise _Killed(msg)

    return log, lines

  ckpt = str(tmp_path / "pre.partial")
  # Every step logs (total // 4 == 1) and saves (save_every_s=0); a kill
  # at a step's log loses that step. Kills: step 4 of the short phase
  # (saved: its step 3); after its last 2 steps, step 1 of the main phase
  # (saved: the short phase's end); step 3 of the main phase (saved: 2).
  for after, where, resumed_at in (
    (3, "step 4/5", None),
    (2, "step 1/5", "3/5 of L=32"),
    (2, "step 3/5", "5/5 of L=32"),
  ):
    log, lines = killer(after)
    with pytest.raises(_Killed, match=where):
      mod.pretrain_dense(pr, "mqar", 0, log, checkpoint=ckpt, save_every_s=0)
    if resumed_at:
      assert any(f"resumed at step {resumed_at}" in m for m in lines), lines
  log, lines = killer(10**9)
  resumed, seconds = mod.pretrain_dense(
    pr, "mqar", 0, log, checkpoint=ckpt, save_every_s=0
  )
  assert any("resumed at step 2/5 of L=64" in m for m in lines), lines
  assert seconds > 0
  # The library's orbax checkpoints, a folder of steps per phase.
  assert sorted(os.listdir(tmp_path / "pre.partial")) == ["phase0", "phase1"]
  for a, b in zip(
    jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_retrieval_pretraining_refuses_a_foreign_checkpoint(tmp_path):
  """A checkpoint directory that pretrain_dense did not write (no seconds
  kept with its step) is refused with a ValueError naming it."""
  import dataclasses

  from sparse_attn import training as T

  mod = _module("retrieval")
  pr = dataclasses.replace(mod.PRESETS["smoke"], pretrain_steps=2)
  cfg = mod.make_config(
    pr,
    "mqar",
    "dense",
    pr.budget_top_k,
    {},
    warmup=0,
    steps=2,
    lr=pr.lr,
    seed=0,
  )
  mngr = T.checkpoint_manager(str(tmp_path / "pre" / "phase0"), cfg)
  T.save_state(mngr, 1, T.init_state(T.setup(cfg)))
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(ValueError, match="not saved by pretrain_dense"):
    mod.pretrain_dense(
      pr, "mqar", 0, lambda m: None, checkpoint=str(tmp_path / "pre")
    )


def test_retrieval_model_and_task_options_flags():
  mod = _module("retrieval")
  C = _module("_common")
  before = copy.deepcopy(C.TASK_OPTIONS)
  _, pr = mod.parse_args(
    [
      "--quick",
      "--tasks",
      "vartrack",
      "--model",
      "num_layers=4,mlp_dim=256",
      "--task-options",
      "num_hops=1",
    ]
  )
  quick = mod.PRESETS["quick"].model
  assert pr.model == dict(quick, num_layers=4, mlp_dim=256)
  assert mod.PRESETS["quick"].model == quick  # the preset is not changed
  # The options are the preset's: the script-level defaults stay as they are
  # (other scripts of the same process read them).
  assert C.TASK_OPTIONS == before
  assert pr.options("vartrack") == dict(before["vartrack"], num_hops=1)
  assert pr.options("mqar") == before["mqar"]
  cfg = mod.make_config(
    pr, "vartrack", "dense", 8, {}, warmup=0, steps=1, lr=1e-3, seed=0
  )
  assert cfg.model.num_layers == 4
  assert cfg.train.dataset_options_dict["vartrack"]["num_hops"] == 1
  # Training, evaluation and the config all see the same generator.
  ds = mod.dataset(
    "vartrack", 128, "validation", options=pr.options("vartrack")
  )
  assert ds.task.num_hops == 1
  assert mod.dataset("vartrack", 128, "validation").task.num_hops == 2
  for flag, value in (
    ("--model", "layers=4"),
    ("--model", "num_layers"),
    ("--task-options", "num_hops=x"),
  ):
    with pytest.raises(ValueError, match=flag):
      mod.parse_args(["--smoke", flag, value])


def test_retrieval_study_smoke_and_resume(tmp_path):
  """Every part at one seed, then a rerun that trains nothing (the cache),
  then one more seed (only its models are trained)."""
  mod = _module("retrieval_study")
  out = run_script(
    "retrieval_study", "--smoke", "--seeds", "0", "--out-dir", tmp_path
  )
  todo = mod.models(mod.SMOKE, mod.PARTS, seeds=(0,))
  keys = {m.key(mod.SMOKE) for m in todo}
  assert len(keys) < len(todo)  # warm-up sweep shares main's DSA model
  assert f"({len(keys)} distinct), 0 already in" in out
  assert f" {len(keys)} to train" in out
  runs = mod.read_runs(str(tmp_path / "runs.jsonl"))
  assert set(runs) == keys
  rows = _rows(tmp_path / "study.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  assert {r["part"] for r in rows} == set(mod.PARTS)
  for r in rows:
    _finite(r, ("exact_match", "token_acc", "keys_per_query"))
  for name in ("study.md", "study_length.png", "study_warmup.png"):
    assert (tmp_path / name).exists(), name
  # The dense model each convert cell starts from is scored and reported.
  assert len(mod.read_scores(str(tmp_path))) == 1
  assert "Dense models before conversion" in (tmp_path / "study.md").read_text()
  # The dense models are saved; their in-progress checkpoints are gone.
  saved = sorted(os.listdir(tmp_path / "pretrained"))
  assert saved and all(n.endswith(".npz") for n in saved), saved
  assert not [n for n in saved if ".partial" in n or ".tmp" in n], saved
  # A saved dense model loads back, with the pretraining time its rows carry.
  said = []
  main, pre_s = mod.load_or_pretrain(
    mod.SMOKE, str(tmp_path), "mqar", 32, 0, said.append
  )
  assert "dense model from" in said[0], said
  times = {
    float(r["pretrain_time_s"])
    for r in rows
    if r["task"] == "mqar" and r["protocol"] == "convert"
  }
  assert times and all(t == pytest.approx(pre_s) for t in times), (times, pre_s)
  leaves = jax.tree.leaves(main)
  assert leaves and all(np.isfinite(x).all() for x in leaves)

  again = run_script(
    "retrieval_study", "--smoke", "--seeds", "0", "--out-dir", tmp_path
  )
  assert f"{len(keys)} already in" in again and " 0 to train" in again
  assert mod.read_runs(str(tmp_path / "runs.jsonl")) == runs

  # A killed run leaves a torn last line: it is skipped, that model retrained.
  with open(tmp_path / "runs.jsonl", "a", encoding="utf-8") as f:
    f.write('{"key": "torn')
  assert mod.read_runs(str(tmp_path / "runs.jsonl")) == runs

  # Pieces trained in separate out-dirs merge into one: the models and dense
  # models the destination lacks; a key that left the grid is skipped.
  dst, stale = tmp_path / "merged", tmp_path / "stale"
  dst.mkdir()
  stale.mkdir()
  half = sorted(runs)[: len(runs) // 2]
  for k in half:
    mod.append_run(str(dst / "runs.jsonl"), k, runs[k])
  mod.append_run(str(stale / "runs.jsonl"), '{"old": 1}', [{"x": 1}])
  merged = run_script(
    "retrieval_study",
    "--smoke",
    "--out-dir",
    dst,
    "--merge",
    tmp_path,
    stale,
  )
  assert f"{len(runs) - len(half)} models added" in merged
  assert "1 not in the grid skipped" in merged
  assert mod.read_runs(str(dst / "runs.jsonl")) == runs
  assert sorted(os.listdir(dst / "pretrained")) == sorted(
    os.listdir(tmp_path / "pretrained")
  )
  assert (dst / "study.md").exists()
  # The dense models' scores come along, so the report does not rescore them.
  assert mod.read_scores(str(dst)) == mod.read_scores(str(tmp_path))
  assert "scoring the dense model" not in merged


def test_retrieval_study_pretrains_from_a_shorter_length(tmp_path):
  """pretrain_from: the dense model at L starts from the one at a shorter
  length (trained first when missing); its time includes that one's, and
  the ETA counts both pretrainings."""
  mod = _module("retrieval_study")
  mq = dataclasses.replace(
    mod.SMOKE.recipes["mqar"], pretrain_short_at={}, pretrain_from={32: 16}
  )
  st = dataclasses.replace(
    mod.SMOKE,
    lens=(16, 32),
    dsa_top_k={16: (2,), 32: (4,)},
    pretrain_steps={16: 2, 32: 2},
    batch_size={16: 2, 32: 2},
    recipes={"mqar": mq},
  )
  out = str(tmp_path)
  left = mod.pretrain_steps_left(st, out, "mqar", 32, 0)
  own = mod.pretrain_steps_left(st, out, "mqar", 16, 0)
  assert left == pytest.approx(3 + own * (16 / 32) ** 1.5)
  said = []
  todo = mod.models(st, ("main",), lens=(32,), seeds=(0,), kinds=("dense",))
  mod.run_study(st, out, todo, said.append)
  log = "\n".join(said)
  assert "[mqar L=32 seed 0] starts from the L=16 dense model" in log, log
  assert "from the given dense model" in log, log
  assert mod.pretrain_steps_left(st, out, "mqar", 32, 0) == 0.0
  short = mod.tree_meta(mod.pretrained_path(st, out, "mqar", 16, 0))
  full = mod.tree_meta(mod.pretrained_path(st, out, "mqar", 32, 0))
  assert float(full["pretrain_time_s"]) > float(short["pretrain_time_s"])
  key = json.loads(full["key"].item())
  assert key["pretrain_from"]["seq_len"] == 16 and "pretrain_short" not in key
  # A base that is not a shorter length of the study is refused.
  for bad in ({32: 32}, {32: 8}):
    with pytest.raises(ValueError, match="pretrain_from"):
      dataclasses.replace(
        st, recipes={"mqar": dataclasses.replace(mq, pretrain_from=bad)}
      )


def test_retrieval_study_refuses_unlearned_dense_models(tmp_path):
  """A dense model below Study.min_dense_exact is scored, reported and not
  converted; the scratch protocol, which needs none, still trains."""
  mod = _module("retrieval_study")
  st = dataclasses.replace(mod.SMOKE, min_dense_exact=1.01)
  todo = mod.models(st, ("main", "scratch"), seeds=(0,))
  said = []
  mod.run_study(st, str(tmp_path), todo, said.append)
  log = "\n".join(said)
  scores = mod.read_scores(str(tmp_path))
  assert len(scores) == 1, scores
  (score,) = scores.values()
  assert score["task"] == "mqar" and score["train_len"] == 32
  assert 0.0 <= score["exact_match"] <= 1.0 and score["pretrain_time_s"] > 0
  assert "refused mqar L=32 seed 0" in log, log
  convert = [m for m in todo if m.protocol == "convert"]
  assert f"{len(convert)} models not trained (refused dense models)" in log
  runs = mod.read_runs(str(tmp_path / "runs.jsonl"))
  assert set(runs) == {m.key(st) for m in todo if m.protocol == "scratch"}
  # The report shows the score; a rerun finds it cached and refuses again.
  md = mod.report(
    [], st, str(tmp_path), None, mod.score_dense(st, str(tmp_path), said.append)
  )
  assert "Dense models before conversion" in md
  assert f"{score['exact_match']:.2f} (" in md and " s), refused |" in md
  said.clear()
  mod.run_study(st, str(tmp_path), todo, said.append)
  assert "refused mqar L=32 seed 0" in "\n".join(said)
  assert mod.read_scores(str(tmp_path)) == scores


def test_retrieval_study_seed_table():
  """The per-seed table: one column per seed a cell has, each cell the
  exact match at 1x / 2x L of that seed's model; empty where that seed's
  model of the kind is missing."""
  mod = _module("retrieval_study")

  def row(label, seed, eval_len, exact, part="main"):
    return dict(
      part=part,
      task="mqar",
      train_len=16,
      protocol="convert",
      label=label,
      seed=seed,
      eval_len=eval_len,
      exact_match=exact,
    )

  rows = [
    row("dense", 0, 16, 1.0),
    row("dense", 0, 32, 0.5),
    row("dense", 2, 16, 0.75),
    row("dense", 2, 32, 0.25),
    row("dsa_k2", 2, 16, 0.125),
    row("dsa_k2", 2, 32, 0.0),
    row("dsa_k2", 0, 16, 0.5, part="warmup"),  # not a main or scratch row
  ]
  md = mod.seed_table(rows)
  assert (
    "**mqar, L=16, protocol convert, per seed** (exact match at 1x / 2x L)"
    in md
  )
  assert "| kind | seed 0 | seed 2 |" in md, md
  assert "| dense | 1.00 / 0.50 | 0.75 / 0.25 |" in md, md
  assert "| dsa_k2 |  | 0.12 / 0.00 |" in md, md
  assert mod.seed_table([r for r in rows if r["part"] == "warmup"]) == ""


def test_retrieval_study_grid():
  """The CPU study's grid: DSA at <= 3% of L, NSA at its closest budget,
  every model keyed by its settings (no two models share a key unless they
  are the same training run)."""
  mod = _module("retrieval_study")
  st = mod.CPU
  for L, ks in st.dsa_top_k.items():
    assert max(ks) <= 0.03 * L, (L, ks)
  todo = mod.models(st, mod.PARTS)
  by_key = {}
  for m in todo:
    by_key.setdefault(m.key(st), set()).add(
      (m.task, m.seq_len, m.protocol, m.seed, m.run[0], m.warmup_steps)
    )
  assert all(len(v) == 1 for v in by_key.values())
  seeds = {m.seed for m in todo}
  assert seeds == {0, 1, 2}
  assert {m.protocol for m in todo} == {"convert", "scratch"}
  assert {m.seq_len for m in todo} == {512, 1024}
  # --kinds keeps a kind's runs or a label's, in every part.
  picked = mod.models(st, mod.PARTS, kinds=("csa", "dsa_k8"))
  assert {m.run[0] for m in picked} == {"csa", "dsa_k8"}
  assert len(picked) == sum(m.run[0] in ("csa", "dsa_k8") for m in todo)
  # The committed results stay valid: every model of docs/results' cache is
  # one of the study's (a changed key would retrain it), and the tasks with
  # a short pretraining phase are keyed by it.
  cached = mod.read_runs(
    os.path.join(EXP, "..", "docs", "results", "retrieval_study", "runs.jsonl")
  )
  assert cached and set(cached) <= set(by_key)
  # A task's own model sizes, generator options and pretraining change that
  # task's keys and no other's.
  C = _module("_common")
  for m in todo:
    key = json.loads(m.key(st))
    r = st.recipe(m.task)
    layers = key["model"]["num_layers"]
    assert layers == dict(st.model, **r.model)["num_layers"], m
    assert key["task_options"] == dict(C.TASK_OPTIONS[m.task], **r.options), m
    pre = r.pretrain.get(m.seq_len)
    assert (key["pretrain_steps"], key["lr"]) == (
      pre or (st.pretrain_steps[m.seq_len], st.lr)
    ), m
    short = r.pretrain_short_at.get(m.seq_len, r.pretrain_short)
    base = r.pretrain_from.get(m.seq_len)
    if m.protocol == "convert" and base is not None:
      assert "pretrain_short" not in key, m
      assert key["pretrain_from"] == json.loads(
        mod.pretrain_key(st, m.task, base, m.seed)
      )
    elif m.protocol == "convert":
      assert key.get("pretrain_short") == (short and list(short)), m
    else:
      assert "pretrain_short" not in key and "pretrain_from" not in key, m
  # MQAR's first phase at L=512 applies at L=1024 only.
  mq = {m.seq_len: json.loads(m.key(st)) for m in todo if m.task == "mqar"}
  assert "pretrain_short" not in mq[512]
  assert mq[1024]["pretrain_short"] == [512, 800, 1e-3]
  from sparse_attn.budgets import key_budget

  for L in st.lens:
    ks = st.dsa_top_k[L]
    target = key_budget("dsa", L, top_k=ks[len(ks) // 2])
    p = mod.scaled_nsa(L, target)
    got = key_budget("nsa", L, **p)
    # NSA's floor: no block sizes of the grid come closer.
    paper = key_budget("nsa", L)
    assert abs(got - target) <= abs(paper - target)


def test_eta_extrapolates_by_weight():
  C = _module("_common")
  eta = C.Eta([1.0, 1.0, 2.0])
  now = [100.0]
  eta._clock = lambda: now[0]  # pylint: disable=protected-access
  eta._t0 = 100.0  # pylint: disable=protected-access
  assert eta.seconds_left() is None and eta.text() == ""
  now[0] = 110.0
  eta.done(0)
  assert eta.seconds_left() == 30.0  # 10 s per unit, 3 units left
  assert eta.text() == "; eta 0m30s"
  eta.done(1)
  eta.done(2)
  assert eta.text() == ""
  assert C.eta_text(3725) == "1h02m" and C.eta_text(-1) == "0m00s"


def test_study_progress_scales_to_unseen_lengths():
  mod = _module("retrieval_study")
  p = mod.Progress([(512, 100), (512, 100), (1024, 100)])
  assert p.eta() is None
  p.done(0, 50.0)  # 0.5 s per step at L=512
  assert abs(p.eta() - (50.0 + 50.0 * 2**1.5)) < 1e-9


def test_context_memory_smoke(tmp_path):
  run_script("context_memory", "--smoke", "--out-dir", tmp_path)
  mod = _module("context_memory")
  rows = _rows(tmp_path / "context_memory.csv")
  assert set(mod.COLUMNS) <= set(rows[0])
  got = {(r["context"], r["strategy"], r["stage"]) for r in rows}
  assert got == {
    ("1", "-", "warmup"),
    ("1", "-", "sparse"),
    *(
      ("2", s, st)
      for s in ("fetch", "all_gather")
      for st in ("warmup", "sparse")
    ),
  }
  for r in rows:
    _finite(r, ("argument_mib", "temp_mib", "total_mib"))
  temp = {
    (r["context"], r["strategy"], r["stage"]): float(r["temp_mib"])
    for r in rows
  }
  # Splitting the sequence in two shrinks every step's activations.
  assert temp["2", "fetch", "sparse"] < temp["1", "-", "sparse"]
  assert temp["2", "fetch", "warmup"] < temp["1", "-", "warmup"]
  assert (tmp_path / "context_memory.md").exists()
