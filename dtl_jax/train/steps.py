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

Data parallelism (``DataParallel``): the supervised and custom steps and the prediction function are
jitted over a 1-D ``"data"`` mesh (default: every device of every process, ``mesh.data_mesh()``) with
shardings, not ``shard_map``: the state and per-call constants are replicated, every batch is split
along its leading axis, and the loss is written, and computed, over the *global* batch (XLA's SPMD
partitioner inserts the collectives: the gradient all-reduce, and for BatchNorm the all-reduces of the
per-channel batch sums). So every device count computes the one-device function: the same losses, the
same BatchNorm statistics (over the whole global batch, a "sync BatchNorm"), the same updates, up to float
rounding (sums taken in another order). A batch whose size the device count does not divide is placed
whole on every device and, for a model without BatchNorm, split inside the step, which XLA pads to equal
parts and masks out of every reduction: still the global function, with no change to any loss; with
BatchNorm every device computes that batch whole (``DataParallel`` says why). Over a long run the
rounding differences grow as any perturbation of the trajectory does: the default run's first steps
agree with one device to 1e-7, its final accuracies to a few points. (The disposal step is the exception
to all this: it runs under ``shard_map`` for its GC layout.)
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

from dtl_jax import losses
from dtl_jax.config import DisposalConfig
from dtl_jax.gc import gc_loss
from dtl_jax.models import Network
from dtl_jax.train.mesh import AXIS, chunk_layout, data_mesh, padded_rows, replicate_batch, shard_batch

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


def replicate(mesh: Mesh, tree):
    """``tree`` placed whole on every device of ``mesh`` (leaves already so placed are kept as they are)."""
    sharding = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))  # the same value everywhere

    return jax.tree.map(place, tree)


def place_batch(mesh: Mesh, batch):
    """A global batch (a pytree of arrays sharing the leading batch axis) on ``mesh``: split along that
    axis (each process contributing its own slice, ``mesh.shard_batch``) when the device count divides
    its size, else whole on every device (``mesh.replicate_batch``; the step splits it, unevenly). A batch
    already on ``mesh`` either way is kept as it is."""
    leaves = jax.tree.leaves(batch)
    placed = (NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P()))
    if all(isinstance(x, jax.Array) and x.sharding in placed for x in leaves):
        return batch
    size = np.shape(leaves[0])[0] if leaves else 0
    return shard_batch(mesh, batch) if size % mesh.devices.size == 0 else replicate_batch(mesh, batch)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly split, possibly multi-process) array as one host array, gathered from its devices."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class DataParallel:
    """``fn(*replicated, *batches)`` jitted over the ``"data"`` axis of ``mesh`` (default: every device of
    every process), as the module docstring describes.

    The first ``replicated`` positional arguments (state, per-call constants) are placed whole on every
    device; the others are batches, pytrees of arrays whose leading axis is the batch, split over the
    axis (``place_batch``). ``fn`` is written for the global batch and computes it: on ``N`` devices the
    function of one device, each device doing ``1/N`` of the per-example work. Outputs are replicated, or
    placed as ``out_specs`` (a pytree prefix of ``PartitionSpec``) says. Calling places the arguments,
    then runs the jitted function; ``lower`` gives the compiled program (e.g. its collectives,
    ``mesh.all_reduce_sizes``). Per-call constants passed again as the same objects (reference weights
    every step) are placed once (so they must not be modified in place between calls).

    A batch that ``N`` does not divide arrives whole on every device. If ``split_uneven(*args)`` (default:
    always) the step splits it there (``with_sharding_constraint``; XLA pads the parts to equal size and
    masks the padding out of reductions); otherwise every device computes the whole batch (the one-device
    program, no speed-up for that step). ``supervised_step`` and ``custom_step`` split uneven batches only
    for models without BatchNorm: with BatchNorm, XLA's padded split gave wrong gradients (Conv, BatchNorm,
    ReLU, ``nn.max_pool``, Conv; 13 examples on 2 or 3 devices: 9e-2 off, where even splits and the same
    model without BatchNorm agree with one device to 2e-7).
    """

    def __init__(
        self, fn: Callable, mesh: Mesh | None = None, *, replicated: int = 1, donate_argnums=(), out_specs=None,
        split_uneven: Callable[..., bool] | None = None,
    ):  # fmt: skip
        self.mesh = mesh if mesh is not None else data_mesh()
        self.devices = int(self.mesh.devices.size)
        self.replicated = replicated
        self.donated = {donate_argnums} if isinstance(donate_argnums, int) else set(donate_argnums)
        self.split_uneven = split_uneven
        self._constants = None  # (leaf ids, the leaves, placed): the last per-call constants, kept alive
        split = NamedSharding(self.mesh, P(AXIS))

        def sharded(*args):
            head, batches = args[:replicated], args[replicated:]
            batches = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, split), batches)
            return fn(*head, *batches)

        out = NamedSharding(self.mesh, P()) if out_specs is None else out_specs
        out = jax.tree.map(
            lambda spec: NamedSharding(self.mesh, spec) if isinstance(spec, P) else spec,
            out,
            is_leaf=lambda x: isinstance(x, P),
        )  # fmt: skip
        self.jitted = jax.jit(sharded, donate_argnums=donate_argnums, out_shardings=out)
        self.whole = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out)  # uneven, not split

    def replicate(self, tree):
        return replicate(self.mesh, tree)

    def place(self, *args) -> tuple:
        head, batches = args[: self.replicated], args[self.replicated :]
        constants = [x for i, x in enumerate(head) if i not in self.donated]
        # per-call constants passed again as the same objects (reference weights every step) are placed once
        ids = [id(x) for x in jax.tree.leaves(constants)]
        if self._constants is None or self._constants[0] != ids:
            self._constants = (ids, jax.tree.leaves(constants), self.replicate(constants))
        placed = iter(self._constants[2])
        head = [self.replicate(x) if i in self.donated else next(placed) for i, x in enumerate(head)]
        return (*head, *(place_batch(self.mesh, b) for b in batches))

    def program(self, *args):
        """``(jitted function, placed arguments)`` for a call with ``args``."""
        placed = self.place(*args)
        uneven = any(
            np.shape(x)[0] % self.devices for b in placed[self.replicated :] for x in jax.tree.leaves(b)[:1]
        )  # fmt: skip
        if uneven and self.split_uneven is not None and not self.split_uneven(*args):
            return self.whole, placed
        return self.jitted, placed

    def __call__(self, *args):
        fn, placed = self.program(*args)
        return fn(*placed)

    def lower(self, *args):
        fn, placed = self.program(*args)
        return fn.lower(*placed)


def _without_batch_norm(state, *_) -> bool:
    return not jax.tree.leaves(state["batch_stats"])


def supervised_step(
    network: Network, head: str, tx, max_grad_norm: float = math.inf, mesh: Mesh | None = None
) -> DataParallel:
    """Cross-entropy on ``batch`` through ``head`` (pre-training, transfer, piggyback learning, FT-style
    unlearning), data-parallel over ``mesh`` (``DataParallel``: the global batch's mean loss and accuracy,
    BatchNorm over the global batch)."""

    def step(state, batch):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            logits, _, stats = network.apply(variables, batch["image"], head=head, train=True)
            loss = losses.cross_entropy(logits, batch["label"])
            return loss, (stats, jnp.mean(jnp.argmax(logits, -1) == batch["label"]))

        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new, metrics = _guarded_update(state, grads, loss, stats, state["rng"], tx, max_grad_norm)
        return new, {**metrics, "accuracy": acc}

    return DataParallel(step, mesh, replicated=1, donate_argnums=0, split_uneven=_without_batch_norm)


def custom_step(
    loss_fn: Callable, tx, max_grad_norm: float = math.inf, project: Callable | None = None, mesh: Mesh | None = None
) -> DataParallel:
    """A step for any loss: ``step(state, aux, *batches)``, data-parallel over ``mesh`` (``DataParallel``).

    ``loss_fn(params, batch_stats, key, aux, *batches) -> (loss, (batch_stats, metrics))`` is written for
    the global batches (every leaf of a batch has the batch as its leading axis); ``aux`` is a per-call
    pytree that is not donated and is replicated (a schedule value, a mask, reference weights).
    ``project(params, aux)``, if given, is applied to the updated parameters (e.g. SalUn keeps masked
    weights at their original values).
    """

    def step(state, aux, *batches):
        rng, key = jax.random.split(state["rng"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], key, aux, *batches)
        new, out = _guarded_update(state, grads, loss, stats, rng, tx, max_grad_norm)
        if project is not None:
            new["params"] = project(new["params"], aux)
        return new, {**out, **metrics}

    return DataParallel(step, mesh, replicated=2, donate_argnums=0, split_uneven=_without_batch_norm)


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


def disposal_step(network: Network, method: str, config: DisposalConfig, tx, mesh: Mesh | None = None) -> Step:
    """Knowledge disposal (METHODS.md §1): ``step(state, teacher, source_batch, target_batch)``, one step of
    ``L_retain + λ · L_unlearn`` from the TL model.

    ``method`` names the unlearning loss on the source batch (``losses.DISPOSAL_LOSSES``: gc, ngc, rtf,
    utf, ga); ``config.retain`` the retaining loss (tgt_kd, src_kd, ce) with ``teacher`` the frozen TL
    model's variables. The teacher is an argument (not donated), not a constant of the program, so one
    compiled step serves every seed of a multi-seed run.

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

    def local(layout, sizes, params, batch_stats, teacher, source_batch, target_batch):
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

    def step(state, teacher, source_batch, target_batch):
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
            in_specs=(P(), P(), P(), P(layout.axes), P(layout.axes)),
            out_specs=(P(), P(), P(), P(), P()),
        )
        source_batch = lay_out(source_batch, *layout.source_rows())
        target_batch = lay_out(target_batch, *padded_rows(n_target, devices))
        loss, grads, stats, retain, unlearn = sharded(
            state["params"], state["batch_stats"], teacher, source_batch, target_batch
        )
        new, metrics = _guarded_update(state, grads, loss, stats, rng, tx, config.max_grad_norm)
        return new, {**metrics, "retain": retain, "unlearn": unlearn}

    # Everything out replicated on ``mesh``: a state placed so (``replicate``) comes back with the same
    # sharding, so the step compiles once, not once more for the shard_map grid's sharding of its output.
    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def predict_fn(network: Network, head: str, mesh: Mesh | None = None) -> DataParallel:
    """Eval-mode forward, data-parallel over ``mesh``: ``(variables, images) -> (logits, features)``, the
    logits replicated (every process reads them whole), the features left split over the devices (gathered
    by ``to_host`` only when asked for: ``evaluate.predict``)."""

    def predict(variables, images):
        logits, features, _ = network.apply(variables, images, head=head, train=False)
        return logits, features

    return DataParallel(predict, mesh, replicated=1, out_specs=(P(), P(AXIS)))
