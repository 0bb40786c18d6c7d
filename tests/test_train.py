"""Training: stages, gradient isolation, loss decrease, config errors,
kill/resume, and smoke runs of the CLI scripts."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _train_worker import small_config
from sparse_attn import training as T
from sparse_attn.config import Config, override, tiny, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV1 = jax.devices()[:1]


def _one_device(*extra):
  return small_config("train.mesh_shape=[1,1,1]", *extra)


@pytest.fixture(scope="module")
def setup_and_batch():
  s = T.setup(_one_device(), DEV1)
  ds, _ = T.make_datasets(s.cfg)
  return s, T.BatchLoader(ds, s).train(0)


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _assert_same_leaves(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_gradient_isolation(setup_and_batch, mode):
  """LM loss -> indexer grads are 0; indexer KL -> main-model grads are 0."""
  s, batch = setup_and_batch
  state = T.init_state(s)
  fwd = T.make_loss_fn(s, mode)
  lm = lambda i, m: fwd(i, m, batch)[1][0]
  kl = lambda i, m: fwd(i, m, batch)[1][2]["indexer_kl"]
  idx, main = state["params"]["indexer"], state["params"]["main"]
  g_lm_idx, g_lm_main = jax.jit(jax.grad(lm, argnums=(0, 1)))(idx, main)
  g_kl_idx, g_kl_main = jax.jit(jax.grad(kl, argnums=(0, 1)))(idx, main)
  norm = lambda g: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g)))
  assert norm(g_lm_idx) == 0.0
  assert norm(g_kl_main) == 0.0
  assert norm(g_lm_main) > 0.0 and norm(g_kl_idx) > 0.0


def test_warmup_changes_only_indexer_sparse_changes_all(setup_and_batch):
  s, batch = setup_and_batch
  state = T.init_state(s)
  before = _flat(state["params"])
  state, m = T.make_train_step(s, "warmup")(state, batch)
  after_warm = _flat(state["params"])
  changed = {k for k in before if not np.array_equal(before[k], after_warm[k])}
  idx_keys = {k for k in before if "indexer" in k}
  assert changed == idx_keys and idx_keys
  # the main optimiser state is untouched during warm-up
  assert int(jax.tree.leaves(state["opt"]["main"])[0]) == 0
  state, m = T.make_train_step(s, "sparse")(state, batch)
  after_sparse = _flat(state["params"])
  unchanged = {
    k for k in before if np.array_equal(after_warm[k], after_sparse[k])
  }
  assert not unchanged, unchanged
  assert int(state["step"]) == 2 and np.isfinite(m["loss"])


def test_loss_decreases_both_stages():
  cfg = override(
    tiny(),
    "train.mesh_shape=[1,1,1]",
    "model.num_layers=1",
    "train.seq_len=64",
    "train.batch_size=8",
    "model.top_k=16",
    "train.warmup_stage_steps=12",
    "train.sparse_stage_steps=24",
    "train.lr_warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.max_bytes=300000",
    "train.eval_max_bytes=30000",
    "train.eval_batches=1",
  )
  r = T.train(cfg, None, devices=DEV1, echo=None, final_eval=False)
  warm = [h for h in r.history if h["stage"] == "warmup"]
  sparse = [h for h in r.history if h["stage"] == "sparse"]
  assert len(warm) == 12 and len(sparse) == 24
  # warm-up: the indexer learns to imitate dense attention; LM loss is frozen
  assert np.mean([h["indexer_kl"] for h in warm[-3:]]) < 0.8 * np.mean(
    [h["indexer_kl"] for h in warm[:3]]
  )
  assert (
    np.mean([h["loss"] for h in sparse[-4:]])
    < np.mean([h["loss"] for h in sparse[:4]]) - 0.5
  )
  assert all(h["attended_fraction"] < 1.0 for h in sparse)


def test_log_leaves_compile_steps_out_of_the_rate():
  """The first step of each stage compiles: it is logged with no tok/s, and
  the rate and the ETA (to the end of the stage) restart after it."""
  cfg = _one_device(
    "train.warmup_stage_steps=3",
    "train.sparse_stage_steps=4",
    "train.log_every=1",
    "train.eval_every=0",
  )
  lines = []
  r = T.train(cfg, None, devices=DEV1, echo=lines.append, final_eval=False)
  rates = {h["step"]: h["tokens_per_s"] for h in r.history}
  assert [h["stage"] for h in r.history] == ["warmup"] * 3 + ["sparse"] * 4
  assert rates[1] is None and rates[4] is None
  assert all(rates[i] > 0 for i in (2, 3, 5, 6, 7))
  steps = [x for x in lines if x.startswith("[dsa:")]
  assert [("(compiled)" in x, " eta " in x) for x in steps] == [
    (True, False),  # 1: compiles the warm-up step
    (False, True),  # 2: one warm-up step to go
    (False, False),  # 3: end of the warm-up
    (True, False),  # 4: compiles the sparse step
    (False, True),
    (False, True),
    (False, False),  # 7: end of the run
  ]


@pytest.mark.parametrize(
  "change,match",
  [
    (("model.top_k=0",), "top_k must be >= 1"),
    (("model.num_heads=3",), "must be divisible by model.num_kv_heads"),
    (("train.mesh_shape=[2,2,2]",), r"mesh_shape \(2, 2, 2\) has 8 devices"),
    (('train.data_path="/nonexistent/corpus"',), "does not exist"),
    (('model.attention="nope"',), "model.attention must be one of"),
    (('train.dataset="text+nope"',), r"unknown dataset\(s\) \['nope'\]"),
    (('train.dataset="text:0"',), "weight > 0"),
    (('train.dataset_options={"mqar": {}}',), "not parts of 'text'"),
    (
      (
        'train.dataset="passkey"',
        'train.dataset_options={"passkey": {"x": 1}}',
      ),
      r"unknown option\(s\) \['x'\] for 'passkey'",
    ),
    (('train.dataset="text+passkey"', "train.seq_len=32"), "too short"),
    (("train.batch_size=3", "train.mesh_shape=[1,1,1]"), None),
  ],
)
def test_bad_config_fails_at_start(change, match, tmp_path):
  cfg = override(small_config("train.mesh_shape=[1,1,1]"), *change)
  if match is None:  # a valid config (sanity check of the parametrisation)
    validate(cfg, num_devices=1)
    return
  with pytest.raises(ValueError, match=match):
    T.train(cfg, str(tmp_path / "run"), devices=DEV1, echo=None)
  assert not (tmp_path / "run").exists()  # failed before touching anything


def _staged(warmup, sparse):
  """(Setup, train dataset) of the small one-device config with these stages."""
  s = T.setup(
    _one_device(
      f"train.warmup_stage_steps={warmup}", f"train.sparse_stage_steps={sparse}"
    ),
    DEV1,
  )
  return s, T.make_datasets(s.cfg)[0]


def test_stage_runner_segments_match_one_run_and_pick_stages():
  """Steps in segments == in one call; each step in the stage of its index."""
  s, ds = _staged(2, 2)
  runner = T.StageRunner(s, ds)
  seen = []
  whole = runner.run(
    T.init_state(s), on_step=lambda r: seen.append((r.step, r.stage))
  )
  assert seen == [(1, "warmup"), (2, "warmup"), (3, "sparse"), (4, "sparse")]
  assert [T.stage_of(s.cfg, i) for i in range(4)] == [
    "warmup",
    "warmup",
    "sparse",
    "sparse",
  ]
  state = runner.run(T.init_state(s), start=0, stop=1)
  state = runner.run(state, start=1)
  assert int(state["step"]) == int(whole["step"]) == 4
  _assert_same_leaves(whole["params"], state["params"])


def test_run_stages_first_step_offsets_the_data():
  s, ds = _staged(1, 1)
  got = T.run_stages(s, T.init_state(s), ds, first_step=5, stop=1)
  want, _ = T.make_train_step(s, "warmup")(
    T.init_state(s), T.BatchLoader(ds, s).train(5)
  )
  _assert_same_leaves(got["params"], want["params"])


def test_transfer_params_copies_matching_paths_shapes_and_dtypes():
  src = {"a": jnp.ones(2), "b": jnp.ones(3), "d": jnp.ones(2, jnp.int32)}
  dst = {
    "a": jnp.zeros(2),
    "b": jnp.zeros(4),
    "c": jnp.zeros(1),
    "d": jnp.zeros(2),
  }
  t = T.transfer_params(src, dst)
  assert t.copied == ("['a']",)
  assert t.kept == ("['b']", "['c']", "['d']")
  np.testing.assert_array_equal(t.params["a"], np.ones(2))
  assert t.params["b"] is dst["b"] and t.params["d"] is dst["d"]
  assert t.params["a"] is not src["a"]  # a copy: src survives donation
  # Opt-in repeats (NSA's per-branch K/V [E, 3G, D], group-major, from a
  # dense [E, G, D]): each entry of src r times in a row, only for the
  # names given; 3 into 4 never, and an unnamed size change is kept.
  kv = jnp.arange(12.0).reshape(2, 2, 3)
  src = {"wk": kv, "b": jnp.ones(3), "w_up": jnp.ones((2, 3))}
  dst = {
    "wk": jnp.zeros((2, 6, 3)),
    "b": jnp.zeros(4),
    "w_up": jnp.zeros((2, 6)),
  }
  t = T.transfer_params(src, dst, repeat=("wk", "b"))
  assert t.repeated == ("['wk']",)
  assert "['b']" in t.kept and "['w_up']" in t.kept
  for branch in range(3):
    np.testing.assert_array_equal(t.params["wk"][:, branch::3], kv)
  assert T.transfer_params(src, dst).repeated == ()


def test_init_from_converts_a_dense_state_to_dsa():
  dense = T.setup(_one_device('model.attention="dense"'), DEV1)
  dsa = T.setup(_one_device(), DEV1)
  dense_state, dsa_state = T.init_state(dense), T.init_state(dsa)
  state, moved = T.init_from(dsa_state, dense_state["params"]["main"])
  assert moved.copied and not moved.kept  # same dims: every main parameter
  _assert_same_leaves(dense_state["params"]["main"], state["params"]["main"])
  assert state["params"]["indexer"] is dsa_state["params"]["indexer"]
  assert state["opt"] is dsa_state["opt"]


def test_config_json_roundtrip_and_resolution():
  cfg = small_config()
  assert Config.from_json(cfg.to_json()) == cfg
  mixed = override(
    cfg,
    'train.dataset="text:2+passkey"',
    "train.seq_len=64",
    'train.dataset_options={"passkey": {"num_digits": 4}}',
  )
  assert Config.from_json(mixed.to_json()) == mixed
  assert mixed.train.dataset_options_dict == {"passkey": {"num_digits": 4}}
  train_ds, _ = T.make_datasets(mixed)
  assert train_ds.components[1].task.num_digits == 4
  dense = override(cfg, 'model.attention="dense"', "train.mesh_shape=[1,1,1]")
  r = validate(dense, num_devices=1)
  assert r.train.warmup_stage_steps == 0
  assert r.train.total_steps == dense.train.total_steps
  with pytest.raises(ValueError, match="unknown config field"):
    override(cfg, "train.bogus=1")


def _cli(run_dir, extra=()):
  from _train_worker import SMALL

  cmd = [
    sys.executable,
    os.path.join(ROOT, "experiments", "train.py"),
    "--run-dir",
    str(run_dir),
    "--warmup-steps",
    "4",
    "--sparse-steps",
    "26",
  ]
  for a in SMALL + ("train.checkpoint_every=3", "train.keep_checkpoints=2"):
    cmd += ["--set", a]
  return cmd + list(extra)


def test_kill_and_resume_matches_uninterrupted(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
  ref = subprocess.Popen(
    _cli(ref_dir),
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  victim = subprocess.Popen(
    _cli(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  killed_at = None
  while time.time() < deadline and victim.poll() is None:
    if metrics.exists():
      steps = [
        json.loads(l).get("step", 0)
        for l in metrics.read_text().splitlines()
        if '"train"' in l
      ]
      if steps and max(steps) >= 10:
        victim.send_signal(signal.SIGKILL)
        killed_at = max(steps)
        break
    time.sleep(0.02)
  victim.wait()
  assert killed_at is not None, "the run finished before it could be killed"
  assert victim.returncode == -signal.SIGKILL
  assert killed_at < 30
  resumed = subprocess.run(
    _cli(run_dir), env=env, capture_output=True, text=True, timeout=240
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step" in resumed.stdout
  _, err = ref.communicate(timeout=240)
  assert ref.returncode == 0, err[-3000:]

  # every loss ever logged by the killed+resumed run equals the reference
  ref_losses = {s: r["loss"] for s, r in T.read_metrics(str(ref_dir)).items()}
  assert sorted(ref_losses) == list(range(1, 31))
  seen = set()
  for line in metrics.read_text().splitlines():
    rec = json.loads(line)
    if rec.get("event") == "train":
      seen.add(rec["step"])
      assert rec["loss"] == pytest.approx(
        ref_losses[rec["step"]], rel=1e-6, abs=1e-7
      ), rec["step"]
  assert seen == set(range(1, 31))
  _, a = T.load_checkpoint(str(ref_dir), devices=DEV1)
  _, b = T.load_checkpoint(str(run_dir), devices=DEV1)
  assert int(a["step"]) == int(b["step"]) == 30
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert (
    json.loads((run_dir / "config.json").read_text())["model"]["top_k"] == 8
  )


def test_quickstart_smoke():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "quickstart.py"),
      "--smoke",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "validation loss  DSA" in out and "dense twin" in out
  assert "keys attended by DSA" in out
