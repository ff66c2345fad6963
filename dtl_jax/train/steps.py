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
from dtl_jax.gc import gc_loss
from dtl_jax.models import Network
from dtl_jax.train.mesh import AXIS, chunk_layout, padded_rows

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

    ``method`` names the unlearning loss on the source batch (``losses.DISPOSAL_LOSSES``: gc, ngc, rtf,
    utf, ga); ``config.retain`` the retaining loss (tgt_kd, src_kd, ce) with ``teacher`` the frozen TL
    model's variables.

    One code path for any number of devices: the step runs under ``jax.shard_map`` over the devices of
    ``mesh`` (default: the first device alone), viewed as a ``c x e`` grid (``mesh.chunk_layout``): the
    source batch's ``K`` chunks over ``c``, each chunk's examples over ``e``; the target batch split over
    all of them. It takes both batches in their natural order, in any placement
    (``mesh.place_disposal_batches`` gives one that moves no data), and lays them out itself; where a
    split is uneven it pads with repeated examples weighted 0, so that every device count gives the
    one-device result (up to float rounding; a BatchNorm model normalises over each device's part).
    GC/NGC is ``gc_loss(..., axis_name=layout.axis_name)`` over the parameters in ``config.gc_params``
    (the rest held constant). Parameter-size all-reduces per step: two where the device count divides
    ``K`` (``G`` or ``U``, then one ``psum`` of every device's ``retain_grad / N + λ · share of ∇GC``);
    otherwise ``ChunkLayout.all_reduces``. For rtf/utf/ga: one, of the mean gradient.
    """
    kind = losses.disposal_loss(method)
    lam = config.gc_lambda if kind.collision else config.fooling_lambda
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), (AXIS,))
    devices = mesh.devices.size

    def local(layout, sizes, params, batch_stats, source_batch, target_batch):
        n_source, n_target = sizes  # real examples in the global batches
        grid_axes = layout.axes

        def share(loss, mask, size, *args):
            """This device's share of the global batch mean of ``loss``: its mean over the device's rows
            divided by the device count or, with padding, its sum over the real rows divided by ``size``."""
            if mask is None:
                return loss(*args) / devices
            values = jax.vmap(lambda *a: loss(*(x[None] for x in a)))(*args)
            return jnp.sum(jnp.where(mask, values, 0.0)) / size

        def retain_loss(params):
            src = config.retain == "src_kd"
            batch, mask, size = (source_batch, source_mask, n_source) if src else (target_batch, target_mask, n_target)
            variables = {"params": params, "batch_stats": batch_stats}
            logits, _, stats = network.apply(variables, batch["image"], head="target", train=True)
            if config.retain == "ce":
                return share(losses.cross_entropy, mask, size, logits, batch["label"]), stats
            teacher_logits, _, _ = network.apply(teacher, batch["image"], head="target", train=False)
            kd = lambda s, t: losses.distillation(s, t, config.temperature)  # noqa: E731
            return share(kd, mask, size, logits, teacher_logits), stats

        def fooling_loss(params):
            variables = {"params": params, "batch_stats": batch_stats}
            logits, _, _ = network.apply(variables, source_batch["image"], head="source", train=True)
            labels = source_batch["fool_label" if kind.wrong_labels else "label"]
            return share(kind.fooling, source_mask, n_source, logits, labels)

        def chunk_loss(p, rest, chunk):
            """A chunk part's loss: the mean over its examples or, padded, ``e/m`` times their real sum, so
            that the mean over the ``e`` parts is the chunk's mean loss either way."""
            variables = {"params": merge_params(p, rest), "batch_stats": batch_stats}
            logits, _, _ = network.apply(variables, chunk["image"], head="source", train=True)
            if "mask" not in chunk:
                return losses.cross_entropy(logits, chunk["label"])
            values = jnp.where(chunk["mask"], losses.per_example_cross_entropy(logits, chunk["label"]), 0.0)
            return jnp.sum(values) * (layout.example_devices / layout.chunk_size)

        def objective(params):
            """This device's share of the step's loss (the loss is the sum of the shares over devices)."""
            retain, stats = retain_loss(params)
            if not kind.collision:
                unlearn = fooling_loss(params)  # this device's share
                return retain + lam * unlearn, (retain, unlearn, stats)
            gc_part, rest = split_gc_params(params, config.gc_params)
            chunks = {k: v for k, v in source_batch.items() if k in ("image", "label", "mask")}
            unlearn = gc_loss(
                lambda p, chunk: chunk_loss(p, rest, chunk),
                gc_part,
                chunks,
                config.num_chunks,
                normalized=kind.normalized,
                low_memory=config.gc_low_memory,
                axis_name=layout.axis_name,
            )
            # GC of the whole batch, the same on every device, so its share is GC / N. (Added to this
            # device-varying sum, its cotangent is summed over the devices: N · λ/N = λ.)
            return retain + lam * unlearn / devices, (retain, unlearn, stats)

        source_mask, target_mask = source_batch.get("mask"), target_batch.get("mask")
        varying = jax.lax.pcast(params, grid_axes, to="varying")  # local gradients: no implicit psum
        (_, (retain, unlearn, stats)), local_grads = jax.value_and_grad(objective, has_aux=True)(varying)
        grads = jax.lax.psum(local_grads, grid_axes)  # the one fused all-reduce of gradients
        retain = jax.lax.psum(retain, grid_axes)
        if not kind.collision:
            unlearn = jax.lax.psum(unlearn, grid_axes)
        stats = jax.lax.pmean(stats, grid_axes)
        return retain + lam * unlearn, grads, stats, retain, unlearn

    def lay_out(batch, rows, mask):
        if rows is not None:
            batch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)
        return batch if mask is None else {**batch, "mask": jnp.asarray(mask)}

    def step(state, source_batch, target_batch):
        rng, key = jax.random.split(state["rng"])
        source_batch = {"image": source_batch["image"], "label": source_batch["label"]}
        target_batch = {"image": target_batch["image"], "label": target_batch["label"]}
        if kind.wrong_labels:  # drawn for the whole global batch: the same draw on any device count
            num_source = state["params"]["heads"]["source"]["bias"].shape[0]
            source_batch["fool_label"] = losses.random_wrong_labels(key, source_batch["label"], num_source)
        n_source, n_target = source_batch["label"].shape[0], target_batch["label"].shape[0]
        layout = chunk_layout(devices, config.num_chunks, n_source)
        sharded = jax.shard_map(
            lambda *args: local(layout, (n_source, n_target), *args),
            mesh=layout.grid(mesh),
            in_specs=(P(), P(), P(layout.axes), P(layout.axes)),
            out_specs=(P(), P(), P(), P(), P()),
        )
        source_batch = lay_out(source_batch, *layout.source_rows())
        target_batch = lay_out(target_batch, *padded_rows(n_target, devices))
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
