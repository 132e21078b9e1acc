"""Devices, meshes and shardings for data parallelism, single- or multi-process."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Start `jax.distributed` when this run has several processes; a no-op for one process.

    Arguments fall back to GEN_JAX_COORDINATOR / GEN_JAX_NUM_PROCESSES / GEN_JAX_PROCESS_ID. On TPU pods
    and SLURM clusters `jax.distributed.initialize()` discovers everything itself: set
    GEN_JAX_DISTRIBUTED=auto (the TPU launch scripts do).
    """
    coordinator = coordinator or os.environ.get("GEN_JAX_COORDINATOR")
    num_processes = num_processes or _env_int("GEN_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("GEN_JAX_PROCESS_ID")
    if os.environ.get("GEN_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return
    if num_processes is None or num_processes <= 1:
        return
    if coordinator is None or process_id is None:
        raise ValueError("a multi-process run needs --coordinator HOST:PORT and --process-id "
                         f"(got coordinator={coordinator!r}, process_id={process_id!r})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes, axis 'data'."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of `mesh` holds the whole array (train state, parameters)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the 'data' axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, pictures and results."""
    return jax.process_index() == 0
