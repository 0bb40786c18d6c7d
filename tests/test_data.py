"""Tests for sparse_attn.data: text corpus, synthetic tasks, deterministic batches."""

import re

import numpy as np
import pytest

from sparse_attn import data as D

TASK_LENGTHS = {
  "mqar": [16, 100, 1024, 8192],
  "passkey": [70, 300, 1024, 8192],
  "niah": [300, 1024, 8192],
  "vartrack": [256, 1024, 8192],
}
SMALL_LEN = {
  "mqar": 64,
  "passkey": 80,
  "niah": 300,
  "vartrack": 256,
  "text": 64,
}


@pytest.fixture(scope="module")
def text_ds():
  return D.make_dataset("text", seq_len=64, max_bytes=300_000)


def _ds(name, **kw):
  kw.setdefault("seq_len", SMALL_LEN[name])
  if name == "text":
    kw.setdefault("max_bytes", 300_000)
  return D.make_dataset(name, **kw)


def _eq(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# batch API: shapes, determinism, resumability, sharding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name", ["text", "mqar", "passkey", "niah", "vartrack"]
)
def test_batch_shapes_and_shift(name):
  ds = _ds(name)
  assert ds.vocab_size == D.VOCAB_SIZE == 256
  b = ds.batch(3, 4)
  L = ds.seq_len
  assert isinstance(b, D.Batch)
  assert b.inputs.shape == b.targets.shape == b.loss_mask.shape == (4, L)
  assert (
    b.inputs.dtype == np.int32
    and b.targets.dtype == np.int32
    and b.loss_mask.dtype == np.float32
  )
  np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
  assert b.inputs.min() >= 0 and b.inputs.max() < ds.vocab_size
  assert b.targets.min() >= 0 and b.targets.max() < ds.vocab_size
  assert set(np.unique(b.loss_mask)) <= {0.0, 1.0}
  if name == "text":
    assert b.loss_mask.min() == 1.0
  else:
    assert (b.loss_mask.sum(1) > 0).all()


@pytest.mark.parametrize(
  "name", ["text", "mqar", "passkey", "niah", "vartrack"]
)
def test_determinism_and_resumability(name):
  a, b = _ds(name, seed=3), _ds(name, seed=3)
  # different objects, same (seed, step) -> identical
  assert _eq(a.batch(5, 4), b.batch(5, 4))
  # different steps / seeds / splits differ
  assert not np.array_equal(a.batch(5, 4).inputs, a.batch(6, 4).inputs)
  assert not np.array_equal(
    a.batch(5, 4).inputs, _ds(name, seed=4).batch(5, 4).inputs
  )
  # batch(step) does not depend on history
  fresh = _ds(name, seed=3).batch(7, 4)
  for _ in b.batches(4, num_steps=7):
    pass
  assert _eq(b.batch(7, 4), fresh)
  resumed = next(_ds(name, seed=3).batches(4, start_step=7))
  assert _eq(resumed, fresh)
  # rows are independent of the batch size (row r of step s is fixed)
  assert _eq([x[:2] for x in a.batch(5, 4)], a.batch(5, 2))


@pytest.mark.parametrize("name", ["text", "mqar", "niah"])
def test_sharding_concatenates_to_global_batch(name):
  ds = _ds(name)
  glob = ds.batch(11, 8)
  for n in (2, 4, 8):
    shards = [ds.batch(11, 8, shard_index=i, num_shards=n) for i in range(n)]
    assert all(s.inputs.shape[0] == 8 // n for s in shards)
    cat = D.Batch(*(np.concatenate(x) for x in zip(*shards)))
    assert _eq(cat, glob)
    evs = [ds.eval_batch(2, 8, shard_index=i, num_shards=n) for i in range(n)]
    assert _eq(
      D.Batch(*(np.concatenate(x) for x in zip(*evs))), ds.eval_batch(2, 8)
    )


def test_sharding_errors(text_ds):
  with pytest.raises(ValueError, match="divisible"):
    text_ds.batch(0, 6, shard_index=0, num_shards=4)
  with pytest.raises(ValueError, match="shard_index"):
    text_ds.batch(0, 8, shard_index=4, num_shards=4)
  with pytest.raises(ValueError, match="step"):
    text_ds.batch(-1, 8)
  with pytest.raises(ValueError, match="batch_size"):
    text_ds.batch(0, 0)
  with pytest.raises(ValueError, match="divisible"):
    list(text_ds.eval_batches(2, 3, num_shards=2))


@pytest.mark.parametrize("name", ["text", "mqar", "passkey"])
def test_eval_batches_deterministic_and_seed_independent(name):
  a, b = _ds(name, seed=0), _ds(name, seed=123)
  ea, eb = list(a.eval_batches(3, 4)), list(b.eval_batches(3, 4))
  assert len(ea) == 3
  assert all(_eq(x, y) for x, y in zip(ea, eb))
  assert _eq(ea[1], a.eval_batch(1, 4))
  assert not np.array_equal(ea[0].inputs, ea[1].inputs)
  assert not np.array_equal(ea[0].inputs, a.batch(0, 4).inputs)


def test_text_eval_windows_disjoint(text_ds):
  L = text_ds.seq_len
  n = text_ds.num_eval_windows
  assert n == text_ds.num_bytes // (L + 1)
  rows = np.concatenate([b.inputs for b in text_ds.eval_batches(4, 16)])
  starts = []
  data = np.asarray(text_ds.data, np.int32)
  for r in rows:  # each eval row is an aligned window: find its start
    starts.append(text_ds.eval_order[len(starts) % n] * (L + 1))
    np.testing.assert_array_equal(r, data[starts[-1] : starts[-1] + L])
  assert len(set(starts)) == len(starts)


# ---------------------------------------------------------------------------
# text corpus
# ---------------------------------------------------------------------------


def test_stdlib_split_by_file_disjoint_and_deterministic():
  files = D.list_text_files()
  assert len(files) > 100 and all(rel.endswith(".py") for rel, _ in files)
  assert not any("site-packages" in rel.split("/") for rel, _ in files)
  tr, va = D.split_files(files)
  tr2, va2 = D.split_files(list(reversed(files)))
  assert tr == tr2 and va == va2
  assert len(va) >= 1 and len(tr) >= 1
  names_tr, names_va = {r for r, _ in tr}, {r for r, _ in va}
  assert not names_tr & names_va
  assert names_tr | names_va == {r for r, _ in files}
  assert 0.005 < len(va) / len(files) < 0.05
  small_tr = D.make_dataset("text", seq_len=64, max_bytes=100_000)
  small_va = D.make_dataset(
    "text", seq_len=64, split="validation", max_bytes=100_000
  )
  assert small_tr.num_bytes == small_va.num_bytes == 100_000
  assert not set(small_tr.files) & set(small_va.files)
  assert set(small_va.files) <= names_va


def test_max_bytes_is_deterministic_prefix():
  full = D.load_text(split="validation")
  part = D.load_text(split="validation", max_bytes=12_345)
  assert part.data.shape == (12_345,) and part.data.dtype == np.uint8
  np.testing.assert_array_equal(part.data, full.data[:12_345])
  assert full.files[: len(part.files)] == part.files
  assert (full.data == D.DOC_SEP).sum() == len(
    full.files
  )  # one separator after every file


def _write(tmp_path, files):
  for rel, text in files.items():
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text)


def test_user_directory(tmp_path):
  files = {
    f"d{i % 3}/f{i}.txt": (f"file {i} " * (20 + i)).encode() for i in range(40)
  }
  files["skip.bin"] = b"binary"
  files[".hidden.txt"] = b"hidden"
  files["empty.txt"] = b""
  _write(tmp_path, files)
  listed = D.list_text_files(tmp_path, suffixes=".txt")
  assert [r for r, _ in listed] == sorted(r for r in files if r.startswith("d"))
  tr, va = D.split_files(listed, val_fraction=0.1)
  dtr = D.make_dataset(
    "text", seq_len=32, path=str(tmp_path), suffixes=[".txt"], val_fraction=0.1
  )
  dva = D.make_dataset(
    "text",
    seq_len=32,
    path=tmp_path,
    suffixes=[".txt"],
    val_fraction=0.1,
    split="validation",
  )
  assert list(dtr.files) == [r for r, _ in tr] and list(dva.files) == [
    r for r, _ in va
  ]
  assert not set(dtr.files) & set(dva.files)
  expected = b"".join(files[r] + bytes([D.DOC_SEP]) for r in dtr.files)
  np.testing.assert_array_equal(dtr.data, np.frombuffer(expected, np.uint8))
  b = dtr.batch(0, 4)
  for row, tgt in zip(
    b.inputs, b.targets
  ):  # every window is a slice of the corpus
    window = bytes(np.concatenate([row, tgt[-1:]]).astype(np.uint8).tolist())
    assert window in expected


def test_user_files_and_single_file_split(tmp_path):
  _write(tmp_path, {"a.txt": b"alpha " * 500, "b.md": b"beta " * 500})
  two = D.make_dataset(
    "text",
    seq_len=16,
    path=[tmp_path / "a.txt", tmp_path / "b.md"],
    val_fraction=0.01,
  )
  two_va = D.make_dataset(
    "text",
    seq_len=16,
    path=[tmp_path / "a.txt", tmp_path / "b.md"],
    val_fraction=0.01,
    split="validation",
  )
  assert (
    len(two.files) == 1 and len(two_va.files) == 1 and two.files != two_va.files
  )  # >= 1 each
  one = D.load_text(tmp_path / "a.txt", val_fraction=0.1)
  one_va = D.load_text(tmp_path / "a.txt", val_fraction=0.1, split="validation")
  whole = b"alpha " * 500 + bytes([D.DOC_SEP])
  assert bytes(one.data) + bytes(one_va.data) == whole
  assert len(one_va.data) == round(len(whole) * 0.1)


def test_cache_dir(tmp_path):
  _write(
    tmp_path / "src",
    {f"f{i}.py": (f"x = {i}\n" * 50).encode() for i in range(10)},
  )
  cache = tmp_path / "cache"
  a = D.load_text(tmp_path / "src", cache_dir=cache)
  assert len(list(cache.glob("*.npy"))) == 1
  D.clear_cache()
  b = D.load_text(tmp_path / "src", cache_dir=cache)
  assert isinstance(b.data, np.memmap)
  np.testing.assert_array_equal(a.data, b.data)
  assert a.files == b.files


def test_path_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    D.make_dataset("text", seq_len=8, path=missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty"):
    D.make_dataset("text", seq_len=8, path=tmp_path / "empty")
  (tmp_path / "e.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="e.txt"):
    D.make_dataset("text", seq_len=8, path=tmp_path / "e.txt")
  _write(tmp_path, {"t/a.txt": b"short", "t/b.txt": b"tiny"})
  with pytest.raises(ValueError, match="seq_len"):
    D.make_dataset("text", seq_len=100, path=tmp_path / "t")


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown dataset"):
    D.make_dataset("nope", seq_len=8)
  with pytest.raises(ValueError, match="split"):
    D.make_dataset("mqar", seq_len=64, split="test")
  with pytest.raises(ValueError, match="num_pairz"):
    D.make_dataset("mqar", seq_len=64, num_pairz=3)
  with pytest.raises(ValueError, match="path"):
    D.make_dataset("passkey", seq_len=64, path="/tmp")
  with pytest.raises(ValueError, match="seed"):
    D.make_dataset("mqar", seq_len=64, seed=-1)
  with pytest.raises(ValueError, match="foo"):
    D.make_dataset("text", seq_len=64, foo=1)
  with pytest.raises(ValueError, match="val_fraction"):
    D.split_files(D.list_text_files(), val_fraction=1.5)
  with pytest.raises(ValueError, match="num_pairs"):
    D.MQARTask(64, num_pairs=65)
  with pytest.raises(ValueError, match="key_vocab"):
    D.MQARTask(64, key_vocab=100, value_vocab=100)
  with pytest.raises(ValueError, match="depth"):
    D.PasskeyTask(100, depth=1.5)


@pytest.mark.parametrize(
  "name,kw",
  [
    ("mqar", {}),
    ("mqar", {"num_pairs": 40}),
    ("passkey", {}),
    ("passkey", {"num_digits": 10}),
    ("niah", {}),
    ("niah", {"num_needles": 8}),
    ("vartrack", {}),
    ("vartrack", {"num_hops": 10}),
  ],
)
def test_seq_len_too_short(name, kw):
  with pytest.raises(ValueError, match="too short"):
    D.make_dataset(name, seq_len=(1 if name == "mqar" and not kw else 40), **kw)


# ---------------------------------------------------------------------------
# synthetic tasks: answers recomputed from the tokens
# ---------------------------------------------------------------------------


def _seq(ex):
  return np.concatenate([ex.inputs[:1], ex.targets])


def _check_mqar(task, ex):
  seq = _seq(ex)
  kl, item = task.key_len, task.key_len + task.value_len
  klo, khi = D.MQAR_KEY_BASE, D.MQAR_KEY_BASE + task.key_vocab
  vlo = D.VOCAB_SIZE - task.value_vocab
  kv = seq[: task.num_pairs * item].reshape(task.num_pairs, item)
  assert ((kv[:, :kl] >= klo) & (kv[:, :kl] < khi)).all()
  assert (kv[:, kl:] >= vlo).all()
  table = {tuple(r[:kl]): tuple(r[kl:]) for r in kv}
  assert len(table) == task.num_pairs  # distinct keys
  answer = np.zeros(seq.shape[0], np.float32)
  i, nq = task.num_pairs * item, 0
  while i < seq.shape[0]:
    if klo <= seq[i] < khi:
      key = tuple(seq[i : i + kl])
      assert tuple(seq[i + kl : i + item]) == table[key]
      answer[i + kl : i + item] = 1
      i, nq = i + item, nq + 1
    else:
      assert seq[i] < D.MQAR_KEY_BASE  # filler is never a key or value
      i += 1
  assert nq == task.num_queries
  np.testing.assert_array_equal(ex.loss_mask, answer[1:])


def _check_answer_tail(ex, answer: str):
  n = len(answer)
  mask = np.zeros(ex.loss_mask.shape[0], np.float32)
  mask[-n:] = 1
  np.testing.assert_array_equal(ex.loss_mask, mask)
  assert D.decode(ex.targets[-n:]) == answer


def _check_passkey(task, ex):
  text = D.decode(_seq(ex))
  m = re.fullmatch(
    r"([^\d]*)The pass key is (\d+)\. ([^\d]*)\nWhat is the pass key\? The pass key is (\d+)",
    text,
    flags=re.S,
  )
  assert m, text
  assert len(m.group(2)) == task.num_digits and m.group(2) == m.group(4)
  _check_answer_tail(ex, m.group(2))
  return len(m.group(1)) / max(1, len(m.group(1)) + len(m.group(3)))


def _check_niah(task, ex):
  text = D.decode(_seq(ex))
  needles = re.findall(
    r"The special magic number for ([a-z]+) is (\d+)\. ", text
  )
  assert len(needles) == task.num_needles
  table = dict(needles)
  assert (
    len(table) == task.num_needles
    and len(set(table.values())) == task.num_needles
  )
  m = re.search(
    r"\nWhat is the special magic number for ([a-z]+)\? "
    r"The special magic number for \1 is (\d+)$",
    text,
  )
  assert m, text[-200:]
  assert table[m.group(1)] == m.group(2)
  _check_answer_tail(ex, m.group(2))


def _check_vartrack(task, ex):
  text = D.decode(_seq(ex))
  stmts = re.findall(r"([a-z]+) = ([a-z]+|\d+); ", text)
  assert len(stmts) == task.num_chains * (task.num_hops + 1)
  table, order = {}, {}
  for i, (lhs, rhs) in enumerate(stmts):
    assert lhs not in table
    if not rhs.isdigit():
      assert rhs in table  # defined before use
    table[lhs], order[lhs] = rhs, i
  m = re.search(r"\n\? ([a-z]+) -> (\d+)$", text)
  assert m, text[-100:]
  name, hops = m.group(1), 0
  while not table[name].isdigit():
    name, hops = table[name], hops + 1
  assert hops == task.num_hops
  assert table[name] == m.group(2)
  _check_answer_tail(ex, m.group(2))


CHECKS = {
  "mqar": _check_mqar,
  "passkey": _check_passkey,
  "niah": _check_niah,
  "vartrack": _check_vartrack,
}


@pytest.mark.parametrize(
  "name,seq_len", [(n, L) for n, Ls in TASK_LENGTHS.items() for L in Ls]
)
def test_task_answers_by_construction(name, seq_len):
  ds = D.make_dataset(name, seq_len=seq_len, seed=1)
  b = ds.batch(0, 2 if seq_len >= 8192 else 4)
  assert b.inputs.shape[1] == seq_len
  for row in range(b.inputs.shape[0]):
    CHECKS[name](ds.task, D.Example(*(x[row] for x in b)))


@pytest.mark.parametrize(
  "kw",
  [
    {"key_len": 2, "value_len": 3, "num_pairs": 300},
    {"num_pairs": 8, "num_queries": 20, "filler": 0},
    {"key_vocab": 16, "value_vocab": 4},
  ],
)
def test_mqar_options(kw):
  task = D.MQARTask(4096, **kw)
  rng = np.random.default_rng(0)
  for _ in range(3):
    ex = task.sample(rng)
    _check_mqar(task, ex)
  if kw.get("filler") == 0:
    assert (_seq(ex) == 0).sum() > 0


def test_passkey_depth():
  rng = np.random.default_rng(0)
  shallow = _check_passkey(t := D.PasskeyTask(2048, depth=0.0), t.sample(rng))
  deep = _check_passkey(
    t := D.PasskeyTask(2048, depth=1.0, num_digits=8), t.sample(rng)
  )
  mid = _check_passkey(t := D.PasskeyTask(2048, depth=0.5), t.sample(rng))
  assert shallow < 0.02 and deep > 0.97 and 0.45 < mid < 0.55


def test_niah_and_vartrack_options():
  rng = np.random.default_rng(0)
  for task in (
    D.NeedleTask(4096, num_needles=16, num_digits=4, depth=0.25),
    D.VariableTrackingTask(4096, num_hops=12, num_chains=5),
    D.VariableTrackingTask(300, num_hops=0, num_chains=1),
  ):
    ex = task.sample(rng)
    CHECKS[task.name](task, ex)


def test_function_api():
  ex = D.passkey(np.random.default_rng(0), 128, num_digits=3)
  assert isinstance(ex, D.Example) and ex.inputs.shape == (128,)
  _check_passkey(D.PasskeyTask(128, num_digits=3), ex)
  ex = D.mqar(np.random.default_rng(0), 64, num_pairs=4)
  _check_mqar(D.MQARTask(64, num_pairs=4), ex)


@pytest.mark.parametrize("name", ["mqar", "passkey", "niah", "vartrack"])
def test_minimum_seq_len_is_exact(name):
  with pytest.raises(ValueError, match="too short") as err:
    D.make_dataset(
      name, seq_len=1, **({"num_pairs": 3} if name == "mqar" else {})
    )
  need = int(re.search(r"needs seq_len >= (\d+)", str(err.value)).group(1))
  kw = {"num_pairs": 3} if name == "mqar" else {}
  ds = D.make_dataset(name, seq_len=need, **kw)
  b = ds.batch(0, 3)
  for row in range(3):
    CHECKS[name](ds.task, D.Example(*(x[row] for x in b)))
  with pytest.raises(ValueError, match="too short"):
    D.make_dataset(name, seq_len=need - 1, **kw)


# -- mixtures ----------------------------------------------------------------

MIX_OPTS = {"passkey": {"num_digits": 4}, "vartrack": {"num_hops": 1}}


def _mix(spec="text:2+passkey+vartrack", split="train", seed=0, **kw):
  kw = {**MIX_OPTS, **kw}
  kw = {k: v for k, v in kw.items() if k in spec}
  return D.make_dataset(
    spec, seq_len=256, split=split, seed=seed, max_bytes=300_000, **kw
  )


def _kind(row_mask):
  """Which part a row came from: text rows predict every token."""
  return "text" if row_mask.sum() == row_mask.size else "task"


def test_parse_mixture():
  from sparse_attn.data.mixture import is_mixture, parse_mixture

  assert parse_mixture("text") == [("text", 1.0)]
  assert parse_mixture("text:2+passkey") == [("text", 2.0), ("passkey", 1.0)]
  assert is_mixture("a+b") and is_mixture("a:2") and not is_mixture("text")
  for bad in ("text:0", "text:-1", "text:x", "+passkey", "text+text"):
    with pytest.raises(ValueError, match="mixture"):
      parse_mixture(bad)


def test_mixture_rows_follow_the_weights_and_options():
  ds = _mix()
  b = ds.batch(0, 400)
  kinds = [_kind(m) for m in b.loss_mask]
  assert 0.42 < kinds.count("text") / 400 < 0.58  # weight 2 of 4
  answers = {int(m.sum()) for m in b.loss_mask if _kind(m) == "task"}
  assert 4 in answers  # passkey with the given num_digits=4
  assert b.inputs.shape == (400, 256)


def test_mixture_batches_are_pure_resumable_and_shardable():
  ds = _mix()
  assert _eq(ds.batch(7, 8), _mix().batch(7, 8))
  assert not np.array_equal(ds.batch(7, 8).inputs, ds.batch(8, 8).inputs)
  assert not np.array_equal(
    ds.batch(7, 8).inputs, _mix(seed=1).batch(7, 8).inputs
  )
  whole = ds.batch(3, 8)
  halves = [ds.batch(3, 8, shard_index=i, num_shards=2) for i in range(2)]
  for f in range(3):
    assert np.array_equal(np.concatenate([h[f] for h in halves]), whole[f])


def test_mixture_eval_takes_every_part_in_turn():
  ev = _mix(split="validation").eval_batch(0, 6)
  assert [_kind(m) for m in ev.loss_mask] == ["text", "task", "task"] * 2
  # the parts' own eval rows: the text rows are the text split's rows 0, 1
  text = D.make_dataset(
    "text", seq_len=256, split="validation", max_bytes=300_000
  )
  want = text.eval_batch(0, 2)
  assert np.array_equal(ev.inputs[[0, 3]], want.inputs)
  again = _mix(split="validation", seed=5).eval_batch(0, 6)
  assert _eq(ev, again)  # seed-free


def test_mixture_errors():
  with pytest.raises(ValueError, match=r"name \['mqar'\], which are not parts"):
    D.make_dataset(
      "text+passkey", seq_len=256, max_bytes=300_000, mqar={"key_vocab": 8}
    )
  with pytest.raises(ValueError, match="needs a 'text' part"):
    D.make_dataset("passkey+vartrack", seq_len=256, max_bytes=10)
  with pytest.raises(ValueError, match="unknown dataset"):
    D.make_dataset("text+nope", seq_len=256, max_bytes=300_000)
  with pytest.raises(ValueError, match="too short"):
    D.make_dataset("text+vartrack", seq_len=32, max_bytes=300_000)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['digits'\]"):
    D.make_dataset("text+passkey", seq_len=256, passkey={"digits": 3})
  text = D.make_dataset("text", seq_len=16, max_bytes=300_000)
  with pytest.raises(ValueError, match="finite and > 0"):
    D.MixtureDataset([text, text], [1.0, 0.0], name="t")


def test_mixture_spelling_is_canonical():
  from sparse_attn.data.mixture import canonical

  assert canonical(" text : 2 + passkey:1 ") == "text:2+passkey"
  assert canonical("passkey ") == "passkey"
  a = _mix("text:2+passkey+vartrack")
  b = _mix("text:2 + passkey:1 + vartrack")
  assert a.name == b.name and _eq(a.batch(3, 8), b.batch(3, 8))


def test_mixture_eval_covers_every_part_with_small_batches():
  """batch_size < parts: the parts still take turns, across batches."""
  ds = _mix(split="validation")
  kinds = [
    _kind(ds.eval_batch(i, 2).loss_mask[r]) for i in range(3) for r in (0, 1)
  ]
  assert kinds == ["text", "task", "task"] * 2
  assert _eq(ds.eval_batch(1, 2), ds.eval_batch(1, 2))
