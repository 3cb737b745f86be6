"""Multi-process (multi-host) initialisation.

One process runs per host (per GPU node, per TPU VM worker). `initialize` calls
`jax.distributed.initialize`, either with explicit arguments (the script's flags)
or with none, in which case JAX detects the cluster: Cloud TPU pod slices, SLURM,
Open MPI, Kubernetes, or the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
`JAX_PROCESS_ID` environment variables. After it, `jax.devices()` lists every
process's devices and collectives span all of them.
"""

from __future__ import annotations

from absl import logging
import jax


def initialize(*, coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               initialization_timeout: int = 300,
               heartbeat_timeout: int = 100) -> None:
  """Joins this process to a multi-process JAX run.

  Must run before anything touches a JAX device. On CPU, collectives across
  processes go through gloo (TCP), so several local processes can stand in for
  several hosts (`--coordinator_address=127.0.0.1:PORT`).

  Args:
    coordinator_address: `host:port` of process 0's coordinator; None to detect.
    num_processes: total number of processes; None to detect.
    process_id: this process's index in `[0, num_processes)`; None to detect.
    initialization_timeout: seconds to wait for all processes to join.
    heartbeat_timeout: seconds without a heartbeat after which the
      coordination service declares a process dead; every other process then
      stops with an error instead of hanging in a collective.

  Raises:
    ValueError: only some of the explicit arguments given, or a process id out
      of range.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError("give all of coordinator_address, num_processes and "
                     "process_id, or none of them (cluster auto-detection); "
                     f"got {explicit}")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must lie in [0, "
                     f"num_processes={num_processes})")
  # CPU collectives across processes need an implementation; gloo ships with
  # jaxlib. This setting only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  logging.info("process %d of %d; %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
