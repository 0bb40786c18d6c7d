"""`implementation=` dispatch between the XLA reference and the Pallas kernels.

None picks the best for the platform: "pallas" on GPU/TPU, "xla" on CPU (the
kernels run there only in interpret mode, which is for testing, not speed).
"xla" is the pure-jnp reference; "pallas" forces the kernel (interpret mode
on CPU). Anything else raises.

`compile_target("tpu" | "gpu")` makes the platform the code is traced *for*
differ from the one it runs on: inside it, implementation=None picks the
native kernels of that platform even on a CPU host, so a model can be lowered
and compiled ahead of time for a TPU topology (sparse_attn/aot.py,
experiments/compile_model.py). The target is a JAX user context: it holds per
thread and is part of the jit cache key, so a function traced for the CPU is
re-traced inside the context (and vice versa).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import jax

IMPLEMENTATIONS = ("xla", "pallas")
_KERNEL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
_TARGETS = ("tpu", "gpu")
_target = (
  jax.make_user_context(default_value=None)
  if hasattr(jax, "make_user_context")
  else None
)


@contextlib.contextmanager
def compile_target(platform: str):
  """Traces for `platform` ("tpu" | "gpu") instead of the default backend."""
  if platform not in _TARGETS:
    raise ValueError(
      f"compile_target platform must be one of {_TARGETS}, got {platform!r}."
    )
  if _target is None:
    raise RuntimeError(
      "compile_target needs jax.make_user_context (jax >= 0.10)."
    )
  with _target(platform):
    yield


def _current() -> str | None:
  return None if _target is None else _target.value


def target_platform() -> str:
  """The platform being compiled for: the compile_target, else the backend."""
  return _current() or jax.default_backend()


def kernel_options() -> dict:
  """Extra kernel arguments: native kernels of the compile target, if any."""
  target = _current()
  return {} if target is None else {"platform": target, "interpret": False}


def kernel(module: str, name: str):
  """kernels_pallas.<module>.<name>, bound to the compile target's options."""
  fn = getattr(kernel_module(module), name)
  opts = kernel_options()
  return functools.partial(fn, **opts) if opts else fn


def kernel_interprets() -> bool:
  """Whether the kernels run in the Pallas interpreter where this is traced.

  True on a CPU host (outside `compile_target`), False for native kernels:
  on GPU/TPU, or when compiling for a target.
  """
  opts = kernel_options()
  backend = kernel_module("backend")
  return backend.resolve(opts.get("interpret"), opts.get("platform"))[1]


def block_sizes(module: str, value, name: str):
  """`value` as kernels_pallas.<module>.BlockSizes (or None), checked.

  Accepts None, a BlockSizes of that kernel, or a dict of its fields (model
  configs are JSON); anything else raises ValueError naming `name`.
  """
  if value is None:
    return None
  mod = kernel_module(module)
  return kernel_module("backend").coerce_block_sizes(
    mod.BlockSizes, value, name
  )


def resolve(implementation: str | None) -> str:
  """Returns "xla" or "pallas" for the platform being compiled for."""
  if implementation is None:
    if target_platform() in _KERNEL_PLATFORMS and kernels_available():
      return "pallas"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be one of {IMPLEMENTATIONS} or None, got "
      f"{implementation!r}."
    )
  if implementation == "pallas":
    platform = target_platform()
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
  """Imports kernels_pallas.<name> lazily (Pallas import is not free).

  name: "topk" or "gathered_attention" (kernel packages), or "backend".
  """
  return importlib.import_module(f"kernels_pallas.{name}")
