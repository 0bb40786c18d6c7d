"""Ahead-of-time compilation of the training steps (sparse_attn.aot)."""

import importlib.util
import os

import jax
import pytest

from sparse_attn import aot, config, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="checks the CPU default"
)
def test_compile_target_switches_dispatch():
  assert dispatch.resolve(None) == "xla" and dispatch.kernel_options() == {}
  with dispatch.compile_target("tpu"):
    assert dispatch.resolve(None) == "pallas"
    assert dispatch.kernel_options() == {"platform": "tpu", "interpret": False}
    with dispatch.compile_target("gpu"):
      assert dispatch.kernel_options()["platform"] == "gpu"
    assert dispatch.target_platform() == "tpu"
  assert dispatch.resolve(None) == "xla"
  with pytest.raises(ValueError, match="compile_target platform"):
    with dispatch.compile_target("cuda"):
      pass


@pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="checks the CPU default"
)
def test_compile_target_is_per_thread_and_in_the_jit_cache_key():
  import threading

  from sparse_attn.ops import attention

  q = jax.ShapeDtypeStruct((1, 4, 2, 8), jax.numpy.float32)
  k = jax.ShapeDtypeStruct((1, 4, 1, 8), jax.numpy.float32)
  idx = jax.ShapeDtypeStruct((1, 4, 2), jax.numpy.int32)
  f = jax.jit(lambda q, k, i: attention.gathered_attention(q, k, k, i))
  kernel_in = lambda: "pallas_call" in str(f.trace(q, k, idx).jaxpr)
  assert not kernel_in()
  with dispatch.compile_target("tpu"):
    # Same jitted function, traced before on CPU: re-traced for the target.
    assert kernel_in()
    seen = []
    t = threading.Thread(target=lambda: seen.append(dispatch.resolve(None)))
    t.start()
    t.join()
    assert seen == ["xla"]  # another thread is not compiling for the TPU
  assert not kernel_in()


def test_compile_train_steps_on_local_devices():
  cfg = config.override(
    config.preset("tiny"), "train.batch_size=2", "train.seq_len=32"
  )
  reports = aot.compile_train_steps(cfg, jax.devices()[:1], stages=("sparse",))
  assert [r.name for r in reports] == ["train_sparse", "eval_sparse"]
  assert all(not r.uses_kernels and r.argument_bytes > 0 for r in reports)
  with pytest.raises(ValueError, match="stages"):
    aot.compile_train_steps(cfg, jax.devices()[:1], stages=("dense",))


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="TPU compiler not installed: pip install 'jax[tpu]'"
)
@pytest.mark.parametrize("family", ["transformer", "deepseek_v32"])
def test_tiny_model_compiles_for_a_tpu_slice_with_kernels(family):
  # 4 v5e chips, mesh data=2 x tensor=2: sharded params, shard_map'd kernels
  # (deepseek_v32: in MLA's absorbed shape, MoE experts over "tensor").
  extra = ("train.seq_len=64", "train.batch_size=4")
  if family == "transformer":
    extra = ()
  cfg = config.override(
    config.preset("tiny", model=family), "train.mesh_shape=[2,1,2]", *extra
  )
  reports = {
    r.name: r
    for r in aot.compile_train_steps(cfg, aot.topology_devices("v5e:2x2"))
  }
  assert set(reports) == {"train_warmup", "train_sparse", "eval_sparse"}
  # Warm-up trains the indexer against dense attention: no top-k, no gather.
  assert not reports["train_warmup"].uses_kernels
  assert (
    reports["train_sparse"].uses_kernels and reports["eval_sparse"].uses_kernels
  )
  assert (
    0 < reports["train_sparse"].peak_bytes < 16 * 2**30
  )  # a v5e chip has 16 GiB


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="TPU compiler not installed: pip install 'jax[tpu]'"
)
def test_compile_model_script(capsys):
  spec = importlib.util.spec_from_file_location(
    "compile_model", os.path.join(ROOT, "experiments", "compile_model.py")
  )
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  reports = script.main(
    [
      "--target",
      "v5e:2x2",
      "--preset",
      "tiny",
      "--mesh",
      "4,1,1",
      "--seq-len",
      "64",
      "--batch-size",
      "4",
    ]
  )
  assert len(reports) == 3
  assert "Pallas kernels: yes" in capsys.readouterr().out


def test_missing_topology_is_a_clear_error():
  with pytest.raises((RuntimeError, ValueError)):
    aot.topology_devices("not-a-topology")
  with pytest.raises(ValueError, match="target must be one of"):
    aot.gpu_target_devices("a100")
