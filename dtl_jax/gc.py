"""Gradient Collision (GC) and normalised GC (NGC) losses with a Hessian-vector-product gradient.

METHODS.md §1.1. A batch ``B`` is split along its leading axis into ``K`` equal, contiguous chunks
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

__all__ = ["gc_loss", "sharded_collision", "split_chunks", "pairwise_collision"]


def split_chunks(batch: PyTree, num_chunks: int) -> PyTree:
    """Reshapes every leaf ``[B, ...]`` of ``batch`` to ``[K, B/K, ...]`` (contiguous chunks)."""
    if num_chunks < 2:
        raise ValueError(f"num_chunks={num_chunks}: GC needs at least 2 chunks")
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


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _scale(tree: PyTree, factor: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x * factor, tree)


def pairwise_collision(grads: list[PyTree], normalized: bool = False, eps: float = 1e-12) -> jax.Array:
    """``φ(g_1..g_K)``: mean pairwise inner product (GC) or cosine (NGC) of the chunk gradients.

    This is the reference definition; ``gc_loss`` differentiates it to get the HVP directions.
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
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


HVP_MODES = ("jvp", "linearize")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _collision(loss_fn, normalized, eps, hvp, low_memory, params, chunks, consts):
    value, _ = _collision_fwd(loss_fn, normalized, eps, hvp, low_memory, params, chunks, consts)
    return value


def _chunk(chunks, k):
    return jax.tree.map(lambda x: x[k], chunks)


def _sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


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


def _hvp(grad_fn, params, chunk, consts, direction):
    """``H v`` forward-over-reverse: the tangent output of ``jax.jvp`` of the chunk gradient."""
    return jax.jvp(lambda p: grad_fn(p, chunk, *consts), (params,), (direction,))[1]


def _tangent_projection(direction, unit, norm):
    """``(I - u uᵀ) w / n``: the chain rule through ``u = g / n``."""
    along = _vdot(unit, direction)
    return jax.tree.map(lambda w, u: (w - u * along) / norm, direction, unit)


def _linearized_grad(grad_fn, params, chunk, consts):
    return jax.linearize(lambda p: grad_fn(p, chunk, *consts), params)


def _after(carry, params, chunk):
    """``(params, chunk)``, made to depend on the whole of ``carry``: XLA must finish ``carry`` first and
    cannot merge what is computed from them with anything computed earlier.

    That is what ``low_memory`` needs: chunk ``k+1``'s gradient waits for the running sum of chunk ``k``
    (so one chunk's buffers are alive at a time), and a gradient recomputed in the backward pass is not
    merged with the forward pass's (which would keep every ``g_k`` alive). ``lax.optimization_barrier``
    says this but XLA:CPU drops it before common-subexpression elimination (jaxlib 0.10.2), and a
    ``lax.scan`` over chunks put convolution weight gradients in a loop body, which XLA:CPU ran 50x slower.
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


def _streamed_sums(grad_fn, params, chunks, consts, normalized, eps):
    """``(Σ_k u_k, Σ_k ||u_k||², [n_k])`` for ``low_memory``: one chunk gradient alive at a time."""
    num_chunks = jax.tree.leaves(chunks)[0].shape[0]
    total, squares, norms = None, 0.0, []
    for k in range(num_chunks):
        current, chunk = (params, _chunk(chunks, k)) if total is None else _after(total, params, _chunk(chunks, k))
        [unit], [norm] = _units([grad_fn(current, chunk, *consts)], normalized, eps)
        total = unit if total is None else jax.tree.map(jnp.add, total, unit)
        squares = squares + _vdot(unit, unit)
        norms.append(jnp.asarray(norm))
    return total, squares, jnp.stack(norms)


def _streamed_hvps(grad_fn, params, chunks, consts, total, norms, num_chunks, normalized):
    """``Σ_k H_k v_k`` for ``low_memory``: chunk by chunk, ``g_k`` is recomputed (and shared with the primal
    of its ``jax.jvp``), ``v_k`` formed from it and ``G`` (``U``), and ``H_k v_k`` added to the running sum."""
    result = None
    for k in range(norms.shape[0]):
        current, chunk = _after(total if result is None else result, params, _chunk(chunks, k))
        chunk_grad = lambda p, chunk=chunk: grad_fn(p, chunk, *consts)  # noqa: E731
        unit = chunk_grad(current)
        if normalized:
            unit = _scale(unit, 1.0 / norms[k])
        direction = _direction(total, unit, norms[k], num_chunks, normalized)
        product = jax.jvp(chunk_grad, (current,), (direction,))[1]
        result = product if result is None else jax.tree.map(jnp.add, result, product)
    return result


def _collision_fwd(loss_fn, normalized, eps, hvp, low_memory, params, chunks, consts):
    grad_fn = jax.grad(loss_fn)
    num_chunks = jax.tree.leaves(chunks)[0].shape[0]
    if low_memory:  # keep only G (U) and the norms; the backward pass recomputes every g_k
        total, squares, norms = _streamed_sums(grad_fn, params, chunks, consts, normalized, eps)
        value = (_vdot(total, total) - squares) / (num_chunks * (num_chunks - 1))
        return value, (params, chunks, consts, (total, norms))
    if hvp == "linearize":
        # g_k and the linear map v -> H_k v from one forward-over-reverse pass; the map's residuals
        # (activations and their tangents' coefficients) are kept for the backward pass.
        pairs = [_linearized_grad(grad_fn, params, _chunk(chunks, k), consts) for k in range(num_chunks)]
        grads, residual = [g for g, _ in pairs], [lin for _, lin in pairs]
    else:  # "jvp": keep the inputs, recompute the gradient inside the backward pass's jvp
        grads = [grad_fn(params, _chunk(chunks, k), *consts) for k in range(num_chunks)]
        residual = params
    value, directions = jax.value_and_grad(pairwise_collision)(grads, normalized, eps)
    return value, (residual, chunks, consts, directions)


def _collision_bwd(loss_fn, normalized, eps, hvp, low_memory, residuals, cotangent):
    del eps
    residual, chunks, consts, saved = residuals  # saved: the directions v_k, or (G or U, norms) if low_memory
    grad_fn = jax.grad(loss_fn)
    if low_memory:
        total_units, norms = saved
        total = _streamed_hvps(grad_fn, residual, chunks, consts, total_units, norms, norms.shape[0], normalized)
    else:
        total = None
        for k, direction in enumerate(saved):
            if hvp == "linearize":
                product = residual[k](direction)
            else:
                product = _hvp(grad_fn, residual, _chunk(chunks, k), consts, direction)
            total = product if total is None else jax.tree.map(jnp.add, total, product)
    params_ct = jax.tree.map(lambda h: (cotangent * h).astype(h.dtype), total)
    return params_ct, jax.tree.map(_zero_cotangent, chunks), jax.tree.map(_zero_cotangent, consts)


_collision.defvjp(_collision_fwd, _collision_bwd)


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
) -> jax.Array:
    """Gradient Collision loss (METHODS.md §1.1); NGC with ``normalized=True``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a *mean* loss over the examples of ``batch``.
        It may close over other arrays (e.g. frozen parameters); they receive no gradient.
      params: the parameters that enter the chunk gradients ``g_k``; ``jax.grad`` of the result is
        taken with respect to them.
      batch: a pytree of arrays with a common leading batch axis ``B``, divisible by ``num_chunks``.
        Chunk ``k`` is the contiguous slice ``[k*B/K, (k+1)*B/K)``.
      num_chunks: ``K ≥ 2``.
      normalized: ``False`` for GC (mean pairwise inner product of chunk gradients), ``True`` for NGC
        (mean pairwise cosine).
      eps: NGC's guard, ``u_k = g_k / sqrt(||g_k||² + eps)``; unused by GC.
      hvp: how the Hessian-vector products are formed, both forward-over-reverse. ``"jvp"`` (default):
        ``jax.jvp`` of ``∇ℓ_k`` in the backward pass, recomputing the chunk's forward pass.
        ``"linearize"``: ``jax.linearize`` of ``∇ℓ_k`` in the forward pass gives ``g_k`` and the map
        ``v ↦ H_k v`` for the backward pass; it keeps every chunk's linearisation in memory and measured
        no faster on CPU (``benchmarks/gc_step.py``). Under ``jax.jit`` XLA shares the recomputed
        gradient with the forward one, so both modes compile to the same temporary memory
        (``benchmarks/memory.py``).
      low_memory: keep no chunk gradients between the forward and the backward pass. The forward pass
        visits the chunks one after another keeping only ``G`` (``U``) and the norms; the backward pass
        recomputes each ``g_k`` inside its HVP. Temporary memory falls from about ``2K+1``
        parameter-sized buffers plus every chunk's activations to about 3 plus one chunk's
        (``benchmarks/memory.py``, K = 4: MLP 8.1x → 3.4x a plain step, small CNN 2.35x → 0.63x,
        ResNet-18 2.63x → 0.92x); the time rises by ``K`` chunk gradients (1.2x the default for the
        small CNN, 1.45-1.65x for the MLP). ``hvp`` is ignored (always ``"jvp"``).

    Returns:
      A scalar. ``jax.grad`` of it costs ``K`` chunk gradients plus ``K`` forward-over-reverse
      Hessian-vector products and never forms a Hessian. Works under ``jax.jit``; cannot itself be
      ``jax.jvp``'d (it is a ``custom_vjp``).

    >>> import jax.numpy as jnp
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4), "y": jnp.zeros(4)}
    >>> float(gc_loss(loss, jnp.ones(4), batch, 2))  # g_1 = [1,1,0,0], g_2 = [0,0,1,1]: orthogonal
    0.0
    """
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp={hvp!r}: expected one of {', '.join(HVP_MODES)}")
    chunks = split_chunks(batch, num_chunks)
    closed, consts = jax.closure_convert(loss_fn, params, _chunk(chunks, 0))
    return _collision(closed, bool(normalized), float(eps), hvp, bool(low_memory), params, chunks, tuple(consts))


def sharded_collision(
    loss_fn: LossFn,
    params: PyTree,
    local_batch: PyTree,
    num_chunks: int,
    axis_name: str,
    *,
    normalized: bool = False,
    eps: float = 1e-12,
    low_memory: bool = False,
) -> tuple[jax.Array, PyTree]:
    """GC / NGC with chunks spread over the devices of a ``shard_map`` axis (METHODS.md §1.1, Distributed).

    Call inside ``jax.shard_map`` over ``axis_name``, with ``params`` replicated and ``local_batch`` this
    device's contiguous share of the batch: ``num_chunks / N`` chunks for ``N`` devices (device ``d`` holds
    chunks ``d·K/N .. (d+1)·K/N - 1`` of the single-device layout).

    Each device computes its chunk gradients; **one all-reduce** of parameter size forms ``G = Σ_k g_k``
    (``U = Σ_k u_k`` for NGC; plus one scalar all-reduce); each device then computes its local HVPs.

    Returns ``(value, local_hvp)``: ``value`` is GC (NGC), equal on every device; ``local_hvp`` is
    ``Σ_{local k} H_k v_k``, this device's share of ``∇GC``. The caller sums it over the axis: that is the
    **second all-reduce**, which a train step fuses with its other gradients (``psum`` of
    ``retain_grad / N + λ · local_hvp``), so a sharded disposal step has exactly two parameter-size
    all-reduces. Gradients here are local: ``params`` is cast to device-varying before differentiating,
    so no implicit ``psum`` is inserted by ``jax.grad`` inside ``shard_map``. ``low_memory`` as in
    ``gc_loss``: the local chunks are visited one after another and recomputed for their HVPs.
    """
    devices = jax.lax.axis_size(axis_name)
    if num_chunks % devices:
        raise ValueError(f"num_chunks={num_chunks} is not a multiple of the {devices} devices on axis {axis_name!r}")
    local = num_chunks // devices
    params = jax.lax.pcast(params, axis_name, to="varying")
    chunks = split_chunks(local_batch, local) if local > 1 else jax.tree.map(lambda x: x[None], local_batch)
    grad_fn = jax.grad(loss_fn)
    if low_memory:
        local_total, squares, norms = _streamed_sums(grad_fn, params, chunks, (), normalized, eps)
    else:
        grads = [grad_fn(params, _chunk(chunks, k)) for k in range(local)]
        units, norms = _units(grads, normalized, eps)
        local_total, squares = _sum(units), sum(_vdot(u, u) for u in units)
    total = jax.lax.psum(local_total, axis_name)  # all-reduce 1
    squares = jax.lax.psum(squares, axis_name)
    value = (_vdot(total, total) - squares) / (num_chunks * (num_chunks - 1))
    if low_memory:
        return value, _streamed_hvps(grad_fn, params, chunks, (), total, norms, num_chunks, normalized)
    hvp = None
    for k in range(local):
        direction = _direction(total, units[k], norms[k], num_chunks, normalized)
        product = _hvp(grad_fn, params, _chunk(chunks, k), (), direction)
        hvp = product if hvp is None else jax.tree.map(jnp.add, hvp, product)
    return value, hvp
