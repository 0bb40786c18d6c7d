"""Two JAX processes on localhost (jax.distributed + gloo CPU collectives)
train a few steps, with checkpoints, and match a single-process run: the
batch split over them (data=2), or the sequence (context=2)."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_train_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
  "mesh,want",
  [
    ("", {"data": 2, "fsdp": 1, "tensor": 1, "context": 1}),
    # context parallelism across the processes: the sequence split in two
    ("[1,1,1,2]", {"data": 1, "fsdp": 1, "tensor": 1, "context": 2}),
  ],
  ids=["data2", "context2"],
)
def test_two_process_run_matches_single_process(tmp_path, mesh, want):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port = _free_port()
  outs = [tmp_path / f"multi{i}.json" for i in range(2)]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        WORKER,
        "multihost",
        str(outs[i]),
        str(i),
        "2",
        str(port),
        str(tmp_path / "multi_run"),
        mesh,
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  single = subprocess.run(
    [sys.executable, WORKER, "single", str(tmp_path / "single.json")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      p.kill()
      logs.append(p.communicate()[0])
  assert single.returncode == 0, single.stderr[-3000:]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  multi = json.loads(outs[0].read_text())
  ref = json.loads((tmp_path / "single.json").read_text())
  assert multi["processes"] == 2 and ref["processes"] == 1
  assert multi["mesh"] == want
  assert len(multi["losses"]) == len(ref["losses"]) == 5
  assert multi["losses"] == pytest.approx(ref["losses"], rel=1e-5)
  assert multi["kls"] == pytest.approx(ref["kls"], rel=1e-4, abs=1e-6)
  assert multi["eval"] == pytest.approx(ref["eval"], rel=1e-5)
  # both processes wrote one shared checkpoint directory
  assert (tmp_path / "multi_run" / "checkpoints" / "5").exists()
