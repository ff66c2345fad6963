"""Device meshes: the one ``"data"`` axis that disposal shards its batches (and GC chunks) over."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

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
