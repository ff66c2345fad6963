"""Device meshes and multi-process jobs: the one ``"data"`` axis that disposal shards its batches (and GC
chunks) over, the placement of process-local batch slices, and ``jax.distributed`` start-up."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dtl_jax.config import UserError
from dtl_jax.train.steps import AXIS


def data_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``devices`` devices (0 = all of ``jax.devices()``, every process's)."""
    available = jax.devices()
    n = devices or len(available)
    if n > len(available):
        raise UserError(f"disposal.devices={devices}: only {len(available)} devices are available")
    return Mesh(np.array(available[:n]), (AXIS,))


def check_divisible(mesh: Mesh, num_chunks: int, source_batch: int, target_batch: int) -> None:
    """Each device must hold whole GC chunks and equal shares of both batches."""
    n = mesh.devices.size
    for name, value in (
        ("disposal.num_chunks", num_chunks),
        ("disposal.source_batch_size", source_batch),
        ("transfer.batch_size (the disposal's target batch)", target_batch),
    ):
        if value % n:
            raise UserError(
                f"{name}={value} is not a multiple of the {n} devices of the mesh "
                "(set disposal.devices, or change the value)"
            )


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Places a global batch on ``mesh``, split along the leading axis over the ``"data"`` axis.

    Every process holds the same global batch (the data pipeline is seeded identically everywhere) and
    contributes only its own contiguous slice (``jax.make_array_from_process_local_data``): one code
    path for one process and for many.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    index, count = jax.process_index(), jax.process_count()

    def place(x):
        x = np.asarray(x)
        share = x.shape[0] // count
        return jax.make_array_from_process_local_data(sharding, x[index * share : (index + 1) * share])

    return jax.tree.map(place, batch)


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Joins a multi-process JAX job (``jax.distributed.initialize``) when asked to.

    Arguments fall back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
    ``coordinator="auto"`` lets JAX detect a cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). CPU
    collectives go through gloo. Returns whether a multi-process job was joined.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if not coordinator:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"--coordinator {coordinator}: expected --num-processes N >= 1 and --process-id in 0..N-1, "
                f"got {num_processes} and {process_id}"
            )
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def all_reduce_sizes(hlo: str) -> list[int]:
    """Element counts of every all-reduce in compiled HLO text (a tuple all-reduce counts its parts
    together): ``jax.jit(step).lower(...).compile().as_text()``. A sharded GC disposal step has two of
    parameter size."""
    sizes = []
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) all-reduce(-start)?\(", line)
        if match:
            shapes = re.findall(r"[fsu]\d+\[([\d,]*)\]", match.group(1))
            sizes.append(sum(int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in shapes))
    return sizes
