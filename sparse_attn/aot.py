"""Ahead-of-time compilation of the training steps for an accelerator topology.

On a CPU-only host with ``libtpu`` installed (``pip install "jax[tpu]"``), JAX
can describe a TPU slice that is not there (``topology_devices("v5e:2x2")``)
and run the real TPU compiler for it, Mosaic included. That answers, before
any TPU time is spent, whether a config compiles (the Pallas kernels at its
shapes, the sharded model on its mesh) and how much HBM each device needs.

  from sparse_attn import aot, config
  cfg = config.override(config.preset("small"), "train.mesh_shape=(4,1,1)")
  report = aot.compile_train_steps(cfg, aot.topology_devices("v5e:2x2"))

Tracing happens under `dispatch.compile_target(platform)`, so the attention
functions pick the native kernels of the target (implementation=None ->
"pallas") although the host backend is CPU.

GPUs work the same way with the CUDA compiler plugin and ptxas installed
(``pip install "jax[cuda12-local]" nvidia-cuda-nvcc-cu12``, no GPU or driver
needed): `gpu_target_devices("h100")` describes an sm_90 device from a bundled
target description, XLA compiles the Pallas Triton kernels down to cubins,
and `gpu_kernel_resources` reads back what ptxas gave each kernel (registers,
spills, shared memory). The CUDA plugin must be told not to look for a driver
*before* JAX starts its backends: set JAX_PLATFORMS=cpu (or
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) in the environment of the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn import dispatch
from sparse_attn import training as train_lib
from sparse_attn.config import Config

_STAGES = ("warmup", "sparse")


def topology_devices(topology: str, platform: str = "tpu") -> list:
  """Abstract devices of a slice, e.g. "v5e:2x2", "v4:2x2x1", "v6e:2x2".

  Needs the platform's compiler plugin (libtpu for TPU); raises RuntimeError
  saying so when it is missing.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(
      topology_name=topology, platform=platform
    )
  except Exception as e:  # the plugin raises several types for "not installed"
    raise RuntimeError(
      f"cannot describe {platform} topology {topology!r} on this host ({e}). "
      f"For TPU install libtpu: pip install 'jax[tpu]'."
    ) from e
  return list(topo.devices)


GPU_TARGETS = {"h100": "h100_sxm.txtpb"}
_TARGET_DIR = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "aot_targets"
)


def gpu_target_devices(target: str = "h100") -> list:
  """A compile-only CUDA device for `target` (see GPU_TARGETS); no GPU needed."""
  if target not in GPU_TARGETS:
    raise ValueError(
      f"target must be one of {tuple(GPU_TARGETS)}, got {target!r}."
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  with open(
    os.path.join(_TARGET_DIR, GPU_TARGETS[target]), encoding="utf-8"
  ) as f:
    config = f.read()
  try:
    topo = topologies.get_topology_desc(
      platform="cuda",
      topology_name=target,
      target_config=config,
      topology="1x1x1",
    )
  except Exception as e:  # missing plugin, or the plugin looked for a driver
    raise RuntimeError(
      f"cannot describe GPU target {target!r} on this host ({e}). Install "
      f"'jax[cuda12-local]' and nvidia-cuda-nvcc-cu12, and start the process with "
      f"JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1."
    ) from e
  return list(topo.devices)


@dataclasses.dataclass
class KernelResources:
  """What ptxas gave one GPU kernel of a compiled program."""

  name: str
  registers: int | None
  spill_store_bytes: int | None
  spill_load_bytes: int | None
  shared_memory_bytes: int
  threads: int
  grid: tuple[int, ...]


_THUNK = re.compile(
  r"\]\s+(\S+)\s+grid: \[([^\]]*)\] threads: \[([^\]]*)\]\s+"
  r"shared_memory: (\d+) bytes"
)
_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path() -> str | None:
  """ptxas from the nvidia-cuda-nvcc wheel, else from PATH."""
  try:
    import nvidia.cuda_nvcc as nvcc  # pylint: disable=g-import-not-at-top

    path = os.path.join(list(nvcc.__path__)[0], "bin", "ptxas")
    if os.path.exists(path):
      return path
  except ImportError:
    pass
  return shutil.which("ptxas")


def _parse_ptxas(text: str, stats: dict[str, dict[str, int]]) -> None:
  cur = None
  for line in text.splitlines():
    if m := _PTXAS_FN.search(line):
      cur = stats.setdefault(m.group(1), {})
    elif cur is not None and (m := _PTXAS_SPILL.search(line)):
      cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
    elif cur is not None and (m := _PTXAS_REGS.search(line)):
      cur["regs"] = int(m.group(1))


def _ptxas_stats(ptx_files: Sequence[str]) -> dict[str, dict[str, int]]:
  ptxas = ptxas_path()
  if ptxas is None:
    raise RuntimeError("ptxas not found: pip install nvidia-cuda-nvcc-cu12")
  stats: dict[str, dict[str, int]] = {}
  for ptx in ptx_files:
    with open(ptx, encoding="utf-8", errors="replace") as f:
      arch = next(
        (l.split()[1].strip(",") for l in f if l.startswith(".target")),
        "sm_90a",
      )
    res = subprocess.run(
      [ptxas, ptx, "-o", os.devnull, f"-arch={arch}", "-v"],
      capture_output=True,
      text=True,
      check=False,
    )
    _parse_ptxas(res.stdout + res.stderr, stats)
  return stats


@contextlib.contextmanager
def _capture_fd2():
  """Collects what native code writes to stderr (fd 2) inside the block."""
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    box = []
    try:
      yield box
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      box.append(tmp.read().decode("utf-8", errors="replace"))


def gpu_kernel_resources(lowered) -> list[KernelResources]:
  """Compiles `lowered` (for a GPU target) and reports every kernel launched.

  XLA dumps the PTX and the launch sequence (grid, threads, dynamic shared
  memory) of the compiled program; ptxas -v on the PTX gives registers and
  spills, with the flags XLA itself uses.
  """
  with tempfile.TemporaryDirectory() as dump:
    # jax <= 0.10 dumps each kernel's PTX; jax >= 0.11 compiles kernels (Triton
    # included) as custom kernels and dumps none, but XLA runs ptxas -v itself
    # and logs its report at VLOG 2 of subprocess_compilation (needs
    # TF_CPP_VMODULE=subprocess_compilation=2, TF_CPP_MIN_LOG_LEVEL=0 set
    # before JAX starts; see experiments/compile_kernels.py).
    with _capture_fd2() as log:
      lowered.compile({"xla_dump_to": dump})
    ptx = [
      f for f in glob.glob(os.path.join(dump, "*.ptx")) if os.path.getsize(f)
    ]
    if ptx:
      stats = _ptxas_stats(ptx)
    else:
      stats = {}
      _parse_ptxas(log[0], stats)
    out = []
    for fn in sorted(glob.glob(os.path.join(dump, "*thunk_sequence.txt"))):
      with open(fn, encoding="utf-8") as f:
        for line in f:
          m = _THUNK.search(line)
          if not m:
            continue
          st = stats.get(m.group(1), {})
          ints = lambda g: tuple(int(x) for x in g.replace(",", " ").split())
          out.append(
            KernelResources(
              m.group(1),
              st.get("regs"),
              st.get("spill_st"),
              st.get("spill_ld"),
              int(m.group(4)),
              math.prod(ints(m.group(3))),
              ints(m.group(2)),
            )
          )
  return out


def _platform_of(devices: Sequence[Any]) -> str:
  p = devices[0].platform.lower()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


@dataclasses.dataclass
class StepReport:
  """What compiling one step for the target gave."""

  name: str
  seconds: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  uses_kernels: bool

  @property
  def peak_bytes(self) -> int:
    """Per device: arguments + outputs + temporaries (no aliasing credit)."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes


def _batch_struct(s: train_lib.Setup):
  t = s.cfg.train
  shape = (t.batch_size, t.seq_len)
  sds = lambda dt: jax.ShapeDtypeStruct(shape, dt, sharding=s.batch_sharding)
  return {
    "inputs": sds(jnp.int32),
    "targets": sds(jnp.int32),
    "loss_mask": sds(jnp.float32),
  }


def _state_struct(s: train_lib.Setup):
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    s.abstract_state,
    s.state_shardings,
  )


def _report(name: str, lowered, t0: float) -> StepReport:
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  text = lowered.as_text()
  uses = "tpu_custom_call" in text or "__gpu$xla.gpu.triton" in text
  get = lambda f: int(getattr(mem, f, 0) or 0) if mem is not None else 0
  return StepReport(
    name,
    seconds,
    get("argument_size_in_bytes"),
    get("output_size_in_bytes"),
    get("temp_size_in_bytes"),
    uses,
  )


def compile_train_steps(
  cfg: Config,
  devices: Sequence[Any],
  stages: Sequence[str] = _STAGES,
  eval_step: bool = True,
) -> list[StepReport]:
  """Compiles the train step of each stage (and the eval step) for `devices`.

  Args:
    cfg: the run's config (mesh_shape must match len(devices)).
    devices: abstract target devices (`topology_devices`) or real ones.
    stages: subset of ("warmup", "sparse").
  Returns:
    one StepReport per compiled step. Raises whatever the target compiler
    raises (e.g. a Mosaic layout error naming the kernel op).
  """
  bad = [x for x in stages if x not in _STAGES]
  if bad:
    raise ValueError(
      f"stages must be a subset of {_STAGES}, got {tuple(stages)}."
    )
  platform = _platform_of(devices)
  reports = []
  target = (
    dispatch.compile_target(platform)
    if platform in ("tpu", "gpu")
    else contextlib.nullcontext()
  )
  with target:
    s = train_lib.setup(cfg, devices)
    state, batch = _state_struct(s), _batch_struct(s)
    for stage in stages:
      t0 = time.perf_counter()
      step = train_lib.make_train_step(s, stage)
      reports.append(_report(f"train_{stage}", step.lower(state, batch), t0))
    if eval_step:
      t0 = time.perf_counter()
      step = train_lib.make_eval_step(s, "sparse")
      reports.append(
        _report("eval_sparse", step.lower(state["params"], batch), t0)
      )
  return reports
