"""Multi-process runs: one JAX process per host (or per CPU in tests)."""

from __future__ import annotations

import jax


def init_distributed(
  coordinator: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  cpu_collectives: str = "gloo",
) -> None:
  """jax.distributed.initialize when process coordinates are given.

  On CPU, cross-process collectives need an implementation (gloo); set it
  before initialising. A no-op when coordinator is None.
  """
  if coordinator is None:
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator needs --num-processes and --process-id.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} not in [0, {num_processes}).")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
  )
