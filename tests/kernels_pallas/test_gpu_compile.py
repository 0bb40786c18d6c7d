"""Both kernels compile for an sm_90 GPU (H100/H200), on this CPU host.

The CUDA compiler plugin (``jax[cuda12-local]``) and ptxas
(``nvidia-cuda-nvcc-cu12``), both in the test extra, let XLA compile for a
described GPU without one: Pallas -> Triton -> LLVM -> PTX -> cubin, the same
path as on the device. ptxas reports what each kernel needs; the tilings
must fit an SM (255 registers per thread, 227 KiB shared memory per block)
and the forward must not spill. These limits are what first failed: with
D=576 padded to 1024 and all 128 heads in one program the MQA forward asked
for 640 KiB of shared memory; the GQA forward spilled 260 bytes.
"""

import importlib.util

import pytest


def _has_cuda_plugin():
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:  # no jax_plugins namespace at all
    return False


if not _has_cuda_plugin():
  pytest.skip(
    "CUDA compiler plugin not installed: pip install 'jax[cuda12-local]' "
    "nvidia-cuda-nvcc-cu12",
    allow_module_level=True,
  )

from _compile_script import run_compile_kernels  # noqa: E402

SMEM_LIMIT = 232448
# The MQA backward holds q, dO, dq and the gathered K/V of 16 keys at
# D=576/Dv=512 and sits at the register cap; a few bytes of spill remain
# there (4 B measured with jax 0.10.2 / ptxas 12.9).
BWD_SPILL_BYTES = 64


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  return run_compile_kernels(
    tmp_path_factory.mktemp("gpu"), "h100", ["odd", "decode", "gqa4k", "mqa576"]
  )


def test_every_program_compiles(rows):
  assert len(rows) == 12
  for r in rows:
    assert r["ok"] and "error" not in r, r
    names = {k["name"] for k in r["kernels"]}
    expected = {
      "gathered_fwd": {"gathered_attention_fwd_gpu"},
      "gathered_fwd_bwd": {
        "gathered_attention_fwd_gpu",
        "gathered_attention_bwd_gpu",
      },
      "topk": {"lightning_scores_gpu"},
    }[r["program"]]
    assert names == expected, (r["case"], r["program"], names)


def test_kernels_fit_an_sm(rows):
  for r in rows:
    for k in r["kernels"]:
      where = (r["case"], k["name"])
      assert k["registers"] is not None and k["registers"] <= 255, where
      assert k["shared_memory_bytes"] <= SMEM_LIMIT, where
      limit = BWD_SPILL_BYTES if k["name"].endswith("bwd_gpu") else 0
      assert (
        k["spill_store_bytes"] <= limit and k["spill_load_bytes"] <= limit
      ), (where, k)


def test_mqa576_tiling(rows):
  # 128 heads split in blocks of 32: four programs per query token.
  fwd = next(
    k
    for r in rows
    if r["case"] == "mqa576" and r["program"] == "gathered_fwd"
    for k in r["kernels"]
  )
  assert fwd["grid"] == [4096, 1, 4] and fwd["threads"] == 256
