"""Data parallelism in JAX: one `data` mesh axis over every device of every process.

The batch is sharded over `data`, parameters and optimizer state are replicated, and the training
step is one jit with those shardings written out (as big_vision's trainers do): XLA inserts the
gradient all-reduce. On the CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices.

Several processes (hosts) join through `jax.distributed.initialize()` when their environment says
so: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a cluster JAX detects
itself (SLURM, Open MPI). Each process then feeds the rows of the global batch its devices hold.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_initialized = False


def init() -> None:
    """Join the other processes once, when the environment names them (before JAX is first used)."""
    global _initialized
    if _initialized:
        return
    _initialized = True
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"])
        )
    elif any(int(os.environ.get(name, "1")) > 1 for name in _CLUSTER_SIZES):
        jax.distributed.initialize()


class DataParallel:
    """The mesh and the two shardings: batch rows split over `data`, everything else replicated."""

    def __init__(self):
        self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
        self.batch = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.devices = self.mesh.size

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def global_batch(self, local_rows: np.ndarray) -> jax.Array:
        """This process's rows of a global batch as the global array sharded over `data`."""
        return jax.make_array_from_process_local_data(self.batch, local_rows)

    def to_host(self, array: jax.Array) -> np.ndarray:
        """All rows of a batch-sharded array, on every process."""
        if jax.process_count() == 1:
            return np.asarray(array)
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def barrier() -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vitspec")
