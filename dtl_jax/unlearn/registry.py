"""The method registry: a method is one function ``run(ctx) -> variables`` in one file of
``dtl_jax/unlearn/methods/``, registered with ``@register(name)``. Files there are discovered
automatically, so adding a method touches one file.

A method receives a ``Context`` (the original model, the scenario splits, the config, helpers to make
batches, optimisers and to run its jitted step through the shared loop) and returns the unlearned model's
variables ``{"params", "batch_stats"}`` with the classifier head ``"classes"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator

import jax
import numpy as np

from dtl_jax import seeds
from dtl_jax.config import Config, OptimConfig
from dtl_jax.data import pipeline
from dtl_jax.data.sources import ImageSplit
from dtl_jax.errors import UserError
from dtl_jax.models import Network
from dtl_jax.train import loop, steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.mesh import data_mesh
from dtl_jax.train.metrics import MetricsWriter
from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn.scenario import Scenario

HEAD = "classes"
METHODS: dict[str, Callable] = {}


def register(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return wrap


def load_methods() -> dict[str, Callable]:
    """Imports every module of ``dtl_jax/unlearn/methods/`` (each registers its methods) and returns the
    registry: the one list of unlearning methods, which config validation, the CLI and the runner read."""
    from dtl_jax.unlearn import methods

    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda m: m.name):
        importlib.import_module(f"{methods.__name__}.{info.name}")
    return METHODS


ORACLE = "retrain"  # the reference every other method is compared with; listed first


def method_names() -> tuple[str, ...]:
    """Every registered method's name, the oracle (Retrain) first, then in registration order."""
    names = tuple(load_methods())
    return tuple(sorted(names, key=lambda name: name != ORACLE))


def resolve(names: tuple[str, ...], key: str = "unlearn.methods") -> dict[str, Callable]:
    """The methods called ``names`` (``()``: every method, Retrain first), by name; an unknown name is a
    one-line ``UserError`` naming ``key`` (where the names came from) and the known methods."""
    known = method_names()
    for name in names:
        if name not in known:
            raise UserError(f"{key}={name!r}: expected one of {', '.join(known)}")
    return {name: METHODS[name] for name in names or known}


@dataclasses.dataclass
class Context:
    config: Config
    network: Network
    scenario: Scenario
    original: dict
    seed: int
    quiet: bool = False
    history: list = dataclasses.field(default_factory=list)
    stage: CheckpointedStage | None = None  # mid-run checkpoints of each ctx.run call, one part each
    writer: MetricsWriter | None = None

    @property
    def u(self):
        return self.config.unlearn

    def stream(self, purpose: str, *index: int) -> int:
        """The seed of the run's ``unlearn-<purpose>`` stream (``dtl_jax.seeds``); ``index`` e.g. a
        method's stream number."""
        return seeds.derive(self.seed, f"unlearn-{purpose}", *index)

    def key(self, purpose: str, *index: int) -> jax.Array:
        """A JAX PRNG key on the run's ``unlearn-<purpose>`` stream (e.g. Retrain's initialisation)."""
        return seeds.key(self.seed, f"unlearn-{purpose}", *index)

    def batches(
        self, split: ImageSplit, batch_size: int | None = None, seed: int = 0, flip: bool | None = None,
        drop_last: bool = True,
    ):  # fmt: skip
        """Endless shuffled epochs of ``split`` (``pipeline.shuffled_batches``). ``drop_last=False`` keeps
        the last partial batch, so that every example is visited once an epoch (the baselines' references)."""
        d = self.config.data
        return pipeline.shuffled_batches(
            split, batch_size or self.u.optim.batch_size, self.stream("batches", seed), mean=d.mean, std=d.std,
            flip=d.flip if flip is None else flip, drop_last=drop_last,
        )  # fmt: skip

    def steps_per_epoch(self, split: ImageSplit, batch_size: int | None = None, drop_last: bool = True) -> int:
        return pipeline.steps_per_epoch(split, batch_size or self.u.optim.batch_size, drop_last)

    def optimizer(self, total_steps: int, learning_rate: float | None = None, optim: OptimConfig | None = None):
        optim = optim or self.u.optim
        if learning_rate is not None:
            optim = dataclasses.replace(optim, learning_rate=learning_rate)
        return make_optimizer(optim, total_steps)

    def train(self, step, variables: dict, tx, inputs: Iterator[tuple], num_steps: int, desc: str) -> dict:
        """Runs ``step`` (a ``steps.custom_step`` or ``steps.supervised_step``) ``num_steps`` times from
        ``variables`` with a fresh optimiser state through the shared loop; returns the final variables."""
        state = self.run(step, self.init_state(variables, tx), inputs, num_steps, desc)
        return steps.variables_of(state)

    def init_state(self, variables: dict, tx) -> dict:
        """A fresh train state (parameters, BatchNorm statistics, ``tx``'s optimiser state) for ``run``."""
        return steps.init_state(variables, tx, self.stream("rng"))

    def run(self, step, state: dict, inputs: Iterator[tuple], num_steps: int, desc: str) -> dict:
        """Like ``train`` but from and to a whole train state, so that phases built on the same ``tx``
        share one optimiser (momentum, schedule count, halted flag carry over; SCRUB's max/min phases).
        A state the divergence guard already halted is returned as it is. ``steps.supervised_step`` and
        ``steps.custom_step`` run data-parallel over every device (their default mesh); ``history`` records
        the device count of each run (``devices``)."""
        devices = getattr(step, "devices", 1)  # a steps.DataParallel step runs on its mesh's devices
        if bool(jax.device_get(state["halted"])):
            self.history.append({"desc": desc, "steps": 0, "halted_at": int(jax.device_get(state["halted_at"])),
                                 "last_loss": None, "devices": devices})  # fmt: skip
            return state
        if isinstance(step, steps.DataParallel):
            state = step.replicate(state)  # placed once for the whole run (a no-op for a placed state)
        part = desc.replace(" ", "-")
        with self.stage.progress(part) if self.stage is not None else contextlib.nullcontext() as progress:
            state, history, halted_at = loop.run_steps(
                step, state, inputs, num_steps, desc=desc, quiet=self.quiet, progress=progress, writer=self.writer
            )
        self.history.append({"desc": desc, "steps": len(history), "halted_at": halted_at,
                             "last_loss": history[-1]["loss"] if history else None, "devices": devices})  # fmt: skip
        return state

    def random_labels(self, split: ImageSplit, seed: int) -> ImageSplit:
        """``split`` with labels drawn uniformly at random (RL, SalUn)."""
        rng = np.random.default_rng(self.stream("labels", seed))
        return ImageSplit(split.images, rng.integers(0, self.scenario.num_classes, len(split)).astype(np.int32))


def cycle(*streams: Iterator) -> Iterator[tuple]:
    """Zips endless batch streams into the tuples a step takes."""
    return zip(*streams)


def constant(value, mesh=None) -> Iterator:
    """``value`` at every step, placed once, whole on every device of ``mesh`` (default: every device, the
    mesh the steps run on by default): a per-call constant of a ``steps.custom_step``."""
    value = steps.replicate(mesh if mesh is not None else data_mesh(), value)
    while True:
        yield value
