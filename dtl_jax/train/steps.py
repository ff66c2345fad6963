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
shardings, not ``shard_map``: the state and per-call constants are replicated (placed once, by the
caller: ``replicate``, ``init_state(..., mesh)``), every batch is split
along its leading axis, and the loss is written, and computed, over the *global* batch (XLA's SPMD
partitioner inserts the collectives: the gradient all-reduce, and for BatchNorm the all-reduces of the
per-channel batch sums). So every device count computes the one-device function: the same losses, the
same BatchNorm statistics (over the whole global batch, a "sync BatchNorm"), the same updates, up to float
rounding (sums taken in another order). A batch whose size the device count does not divide is placed
whole on every device and, for a model without BatchNorm, split inside the step, which XLA pads to equal
parts and masks out of every reduction: still the global function, with no change to any loss; with
BatchNorm every device computes that batch whole (``DataParallel`` says why). Over a long run the
rounding differences grow as any perturbation of the trajectory does: the default run's first steps
agree with one device to float rounding, its final accuracies to a few points. (The disposal step,
``dtl_jax.train.disposal_step``, is the exception to all this: it runs under ``shard_map`` for its GC
layout.)
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
from dtl_jax.models import Network
from dtl_jax.train.mesh import AXIS, data_mesh, replicate_batch, shard_batch

Step = Callable


def init_state(variables: dict, tx: optax.GradientTransformation, seed: int, mesh: Mesh | None = None) -> dict:
    """A fresh train state over a *copy* of ``variables`` (steps donate the state, the caller keeps its
    arrays), built on the default device from a host copy; with ``mesh``, placed whole on every device of it
    (``replicate``), where a step wants it."""
    if mesh is not None:
        return replicate(mesh, init_state(variables, tx, seed))
    variables = jax.tree.map(jnp.asarray, jax.device_get(variables))
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


def guarded_update(state, grads, loss, batch_stats, rng, tx, max_grad_norm):
    """The update of ``tx`` applied only where the step is sound, else the divergence guard (module docstring).

    ``optax.apply_if_finite`` does part of this and is not used because it does less: it looks at the
    gradients' finiteness only (not the loss, not a bound on the loss or the gradient norm), it applies the
    update anyway after ``max_consecutive_errors`` bad steps, it cannot hold back the BatchNorm statistics
    (outside optax's state) of a rejected step, and it does not stop the stage or record where it stopped.
    Here a rejected step keeps parameters, BatchNorm statistics and optimiser state, and ``halted`` (with
    ``halted_at``) makes every later step a no-op, which the loop sees and stops on."""
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
        return np.asarray(jax.device_get(x))  # an explicit transfer (``jax.transfer_guard``)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class DataParallel:
    """``fn(*replicated, *batches)`` jitted over the ``"data"`` axis of ``mesh`` (default: every device of
    every process), as the module docstring describes.

    The first ``replicated`` positional arguments (the state, per-call constants) are the caller's to place,
    once, whole on every device (``replicate``; the state comes back so placed, ``out_shardings``): the
    step passes them to ``jax.jit`` as they are, with ``in_shardings`` saying where they must be, so an
    argument left on the host or on another device is an implicit transfer (which
    ``jax.transfer_guard("disallow")`` turns into an error) and one placed otherwise on the mesh an error.
    The other arguments are batches, pytrees of arrays whose leading axis is the batch: new data every call,
    placed by the step (``place_batch``, an explicit transfer), split along that axis. ``fn`` is written for
    the global batch and computes it: on ``N`` devices the function of one device, each device doing ``1/N``
    of the per-example work. Outputs are replicated, or placed as ``out_specs`` (a pytree prefix of
    ``PartitionSpec``) says. ``lower`` gives the compiled program (e.g. its collectives,
    ``mesh.all_reduce_sizes``).

    A batch that ``N`` does not divide arrives whole on every device. If ``split_uneven(*args)`` (default:
    always) the step splits it there (``with_sharding_constraint``; XLA pads the parts to equal size and
    masks the padding out of reductions); otherwise every device computes the whole batch (the one-device
    program, no speed-up for that step). ``supervised_step`` and ``custom_step`` split uneven batches only
    for models without BatchNorm: with BatchNorm, XLA's padded split gave wrong gradients (Conv, BatchNorm,
    ReLU, ``nn.max_pool``, Conv; 13 examples on 2 or 3 devices), where even splits and the same model
    without BatchNorm agree with one device to float rounding.
    """

    def __init__(
        self, fn: Callable, mesh: Mesh | None = None, *, replicated: int = 1, donate_argnums=(), out_specs=None,
        split_uneven: Callable[..., bool] | None = None,
    ):  # fmt: skip
        self.fn = fn
        self.mesh = mesh if mesh is not None else data_mesh()
        self.devices = int(self.mesh.devices.size)
        self.replicated = replicated
        self.donate_argnums = donate_argnums
        self.split_uneven = split_uneven
        self._whole = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))
        out = self._whole if out_specs is None else out_specs
        self._out = jax.tree.map(
            lambda spec: NamedSharding(self.mesh, spec) if isinstance(spec, P) else spec,
            out,
            is_leaf=lambda x: isinstance(x, P),
        )  # fmt: skip
        self._programs: dict[tuple[tuple[bool, ...], str], Callable] = {}  # (arrivals, mode) -> jitted

    def replicate(self, tree):
        """``tree`` placed whole on every device of the mesh (explicitly; placed leaves are kept)."""
        return replicate(self.mesh, tree)

    def jitted(self, arrivals: tuple[bool, ...], mode: str = "split") -> Callable:
        """The jitted function for batches that arrive split (``True``) or whole (``False``), in order;
        ``mode``: ``split`` (every batch split; the whole ones inside, ``with_sharding_constraint``) or
        ``whole`` (the whole ones computed whole on every device)."""
        if (arrivals, mode) not in self._programs:
            batches = tuple(self._split if split else self._whole for split in arrivals)
            fn = self.fn if mode == "whole" else self._constrained
            self._programs[arrivals, mode] = jax.jit(
                fn, in_shardings=(self._whole,) * self.replicated + batches, out_shardings=self._out,
                donate_argnums=self.donate_argnums,
            )  # fmt: skip
        return self._programs[arrivals, mode]

    def _constrained(self, *args):
        head, batches = args[: self.replicated], args[self.replicated :]
        batches = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self._split), batches)
        return self.fn(*head, *batches)

    def program(self, *args):
        """``(jitted function, arguments with the batches placed)`` for a call with ``args``, and so the
        mode: ``split``, or ``whole`` where ``split_uneven`` rejects an uneven batch."""
        head, batches = args[: self.replicated], [place_batch(self.mesh, b) for b in args[self.replicated :]]
        firsts = [jax.tree.leaves(b)[0] for b in batches if jax.tree.leaves(b)]
        arrivals = tuple(x.sharding == self._split for x in firsts)
        uneven = any(x.shape[0] % self.devices for x in firsts)
        rejected = uneven and self.split_uneven is not None and not self.split_uneven(*args)
        return self.jitted(arrivals, "whole" if rejected else "split"), (*head, *batches)

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
        new, metrics = guarded_update(state, grads, loss, stats, state["rng"], tx, max_grad_norm)
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
        new, out = guarded_update(state, grads, loss, stats, rng, tx, max_grad_norm)
        if project is not None:
            new["params"] = project(new["params"], aux)
        return new, {**out, **metrics}

    return DataParallel(step, mesh, replicated=2, donate_argnums=0, split_uneven=_without_batch_norm)


def predict_fn(network: Network, head: str, mesh: Mesh | None = None) -> DataParallel:
    """Eval-mode forward, data-parallel over ``mesh``: ``(variables, images) -> (logits, features)``, the
    logits replicated (every process reads them whole), the features left split over the devices (gathered
    by ``to_host`` only when asked for: ``evaluate.predict``)."""

    def predict(variables, images):
        logits, features, _ = network.apply(variables, images, head=head, train=False)
        return logits, features

    return DataParallel(predict, mesh, replicated=1, out_specs=(P(), P(AXIS)))
