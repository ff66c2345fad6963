"""Jitted train steps, one builder per kind of stage. Each step is ``step(state, *batches) -> (state,
metrics)`` over the dict state below, jitted once per stage with the state donated.

State::

    {"params": ..., "batch_stats": ..., "opt_state": ..., "step": int32, "rng": key,
     "halted": bool, "halted_at": int32}

Divergence guard (inside the step, so it costs no host sync): a step whose loss or gradient norm is not
finite, whose loss exceeds ``MAX_ABS_LOSS`` in magnitude, or whose gradient norm exceeds ``max_grad_norm``,
is not applied and sets ``halted``; every later
step is a no-op. The state therefore always holds the last good parameters, and the loop stops when it
sees ``halted``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtl_jax import losses
from dtl_jax.config import DisposalConfig
from dtl_jax.gc import sharded_collision
from dtl_jax.models import Network

AXIS = "data"

Step = Callable


def init_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh train state over a *copy* of ``variables`` (steps donate the state, the caller keeps its
    arrays)."""
    variables = jax.tree.map(jnp.array, variables)
    return {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
        "halted": jnp.zeros((), bool),
        "halted_at": jnp.full((), -1, jnp.int32),
    }


def variables_of(state: dict) -> dict:
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


MAX_ABS_LOSS = 1e6  # a loss this large (e.g. gradient ascent running away) counts as divergence


def _guarded_update(state, grads, loss, batch_stats, rng, tx, max_grad_norm):
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (jnp.abs(loss) <= MAX_ABS_LOSS)
    ok = finite & (grad_norm <= max_grad_norm) & ~state["halted"]
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    candidate = {
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
    }
    kept = {k: state[k] for k in candidate}
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), candidate, kept)
    halted = state["halted"] | ~ok
    new.update(
        step=state["step"] + ok.astype(jnp.int32),
        rng=rng,
        halted=halted,
        halted_at=jnp.where(halted & ~state["halted"], state["step"], state["halted_at"]),
    )
    return new, {"loss": loss, "grad_norm": grad_norm}


def supervised_step(network: Network, head: str, tx, max_grad_norm: float = math.inf) -> Step:
    """Cross-entropy on ``batch`` through ``head`` (pre-training, transfer, piggyback learning)."""

    def step(state, batch):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            logits, _, stats = network.apply(variables, batch["image"], head=head, train=True)
            loss = losses.cross_entropy(logits, batch["label"])
            return loss, (stats, jnp.mean(jnp.argmax(logits, -1) == batch["label"]))

        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new, metrics = _guarded_update(state, grads, loss, stats, state["rng"], tx, max_grad_norm)
        return new, {**metrics, "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


def custom_step(loss_fn: Callable, tx, max_grad_norm: float = math.inf, project: Callable | None = None) -> Step:
    """A step for any loss: ``step(state, aux, *batches)``.

    ``loss_fn(params, batch_stats, key, aux, *batches) -> (loss, (batch_stats, metrics))``; ``aux`` is a
    per-call pytree that is not donated (a schedule value, a mask, reference weights). ``project(params,
    aux)``, if given, is applied to the updated parameters (e.g. SalUn keeps masked weights at their
    original values).
    """

    def step(state, aux, *batches):
        rng, key = jax.random.split(state["rng"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], key, aux, *batches)
        new, out = _guarded_update(state, grads, loss, stats, rng, tx, max_grad_norm)
        if project is not None:
            new["params"] = project(new["params"], aux)
        return new, {**out, **metrics}

    return jax.jit(step, donate_argnums=0)


def split_gc_params(params: dict, which: str) -> tuple[dict, dict]:
    """Splits ``params`` into (parameters that enter the chunk gradients, the rest)."""
    if which == "all":
        return params, {}
    heads = params["heads"]
    keep = {"source"} if which == "backbone_source" else set()
    gc_part = {"backbone": params["backbone"], "heads": {k: v for k, v in heads.items() if k in keep}}
    rest = {"heads": {k: v for k, v in heads.items() if k not in keep}}
    return gc_part, rest


def merge_params(gc_part: dict, rest: dict) -> dict:
    if not rest:
        return gc_part
    return {"backbone": gc_part["backbone"], "heads": {**rest["heads"], **gc_part["heads"]}}


def disposal_step(
    network: Network, method: str, config: DisposalConfig, tx, teacher: dict, mesh: Mesh | None = None
) -> Step:
    """Knowledge disposal (METHODS.md §1): ``L_retain + λ · L_unlearn`` from the TL model.

    ``method`` is the unlearning loss on the source batch (gc, ngc, rtf, utf, ga); ``config.retain``
    the retaining loss (tgt_kd, src_kd, ce) with ``teacher`` the frozen TL model's variables.

    One code path for 1 and N devices: the step runs under ``jax.shard_map`` over the ``"data"`` axis of
    ``mesh`` (default: the first device alone). Both batches are split along their leading axis over the
    devices; for GC/NGC each device holds ``num_chunks / N`` contiguous chunks of the source batch
    (``dtl_jax.gc.sharded_collision``), the parameters outside ``config.gc_params`` held constant. Per
    step there are exactly two parameter-size all-reduces: ``G`` (or ``U``) inside GC, then one ``psum``
    of every device's ``retain_grad / N + λ · local_hvp``. (For rtf/utf/ga: one, of the mean gradient.)
    """
    lam = config.gc_lambda if method in ("gc", "ngc") else config.fooling_lambda
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), (AXIS,))

    def local(params, batch_stats, source_batch, target_batch):
        devices = jax.lax.axis_size(AXIS)

        def retain_loss(params):
            inputs = source_batch["image"] if config.retain == "src_kd" else target_batch["image"]
            variables = {"params": params, "batch_stats": batch_stats}
            logits, _, stats = network.apply(variables, inputs, head="target", train=True)
            if config.retain == "ce":
                return losses.cross_entropy(logits, target_batch["label"]), stats
            teacher_logits, _, _ = network.apply(teacher, inputs, head="target", train=False)
            return losses.distillation(logits, teacher_logits, config.temperature), stats

        def fooling_loss(params):
            variables = {"params": params, "batch_stats": batch_stats}
            logits, _, _ = network.apply(variables, source_batch["image"], head="source", train=True)
            if method == "rtf":  # the wrong labels were drawn for the whole batch (device-count invariant)
                return losses.cross_entropy(logits, source_batch["fool_label"])
            if method == "utf":
                return losses.uniform_target_fooling(logits)
            return losses.gradient_ascent(logits, source_batch["label"])

        varying = jax.lax.pcast(params, AXIS, to="varying")  # local gradients: no implicit psum
        (retain, stats), retain_grads = jax.value_and_grad(retain_loss, has_aux=True)(varying)
        if method in ("gc", "ngc"):
            gc_part, rest = split_gc_params(params, config.gc_params)

            def chunk_loss(p, chunk):
                variables = {"params": merge_params(p, rest), "batch_stats": batch_stats}
                logits, _, _ = network.apply(variables, chunk["image"], head="source", train=True)
                return losses.cross_entropy(logits, chunk["label"])

            chunks = {"image": source_batch["image"], "label": source_batch["label"]}
            unlearn, hvp = sharded_collision(
                chunk_loss,
                gc_part,
                chunks,
                config.num_chunks,
                AXIS,
                normalized=method == "ngc",
                low_memory=config.gc_low_memory,
            )
            zeros = jax.tree.map(jnp.zeros_like, rest)
            unlearn_share = merge_params(hvp, zeros)  # already a sum-type share of ∇GC
            local_grads = jax.tree.map(lambda r, u: r / devices + lam * u, retain_grads, unlearn_share)
            loss = jax.lax.psum(retain / devices, AXIS) + lam * unlearn
        else:
            unlearn, unlearn_grads = jax.value_and_grad(fooling_loss)(varying)
            local_grads = jax.tree.map(lambda r, u: (r + lam * u) / devices, retain_grads, unlearn_grads)
            unlearn = jax.lax.psum(unlearn / devices, AXIS)
            loss = jax.lax.psum(retain / devices, AXIS) + lam * unlearn
        grads = jax.lax.psum(local_grads, AXIS)  # the one fused all-reduce of gradients
        stats = jax.lax.pmean(stats, AXIS)
        return loss, grads, stats, jax.lax.psum(retain / devices, AXIS), unlearn

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P(), P(), P(), P()),
    )

    def step(state, source_batch, target_batch):
        rng, key = jax.random.split(state["rng"])
        source_batch = {"image": source_batch["image"], "label": source_batch["label"]}
        if method == "rtf":
            num_source = state["params"]["heads"]["source"]["bias"].shape[0]
            source_batch["fool_label"] = losses.random_wrong_labels(key, source_batch["label"], num_source)
        loss, grads, stats, retain, unlearn = sharded(state["params"], state["batch_stats"], source_batch, target_batch)
        new, metrics = _guarded_update(state, grads, loss, stats, rng, tx, config.max_grad_norm)
        return new, {**metrics, "retain": retain, "unlearn": unlearn}

    return jax.jit(step, donate_argnums=0)


def predict_fn(network: Network, head: str) -> Callable:
    """Jitted eval-mode forward: ``(variables, images) -> (logits, features)``."""

    def predict(variables, images):
        logits, features, _ = network.apply(variables, images, head=head, train=False)
        return logits, features

    return jax.jit(predict)
