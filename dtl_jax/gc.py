"""Gradient Collision (GC) and normalised GC (NGC) losses with a Hessian-vector-product gradient.

docs/methods.md §1.1. A batch ``B`` is split along its leading axis into ``K`` equal, contiguous chunks
``B_1..B_K``; ``ℓ_k(θ)`` is ``loss_fn(θ, B_k)`` (a mean loss) and ``g_k = ∇_θ ℓ_k``. Then

    GC(θ)  = 1/(K(K-1)) Σ_{i≠j} <g_i, g_j>  = (||G||² − Σ_k ||g_k||²) / (K(K-1)),   G = Σ_k g_k
    NGC(θ) = 1/(K(K-1)) Σ_{i≠j} <u_i, u_j>,  u_k = g_k / sqrt(||g_k||² + eps)

Both are functions ``φ(g_1..g_K)`` of the chunk gradients, so by the chain rule

    ∇_θ φ = Σ_k H_k v_k,   v_k = ∂φ/∂g_k,   H_k = ∇²ℓ_k(θ)

(for GC ``v_k = 2(G − g_k)/(K(K-1))``; for NGC ``v_k = 2(I − u_k u_kᵀ)(U − u_k) / (K(K-1) n_k)``).
The rule is attached with ``jax.custom_vjp``: the forward pass computes the ``K`` chunk gradients, the
backward pass one Hessian-vector product per chunk, forward-over-reverse (``jax.linearize`` or
``jax.jvp`` of ``jax.grad``).
No Hessian is materialised and nothing is differentiated reverse-over-reverse.

Chunks are contiguous slices of the batch: chunk ``k`` is ``batch[k*B/K:(k+1)*B/K]``. Arrange the batch
accordingly (e.g. ``by_class`` chunking sorts examples so that each chunk holds one class).

One function, ``gc_loss``, serves one device and many: with ``axis_name`` it runs inside ``jax.shard_map``
with the chunks (and, optionally, each chunk's examples) spread over mesh axes; the direction and HVP loops
below are the same code for both, the only difference being where the collectives sit (``_chunk_grads``,
``_over_chunks``, ``_part_share``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
AxisName = str | tuple[str | None, str] | None

__all__ = ["gc_loss", "split_chunks", "pairwise_collision", "HVP_MODES"]

HVP_MODES = ("jvp", "linearize", "batched")


def _reshape_chunks(batch: PyTree, num_chunks: int) -> PyTree:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch is empty: GC needs a pytree with at least one array leaf")
    size = leaves[0].shape[0]
    if size % num_chunks:
        raise ValueError(f"batch size {size} is not divisible by num_chunks={num_chunks}")

    def reshape(x):
        if x.shape[0] != size:
            raise ValueError(f"batch leaves disagree on the batch size: {x.shape[0]} vs {size}")
        return x.reshape(num_chunks, size // num_chunks, *x.shape[1:])

    return jax.tree.map(reshape, batch)


def split_chunks(batch: PyTree, num_chunks: int) -> PyTree:
    """Reshapes every leaf ``[B, ...]`` of ``batch`` to ``[K, B/K, ...]`` (contiguous chunks)."""
    if num_chunks < 2:
        raise ValueError(f"num_chunks={num_chunks}: GC needs at least 2 chunks")
    return _reshape_chunks(batch, num_chunks)


def _leaf_vdot(x: jax.Array, y: jax.Array) -> jax.Array:
    """``<x, y>``, accumulated in at least float32 (a bfloat16 sum of 10⁵ products is mostly rounding)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return jnp.vdot(x, y, preferred_element_type=jnp.float32)
    return jnp.vdot(x, y)


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(_leaf_vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _scale(tree: PyTree, factor: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x * jnp.asarray(factor).astype(x.dtype), tree)


def pairwise_collision(grads: list[PyTree], normalized: bool = False, eps: float = 1e-12) -> jax.Array:
    """``φ(g_1..g_K)``: mean pairwise inner product (GC) or cosine (NGC) of the chunk gradients.

    This is the reference definition (tests differentiate it to check ``gc_loss``'s HVP directions).
    """
    k = len(grads)
    if normalized:
        grads = [_scale(g, 1.0 / jnp.sqrt(_vdot(g, g) + eps)) for g in grads]
    total = jax.tree.map(lambda *xs: sum(xs), *grads)
    off_diagonal = _vdot(total, total) - sum(_vdot(g, g) for g in grads)
    return off_diagonal / (k * (k - 1))


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)  # keeps x's device-variance inside shard_map
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _chunk(chunks, k):
    return jax.tree.map(lambda x: x[k], chunks)


def _sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


# ---------------------------------------------------------------------------------------------------
# Where the collectives sit. ``axes = (chunk_axis, example_axis)``, either ``None`` (not sharded).


def _chunk_grads(partials: list[PyTree], axes) -> list[PyTree]:
    """The chunk gradients ``g_k`` from this device's parts: the mean over the example axis (one
    all-reduce of all local chunks' gradients together). Identity without an example axis."""
    example = axes[1]
    if example is None:
        return partials
    grads = jax.lax.psum(partials, example)
    size = jax.lax.axis_size(example)
    return grads if size == 1 else [jax.tree.map(lambda g: g / size, tree) for tree in grads]


def _over_chunks(tree: PyTree, axes) -> PyTree:
    """The sum over all chunks of per-device sums (``G`` or ``U``, ``Σ||u_k||²``): a ``psum`` over the chunk
    axis. Identity without one."""
    return tree if axes[0] is None else jax.lax.psum(tree, axes[0])


def _part_share(tree: PyTree, axes) -> PyTree:
    """``H_k = (1/e) Σ_j H_{k,j}`` over the ``e`` example parts: this device's share of ``Σ_k H_k v_k``."""
    example = axes[1]
    if example is None or jax.lax.axis_size(example) == 1:
        return tree
    size = jax.lax.axis_size(example)
    return jax.tree.map(lambda x: x / size, tree)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _cast(x, names):
    missing = tuple(a for a in names if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _vary(tree: PyTree, names: tuple[str, ...]) -> PyTree:
    """Marks ``tree`` device-varying over ``names`` (``jax.lax.pcast``) where it is not already, so that
    ``jax.grad`` inside ``shard_map`` returns this device's share instead of inserting a ``psum``."""
    return jax.tree.map(lambda x: _cast(x, names), tree)


def _like(tree: PyTree, reference: PyTree) -> PyTree:
    """``tree`` device-varying wherever ``reference`` is (a tangent must vary like its primal: a direction
    built from all-reduced gradients is invariant over the axes they were summed over)."""
    return jax.tree.map(lambda x, r: _cast(x, tuple(_varying_axes(r))), tree, reference)


# ---------------------------------------------------------------------------------------------------
# The chunk loops, written once.


def _units(grads, normalized, eps):
    """``(u_k, n_k)``: the chunk gradients and their norms ``sqrt(||g||² + eps)`` for NGC; ``(g_k, 1)`` for GC."""
    if not normalized:
        return grads, [1.0] * len(grads)
    norms = [jnp.sqrt(_vdot(g, g) + eps) for g in grads]
    return [_scale(g, 1.0 / n) for g, n in zip(grads, norms, strict=True)], norms


def _direction(total, unit, norm, num_chunks, normalized):
    """``v_k = ∂φ/∂g_k`` from the sum ``G`` (``U``) and chunk ``k``'s ``g_k`` (``u_k``, ``n_k``):
    ``2(G - g_k)/(K(K-1))`` for GC, ``(I - u_k u_kᵀ) 2(U - u_k) / (K(K-1) n_k)`` for NGC."""
    direction = jax.tree.map(lambda t, u: 2.0 * (t - u) / (num_chunks * (num_chunks - 1)), total, unit)
    return _tangent_projection(direction, unit, norm) if normalized else direction


def _tangent_projection(direction, unit, norm):
    """``(I - u uᵀ) w / n``: the chain rule through ``u = g / n``."""
    along = _vdot(unit, direction)
    return jax.tree.map(lambda w, u: (w - u * along.astype(w.dtype)) / norm.astype(w.dtype), direction, unit)


def _hvp(grad_fn, params, chunk, consts, direction):
    """``H v`` forward-over-reverse: the tangent output of ``jax.jvp`` of the chunk gradient."""
    return jax.jvp(lambda p: grad_fn(p, chunk, *consts), (params,), (_like(direction, params),))[1]


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _batched_chunk_grads(grad_fn, params, chunks, consts) -> list[PyTree]:
    """``[g_1..g_K]`` from one ``jax.vmap`` of the chunk gradient over the leading chunk axis (parameters and
    ``consts`` shared): a chunk's batch statistics (BatchNorm) stay its own, as in the unrolled loop."""
    stacked = jax.vmap(lambda chunk: grad_fn(params, chunk, *consts))(chunks)
    return [_chunk(stacked, k) for k in range(jax.tree.leaves(chunks)[0].shape[0])]


def _batched_hvps(loss_fn, params, chunks, consts, directions):
    """``Σ_k H_k v_k`` as one reverse-over-forward pass over all chunks: ``∇_θ Σ_k <∇ℓ_k(θ), v_k>``, the
    directional derivative ``<∇ℓ_k, v_k>`` a ``jax.jvp`` with the primal ``θ`` shared and the tangent
    ``v_k`` ``jax.vmap``-ed over the chunk axis (``v_k`` held constant). Because ``θ`` is shared, the sum
    over chunks happens inside the reverse pass: every weight gradient runs over the whole batch, and only
    the operations that meet a chunk's own tangent ``v_k`` are per chunk (grouped convolutions)."""
    stacked = _stack([_like(v, params) for v in directions])

    def directional(p):
        def one(chunk, direction):
            return jax.jvp(lambda q: loss_fn(q, chunk, *consts), (p,), (direction,))[1]

        return jnp.sum(jax.vmap(one)(chunks, stacked))

    return jax.grad(directional)(params)


def _after(carry, params, chunk):
    """``(params, chunk)``, made to depend on the whole of ``carry``: XLA must finish ``carry`` first and
    cannot merge what is computed from them with anything computed earlier.

    That is what ``low_memory`` needs: chunk ``k+1``'s gradient waits for the running sum of chunk ``k``
    (so one chunk's buffers are alive at a time), and a gradient recomputed in the backward pass is not
    merged with the forward pass's (which would keep every ``g_k`` alive). ``lax.optimization_barrier``
    says this but XLA:CPU drops it before common-subexpression elimination (jaxlib 0.10.2), and a
    ``lax.scan`` over chunks put convolution weight gradients in a loop body, which XLA:CPU runs far slower.
    So the dependency is data: ``0·Σ carry`` (a scalar; XLA does not fold a floating-point ``0·s``, which
    is NaN for infinite ``s``) is added to the chunk's floating-point leaves, or to the parameters if it
    has none. ``x + 0`` is ``x`` bit for bit (up to the sign of a zero); a non-finite ``carry`` makes the
    result non-finite, which a step with a non-finite ``G`` is anyway (the divergence guard halts it).
    """
    token = 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(carry))

    def add(x):
        return x + token.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    if any(jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(chunk)):
        return params, jax.tree.map(add, chunk)
    return jax.tree.map(add, params), chunk


def _streamed_sums(grad_fn, params, chunks, consts, normalized, eps, axes):
    """``(Σ_k u_k, Σ_k ||u_k||², [n_k])`` over this device's chunks for ``low_memory``: one chunk gradient
    alive at a time (with an example axis, each ``g_k`` is all-reduced on its own)."""
    total, squares, norms = None, 0.0, []
    for k in range(jax.tree.leaves(chunks)[0].shape[0]):
        current, chunk = (params, _chunk(chunks, k)) if total is None else _after(total, params, _chunk(chunks, k))
        [grad] = _chunk_grads([grad_fn(current, chunk, *consts)], axes)
        [unit], [norm] = _units([grad], normalized, eps)
        total = unit if total is None else jax.tree.map(jnp.add, total, unit)
        squares = squares + _vdot(unit, unit)
        norms.append(jnp.asarray(norm))
    return total, squares, jnp.stack(norms)


def _streamed_hvps(grad_fn, params, chunks, consts, total, norms, num_chunks, normalized, axes):
    """``Σ_k H_k v_k`` for ``low_memory``: chunk by chunk, ``g_k`` is recomputed (and shared with the primal
    of its ``jax.jvp``), ``v_k`` formed from it and ``G`` (``U``), and ``H_k v_k`` added to the running sum."""
    result = None
    for k in range(norms.shape[0]):
        current, chunk = _after(total if result is None else result, params, _chunk(chunks, k))
        chunk_grad = lambda p, chunk=chunk: grad_fn(p, chunk, *consts)  # noqa: E731
        [unit] = _chunk_grads([chunk_grad(current)], axes)
        if normalized:
            unit = _scale(unit, 1.0 / norms[k])
        direction = _direction(total, unit, norms[k], num_chunks, normalized)
        product = jax.jvp(chunk_grad, (current,), (_like(direction, current),))[1]
        result = product if result is None else jax.tree.map(jnp.add, result, product)
    return result


def _value(total, squares, num_chunks, params):
    value = (_vdot(total, total) - squares) / (num_chunks * (num_chunks - 1))
    return value.astype(jnp.result_type(*jax.tree.leaves(params)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6))
def _collision(loss_fn, normalized, eps, hvp, low_memory, num_chunks, axes, params, chunks, consts):
    value, _ = _collision_fwd(loss_fn, normalized, eps, hvp, low_memory, num_chunks, axes, params, chunks, consts)
    return value


def _collision_fwd(loss_fn, normalized, eps, hvp, low_memory, num_chunks, axes, params, chunks, consts):
    grad_fn = jax.grad(loss_fn)
    local = jax.tree.leaves(chunks)[0].shape[0]
    if low_memory:  # keep only G (U) and the norms; the backward pass recomputes every g_k
        local_total, squares, norms = _streamed_sums(grad_fn, params, chunks, consts, normalized, eps, axes)
        total, squares = _over_chunks((local_total, squares), axes)
        return _value(total, squares, num_chunks, params), (params, chunks, consts, (total, norms))
    if hvp == "linearize":
        # g_k and the linear map v -> H_k v from one forward-over-reverse pass; the map's residuals
        # (activations and their tangents' coefficients) are kept for the backward pass.
        pairs = [jax.linearize(lambda p, k=k: grad_fn(p, _chunk(chunks, k), *consts), params) for k in range(local)]
        partials, residual = [g for g, _ in pairs], (params, [lin for _, lin in pairs])
    elif hvp == "batched":
        partials, residual = _batched_chunk_grads(grad_fn, params, chunks, consts), params
    else:  # "jvp": keep the inputs, recompute the gradient inside the backward pass's jvp
        partials = [grad_fn(params, _chunk(chunks, k), *consts) for k in range(local)]
        residual = params
    grads = _chunk_grads(partials, axes)
    units, norms = _units(grads, normalized, eps)
    total, squares = _over_chunks((_sum(units), sum(_vdot(u, u) for u in units)), axes)
    directions = [_direction(total, u, n, num_chunks, normalized) for u, n in zip(units, norms, strict=True)]
    return _value(total, squares, num_chunks, params), (residual, chunks, consts, directions)


def _collision_bwd(loss_fn, normalized, eps, hvp, low_memory, num_chunks, axes, residuals, cotangent):
    del eps
    residual, chunks, consts, saved = residuals  # saved: the directions v_k, or (G or U, norms) if low_memory
    grad_fn = jax.grad(loss_fn)
    if low_memory:
        total_units, norms = saved
        total = _streamed_hvps(grad_fn, residual, chunks, consts, total_units, norms, num_chunks, normalized, axes)
    elif hvp == "batched":
        total = _batched_hvps(loss_fn, residual, chunks, consts, saved)
    else:
        total = None
        for k, direction in enumerate(saved):
            if hvp == "linearize":
                product = residual[1][k](_like(direction, residual[0]))
            else:
                product = _hvp(grad_fn, residual, _chunk(chunks, k), consts, direction)
            total = product if total is None else jax.tree.map(jnp.add, total, product)
    total = _part_share(total, axes)
    params_ct = jax.tree.map(lambda h: (cotangent * h).astype(h.dtype), total)
    return params_ct, jax.tree.map(_zero_cotangent, chunks), jax.tree.map(_zero_cotangent, consts)


_collision.defvjp(_collision_fwd, _collision_bwd)


def _parse_axes(axis_name: AxisName) -> tuple[str | None, str | None]:
    if axis_name is None:
        return None, None
    if isinstance(axis_name, str):
        return axis_name, None
    if (
        len(axis_name) == 2
        and isinstance(axis_name[1], str)
        and (axis_name[0] is None or isinstance(axis_name[0], str))
        and axis_name[0] != axis_name[1]
    ):
        return axis_name[0], axis_name[1]
    raise ValueError(f"axis_name={axis_name!r}: expected None, an axis name, or (chunk_axis or None, example_axis)")


def _weighted(per_example: LossFn, example_axis: str | None) -> LossFn:
    """A chunk part's loss from per-example losses and weights, ``(data, w) -> e · Σ_i w_i ℓ_i``: the mean of
    the ``e`` parts' losses (``_chunk_grads``) is then the weighted sum over the whole chunk."""

    def loss_fn(params, part):
        data, w = part
        parts = jax.lax.axis_size(example_axis) if example_axis is not None else 1
        return parts * jnp.sum(w * per_example(params, data))

    return loss_fn


def gc_loss(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    num_chunks: int,
    *,
    normalized: bool = False,
    eps: float = 1e-12,
    hvp: str = "jvp",
    low_memory: bool = False,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Gradient Collision loss (docs/methods.md §1.1); NGC with ``normalized=True``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a *mean* loss over the examples of ``batch``
        (with ``weights``: ``-> [b]``, the per-example losses of ``batch``). It may close over other arrays
        (e.g. frozen parameters); they receive no gradient.
      params: the parameters that enter the chunk gradients ``g_k``; ``jax.grad`` of the result is
        taken with respect to them.
      batch: a pytree of arrays with a common leading batch axis ``B``, divisible by ``num_chunks``.
        Chunk ``k`` is the contiguous slice ``[k*B/K, (k+1)*B/K)``. (Sharded: this device's part, below.)
      num_chunks: ``K ≥ 2``, the number of chunks of the whole (global) batch.
      normalized: ``False`` for GC (mean pairwise inner product of chunk gradients), ``True`` for NGC
        (mean pairwise cosine).
      eps: NGC's guard, ``u_k = g_k / sqrt(||g_k||² + eps)``; unused by GC.
      hvp: how the Hessian-vector products are formed, both forward-over-reverse. ``"jvp"`` (default):
        ``jax.jvp`` of ``∇ℓ_k`` in the backward pass, recomputing the chunk's forward pass.
        ``"linearize"``: ``jax.linearize`` of ``∇ℓ_k`` in the forward pass gives ``g_k`` and the map
        ``v ↦ H_k v`` for the backward pass; it keeps every chunk's linearisation in memory and measured
        no faster on CPU (``benchmarks/gc_step.py``). Under ``jax.jit`` XLA shares the recomputed
        gradient with the forward one, so both modes compile to the same temporary memory
        (``benchmarks/memory.py``) and, on XLA:CPU, to the same program. Both run every chunk's passes
        at the chunk's batch size ``B/K``: ``K`` times as many, ``K`` times smaller kernels as one pass
        over the batch. ``"batched"``: the chunks side by side instead: the chunk gradients are one
        ``jax.vmap`` over the chunk axis, and the backward pass is one reverse-over-forward pass over
        the whole batch, ``Σ_k H_k v_k = ∇_θ Σ_k <∇ℓ_k(θ), v_k>`` (a ``jax.jvp`` vmapped over chunks and
        tangents ``v_k``, then ``jax.grad``), so every primal operation and every weight gradient of the
        backward pass runs over the whole batch and only the operations that meet a chunk's own
        gradient or tangent are per chunk (in a conv net: grouped convolutions, ``feature_group_count
        = K``). ``loss_fn`` must be ``jax.vmap``-able over a chunk (per-chunk BatchNorm statistics are
        kept: each chunk is its own batch). Meant for accelerators, where the per-chunk passes are
        latency-bound; XLA:CPU runs grouped convolutions slowly (``benchmarks/gc_step.py``).
      low_memory: keep no chunk gradients between the forward and the backward pass. The forward pass
        visits the chunks one after another keeping only ``G`` (``U``) and the norms; the backward pass
        recomputes each ``g_k`` inside its HVP. Temporary memory falls from about ``2K+1``
        parameter-sized buffers plus every chunk's activations to about 3 plus one chunk's; the time
        rises by ``K`` chunk gradients (``benchmarks/memory.py`` and ``benchmarks/gc_step.py`` measure
        both). ``hvp`` is ignored (always ``"jvp"``).
      axis_name: ``None`` (one device), or, inside ``jax.shard_map``, where the chunks live:

        * ``"chunks"``: the chunks are spread over that mesh axis of size ``c`` (``c`` divides ``K``);
          ``batch`` is this device's ``K/c`` consecutive whole chunks (device ``i`` holds chunks
          ``i·K/c .. (i+1)·K/c - 1``).
        * ``("chunks", "examples")``: a 2-D layout for any device count: chunks over the first axis
          (size ``c``, dividing ``K``), each chunk's examples over the second (size ``e``). ``batch`` is
          device ``(i, j)``'s part: for each of its ``K/c`` chunks in order, the ``j``-th of ``e``
          equal parts of that chunk's examples. ``loss_fn`` is the mean over a part; a chunk's loss is
          the mean of its ``e`` parts' losses (parts padded to equal size weigh their padding out with
          ``weights``). ``(None, "examples")``: every device holds a part of every chunk (``c = 1``).

        Leave axes of size 1 out of the mesh (``dtl_jax.train.mesh.ChunkLayout.axes``): XLA keeps an
        all-reduce over a size-1 axis of a multi-device mesh.

        Communication (parameter-size all-reduces, ``P`` = the size of ``params``): with ``e = 1``, one
        of ``P`` (``G``, or ``U``, over the chunk axis); with ``e > 1``, one of ``(K/c)·P`` (the local
        chunks' gradients, summed over the example axis; ``low_memory``: ``K/c`` of ``P`` in the forward
        pass and again in the backward pass, which recomputes them) and, if ``c > 1``, one of ``P``
        (``G`` over the chunk axis). Scalars (``Σ||u_k||²``) ride along. The backward pass communicates
        nothing: see Returns.
      weights: optional per-example weights ``[B]`` (sharded: of this device's part), for batches with
        padding (jax_privacy's ``is_padding_example``: a padding example weighs 0). Chunk ``k``'s loss is
        then ``Σ_{i∈B_k} w_i ℓ_i`` over all of its examples (sharded: over all of its parts), ``ℓ_i`` the
        per-example losses ``loss_fn`` returns: weights ``1/m`` for a chunk's ``m`` real examples give the
        mean over them, however the chunk is padded or split.

    Returns:
      A scalar of ``params``' dtype (float32 sums for narrower types): GC of the whole batch (sharded: of
      the global batch, the same on every device). ``jax.grad`` of it costs ``K`` chunk gradients plus
      ``K`` forward-over-reverse Hessian-vector products and never forms a Hessian. Sharded, the
      gradient with respect to *device-varying* parameters (``jax.lax.pcast(params, axes,
      to="varying")``) is this device's share of ``∇GC``, whose ``psum`` over all devices is ``∇GC``:
      a train step fuses that sum with its other gradients into one all-reduce. With replicated
      parameters JAX inserts that ``psum`` itself and the gradient is ``∇GC``. A per-device objective
      that adds GC to device-varying terms (each device's share of a data loss) must add ``GC / N`` on
      each of the ``N`` devices: JAX sums the cotangent of a device-invariant value over the devices
      (``dtl_jax.train.disposal_step.disposal_step`` does this). Works under ``jax.jit``; cannot itself be
      ``jax.jvp``'d (it is a ``custom_vjp``).

    >>> import jax.numpy as jnp
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4), "y": jnp.zeros(4)}
    >>> float(gc_loss(loss, jnp.ones(4), batch, 2))  # g_1 = [1,1,0,0], g_2 = [0,0,1,1]: orthogonal
    0.0
    """
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp={hvp!r}: expected one of {', '.join(HVP_MODES)}")
    if num_chunks < 2:
        raise ValueError(f"num_chunks={num_chunks}: GC needs at least 2 chunks")
    axes = _parse_axes(axis_name)
    if weights is not None:
        batch, loss_fn = (batch, weights), _weighted(loss_fn, axes[1])
    if axes[0] is None and axes[1] is None:
        chunks = split_chunks(batch, num_chunks)
    else:
        chunk_devices = jax.lax.axis_size(axes[0]) if axes[0] is not None else 1
        if num_chunks % chunk_devices:
            raise ValueError(f"num_chunks={num_chunks} is not a multiple of the {chunk_devices} devices on {axes[0]!r}")
        chunks = _reshape_chunks(batch, num_chunks // chunk_devices)
        params = _vary(params, tuple(a for a in axes if a is not None))
    closed, consts = jax.closure_convert(loss_fn, params, _chunk(chunks, 0))
    return _collision(
        closed, bool(normalized), float(eps), hvp, bool(low_memory), num_chunks, axes, params, chunks, tuple(consts)
    )
