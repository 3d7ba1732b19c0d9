"""Multi-process (multi-host) runs with `jax.distributed`.

A multi-host run starts one Python process per host (per GPU, or per TPU VM worker); after
`jax.distributed.initialize`, `jax.devices()` lists every process's devices, and the engine's
`sharded` strategy builds its `(clients, model)` mesh over all of them, so one compiled round
spans the hosts (see `docs/tpu_multihost.md` for the launch recipes).

`initialize_from_env()` is what the CLI calls first: it initialises `jax.distributed` only when
the environment describes a multi-process launch, and is a no-op for a single process:

- explicit: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), passed on;
- SLURM (`srun`): `SLURM_JOB_ID` and `SLURM_NTASKS > 1`, JAX's SLURM detection;
- Open MPI (`mpirun`): `OMPI_COMM_WORLD_SIZE > 1`, JAX's Open MPI detection;
- Cloud TPU pod slice: `TPU_WORKER_HOSTNAMES` naming several hosts, or
  `MEGASCALE_COORDINATOR_ADDRESS`, JAX's Cloud TPU detection.

`FEDJAX_LORA_DISTRIBUTED=0` turns detection off; `=1` forces `jax.distributed.initialize()` with
JAX's own auto-detection (other clusters, e.g. Kubernetes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

SWITCH = "FEDJAX_LORA_DISTRIBUTED"


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        raise ValueError(
            f"environment variable {name}={environ[name]!r} must be an integer"
        ) from None


def launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher that `environ` (default `os.environ`) describes: `explicit`,
    `slurm`, `ompi`, `tpu`, `forced`; None for a single-process run."""
    env = os.environ if environ is None else environ
    switch = env.get(SWITCH, "auto")
    if switch not in ("auto", "0", "1"):
        raise ValueError(f"{SWITCH} must be 0, 1 or auto, got {switch!r}")
    if switch == "0":
        return None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "forced" if switch == "1" else None


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Initialises `jax.distributed` when the environment describes a multi-process run (see the
    module docstring); returns whether it did. Call it before anything touches a JAX device."""
    env = os.environ if environ is None else environ
    kind = launcher(env)
    if kind is None or jax.distributed.is_initialized():
        return False
    if kind == "explicit":
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three (the "
                "coordinator host:port, the process count and this process's index)"
            )
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=_count(env, "JAX_NUM_PROCESSES"),
            process_id=_count(env, "JAX_PROCESS_ID"),
        )
    else:
        jax.distributed.initialize()
    return True


def describe() -> str:
    """One line: this process's index, the process count and the local / global devices."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices "
        f"({jax.devices()[0].platform})"
    )


def host(tree: Any) -> Any:
    """A tree of arrays as NumPy values on this process: `jax.device_get` in one process; with
    several processes, a global array spread over other processes' devices is gathered first
    (`multihost_utils.process_allgather`), so every process sees the whole value."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return jax.device_get(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
