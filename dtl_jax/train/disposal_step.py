"""The disposal step: the disposal objective (``dtl_jax.disposal_objective``, pure) sharded over a mesh.

``disposal_step(objective, tx, mesh)`` is only the sharding: the objective's terms are computed on each
device's part of the global batches under ``jax.shard_map``, their gradients summed in one all-reduce, and
the update guarded like every other step's (``steps.guarded_update``). Its own module (not ``steps``) so
that the supervised stages, which never run it, do not import the GC loss (their code version, in the stage
keys, does not move when GC's code does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dtl_jax import disposal_objective
from dtl_jax.disposal_objective import DisposalObjective, combine
from dtl_jax.models import Network
from dtl_jax.train import steps
from dtl_jax.train.mesh import AXIS, ChunkLayout, chunk_layout, padded_rows


def disposal_step(objective: DisposalObjective, tx, mesh: Mesh | None = None, max_grad_norm: float = math.inf):
    """Knowledge disposal (docs/methods.md §1): ``step(state, teacher, weights, source_batch, target_batch)``,
    one step of the objective ``Σ_t w_t L_t`` (``dtl_jax.disposal_objective``: by default
    ``L_retain + λ · L_unlearn``) from the TL model, sharded over ``mesh``.

    ``teacher`` (the frozen TL model's variables) and ``weights`` (``{"retain": 1, "unlearn": λ}``, scalars)
    are arguments, not constants of the program: one compiled step serves every seed of a multi-seed run and
    every λ of a sweep. Place them once, replicated on ``mesh`` (``steps.replicate``, ``disposal_weights``),
    like the state (``steps.init_state(..., mesh)``).

    This function is only the sharding. The step runs the objective under ``jax.shard_map`` over the
    devices of ``mesh`` (default: the first device alone), viewed as a ``c x e`` grid
    (``mesh.chunk_layout``): the source batch's ``K`` chunks over ``c``, each chunk's examples over ``e``;
    the target batch split over all of them. It takes both batches in their natural order, in any placement
    (``mesh.place_disposal_batches`` gives one that moves no data), draws RTF's wrong labels for the global
    batch (``DisposalObjective.prepare_source``) and lays the batches out itself; on more than one device
    every example carries its global-batch weight (``1/n``, padding 0: ``mesh.padded_rows`` and
    ``ChunkLayout.source_rows`` pad uneven splits with repeated examples), so that every device count gives
    the one-device result (up to float rounding; a BatchNorm model normalises over each device's part).
    Each device differentiates its share of the objective with respect to device-varying parameters (a term
    that varies over the devices is its share already; one computed across them, GC, counts ``1/N``); one
    ``psum`` sums the gradients. Parameter-size all-reduces per step: two where the device count divides
    ``K`` (``G`` or ``U`` inside ``gc_loss``, then the gradient sum); otherwise ``ChunkLayout.all_reduces``.
    For the fooling losses: one, of the gradient.
    """
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), (AXIS,))
    devices = int(mesh.devices.size)

    def local(layout, params, batch_stats, teacher, weights, key, source, target):
        axes = layout.axes
        varying = jax.lax.pcast(params, axes, to="varying")  # local gradients: no implicit psum

        def own_share(value):
            """This device's share of a term: a term that varies over the devices is its share of the global
            term already (the batches carry their global weights); one that does not (GC, computed across
            the devices) counts ``1/N`` on each."""
            return value if _varies(value, axes) or devices == 1 else value / devices

        def share(p):
            terms, stats = objective.terms(p, batch_stats, teacher, source, target, layout.axis_name, key)
            return combine(weights, {name: own_share(value) for name, value in terms.items()}), (terms, stats)

        extra = {}
        if objective.loss.separate_clip:
            # Each term's gradient on its own (two backward passes, no wasted work), clipped to
            # ``term_clip`` before the weights combine them: λ weighs two bounded directions.
            def retain_share(p):
                value, stats = objective.retain_term(p, batch_stats, teacher, source, target)
                return own_share(value), (value, stats)

            def unlearn_share(p):
                value = objective.unlearn_term(p, batch_stats, source, layout.axis_name, key)
                return own_share(value), value

            (_, (retain, stats)), retain_grads = jax.value_and_grad(retain_share, has_aux=True)(varying)
            (_, unlearn), unlearn_grads = jax.value_and_grad(unlearn_share, has_aux=True)(varying)
            terms = {"retain": retain, "unlearn": unlearn}
            parts = {"retain": jax.lax.psum(retain_grads, axes), "unlearn": jax.lax.psum(unlearn_grads, axes)}
            for name, part in parts.items():
                norm = optax.global_norm(part)
                extra[f"{name}_grad_norm"] = norm
                parts[name] = jax.tree.map(
                    lambda g, n=norm: g * jnp.minimum(1.0, objective.term_clip / (n + 1e-12)), part
                )
            grads = jax.tree.map(lambda r, u: weights["retain"] * r + weights["unlearn"] * u, parts["retain"],
                                 parts["unlearn"])  # fmt: skip
        else:
            (_, (terms, stats)), grads = jax.value_and_grad(share, has_aux=True)(varying)
            grads = jax.lax.psum(grads, axes)  # the one fused all-reduce of the gradients
        terms = {name: jax.lax.psum(value, axes) if _varies(value, axes) else value for name, value in terms.items()}
        stats = jax.lax.pmean(stats, axes)
        return combine(weights, terms), grads, stats, {**terms, **extra}

    def lay_out(batch, rows, mask, size):
        if rows is not None:
            batch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)
        if devices == 1:
            return batch
        weight = np.full(size if rows is None else rows.size, 1.0 / size, np.float32)
        return {**batch, "weight": jnp.asarray(weight if mask is None else np.where(mask, weight, 0.0))}

    def step(state, teacher, weights, source_batch, target_batch):
        rng, key = jax.random.split(state["rng"])
        num_source = state["params"]["heads"]["source"]["bias"].shape[0]
        source = objective.prepare_source(key, source_batch, num_source)
        target = {"image": target_batch["image"], "label": target_batch["label"]}
        n_source, n_target = source["label"].shape[0], target["label"].shape[0]
        if objective.loss.family == "sophon":  # every device holds a part of each of the k + 1 parts
            layout = ChunkLayout(objective.num_chunks, n_source // objective.num_chunks, 1, devices)
        else:
            layout = chunk_layout(devices, objective.num_chunks, n_source)
        source = lay_out(source, *layout.source_rows(), n_source)
        target = lay_out(target, *padded_rows(n_target, devices), n_target)
        sharded = jax.shard_map(
            lambda *args: local(layout, *args),
            mesh=layout.grid(mesh),
            in_specs=(P(), P(), P(), P(), P(), P(layout.axes), P(layout.axes)),
            out_specs=(P(), P(), P(), P()),
        )
        head_key = jax.random.fold_in(key, 1)  # the sophon family's fresh head (RTF's labels used ``key``)
        loss, grads, stats, terms = sharded(
            state["params"], state["batch_stats"], teacher, weights, head_key, source, target
        )
        new, metrics = steps.guarded_update(state, grads, loss, stats, rng, tx, max_grad_norm)
        return new, {**metrics, **terms}

    # State, teacher and weights in and everything out replicated on ``mesh``: a state placed so
    # (``replicate``) comes back with the same sharding, so the step compiles once. The batches' placement
    # depends on their layout (``place_disposal_batches``): left to the arguments.
    replicated = NamedSharding(mesh, P())
    in_shardings = (replicated, replicated, replicated, None, None)
    return jax.jit(step, donate_argnums=0, in_shardings=in_shardings, out_shardings=replicated)


def _varies(x: jax.Array, axes: tuple[str, ...]) -> bool:
    """Whether ``x`` (inside ``shard_map``) may differ between the devices of ``axes`` (its varying axes)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    varying = manual.varying if manual is not None else getattr(aval, "vma", ())
    return bool(set(axes) & set(varying))


def disposal_weights(mesh: Mesh, weights: dict, dtype=jnp.float32) -> dict:
    """The disposal step's ``weights`` argument: each weight a scalar of ``dtype``, replicated on ``mesh``."""
    return steps.replicate(mesh, {name: np.asarray(value, dtype) for name, value in weights.items()})


def disposal_program(network: Network, method: str, config, tx, mesh: Mesh | None = None) -> tuple[Callable, dict]:
    """``(step, weights)`` for ``method`` under a ``DisposalConfig``: ``disposal_step`` of its objective and
    its term weights (λ) placed on ``mesh``; call ``step(state, teacher, weights, source, target)`` with the
    state and teacher placed there too (``init_state(..., mesh)``, ``replicate``). For scripts and tests: the
    DTL stage (``dtl_jax.stages.disposal``) builds the same, caching the step apart from the weights."""
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), (AXIS,))
    objective = DisposalObjective.from_config(network, method, config)
    step = disposal_step(objective, tx, mesh, config.max_grad_norm)
    return step, disposal_weights(mesh, disposal_objective.weights(method, config))
