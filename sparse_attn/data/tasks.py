"""Synthetic long-context tasks: MQAR, passkey, needle, variable tracking.

Each task is a frozen dataclass, validated on construction, whose
`sample(rng)` draws one Example of length seq_len (see
`sparse_attn.data.example` for the shift and the loss mask). Token
conventions:

* passkey, niah, vartrack: plain ASCII text (bytes 10 and 32..126) built
  from `sparse_attn.data.filler`; answers are ASCII digits '0'..'9' (48..57)
  and are always the last tokens.
* mqar: keys are tokens [MQAR_KEY_BASE, MQAR_KEY_BASE + key_vocab) (128..),
  values are tokens [256 - value_vocab, 256) (..255); the two ranges are
  disjoint and never overlap ASCII, so filler noise (random printable ASCII
  32..126 by default) can never be mistaken for a key/value.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sparse_attn.data import filler as fill
from sparse_attn.data.checks import as_fraction, as_int
from sparse_attn.data.example import VOCAB_SIZE, Example, shifted

# MQAR keys: [128, 128 + key_vocab); values: [256 - value_vocab, 256).
MQAR_KEY_BASE = 128
_ASCII_LO, _ASCII_HI = 32, 127  # printable ASCII noise for MQAR filler


def _answer_at_end(seq: np.ndarray, n: int) -> Example:
  ans = np.zeros(seq.shape[0], bool)
  ans[-n:] = True
  return shifted(seq, ans)


def _check_widths(num_digits: int, name_chars: int) -> None:
  # Numbers and names are drawn as int64s: 10**18 and 26**12 < 2**63.
  if num_digits > 18 or name_chars > 12:
    raise ValueError(
      f"num_digits must be <= 18 and name_chars <= 12, "
      f"got {num_digits}, {name_chars}"
    )


class Task:
  """Base of the task specs: frozen dataclasses validated on construction."""

  name: str = ""
  seq_len: int

  if TYPE_CHECKING:
    # What every subclass's dataclass decorator provides (Task itself is not
    # one, so each task orders its own fields, seq_len first).
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __init__(self, seq_len: int, **kwargs: Any) -> None: ...

  def sample(self, rng: np.random.Generator) -> Example:  # pragma: no cover
    raise NotImplementedError

  def _set(self, field: str, value) -> None:
    object.__setattr__(self, field, value)

  def _int_set(self, field: str, minimum: int) -> int:
    v = as_int(field, getattr(self, field), minimum)
    self._set(field, v)
    return v

  def _fraction_set(self, field: str) -> None:
    # None stays None (a random value per example).
    if getattr(self, field) is not None:
      self._set(
        field,
        as_fraction(field, getattr(self, field), lo_open=False, hi_open=False),
      )

  def _need(self, needed: int, what: str) -> None:
    if self.seq_len + 1 < needed:
      raise ValueError(
        f"seq_len={self.seq_len} is too short for {self.name} "
        f"with {what}: needs seq_len >= {needed - 1}"
      )


@dataclasses.dataclass(frozen=True)
class MQARTask(Task):
  """Multi-query associative recall (Zoology / Based).

  Layout of seq (seq_len + 1 tokens): `k1 v1 k2 v2 ... kP vP` then the query
  region: filler with `num_queries` queries `k v` (keys drawn from the P
  pairs) at random non-overlapping positions. Answers = the value tokens of
  the queries (loss_mask marks the positions that predict them). Each key is
  `key_len` tokens from [128, 128 + key_vocab) (distinct within a
  sequence), each value `value_len` tokens from [256 - value_vocab, 256).

  num_pairs: default min(key_vocab**key_len, (seq_len+1)//16, what fits).
  num_queries: default num_pairs (every key asked once, random order); more
    than num_pairs samples keys with replacement.
  filler: None = random printable ASCII noise (32..126); an int in [0, 128)
    = that constant token.
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
    self._int_set("seq_len", 1)
    kl = self._int_set("key_len", 1)
    vl = self._int_set("value_len", 1)
    kv = self._int_set("key_vocab", 1)
    vv = self._int_set("value_vocab", 1)
    if kv + vv > VOCAB_SIZE - MQAR_KEY_BASE:
      raise ValueError(
        f"key_vocab + value_vocab must be <= "
        f"{VOCAB_SIZE - MQAR_KEY_BASE} (keys and values use "
        f"tokens 128..255), got {kv} + {vv}"
      )
    if kl * np.log2(kv) > 62:
      raise ValueError(f"key_vocab**key_len must be < 2**62, got {kv}**{kl}")
    if vl * np.log2(vv) > 62:
      raise ValueError(
        f"value_vocab**value_len must be < 2**62, got {vv}**{vl}"
      )
    space, total, item = kv**kl, self.seq_len + 1, kl + vl
    if self.num_pairs is None:
      # As many as fit (queries default to one per pair), <= total/16.
      if self.num_queries is None:
        fit = total // (2 * item)
      else:
        queries = as_int("num_queries", self.num_queries, 1)
        fit = (total - queries * item) // item
      self._set("num_pairs", max(1, min(space, total // 16, fit)))
    p = self._int_set("num_pairs", 1)
    if p > space:
      raise ValueError(
        f"num_pairs={p} exceeds the number of distinct keys "
        f"key_vocab**key_len={space}"
      )
    if self.num_queries is None:
      self._set("num_queries", p)
    q = self._int_set("num_queries", 1)
    if self.filler is not None:
      f = self._int_set("filler", 0)
      if f >= MQAR_KEY_BASE:
        raise ValueError(
          f"filler must be a token in [0, {MQAR_KEY_BASE}) "
          f"(or None for noise), got {f}"
        )
    self._need(
      (p + q) * item,
      f"num_pairs={p}, num_queries={q}, key_len={kl}, value_len={vl}",
    )

  @property
  def value_base(self) -> int:
    return VOCAB_SIZE - self.value_vocab

  def sample(self, rng: np.random.Generator) -> Example:
    total, kl, vl = self.seq_len + 1, self.key_len, self.value_len
    p, q, item = self.num_pairs, self.num_queries, kl + vl
    assert p is not None and q is not None  # __post_init__ fills them
    keys = rng.choice(self.key_vocab**kl, p, replace=False)
    vals = rng.integers(0, self.value_vocab**vl, p)
    pairs = np.concatenate(
      [
        fill.digits(keys, self.key_vocab, kl) + MQAR_KEY_BASE,
        fill.digits(vals, self.value_vocab, vl) + self.value_base,
      ],
      axis=1,
    )
    kv_len = p * item
    if self.filler is None:
      seq = rng.integers(_ASCII_LO, _ASCII_HI, total).astype(np.int32)
    else:
      seq = np.full(total, self.filler, np.int32)
    seq[:kv_len] = pairs.reshape(-1)
    which = rng.permutation(p)[:q] if q <= p else rng.integers(0, p, q)
    free = total - kv_len - q * item
    starts = (
      kv_len + np.sort(rng.integers(0, free + 1, q)) + np.arange(q) * item
    )
    seq[starts[:, None] + np.arange(item)] = pairs[which]
    ans = np.zeros(total, bool)
    ans[(starts[:, None] + kl + np.arange(vl)).reshape(-1)] = True
    return shifted(seq, ans)


@dataclasses.dataclass(frozen=True)
class PasskeyTask(Task):
  """Passkey retrieval (Mohtashami & Jaggi 2023), ASCII text.

  `<filler> The pass key is 12345. <filler>\\nWhat is the pass key? The pass
  key is 12345`. The needle sits at a sentence boundary near `depth`
  (fraction of the filler; None = uniform random per example). Answer = the
  final num_digits digits.
  """

  seq_len: int
  num_digits: int = 5
  depth: float | None = None
  name = "passkey"
  NEEDLE = b"The pass key is %s. "
  QUESTION = b"\nWhat is the pass key? The pass key is "

  def __post_init__(self):
    self._int_set("seq_len", 1)
    nd = as_int("num_digits", self.num_digits, 1)
    if nd > 18:
      raise ValueError(f"num_digits must be <= 18, got {nd}")
    self._set("num_digits", nd)
    self._fraction_set("depth")
    self._need(
      len(self.NEEDLE % (b"0" * nd)) + len(self.QUESTION) + nd,
      f"num_digits={nd}",
    )

  def sample(self, rng: np.random.Generator) -> Example:
    key = fill.numbers(rng, 1, self.num_digits)[0]
    depth = rng.random() if self.depth is None else self.depth
    seq = fill.compose(
      rng,
      self.seq_len + 1,
      [self.NEEDLE % key],
      [depth],
      self.QUESTION + key,
      fill.PASSKEY_FILLER,
      cycle=True,
    )
    return _answer_at_end(seq, self.num_digits)


@dataclasses.dataclass(frozen=True)
class NeedleTask(Task):
  """Needle in a haystack with distractor needles (RULER-style multi-key NIAH).

  `num_needles` sentences `The special magic number for <name> is <digits>. `
  (distinct random lowercase names and distinct numbers) at random sentence
  boundaries in random-sentence filler; the question at the end asks for one
  of them: `\\nWhat is the special magic number for <name>? The special magic
  number for <name> is <digits>`. depth: position of the asked needle
  (fraction of the filler; None = random); the distractors are always random.
  """

  seq_len: int
  num_needles: int = 4
  num_digits: int = 7
  name_chars: int = 6
  depth: float | None = None
  name = "niah"
  NEEDLE = b"The special magic number for %s is %s. "
  QUESTION = (
    b"\nWhat is the special magic number for %s? "
    b"The special magic number for %s is "
  )

  def __post_init__(self):
    self._int_set("seq_len", 1)
    n = as_int("num_needles", self.num_needles, 1)
    nd = as_int("num_digits", self.num_digits, 1)
    nc = as_int("name_chars", self.name_chars, 1)
    _check_widths(nd, nc)
    if 10**nd < n or 26**nc < n:
      raise ValueError(
        f"num_needles={n} needs distinct numbers/names: "
        f"10**num_digits={10**nd}, "
        f"26**name_chars={26**nc}"
      )
    for f, v in (("num_needles", n), ("num_digits", nd), ("name_chars", nc)):
      self._set(f, v)
    self._fraction_set("depth")
    nm, dg = b"a" * nc, b"0" * nd
    self._need(
      n * len(self.NEEDLE % (nm, dg)) + len(self.QUESTION % (nm, nm)) + nd,
      f"num_needles={n}, num_digits={nd}, name_chars={nc}",
    )

  def sample(self, rng: np.random.Generator) -> Example:
    n = self.num_needles
    names = fill.names(rng, n, self.name_chars)
    nums = fill.numbers(rng, n, self.num_digits)
    fr = rng.random(n)
    if self.depth is not None:
      fr[0] = self.depth  # needle 0 is the one asked about
    order = np.argsort(fr, kind="stable")
    pieces = [self.NEEDLE % (names[i], nums[i]) for i in order]
    suffix = self.QUESTION % (names[0], names[0]) + nums[0]
    seq = fill.compose(
      rng, self.seq_len + 1, pieces, fr[order], suffix, fill.SENTENCES
    )
    return _answer_at_end(seq, self.num_digits)


@dataclasses.dataclass(frozen=True)
class VariableTrackingTask(Task):
  """Multi-hop variable tracking (RULER-style), ASCII text.

  `num_chains` chains, each `x0 = 12345; ` then `x1 = x0; ` ...
  `xH = x{H-1}; ` (H = num_hops; distinct random lowercase names; distinct
  values across chains), statements placed in order at random sentence
  boundaries of random-sentence filler, chains interleaved at random. The
  question asks for the end of the first chain: `\\n? xH -> 12345`; answer =
  the value digits.
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
    self._int_set("seq_len", 1)
    h = as_int("num_hops", self.num_hops, 0)
    c = as_int("num_chains", self.num_chains, 1)
    nd = as_int("num_digits", self.num_digits, 1)
    nc = as_int("name_chars", self.name_chars, 1)
    _check_widths(nd, nc)
    if 10**nd < c or 26**nc < c * (h + 1):
      raise ValueError(
        f"not enough distinct values/names for num_chains={c}, num_hops={h}"
      )
    for f, v in (
      ("num_hops", h),
      ("num_chains", c),
      ("num_digits", nd),
      ("name_chars", nc),
    ):
      self._set(f, v)
    nm = b"a" * nc
    per_chain = len(self.ASSIGN % (nm, b"0" * nd)) + h * len(
      self.ASSIGN % (nm, nm)
    )
    self._need(
      c * per_chain + len(self.QUESTION % nm) + nd,
      f"num_hops={h}, num_chains={c}, num_digits={nd}, name_chars={nc}",
    )

  def sample(self, rng: np.random.Generator) -> Example:
    h, c = self.num_hops, self.num_chains
    names = fill.names(rng, c * (h + 1), self.name_chars)
    chains = [names[i * (h + 1) : (i + 1) * (h + 1)] for i in range(c)]
    values = fill.numbers(rng, c, self.num_digits)
    stmts = [
      [self.ASSIGN % (ch[0], v)]
      + [self.ASSIGN % (ch[j], ch[j - 1]) for j in range(1, h + 1)]
      for ch, v in zip(chains, values)
    ]
    # Which chain speaks at each slot.
    slots = rng.permutation(np.repeat(np.arange(c), h + 1))
    nxt = [0] * c
    pieces = []
    for ci in slots:
      pieces.append(stmts[ci][nxt[ci]])
      nxt[ci] += 1
    fr = np.sort(rng.random(len(pieces)))
    suffix = self.QUESTION % chains[0][-1] + values[0]
    seq = fill.compose(
      rng, self.seq_len + 1, pieces, fr, suffix, fill.SENTENCES
    )
    return _answer_at_end(seq, self.num_digits)


TASKS: dict[str, type[Task]] = {
  "mqar": MQARTask,
  "passkey": PasskeyTask,
  "niah": NeedleTask,
  "vartrack": VariableTrackingTask,
}


def _task_fn(cls):
  def fn(rng: np.random.Generator, seq_len: int, **kwargs) -> Example:
    return cls(seq_len, **kwargs).sample(rng)

  fn.__name__ = cls.name
  fn.__doc__ = (
    f"One {cls.name} example: (inputs int32[L], targets int32[L], "
    f"loss_mask float32[L]); kwargs as {cls.__name__}.\n\n"
    + (cls.__doc__ or "")
  )
  return fn


mqar = _task_fn(MQARTask)
passkey = _task_fn(PasskeyTask)
niah = _task_fn(NeedleTask)
vartrack = _task_fn(VariableTrackingTask)
