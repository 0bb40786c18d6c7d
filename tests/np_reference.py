"""Plain NumPy loop implementations of the DSA API, written independently of
the library (explicit loops over batch, query, head, key), used as ground truth."""

import numpy as np


def positions(B, T, S, q_offset):
  off = np.broadcast_to(
    np.asarray(S - T if q_offset is None else q_offset), (B,)
  )
  return [[int(off[b]) + t for t in range(T)] for b in range(B)]


def is_visible(s, pos, b, kv_lengths):
  return s <= pos and (kv_lengths is None or s < int(kv_lengths[b]))


def indexer_scores(q_idx, k_idx, w, q_offset=None, kv_lengths=None):
  B, T, HI, _ = q_idx.shape
  S = k_idx.shape[1]
  pos = positions(B, T, S, q_offset)
  out = np.full((B, T, S), -np.inf)
  for b in range(B):
    for t in range(T):
      for s in range(S):
        if is_visible(s, pos[b][t], b, kv_lengths):
          out[b, t, s] = sum(
            float(w[b, t, j])
            * max(0.0, float(np.dot(q_idx[b, t, j], k_idx[b, s])))
            for j in range(HI)
          )
  return out


def _softmax_attend(q_row, keys, values, scale):
  """q_row [D], keys [N, D], values [N, Dv] -> [Dv] (zeros if N == 0)."""
  if len(keys) == 0:
    return np.zeros(values.shape[-1])
  logits = np.array([scale * float(np.dot(q_row, kk)) for kk in keys])
  p = np.exp(logits - logits.max())
  p /= p.sum()
  return (p[:, None] * values).sum(0)


def dense_attention(q, k, v, q_offset=None, kv_lengths=None, scale=None):
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  scale = D**-0.5 if scale is None else scale
  pos = positions(B, T, S, q_offset)
  out = np.zeros((B, T, H, v.shape[-1]))
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(S) if is_visible(s, pos[b][t], b, kv_lengths)]
      for h in range(H):
        g = h // (H // G)
        out[b, t, h] = _softmax_attend(
          q[b, t, h], k[b, keys, g], v[b, keys, g], scale
        )
  return out


def gathered_attention(q, k, v, indices, scale=None):
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  scale = D**-0.5 if scale is None else scale
  out = np.zeros((B, T, H, v.shape[-1]))
  for b in range(B):
    for t in range(T):
      keys = [int(i) for i in indices[b, t] if 0 <= i < S]
      for h in range(H):
        g = h // (H // G)
        out[b, t, h] = _softmax_attend(
          q[b, t, h], k[b, keys, g], v[b, keys, g], scale
        )
  return out


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def head_avg_target(q, k, b, t, keys, scale):
  H, G = q.shape[2], k.shape[2]
  p = np.zeros(len(keys))
  for h in range(H):
    g = h // (H // G)
    p += _softmax([scale * float(np.dot(q[b, t, h], k[b, s, g])) for s in keys])
  return p / p.sum()


def kl(p, logits):
  logq = np.log(_softmax(logits))
  return float(sum(pi * (np.log(pi) - lq) for pi, lq in zip(p, logq) if pi > 0))


def dense_indexer_kl(q, k, q_idx, k_idx, w, q_offset=None, kv_lengths=None):
  B, T, _, D = q.shape
  S = k.shape[1]
  scores = indexer_scores(q_idx, k_idx, w, q_offset, kv_lengths)
  pos = positions(B, T, S, q_offset)
  total, count = 0.0, 0
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(S) if is_visible(s, pos[b][t], b, kv_lengths)]
      if not keys:
        continue
      p = head_avg_target(q, k, b, t, keys, D**-0.5)
      total += kl(p, scores[b, t, keys])
      count += 1
  return total / max(count, 1)


def sparse_indexer_kl(q, k, q_idx, k_idx, w, indices):
  B, T, HI, D = q.shape[0], q.shape[1], q_idx.shape[2], q.shape[3]
  S = k.shape[1]
  total, count = 0.0, 0
  for b in range(B):
    for t in range(T):
      keys = [int(i) for i in indices[b, t] if 0 <= i < S]
      if not keys:
        continue
      p = head_avg_target(q, k, b, t, keys, D**-0.5)
      logits = [
        sum(
          float(w[b, t, j])
          * max(0.0, float(np.dot(q_idx[b, t, j], k_idx[b, s])))
          for j in range(HI)
        )
        for s in keys
      ]
      total += kl(p, logits)
      count += 1
  return total / max(count, 1)


def select_topk(scores, k):
  """The API's tie rule, by sorting: the K largest finite scores of each row,
  by descending score and, among equal scores, descending index (the more
  recent key first); -1 for the slots past the visible keys."""
  B, T, S = scores.shape
  out = np.full((B, T, k), -1, np.int64)
  for b in range(B):
    for t in range(T):
      keys = [(-float(scores[b, t, s]), -s) for s in range(S)]
      keys = [x for x in keys if np.isfinite(x[0])]
      for slot, (_, neg_s) in enumerate(sorted(keys)[:k]):
        out[b, t, slot] = -neg_s
  return out
