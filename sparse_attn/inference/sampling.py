"""Token sampling from logits: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_logits(
  logits: jax.Array,
  key: jax.Array,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
) -> jax.Array:
  """int32[B] tokens from logits f32[B, V].

  temperature 0: greedy (argmax). Otherwise softmax(logits / temperature)
  restricted to the smallest set of tokens whose probability reaches top_p
  (nucleus sampling; top_p = 1 keeps every token; the top token is always
  kept).
  """
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(
      f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}."
    )
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = (
      jnp.cumsum(probs, axis=-1) - probs
    )  # mass of strictly better tokens
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
