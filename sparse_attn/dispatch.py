"""`implementation=` dispatch between the XLA reference and the Pallas kernels.

None picks the best for the platform: "pallas" on GPU/TPU, "xla" on CPU (the
kernels run there only in interpret mode, which is for testing, not speed).
"xla" is the pure-jnp reference; "pallas" forces the kernel (interpret mode
on CPU). Anything else raises.
"""

from __future__ import annotations

import importlib

import jax

IMPLEMENTATIONS = ("xla", "pallas")
_KERNEL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def resolve(implementation: str | None) -> str:
  """Returns "xla" or "pallas" for the current default backend."""
  if implementation is None:
    if jax.default_backend() in _KERNEL_PLATFORMS and kernels_available():
      return "pallas"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS} or None, got "
        f"{implementation!r}."
    )
  if implementation == "pallas":
    platform = jax.default_backend()
    if platform not in _KERNEL_PLATFORMS + ("cpu",):
      raise ValueError(
          f"implementation='pallas' is not supported on platform {platform!r}; "
          f"supported: {_KERNEL_PLATFORMS + ('cpu (interpret mode)',)}."
      )
  return implementation


def kernels_available() -> bool:
  try:
    kernel_module("topk")
    kernel_module("gathered_attention")
  except ImportError:
    return False
  return True


def kernel_module(name: str):
  """Imports kernels_pallas.<name> lazily (Pallas import is not free)."""
  return importlib.import_module(f"kernels_pallas.{name}")
