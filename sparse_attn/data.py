"""Data: a byte-level text corpus and synthetic long-context tasks.

Pure numpy; nothing is downloaded and jax is not imported. Everything a model
sees from this module lives in ONE vocabulary of 256 tokens, token id == byte
value, so the same byte-level model trains on text and on every task.

Token conventions (``VOCAB_SIZE = 256``)
----------------------------------------
* ``text``: raw bytes of the files. Each file is followed by ``DOC_SEP``
  (byte 0x00, absent from CPython 3.11's standard-library sources), so a
  window may span a document boundary and the model sees where documents end.
* ``passkey``, ``niah``, ``vartrack``: plain ASCII text (bytes 10 and 32..126).
  Filler sentences contain no digits and none of ``= ; ? :``; answers are
  ASCII digits ``'0'..'9'`` (48..57) and are always the last tokens.
* ``mqar``: keys are tokens ``[MQAR_KEY_BASE, MQAR_KEY_BASE + key_vocab)``
  (128..), values are tokens ``[256 - value_vocab, 256)`` (..255); the two
  ranges are disjoint and never overlap ASCII, so filler noise (random
  printable ASCII 32..126 by default) can never be mistaken for a key/value.

Next-token prediction layout
----------------------------
Every example is built as one sequence ``seq`` of ``seq_len + 1`` tokens and
returned shifted: ``inputs = seq[:-1]``, ``targets = seq[1:]``, and
``loss_mask[i] = 1`` exactly when ``targets[i]`` is an answer token (text: all
ones). The loss mask therefore marks the positions whose *prediction* is the
answer, i.e. it is aligned with ``targets``.

Determinism and resumability
----------------------------
``Dataset.batch(step, batch_size, shard_index=, num_shards=)`` is a pure
function: row ``r`` of the global batch at ``step`` is drawn from
``np.random.default_rng(SeedSequence([seed, TRAIN_TAG, stream, step, r]))``
where ``stream`` is a stable hash (crc32) of (dataset name, split). A run
resumed at step N gets exactly the batch it would have had, whatever was asked before, and shard
``i`` of ``n`` computes only rows ``[i*B/n, (i+1)*B/n)`` of the global batch.
``eval_batch``/``eval_batches`` use a separate stream that does not depend on
``seed``, so runs with different seeds are evaluated on the same examples.

Text corpus
-----------
Default: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``
(CPython 3.11: ~1,790 files, ~31.5 MB, including the ``test`` package, whose
files are ordinary Python, only more of it), excluding ``site-packages``,
``dist-packages``, ``__pycache__`` and hidden entries. Or ``path=``: a file, a
directory (recursively: every non-hidden, non-empty file, optionally filtered
by ``suffixes``), or a list of those. The train/validation split is BY FILE:
a file is in validation iff ``sha256(relative_path)[:8] / 2**64 < val_fraction``
(default 2%), with at least one file forced into each split. A single file is
split by bytes instead (its last ``val_fraction`` goes to validation). Files
of a split are concatenated in hash order (a fixed pseudo-random order), so
``max_bytes`` keeps a deterministic, well-mixed prefix and reads only the
files it needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
import pathlib
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "VOCAB_SIZE", "DOC_SEP", "MQAR_KEY_BASE", "TASKS",
    "Example", "Batch", "TextCorpus",
    "list_text_files", "split_files", "load_text",
    "MQARTask", "PasskeyTask", "NeedleTask", "VariableTrackingTask",
    "mqar", "passkey", "niah", "vartrack",
    "Dataset", "TextDataset", "TaskDataset", "make_dataset", "decode",
]

VOCAB_SIZE = 256
DOC_SEP = 0            # byte that terminates every document in the text corpus
MQAR_KEY_BASE = 128    # MQAR keys: [128, 128 + key_vocab); values: [256 - value_vocab, 256)
_ASCII_LO, _ASCII_HI = 32, 127   # printable ASCII noise for MQAR filler: [32, 127)
SPLITS = ("train", "validation")
_EVAL_TAG = 0x5EED_E7A1           # entropy word that marks the (seed-free) eval stream
_TRAIN_TAG = 0x7EA1_0000


class Example(NamedTuple):
    """One example for next-token prediction (all arrays have length L = seq_len)."""
    inputs: np.ndarray     # int32[L]   tokens fed to the model
    targets: np.ndarray    # int32[L]   inputs shifted left by one (next token)
    loss_mask: np.ndarray  # float32[L] 1.0 where targets[i] is an answer token


class Batch(NamedTuple):
    """A batch for next-token prediction."""
    inputs: np.ndarray     # int32[B, L]
    targets: np.ndarray    # int32[B, L]
    loss_mask: np.ndarray  # float32[B, L]


def decode(tokens) -> str:
    """Tokens (any int array/sequence of byte ids) -> str, for display only."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------

def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def _fraction(name: str, value: Any, lo_open: bool, hi_open: bool) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok_lo = out > 0 if lo_open else out >= 0
    ok_hi = out < 1 if hi_open else out <= 1
    if not (ok_lo and ok_hi):
        lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
    return out


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _shift(seq: np.ndarray, answer: np.ndarray) -> Example:
    """seq int[T], answer bool[T] (True where seq[j] is an answer) -> Example of length T-1."""
    seq = np.asarray(seq, dtype=np.int32)
    return Example(seq[:-1].copy(), seq[1:].copy(), answer[1:].astype(np.float32))


# ----------------------------------------------------------------------------
# text corpus
# ----------------------------------------------------------------------------

_STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _as_paths(path) -> list[pathlib.Path]:
    if isinstance(path, (str, os.PathLike)):
        return [pathlib.Path(path)]
    if isinstance(path, Sequence) and path:
        return [pathlib.Path(p) for p in path]
    raise ValueError(f"path must be a file/directory path or a non-empty list of them, got {path!r}")


def list_text_files(path=None, *, suffixes: Sequence[str] | None = None) -> list[tuple[str, pathlib.Path]]:
    """Files of a corpus as sorted ``(relative_name, absolute_path)`` pairs.

    path: None (Python stdlib ``.py`` sources), a file, a directory, or a list
      of those. Directories are walked recursively in sorted order, skipping
      hidden entries and ``__pycache__`` (and, for the stdlib, site-packages /
      dist-packages). Empty files are skipped. The relative name (posix,
      relative to the directory given; a file's own name for a file given
      directly) is what decides the split.
    suffixes: keep only files whose names end with one of these (applied to
      files found in directories; default: ``(".py",)`` for the stdlib, all
      files otherwise).
    Raises FileNotFoundError naming a missing path, ValueError if nothing is found.
    """
    if path is None:
        roots = [pathlib.Path(sysconfig.get_paths()["stdlib"])]
        exclude = _STDLIB_EXCLUDE
        suffixes = (".py",) if suffixes is None else suffixes
    else:
        roots = _as_paths(path)
        exclude = frozenset({"__pycache__"})
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    suffixes = tuple(suffixes) if suffixes is not None else None
    found: dict[pathlib.Path, str] = {}
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"text corpus path does not exist: {str(root)!r}")
        if root.is_file():
            if root.stat().st_size > 0:
                found.setdefault(root.resolve(), root.name)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude)
            for fn in sorted(filenames):
                if fn.startswith(".") or (suffixes is not None and not fn.endswith(suffixes)):
                    continue
                full = pathlib.Path(dirpath, fn)
                try:
                    if not full.is_file() or full.stat().st_size == 0:
                        continue
                except OSError:
                    continue
                found.setdefault(full.resolve(), full.relative_to(root).as_posix())
    if not found:
        if path is None:
            what = "the Python standard library"
        else:
            what = repr(str(roots[0]) if len(roots) == 1 else [str(r) for r in roots])
        raise ValueError(f"no non-empty text files found in {what} (suffixes={suffixes})")
    return sorted(((rel, p) for p, rel in found.items()), key=lambda t: (t[0], str(t[1])))


def _file_hash(rel: str) -> float:
    """Stable hash of a relative path as a float in [0, 1)."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_files(files: Sequence[tuple[str, pathlib.Path]], val_fraction: float = 0.02
                ) -> tuple[list[tuple[str, pathlib.Path]], list[tuple[str, pathlib.Path]]]:
    """Deterministic split BY FILE -> (train, validation), each in hash order.

    A file goes to validation iff hash(relative_name) < val_fraction. With two or
    more files each split is guaranteed at least one file (the lowest-hash file
    is moved to validation / the highest-hash file to train if needed).
    """
    val_fraction = _fraction("val_fraction", val_fraction, lo_open=True, hi_open=True)
    ordered = sorted(files, key=lambda f: (_file_hash(f[0]), f[0], str(f[1])))
    train = [f for f in ordered if _file_hash(f[0]) >= val_fraction]
    val = [f for f in ordered if _file_hash(f[0]) < val_fraction]
    if len(ordered) >= 2:
        if not val:
            val, train = [train[0]], train[1:]
        elif not train:
            train, val = [val[-1]], val[:-1]
    return train, val


class TextCorpus(NamedTuple):
    """One split of a byte corpus."""
    data: np.ndarray          # uint8[N], read-only (possibly a np.memmap)
    files: tuple[str, ...]    # relative names of the files in `data`, in order


_MEMO: dict[str, TextCorpus] = {}
_MEMO_MAX = 8


def _concat(files: Sequence[tuple[str, pathlib.Path]], max_bytes: int | None) -> tuple[bytes, list[str]]:
    parts, names, total = [], [], 0
    sep = bytes([DOC_SEP])
    for rel, p in files:
        if max_bytes is not None and total >= max_bytes:
            break
        b = p.read_bytes()
        if not b:
            continue
        parts += [b, sep]
        names.append(rel)
        total += len(b) + 1
    blob = b"".join(parts)
    return (blob[:max_bytes] if max_bytes is not None else blob), names


def load_text(path=None, *, split: str = "train", max_bytes: int | None = None,
              val_fraction: float = 0.02, suffixes: Sequence[str] | None = None,
              cache_dir: str | os.PathLike | None = None) -> TextCorpus:
    """Load one split of a byte corpus as a uint8 array (see module docstring).

    max_bytes: keep only the first max_bytes bytes of the split (files in hash
      order; only the files needed are read).
    cache_dir: if given (or env ``SPARSE_ATTN_DATA_CACHE`` is set), the array is
      cached there as ``.npy`` keyed by the file list, sizes, mtimes and options,
      and loaded back with ``mmap_mode="r"``. Results are also memoised in-process.
    """
    split = _split(split)
    if max_bytes is not None:
        max_bytes = _int("max_bytes", max_bytes, 1)
    files = list_text_files(path, suffixes=suffixes)
    train, val = split_files(files, val_fraction)
    single = len(files) == 1
    chosen = files if single else (train if split == "train" else val)
    stats = [(rel, str(p), p.stat().st_size, p.stat().st_mtime_ns) for rel, p in chosen]
    key = hashlib.sha256(repr(("v1", split, float(val_fraction), max_bytes, single, stats)).encode()).hexdigest()[:24]
    if key in _MEMO:
        return _MEMO[key]
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("SPARSE_ATTN_DATA_CACHE") or None
    cache_file = pathlib.Path(cache_dir, f"sparse_attn_text_{key}.npy") if cache_dir else None
    names_file = cache_file.with_suffix(".files.txt") if cache_file else None
    if cache_file is not None and cache_file.exists() and names_file.exists():
        corpus = TextCorpus(np.load(cache_file, mmap_mode="r"), tuple(names_file.read_text("utf-8").splitlines()))
    else:
        if single:
            blob, names = _concat(chosen, None)
            n_val = max(1, int(round(len(blob) * val_fraction)))
            if len(blob) < 2:
                raise ValueError(f"text file {str(chosen[0][1])!r} is too short to split into train/validation")
            blob = blob[:len(blob) - n_val] if split == "train" else blob[len(blob) - n_val:]
            blob = blob[:max_bytes] if max_bytes is not None else blob
        else:
            blob, names = _concat(chosen, max_bytes)
        arr = np.frombuffer(blob, dtype=np.uint8)
        corpus = TextCorpus(arr, tuple(names))
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr)
            names_file.write_text("\n".join(names), "utf-8")
            os.replace(tmp, cache_file)  # atomic: readers never see a partial file
            corpus = TextCorpus(np.load(cache_file, mmap_mode="r"), corpus.files)
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = corpus
    return corpus


# ----------------------------------------------------------------------------
# synthetic tasks
# ----------------------------------------------------------------------------

# Classic passkey filler (Mohtashami & Jaggi 2023), cycled in order.
_PASSKEY_FILLER = tuple(s.encode() for s in (
    "The grass is green. ", "The sky is blue. ", "The sun is yellow. ",
    "Here we go. ", "There and back again. "))
# Varied filler for niah / vartrack: sentences drawn at random. No digits, '=', ';', '?', ':'.
_SENTENCES = tuple(s.encode() for s in (
    "The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
    "There and back again. ", "A quiet river runs through the old town. ",
    "Birds sing in the early morning. ", "The library opens after lunch. ",
    "Snow covers the distant hills. ", "A cat sleeps on the warm windowsill. ",
    "The market is busy on weekends. ", "Clouds drift slowly over the valley. ",
    "The train leaves from the northern station. ", "Tea tastes better in a blue cup. ",
    "Old maps hang on the kitchen wall. ", "The garden needs water in summer. "))


def _filler(rng: np.random.Generator | None, n: int, bank: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """n filler bytes made of sentences (cycled if rng is None, else random) and
    the sentence start offsets (int64[k], starting with 0, all <= n)."""
    if n <= 0:
        return b"", np.zeros(1, np.int64)
    k = n // min(len(s) for s in bank) + 1
    idx = np.arange(k) % len(bank) if rng is None else rng.integers(0, len(bank), k)
    chosen = [bank[i] for i in idx]
    starts = np.concatenate([[0], np.cumsum([len(s) for s in chosen])])
    return b"".join(chosen)[:n], starts[starts <= n]


def _compose(rng: np.random.Generator, total: int, pieces: Sequence[bytes], fractions: Sequence[float],
             suffix: bytes, bank: Sequence[bytes], cycle: bool = False) -> np.ndarray:
    """Filler text of length total with `pieces` inserted (in order) at sentence
    boundaries near the given depth fractions (non-decreasing), then `suffix`.
    Returns int32[total]."""
    n_fill = total - sum(len(p) for p in pieces) - len(suffix)
    assert n_fill >= 0, (total, n_fill)
    fill, starts = _filler(None if cycle else rng, n_fill, bank)
    want = np.asarray(fractions, np.float64) * n_fill
    cuts = starts[np.searchsorted(starts, want, side="right") - 1]
    parts, prev = [], 0
    for piece, cut in zip(pieces, cuts):
        parts += [fill[prev:cut], piece]
        prev = int(cut)
    parts += [fill[prev:], suffix]
    out = b"".join(parts)
    assert len(out) == total, (len(out), total)
    return np.frombuffer(out, np.uint8).astype(np.int32)


def _answer_at_end(seq: np.ndarray, n: int) -> Example:
    ans = np.zeros(seq.shape[0], bool)
    ans[-n:] = True
    return _shift(seq, ans)


def _digits(values: np.ndarray, base: int, width: int) -> np.ndarray:
    """int[N] -> int[N, width] base-`base` digits, most significant first."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (np.asarray(values, np.int64)[:, None] // powers) % base


def _numbers(rng: np.random.Generator, n: int, num_digits: int, distinct: bool = True) -> list[bytes]:
    """n random decimal strings of exactly num_digits digits (leading zeros allowed)."""
    vals = rng.choice(10 ** num_digits, n, replace=not distinct)
    return [str(v).zfill(num_digits).encode() for v in vals]


def _names(rng: np.random.Generator, n: int, chars: int) -> list[bytes]:
    """n distinct random lowercase names of `chars` letters."""
    vals = rng.choice(26 ** chars, n, replace=False)
    return [bytes((_digits(np.array([v]), 26, chars)[0] + ord("a")).tolist()) for v in vals]


class _Task:
    """Base for synthetic task specs: frozen dataclasses validated on construction."""
    name: str = ""
    seq_len: int

    def sample(self, rng: np.random.Generator) -> Example:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set(self, field: str, value) -> None:
        object.__setattr__(self, field, value)

    def _int_set(self, field: str, minimum: int) -> int:
        v = _int(field, getattr(self, field), minimum)
        self._set(field, v)
        return v

    def _need(self, needed: int, what: str) -> None:
        if self.seq_len + 1 < needed:
            raise ValueError(f"seq_len={self.seq_len} is too short for {self.name} with {what}: "
                             f"needs seq_len >= {needed - 1}")


@dataclasses.dataclass(frozen=True)
class MQARTask(_Task):
    """Multi-query associative recall (Zoology / Based).

    Layout of seq (seq_len + 1 tokens): ``k1 v1 k2 v2 ... kP vP`` then the query
    region: filler with ``num_queries`` queries ``k v`` (keys drawn from the P
    pairs) at random non-overlapping positions. Answers = the value tokens of
    the queries (loss_mask marks the positions that predict them). Each key is
    ``key_len`` tokens from ``[128, 128 + key_vocab)`` (distinct within a
    sequence), each value ``value_len`` tokens from ``[256 - value_vocab, 256)``.

    num_pairs: default ``min(key_vocab**key_len, (seq_len+1)//16, what fits)``.
    num_queries: default num_pairs (every key asked once, random order); more
      than num_pairs samples keys with replacement.
    filler: None = random printable ASCII noise (32..126); an int in [0, 128) =
      that constant token.
    """
    seq_len: int
    num_pairs: int | None = None
    num_queries: int | None = None
    key_len: int = 1
    value_len: int = 1
    key_vocab: int = 64
    value_vocab: int = 64
    filler: int | None = None
    name = "mqar"

    def __post_init__(self):
        self._set("seq_len", _int("seq_len", self.seq_len, 1))
        kl = self._int_set("key_len", 1)
        vl = self._int_set("value_len", 1)
        kv = self._int_set("key_vocab", 1)
        vv = self._int_set("value_vocab", 1)
        if kv + vv > VOCAB_SIZE - MQAR_KEY_BASE:
            raise ValueError(f"key_vocab + value_vocab must be <= {VOCAB_SIZE - MQAR_KEY_BASE} "
                             f"(keys and values use tokens 128..255), got {kv} + {vv}")
        if kl * np.log2(kv) > 62:
            raise ValueError(f"key_vocab**key_len must be < 2**62, got {kv}**{kl}")
        if vl * np.log2(vv) > 62:
            raise ValueError(f"value_vocab**value_len must be < 2**62, got {vv}**{vl}")
        space, total, item = kv ** kl, self.seq_len + 1, kl + vl
        if self.num_pairs is None:  # as many as fit (queries default to one per pair), <= total/16
            if self.num_queries is None:
                fit = total // (2 * item)
            else:
                fit = (total - _int("num_queries", self.num_queries, 1) * item) // item
            self._set("num_pairs", max(1, min(space, total // 16, fit)))
        p = self._int_set("num_pairs", 1)
        if p > space:
            raise ValueError(f"num_pairs={p} exceeds the number of distinct keys key_vocab**key_len={space}")
        if self.num_queries is None:
            self._set("num_queries", p)
        q = self._int_set("num_queries", 1)
        if self.filler is not None:
            f = self._int_set("filler", 0)
            if f >= MQAR_KEY_BASE:
                raise ValueError(f"filler must be a token in [0, {MQAR_KEY_BASE}) (or None for noise), got {f}")
        self._need((p + q) * item, f"num_pairs={p}, num_queries={q}, key_len={kl}, value_len={vl}")

    @property
    def value_base(self) -> int:
        return VOCAB_SIZE - self.value_vocab

    def sample(self, rng: np.random.Generator) -> Example:
        total, kl, vl = self.seq_len + 1, self.key_len, self.value_len
        p, q, item = self.num_pairs, self.num_queries, kl + vl
        keys = rng.choice(self.key_vocab ** kl, p, replace=False)
        vals = rng.integers(0, self.value_vocab ** vl, p)
        pairs = np.concatenate([_digits(keys, self.key_vocab, kl) + MQAR_KEY_BASE,
                                _digits(vals, self.value_vocab, vl) + self.value_base], axis=1)
        kv_len = p * item
        if self.filler is None:
            seq = rng.integers(_ASCII_LO, _ASCII_HI, total).astype(np.int32)
        else:
            seq = np.full(total, self.filler, np.int32)
        seq[:kv_len] = pairs.reshape(-1)
        which = rng.permutation(p)[:q] if q <= p else rng.integers(0, p, q)
        free = total - kv_len - q * item
        starts = kv_len + np.sort(rng.integers(0, free + 1, q)) + np.arange(q) * item
        seq[starts[:, None] + np.arange(item)] = pairs[which]
        ans = np.zeros(total, bool)
        ans[(starts[:, None] + kl + np.arange(vl)).reshape(-1)] = True
        return _shift(seq, ans)


@dataclasses.dataclass(frozen=True)
class PasskeyTask(_Task):
    """Passkey retrieval (Mohtashami & Jaggi 2023), ASCII text.

    ``<filler> The pass key is 12345. <filler>\\nWhat is the pass key? The pass key is 12345``
    The needle sits at a sentence boundary near ``depth`` (fraction of the
    filler; None = uniform random per example). Answer = the final num_digits
    digits.
    """
    seq_len: int
    num_digits: int = 5
    depth: float | None = None
    name = "passkey"
    NEEDLE = b"The pass key is %s. "
    QUESTION = b"\nWhat is the pass key? The pass key is "

    def __post_init__(self):
        self._set("seq_len", _int("seq_len", self.seq_len, 1))
        nd = _int("num_digits", self.num_digits, 1)
        if nd > 18:
            raise ValueError(f"num_digits must be <= 18, got {nd}")
        self._set("num_digits", nd)
        if self.depth is not None:
            self._set("depth", _fraction("depth", self.depth, lo_open=False, hi_open=False))
        self._need(len(self.NEEDLE % (b"0" * nd)) + len(self.QUESTION) + nd, f"num_digits={nd}")

    def sample(self, rng: np.random.Generator) -> Example:
        key = _numbers(rng, 1, self.num_digits)[0]
        depth = rng.random() if self.depth is None else self.depth
        seq = _compose(rng, self.seq_len + 1, [self.NEEDLE % key], [depth], self.QUESTION + key,
                       _PASSKEY_FILLER, cycle=True)
        return _answer_at_end(seq, self.num_digits)


@dataclasses.dataclass(frozen=True)
class NeedleTask(_Task):
    """Needle in a haystack with distractor needles (RULER-style multi-key NIAH).

    ``num_needles`` sentences ``The special magic number for <name> is <digits>. ``
    (distinct random lowercase names and distinct numbers) at random sentence
    boundaries in random-sentence filler; the question at the end asks for one
    of them: ``\\nWhat is the special magic number for <name>? The special magic
    number for <name> is <digits>``. depth: position of the asked needle
    (fraction of the filler; None = random); the distractors are always random.
    """
    seq_len: int
    num_needles: int = 4
    num_digits: int = 7
    name_chars: int = 6
    depth: float | None = None
    name = "niah"
    NEEDLE = b"The special magic number for %s is %s. "
    QUESTION = b"\nWhat is the special magic number for %s? The special magic number for %s is "

    def __post_init__(self):
        self._set("seq_len", _int("seq_len", self.seq_len, 1))
        n = _int("num_needles", self.num_needles, 1)
        nd = _int("num_digits", self.num_digits, 1)
        nc = _int("name_chars", self.name_chars, 1)
        if nd > 18 or nc > 12:
            raise ValueError(f"num_digits must be <= 18 and name_chars <= 12, got {nd}, {nc}")
        if 10 ** nd < n or 26 ** nc < n:
            raise ValueError(f"num_needles={n} needs distinct numbers/names: 10**num_digits={10 ** nd}, "
                             f"26**name_chars={26 ** nc}")
        for f, v in (("num_needles", n), ("num_digits", nd), ("name_chars", nc)):
            self._set(f, v)
        if self.depth is not None:
            self._set("depth", _fraction("depth", self.depth, lo_open=False, hi_open=False))
        nm, dg = b"a" * nc, b"0" * nd
        self._need(n * len(self.NEEDLE % (nm, dg)) + len(self.QUESTION % (nm, nm)) + nd,
                   f"num_needles={n}, num_digits={nd}, name_chars={nc}")

    def sample(self, rng: np.random.Generator) -> Example:
        n = self.num_needles
        names = _names(rng, n, self.name_chars)
        nums = _numbers(rng, n, self.num_digits)
        fr = rng.random(n)
        if self.depth is not None:
            fr[0] = self.depth  # needle 0 is the one asked about
        order = np.argsort(fr, kind="stable")
        pieces = [self.NEEDLE % (names[i], nums[i]) for i in order]
        suffix = self.QUESTION % (names[0], names[0]) + nums[0]
        seq = _compose(rng, self.seq_len + 1, pieces, fr[order], suffix, _SENTENCES)
        return _answer_at_end(seq, self.num_digits)


@dataclasses.dataclass(frozen=True)
class VariableTrackingTask(_Task):
    """Multi-hop variable tracking (RULER-style), ASCII text.

    ``num_chains`` chains, each ``x0 = 12345; `` then ``x1 = x0; `` ... ``xH = x{H-1}; ``
    (H = num_hops; distinct random lowercase names; distinct values across
    chains), statements placed in order at random sentence boundaries of
    random-sentence filler, chains interleaved at random. The question asks for
    the end of the first chain: ``\\n? xH -> 12345``; answer = the value digits.
    """
    seq_len: int
    num_hops: int = 4
    num_chains: int = 3
    num_digits: int = 5
    name_chars: int = 5
    name = "vartrack"
    ASSIGN = b"%s = %s; "
    QUESTION = b"\n? %s -> "

    def __post_init__(self):
        self._set("seq_len", _int("seq_len", self.seq_len, 1))
        h = _int("num_hops", self.num_hops, 0)
        c = _int("num_chains", self.num_chains, 1)
        nd = _int("num_digits", self.num_digits, 1)
        nc = _int("name_chars", self.name_chars, 1)
        if nd > 18 or nc > 12:
            raise ValueError(f"num_digits must be <= 18 and name_chars <= 12, got {nd}, {nc}")
        if 10 ** nd < c or 26 ** nc < c * (h + 1):
            raise ValueError(f"not enough distinct values/names for num_chains={c}, num_hops={h}")
        for f, v in (("num_hops", h), ("num_chains", c), ("num_digits", nd), ("name_chars", nc)):
            self._set(f, v)
        nm = b"a" * nc
        per_chain = len(self.ASSIGN % (nm, b"0" * nd)) + h * len(self.ASSIGN % (nm, nm))
        self._need(c * per_chain + len(self.QUESTION % nm) + nd,
                   f"num_hops={h}, num_chains={c}, num_digits={nd}, name_chars={nc}")

    def sample(self, rng: np.random.Generator) -> Example:
        h, c = self.num_hops, self.num_chains
        names = _names(rng, c * (h + 1), self.name_chars)
        chains = [names[i * (h + 1):(i + 1) * (h + 1)] for i in range(c)]
        values = _numbers(rng, c, self.num_digits)
        stmts = [[self.ASSIGN % (ch[0], v)] + [self.ASSIGN % (ch[j], ch[j - 1]) for j in range(1, h + 1)]
                 for ch, v in zip(chains, values)]
        slots = rng.permutation(np.repeat(np.arange(c), h + 1))  # which chain speaks at each slot
        nxt = [0] * c
        pieces = []
        for ci in slots:
            pieces.append(stmts[ci][nxt[ci]])
            nxt[ci] += 1
        fr = np.sort(rng.random(len(pieces)))
        suffix = self.QUESTION % chains[0][-1] + values[0]
        seq = _compose(rng, self.seq_len + 1, pieces, fr, suffix, _SENTENCES)
        return _answer_at_end(seq, self.num_digits)


TASKS: dict[str, type[_Task]] = {
    "mqar": MQARTask, "passkey": PasskeyTask, "niah": NeedleTask, "vartrack": VariableTrackingTask,
}


def _task_fn(cls):
    def fn(rng: np.random.Generator, seq_len: int, **kwargs) -> Example:
        return cls(seq_len, **kwargs).sample(rng)
    fn.__name__ = cls.name
    fn.__doc__ = (f"One {cls.name} example: (inputs int32[L], targets int32[L], loss_mask float32[L]); "
                  f"kwargs as {cls.__name__}.\n\n" + (cls.__doc__ or ""))
    return fn


mqar = _task_fn(MQARTask)
passkey = _task_fn(PasskeyTask)
niah = _task_fn(NeedleTask)
vartrack = _task_fn(VariableTrackingTask)


# ----------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------

class Dataset:
    """Deterministic, resumable batches for next-token prediction.

    Every method is a pure function of (seed, split, step/index, rows): no
    iterator state, so resuming at step N or running on many hosts needs no
    bookkeeping. Attributes: name, seq_len, split, seed, vocab_size (256).
    """
    vocab_size: int = VOCAB_SIZE

    def __init__(self, name: str, seq_len: int, split: str, seed: int):
        self.name = name
        self.seq_len = _int("seq_len", seq_len, 1)
        self.split = _split(split)
        self.seed = _int("seed", seed, 0)
        self._stream = zlib.crc32(f"{name}:{self.split}".encode())

    # subclasses implement: one row from its rng (train) / eval row j
    def _train_row(self, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def _eval_row(self, index: int, row: int, batch_size: int) -> Example:
        rng = np.random.default_rng(np.random.SeedSequence([_EVAL_TAG, self._stream, index, row]))
        return self._train_row(rng)

    @staticmethod
    def _rows(batch_size: int, shard_index: int, num_shards: int) -> range:
        b = _int("batch_size", batch_size, 1)
        n = _int("num_shards", num_shards, 1)
        i = _int("shard_index", shard_index, 0)
        if i >= n:
            raise ValueError(f"shard_index must be in [0, num_shards={n}), got {i}")
        if b % n:
            raise ValueError(f"batch_size={b} (global) must be divisible by num_shards={n}")
        per = b // n
        return range(i * per, (i + 1) * per)

    @staticmethod
    def _stack(rows: list[Example]) -> Batch:
        return Batch(*(np.stack(x) for x in zip(*rows)))

    def batch(self, step: int, batch_size: int, *, shard_index: int = 0, num_shards: int = 1) -> Batch:
        """Rows [i*B/n, (i+1)*B/n) of the global batch for `step` (B = batch_size, global).

        Returns Batch(inputs int32[B/n, L], targets int32[B/n, L], loss_mask float32[B/n, L]).
        """
        step = _int("step", step, 0)
        rows = self._rows(batch_size, shard_index, num_shards)
        return self._stack([
            self._train_row(np.random.default_rng(
                np.random.SeedSequence([self.seed, _TRAIN_TAG, self._stream, step, r])))
            for r in rows])

    def batches(self, batch_size: int, *, start_step: int = 0, num_steps: int | None = None,
                shard_index: int = 0, num_shards: int = 1) -> Iterator[Batch]:
        """batch(start_step), batch(start_step + 1), ... (forever if num_steps is None)."""
        step = _int("start_step", start_step, 0)
        stop = None if num_steps is None else step + _int("num_steps", num_steps, 0)
        while stop is None or step < stop:
            yield self.batch(step, batch_size, shard_index=shard_index, num_shards=num_shards)
            step += 1

    def eval_batch(self, index: int, batch_size: int, *, shard_index: int = 0, num_shards: int = 1) -> Batch:
        """Evaluation batch `index` (seed-independent; from this dataset's split)."""
        index = _int("index", index, 0)
        rows = self._rows(batch_size, shard_index, num_shards)
        return self._stack([self._eval_row(index, r, batch_size) for r in rows])

    def eval_batches(self, num_batches: int, batch_size: int, *, shard_index: int = 0,
                     num_shards: int = 1) -> Iterator[Batch]:
        """eval_batch(0), ..., eval_batch(num_batches - 1), lazily. Same for every seed."""
        num_batches = _int("num_batches", num_batches, 0)
        self._rows(batch_size, shard_index, num_shards)  # validate eagerly
        return (self.eval_batch(i, batch_size, shard_index=shard_index, num_shards=num_shards)
                for i in range(num_batches))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, seq_len={self.seq_len}, split={self.split!r}, "
                f"seed={self.seed}, vocab_size={self.vocab_size})")


class TextDataset(Dataset):
    """Random windows of seq_len + 1 bytes of a TextCorpus; loss_mask is all ones.

    Training windows start at uniformly random offsets. Evaluation uses the
    ``num_eval_windows`` non-overlapping windows ``[w*(L+1), (w+1)*(L+1))`` in a
    fixed shuffled order (wrapping around after all have been used).
    """

    def __init__(self, corpus: TextCorpus, seq_len: int, split: str = "train", seed: int = 0,
                 name: str = "text"):
        super().__init__(name, seq_len, split, seed)
        self.corpus = corpus
        self.data = corpus.data
        self.files = corpus.files
        n, w = int(self.data.shape[0]), self.seq_len + 1
        if n < w:
            raise ValueError(f"{split} split of the text corpus has {n} bytes ({len(self.files)} files), "
                             f"fewer than seq_len + 1 = {w}; use a larger corpus/max_bytes or a smaller seq_len")
        self.num_bytes = n
        self.num_eval_windows = n // w
        self._eval_order: np.ndarray | None = None

    def _window(self, start: int) -> Example:
        seq = np.asarray(self.data[start:start + self.seq_len + 1], dtype=np.int32)
        return Example(seq[:-1], seq[1:], np.ones(self.seq_len, np.float32))

    def _train_row(self, rng: np.random.Generator) -> Example:
        return self._window(int(rng.integers(0, self.num_bytes - self.seq_len)))

    def _eval_row(self, index: int, row: int, batch_size: int) -> Example:
        if self._eval_order is None:
            rng = np.random.default_rng(np.random.SeedSequence([_EVAL_TAG, self.num_eval_windows]))
            self._eval_order = rng.permutation(self.num_eval_windows)
        w = self.seq_len + 1
        return self._window(int(self._eval_order[(index * batch_size + row) % self.num_eval_windows]) * w)


class TaskDataset(Dataset):
    """Batches of a synthetic task (one independent example per row)."""

    def __init__(self, task: _Task, split: str = "train", seed: int = 0):
        super().__init__(task.name, task.seq_len, split, seed)
        self.task = task

    def _train_row(self, rng: np.random.Generator) -> Example:
        return self.task.sample(rng)

    def __repr__(self) -> str:
        return f"TaskDataset({self.task!r}, split={self.split!r}, seed={self.seed})"


_TEXT_KWARGS = ("val_fraction", "suffixes", "cache_dir")


def make_dataset(name: str, *, seq_len: int, split: str = "train", seed: int = 0, path=None,
                 max_bytes: int | None = None, **kwargs) -> Dataset:
    """Build a dataset by name.

    name: "text" (stdlib sources, or `path`), or a synthetic task in TASKS:
      "mqar", "passkey", "niah", "vartrack".
    seq_len: L, the length of inputs/targets/loss_mask rows.
    split: "train" or "validation" (text: disjoint file sets; tasks: different
      random streams).
    seed: int >= 0; batch(step) depends only on (seed, split, step, shard).
    path, max_bytes (+ val_fraction, suffixes, cache_dir): text only, see load_text.
    **kwargs: task options (see MQARTask, PasskeyTask, NeedleTask, VariableTrackingTask).
    """
    split = _split(split)
    if name == "text":
        bad = sorted(set(kwargs) - set(_TEXT_KWARGS))
        if bad:
            raise ValueError(f"unknown option(s) {bad} for 'text'; "
                             f"accepted: path, max_bytes, {', '.join(_TEXT_KWARGS)}")
        seq_len = _int("seq_len", seq_len, 1)
        corpus = load_text(path, split=split, max_bytes=max_bytes, **kwargs)
        return TextDataset(corpus, seq_len, split=split, seed=seed)
    if name not in TASKS:
        raise ValueError(f"unknown dataset {name!r}; expected 'text' or one of {sorted(TASKS)}")
    if path is not None or max_bytes is not None:
        raise ValueError(f"path/max_bytes apply only to 'text', not to the synthetic task {name!r}")
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "seq_len"]
    bad = sorted(set(kwargs) - set(fields))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for {name!r}; accepted: {fields}")
    return TaskDataset(cls(seq_len, **kwargs), split=split, seed=seed)
