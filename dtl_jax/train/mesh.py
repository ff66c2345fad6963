"""Device meshes and multi-process jobs: the ``"data"`` axis that disposal shards its batches over, the
2-D (chunks x examples) view of it that lays GC chunks out on any device count, the placement of
process-local batch slices, and ``jax.distributed`` start-up."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dtl_jax.errors import UserError

AXIS = "data"
CHUNKS, EXAMPLES = "chunks", "examples"  # the disposal step's 2-D view of the "data" axis


_DEFAULT_DEVICES = [0]  # what data_mesh(0) means: 0 = every device (``set_default_devices`` changes it)


def set_default_devices(devices: int) -> int:
    """From now on ``data_mesh()`` (and so every step built without a mesh of its own: the DTL stages with
    ``disposal.devices=0``, the unlearning methods and their evaluation) uses the first ``devices`` devices
    (0: all of them); returns the previous setting."""
    before = _DEFAULT_DEVICES[0]
    _DEFAULT_DEVICES[0] = devices
    return before


@contextlib.contextmanager
def default_devices(devices: int):
    """``set_default_devices(devices)`` within the block only."""
    before = set_default_devices(devices)
    try:
        yield
    finally:
        set_default_devices(before)


def data_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``devices`` devices (0 = all of ``jax.devices()``, every process's, unless
    ``default_devices`` says otherwise)."""
    available = jax.devices()
    n = devices or _DEFAULT_DEVICES[0] or len(available)
    if n > len(available):
        raise UserError(f"a mesh of {devices} devices: only {len(available)} are available")
    return Mesh(np.array(available[:n]), (AXIS,))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where the ``K`` chunks of ``m`` examples of a GC source batch live on ``N = c·e`` devices.

    The devices of the 1-D ``"data"`` mesh, in order, form a ``c x e`` grid (``grid``): chunks over the
    first axis (``CHUNKS``, ``c`` dividing ``K``), each chunk's examples over the second (``EXAMPLES``).
    Device ``(i, j)`` holds, for each chunk ``k`` of ``i·K/c .. (i+1)·K/c - 1``, the ``j``-th of ``e``
    parts of ``part = ceil(m/e)`` examples; when ``e`` does not divide ``m`` the last parts are padded
    with repeats of the chunk's first examples, marked by ``mask`` (to be weighted 0).

    Per step this costs (``dtl_jax.gc.gc_loss`` with ``axis_name=(CHUNKS, EXAMPLES)``; ``P_gc`` the
    parameters that enter ``g_k``, ``P`` all of them), as parameter-size all-reduces
    (``all_reduces``): ``e = 1`` (``N`` divides ``K``): two, ``G`` (``P_gc``, over the chunk axis) and the
    fused gradient (``P``, over all devices). ``e > 1``: the local chunk gradients summed over the example
    axis (``(K/c)·P_gc``; ``low_memory``: ``K/c`` all-reduces of ``P_gc`` in each pass), ``G`` over the
    chunk axis if ``c > 1`` (``P_gc``), and the fused gradient (``P``): two when ``c = 1``, three otherwise.
    """

    num_chunks: int  # K
    chunk_size: int  # m, real examples per chunk
    chunk_devices: int  # c
    example_devices: int  # e

    @property
    def devices(self) -> int:
        return self.chunk_devices * self.example_devices

    @property
    def part(self) -> int:
        """Examples of one chunk on one device, padding included."""
        return -(-self.chunk_size // self.example_devices)

    @property
    def padded(self) -> bool:
        return self.chunk_size % self.example_devices != 0

    @property
    def axes(self) -> tuple[str, ...]:
        """The grid's axes: ``CHUNKS`` and ``EXAMPLES`` where their size exceeds 1 (XLA keeps an all-reduce
        over a size-1 axis of a multi-device mesh), ``(CHUNKS,)`` on one device."""
        named = ((CHUNKS, self.chunk_devices), (EXAMPLES, self.example_devices))
        return tuple(name for name, size in named if size > 1) or (CHUNKS,)

    @property
    def axis_name(self) -> str | tuple[str | None, str]:
        """``gc_loss``'s ``axis_name`` on ``grid``: ``CHUNKS``, ``(None, EXAMPLES)`` or both."""
        if EXAMPLES not in self.axes:
            return CHUNKS
        return (CHUNKS if CHUNKS in self.axes else None, EXAMPLES)

    def grid(self, mesh: Mesh) -> Mesh:
        """The ``c x e`` view of a 1-D mesh's devices over ``axes`` (same order, so an array split along its
        leading axis over ``mesh`` is split the same way over ``P(axes)``)."""
        if mesh.devices.size != self.devices:
            raise ValueError(f"a layout for {self.devices} devices on a mesh of {mesh.devices.size}")
        shape = [{CHUNKS: self.chunk_devices, EXAMPLES: self.example_devices}[a] for a in self.axes]
        return Mesh(mesh.devices.reshape(shape), self.axes)

    def source_rows(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(rows, mask)``: the source batch in device order is ``batch[rows]`` (``None``: the batch as it
        is), ``mask`` marks its real examples (``None``: no padding)."""
        k_local, e, m, part = self.num_chunks // self.chunk_devices, self.example_devices, self.chunk_size, self.part
        rows, mask = [], []
        for i in range(self.chunk_devices):
            for j in range(e):
                for k in range(i * k_local, (i + 1) * k_local):
                    slots = np.arange(j * part, (j + 1) * part)
                    rows.append(k * m + slots % m)
                    mask.append(slots < m)
        rows, mask = np.concatenate(rows), np.concatenate(mask)
        identity = not self.padded and np.array_equal(rows, np.arange(rows.size))
        return (None if identity else rows), (mask if self.padded else None)

    def all_reduces(self, gc_size: int, size: int, low_memory: bool = False) -> list[int]:
        """Element counts of the parameter-size all-reduces of one GC disposal step, as above (sorted)."""
        k_local = self.num_chunks // self.chunk_devices
        if self.devices == 1:
            return []
        sizes = [size]
        if self.example_devices > 1:
            sizes += [gc_size] * (2 * k_local) if low_memory else [k_local * gc_size]
        if self.chunk_devices > 1:
            sizes.append(gc_size)
        return sorted(sizes)


def chunk_layout(devices: int, num_chunks: int, source_batch: int) -> ChunkLayout:
    """The layout of ``num_chunks`` chunks of a ``source_batch`` on ``devices`` devices (``ChunkLayout``).

    Over the splits ``c·e = devices`` with ``c`` dividing ``K`` (and ``devices``), it takes the one with
    the least work per device, ``(K/c)·ceil(m/e)`` chunk examples (so no padding where some split needs
    none), and among those the largest ``c`` (fewest all-reduces). Where ``devices`` divides ``K`` that
    is ``c = devices, e = 1``: whole chunks per device, two all-reduces. Examples: 4 devices, K = 5,
    m = 16: ``c = 1, e = 4``; 8 devices, K = 4: ``c = 4, e = 2``; 3 devices, K = 5, m = 16: ``c = 1,
    e = 3``, parts of 6 with 2 padded slots per chunk.
    """
    if num_chunks < 1 or source_batch % num_chunks:
        raise UserError(f"a source batch of {source_batch} examples does not split into {num_chunks} equal chunks")
    m = source_batch // num_chunks
    best = None
    for c in range(1, math.gcd(devices, num_chunks) + 1):
        if devices % c or num_chunks % c:
            continue
        e = devices // c
        cost = ((num_chunks // c) * -(-m // e), -c)
        if best is None or cost < best[0]:
            best = (cost, ChunkLayout(num_chunks, m, c, e))
    return best[1]


def padded_rows(size: int, devices: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(rows, mask)`` that split a batch of ``size`` evenly over ``devices``: ``batch[rows]``, padded to
    a multiple of ``devices`` with repeats of its first examples, ``mask`` marking the real ones
    (``(None, None)`` where ``devices`` divides ``size``)."""
    if size % devices == 0:
        return None, None
    total = -(-size // devices) * devices
    slots = np.arange(total)
    return slots % size, slots < size


def place_disposal_batches(mesh: Mesh, num_chunks: int, source: dict, target: dict) -> tuple[dict, dict]:
    """Places a disposal step's global batches on ``mesh`` so that the step moves no data between devices.

    The step (``dtl_jax.train.disposal_step.disposal_step``) accepts its batches in any placement and lays them
    out itself (``ChunkLayout.source_rows``, ``padded_rows``). A batch whose layout is the batch as it is
    goes split along the leading axis (``shard_batch``); one that is reordered or padded goes replicated,
    so that every device takes its rows locally (a reorder of a split batch would be communication).
    """
    n = mesh.devices.size
    layouts = chunk_layout(n, num_chunks, len(source["label"])).source_rows(), padded_rows(len(target["label"]), n)
    return tuple(
        shard_batch(mesh, batch) if rows is None and mask is None else replicate_batch(mesh, batch)
        for batch, (rows, mask) in zip((source, target), layouts, strict=True)
    )


def place_like(tree, like):
    """``tree`` (host arrays, e.g. a restored checkpoint) placed as the arrays of ``like`` are: each leaf
    with its counterpart's sharding (a host leaf of ``like`` leaves its counterpart as it is). In a
    multi-process job every process holds the same values (``jax.make_array_from_process_local_data``)."""

    def place(x, reference):
        if not isinstance(reference, jax.Array):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, reference.sharding)
        return jax.make_array_from_process_local_data(reference.sharding, np.asarray(x))

    return jax.tree.map(place, tree, like)


def replicate_batch(mesh: Mesh, batch: dict) -> dict:
    """Places a global batch whole on every device of ``mesh`` (every process holds the whole batch)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


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
                f"coordinator {coordinator}: expected a number of processes N >= 1 and a process id in 0..N-1, "
                f"got {num_processes} and {process_id}"
            )
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def all_reduce_sizes(hlo: str) -> list[int]:
    """Element counts of every all-reduce in compiled HLO text (a tuple all-reduce counts its parts
    together): ``jax.jit(step).lower(...).compile().as_text()``. A sharded GC disposal step has the ones
    ``ChunkLayout.all_reduces`` lists (two where the device count divides ``K``)."""
    sizes = []
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) all-reduce(-start)?\(", line)
        if match:
            shapes = re.findall(r"[fsu]\d+\[([\d,]*)\]", match.group(1))
            sizes.append(sum(int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in shapes))
    return sizes
