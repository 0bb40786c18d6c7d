"""Shared test setup, and the one place where tests get their markers.

Markers (registered in pyproject.toml, [tool.pytest.ini_options]):

  slow          long experiment runs; left out by default (addopts -m 'not slow')
  aot           ahead-of-time compilation for TPU/GPU: sparse_attn.aot and the
                compile targets. Those that need a compiler of the `aot` extra
                (libtpu; the CUDA PJRT plugin + ptxas) are skipped without it,
                with the reason and the install command.
  multiprocess  starts other Python processes (subprocess, a jax.distributed
                group)
  notebooks     tests/test_notebooks.py (runs each notebook in a kernel)
  hf            live parity with transformers (needs the `hf` extra: torch
                CPU + transformers; skipped, saying why, without it)

`aot`, `multiprocess` and `notebooks` are assigned here, from the tables
below (keyed on the file's path under tests/ and the test function's name,
without parametrisation), and not in the test files: a test that starts a
process, compiles for an accelerator or joins a file listed here belongs in
these tables. A table entry whose file or function is gone is reported as a
warning at collection.

  python -m pytest -q                      # the default suite (README)
  python -m pytest -q -m aot               # needs: pip install -e '.[aot]'
  python -m pytest -q -m hf                # needs: pip install -e '.[hf]'
  python -m pytest -q -m "not slow and not aot and not multiprocess and not notebooks"
                                           # unit run (no subprocesses, no compilers)

A -m on the command line replaces the default -m 'not slow': keep
"not slow" in it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import warnings

import numpy as np
import pytest

# Test helpers (np_reference, _testutil) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# The aot extra installs libtpu (for the TPU compile tests). Without a TPU it
# is still loaded by every JAX process that probes backends, and by default
# only one process may hold it at a time; the suite starts subprocesses.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_TESTS = pathlib.Path(__file__).resolve().parent
ALL = "*"  # every test of the file

# marker -> {path under tests/: ALL or the names of the test functions}.
MARKED: dict[str, dict[str, str | frozenset[str]]] = {
  "aot": {
    "kernels_pallas/test_tpu_compile.py": ALL,
    "kernels_pallas/test_gpu_compile.py": ALL,
    "test_aot.py": ALL,
    "test_sharded_kernels.py": frozenset(
      {"test_native_kernels_keep_check_vma_under_a_mesh"}
    ),
  },
  "multiprocess": {
    "kernels_pallas/test_bench_smoke.py": ALL,
    "kernels_pallas/test_gpu_compile.py": ALL,  # compiles in a subprocess
    "kernels_pallas/test_kernel_shard_map.py": ALL,
    "test_context_parallel.py": frozenset(
      {
        "test_context_parallel_ops_on_8_devices_match_one_device",
        "test_context_parallel_training_on_8_devices_matches_one_device",
        "test_context_parallel_prefill_on_8_devices_matches_one_device",
      }
    ),
    "test_decode.py": frozenset(
      {
        "test_sharded_cache",
        "test_generate_script_from_checkpoint",
        "test_generate_script_smoke",
        "test_bench_decode_smoke",
      }
    ),
    "test_experiments.py": ALL,  # runs each script in its own process
    "test_hf.py": frozenset({"test_loading_imports_no_torch"}),
    "test_multihost.py": ALL,
    "test_sharded_kernels.py": frozenset(
      {"test_pallas_under_every_mesh_matches_xla"}
    ),
    "test_sharding.py": frozenset(
      {"test_train_step_8_devices_matches_1_device"}
    ),
    "test_train.py": frozenset(
      {"test_kill_and_resume_matches_uninterrupted", "test_quickstart_smoke"}
    ),
  },
  "notebooks": {
    "test_notebooks.py": ALL,
  },
  "hf": {
    "test_hf_parity.py": ALL,
  },
}

# The aot tests that need a compiler of the aot extra: "tpu" (libtpu) or
# "gpu" (the CUDA PJRT plugin and ptxas). The other aot tests run anywhere.
# A file needing one as a whole (ALL) is skipped before it is imported
# (pytest_make_collect_report); test_tpu_compile.py and test_gpu_compile.py
# also check for their plugin themselves at import.
AOT_NEEDS: dict[str, dict[str, str]] = {
  "kernels_pallas/test_tpu_compile.py": {ALL: "tpu"},
  "kernels_pallas/test_gpu_compile.py": {ALL: "gpu"},
  "test_aot.py": {
    "test_tiny_model_compiles_for_a_tpu_slice_with_kernels": "tpu",
    "test_compile_model_script": "tpu",
  },
  "test_sharded_kernels.py": {
    "test_native_kernels_keep_check_vma_under_a_mesh": "tpu"
  },
}

_AOT_HINT = "pip install -e '.[aot]'"


def _has_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ImportError:  # a missing parent package (e.g. no jax_plugins at all)
    return False


def _missing_compiler(kind: str) -> str | None:
  """Why the aot tests needing `kind` cannot run here, or None if they can."""
  if kind == "tpu":
    if not _has_module("libtpu"):
      return "libtpu (the TPU compiler) is not installed"
  elif kind == "gpu":
    if not _has_module("jax_plugins.xla_cuda12"):
      return "the CUDA PJRT plugin (jax[cuda12-local]) is not installed"
    if not (_has_module("nvidia.cuda_nvcc") or shutil.which("ptxas")):
      return "ptxas (nvidia-cuda-nvcc-cu12) is not installed"
  else:
    raise ValueError(f"unknown compiler kind {kind!r} in AOT_NEEDS")
  return None


def _rel(node: pytest.Item | pytest.Collector) -> str:
  try:
    return node.path.resolve().relative_to(_TESTS).as_posix()
  except ValueError:  # not under tests/
    return ""


def _lookup(table: dict, rel: str, name: str):
  entry = table.get(rel)
  if entry is None:
    return None
  if isinstance(entry, dict):  # AOT_NEEDS: {name or ALL: value}
    return entry.get(name, entry.get(ALL))
  return True if entry == ALL or name in entry else None


def _check_tables(seen: set[str]) -> None:
  """Warns about table entries that name a file or test that is gone."""
  tables = list(MARKED.items()) + [("aot (AOT_NEEDS)", AOT_NEEDS)]
  for marker, table in tables:
    for rel, entry in table.items():
      path = _TESTS / rel
      if not path.exists():
        warnings.warn(
          f"tests/conftest.py: the {marker} table names "
          f"tests/{rel}, which does not exist",
          stacklevel=1,
        )
        continue
      if rel not in seen:  # not collected in this run: nothing to check
        continue
      names = set(entry) - {ALL} if entry != ALL else set()
      source = path.read_text(encoding="utf-8")
      for name in sorted(names):
        if f"def {name}(" not in source:
          warnings.warn(
            f"tests/conftest.py: the {marker} table names "
            f"{name} in tests/{rel}, which has no such test",
            stacklevel=1,
          )


@pytest.hookimpl(tryfirst=True)
def pytest_make_collect_report(collector):
  """Skips a whole-file entry of AOT_NEEDS, saying why, if its compiler is missing.

  The file is not imported then. (A skip at collection carries no markers:
  `-m "not aot"` shows such a file as skipped, not deselected.)
  """
  if not isinstance(collector, pytest.Module):
    return None
  kind = AOT_NEEDS.get(_rel(collector), {}).get(ALL)
  why = _missing_compiler(kind) if kind else None
  if not why:
    return None  # collected as usual
  reason = f"needs the aot extra: {why}; {_AOT_HINT}"
  return pytest.CollectReport(
    collector.nodeid, "skipped", (str(collector.path), 1, reason), []
  )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
  del config  # unused
  missing: dict[str, str | None] = {}
  seen = set()
  for item in items:
    rel = _rel(item)
    seen.add(rel)
    name = getattr(item, "originalname", None) or item.name
    for marker, table in MARKED.items():
      if _lookup(table, rel, name):
        item.add_marker(getattr(pytest.mark, marker))
    kind = _lookup(AOT_NEEDS, rel, name)
    if kind is not None:
      if kind not in missing:
        missing[kind] = _missing_compiler(kind)
      if missing[kind]:
        # First among the item's skipif marks, so this reason is the one shown.
        item.add_marker(
          pytest.mark.skipif(
            True, reason=f"needs the aot extra: {missing[kind]}; {_AOT_HINT}"
          ),
          append=False,
        )
  _check_tables(seen)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
