"""Starting JAX's multi-controller runtime: one process per host (TPU) or per GPU (SLURM, GKE).

`initialize` must run before anything touches a device. With explicit flags it connects to the
given coordinator; otherwise it calls `jax.distributed.initialize()` only when the environment shows
a multi-process job, so JAX's own auto-detection (Cloud TPU pods, SLURM, Open MPI, GKE via the
JAX_COORDINATOR_ADDRESS variables) fills in the rest; a single process on one machine needs nothing.
"""

from __future__ import annotations

import os

import jax

from samba_jax.config import ConfigError


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def multi_process_environment() -> str | None:
    """The kind of multi-process job this process is part of, judged from its environment, or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if _env_int("SLURM_STEP_NUM_TASKS") > 1 or (_env_int("SLURM_NTASKS") > 1 and "SLURM_PROCID" in os.environ):
        return "SLURM"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU pod"
    return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Connects this process to the others; returns whether the runtime was started.

    coordinator_address "host:port" (with num_processes and process_id) for a hand-made cluster;
    empty to auto-detect. On CPU-only jobs the cross-process collectives go through gloo.
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
                             f"num_processes, got num_processes={num_processes}, process_id={process_id}")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif multi_process_environment():
        kwargs = {}
    else:
        return False
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
