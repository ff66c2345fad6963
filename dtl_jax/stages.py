"""The four stages of disposable transfer learning (METHODS.md §1), each checkpointed under its stage key.

    pre-train (source) ─▶ transfer (target) ─▶ [re-fit source head] ─▶ disposal (one per method)
                                                                      ─▶ piggyback learning (one per model,
                                                                         attacker budget and draw)

``stage_key(config, stage, method)`` names a stage's checkpoint by a hash of exactly the config fields
the stage reads (``STAGE_FIELDS``) and the key of the stage it starts from, so a later run in the same
workdir reuses every stage whose inputs are unchanged: changing ``disposal.gc_lambda`` re-runs only the
GC and NGC disposals and their piggyback learning; adding a method re-runs nothing else.

Every random choice draws from its own stream (``dtl_jax.seeds``). Held-out checks read validation
splits only, never a test split (METHODS.md §3).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from dtl_jax import checkpoint, evaluate, seeds
from dtl_jax.checkpoint import Progress
from dtl_jax.config import Config, OptimConfig, UserError, validate
from dtl_jax.data import pipeline
from dtl_jax.data.sources import ImageSplit
from dtl_jax.data.tasks import Task, attacker_task, budgets, few_shot_task, make_task
from dtl_jax.losses import cross_entropy, disposal_loss
from dtl_jax.models import Network, apply_head, build, init_head
from dtl_jax.train import steps
from dtl_jax.train.loop import Bookkeeping, run_steps
from dtl_jax.train.mesh import data_mesh, place_disposal_batches
from dtl_jax.train.metrics import MetricsWriter
from dtl_jax.train.optim import heads_trainable, make_optimizer
from dtl_jax.workdir import fingerprint

# ---------------------------------------------------------------------------------------------------
# Stage identity

_OPTIM = tuple(f.name for f in dataclasses.fields(OptimConfig))
_IMAGES = ("data.image_size", "data.channels", "data.mean", "data.std", "data.flip", "data.val_fraction")

STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # the config fields each stage reads, besides the key of the stage it starts from
    "pretrain": ("seed", "data.source", *_IMAGES, "model", "pretrain"),
    "transfer": ("data.target", "transfer"),
    "refit": (),  # the transfer stage's optimiser and the source data, both in the transfer key
    "random_init": ("seed", "model", "data.source", "data.target", *_IMAGES),
    "disposal": (
        "data.piggyback_fraction",
        "piggyback.shots",  # the held-out probe's labelled draw
        "disposal.retain",
        "disposal.temperature",
        "disposal.source_batch_size",
        "disposal.steps",
        "disposal.eval_every",
        "disposal.max_target_drop",
        "disposal.selection",
        "disposal.max_grad_norm",
        "disposal.refit_source_head",
        "disposal.optim",
    ),  # fmt: skip
    "disposal:collision": ("disposal.gc_lambda", "disposal.num_chunks", "disposal.chunking", "disposal.gc_params"),
    "disposal:fooling": ("disposal.fooling_lambda",),
    "piggyback": ("data.piggyback", "piggyback.curve_every", *(f"piggyback.{name}" for name in _OPTIM)),
}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def stage_inputs(config: Config, stage: str, method: str = "", **extra) -> dict:
    """What ``stage`` (for ``method``: a disposal method, or the model a PL run starts from) reads: its
    config fields and the key of the stage it starts from."""
    fields = list(STAGE_FIELDS[stage])
    after = None
    if stage == "transfer":
        after = stage_key(config, "pretrain")
    elif stage == "refit":
        after = stage_key(config, "transfer")
    elif stage == "disposal":
        kind = disposal_loss(method)
        fields += STAGE_FIELDS["disposal:collision" if kind.collision else "disposal:fooling"]
        after = stage_key(config, "refit" if config.disposal.refit_source_head else "transfer")
    elif stage == "piggyback":
        after = model_key(config, method)
    inputs = {name: _get(config, name) for name in fields}
    return {"stage": stage, "method": method, "after": after, "fields": inputs, **extra}


def stage_key(config: Config, stage: str, method: str = "", **extra) -> str:
    """``<stage>[-<method>]-<hash of stage_inputs>``: the stage's checkpoint folder name."""
    name = f"{stage}-{method}" if method else stage
    suffix = "".join(f"-{k}{v}" for k, v in extra.items())
    return f"{name}{suffix}-{fingerprint(stage_inputs(config, stage, method, **extra))}"


def model_key(config: Config, model: str) -> str:
    """The key of the stage that made ``model`` (random_init, tl or a disposal method)."""
    if model == "random_init":
        return stage_key(config, "random_init")
    if model == "tl":
        return stage_key(config, "transfer")
    return stage_key(config, "disposal", model)


# ---------------------------------------------------------------------------------------------------
# The experiment: tasks, network, mesh and the jitted functions


class Compiled:
    """Jitted functions built once per key, a tuple of config values (never object identities): one
    ``Compiled`` shared by every seed of a multi-seed run compiles each step once."""

    def __init__(self):
        self._functions: dict = {}

    def get(self, key: tuple, build: Callable):
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]


@dataclasses.dataclass
class Experiment:
    """What every stage needs: config, tasks, network, mesh and the jitted functions."""

    config: Config
    workdir: Path
    source: Task
    target: Task
    attacker: Task  # the task piggyback learning draws its labelled subsets from
    network: Network
    mesh: Mesh
    writer: MetricsWriter
    compiled: Compiled
    quiet: bool = False

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.source.train.images.shape[1:])

    def stream(self, purpose: str, *index: int) -> int:
        return seeds.derive(self.config.seed, purpose, *index)

    def batches(self, split, batch_size, purpose: str, *index: int):
        d = self.config.data
        seed = self.stream(purpose, *index)
        return pipeline.shuffled_batches(split, batch_size, seed, mean=d.mean, std=d.std, flip=d.flip)

    @property
    def devices(self) -> int:
        """The devices of ``mesh``, which every stage runs data-parallel on."""
        return int(self.mesh.devices.size)

    def predict(self, variables, split, head, features: bool = True):
        """``(logits, features)`` of ``split`` in eval mode, data-parallel over ``mesh`` (``features``: the
        features are gathered to the host only when asked for, else ``None``)."""
        key = ("predict", self.config.model, head, self.mesh)
        fn = self.compiled.get(key, lambda: steps.predict_fn(self.network, head, self.mesh))
        d = self.config.data
        size = self.config.eval.batch_size
        return evaluate.predict(fn, variables, split, batch_size=size, mean=d.mean, std=d.std, features=features)

    def accuracy(self, variables, split, head) -> float:
        logits, _ = self.predict(variables, split, head, features=False)
        return evaluate.accuracy(logits, split.labels)

    def checkpoint_dir(self, key: str) -> Path:
        return self.workdir / "checkpoints" / key


def build_experiment(config: Config, workdir, quiet: bool = False, compiled: Compiled | None = None) -> Experiment:
    c = validate(config)
    source = make_task("source", c.data.source, c.data, seeds.derive(c.seed, "source-split"))
    target = make_task("target", c.data.target, c.data, seeds.derive(c.seed, "target-split"))
    if source.train.images.shape[1:] != target.train.images.shape[1:]:
        raise UserError(
            f"source images {source.train.images.shape[1:]} and target images {target.train.images.shape[1:]} "
            "differ: set data.image_size and data.channels so that they match"
        )
    attacker = attacker_task(source, c.data, seeds.derive(c.seed, "attacker-split"))
    d = c.disposal
    collision = any(disposal_loss(m).collision for m in d.methods)
    if collision and d.chunking == "by_class" and d.num_chunks > source.num_classes:
        raise UserError(
            f"disposal.num_chunks={d.num_chunks} with chunking=by_class needs at least as many source classes; "
            f"the source task has {source.num_classes}"
        )
    mesh = data_mesh(d.devices)
    return Experiment(
        c, Path(workdir), source, target, attacker, build(c.model), mesh, MetricsWriter(workdir),
        compiled or Compiled(), quiet,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Supervised stages


def _progress(exp: Experiment, directory: Path) -> Progress | None:
    every = exp.config.checkpoint_every
    return Progress(directory.with_name(directory.name + ".progress"), every) if every else None


def _finish(directory: Path, tree, meta: dict) -> None:
    """Writes a stage's checkpoint, then removes its mid-stage checkpoints."""
    checkpoint.save(directory, tree, meta)
    checkpoint.remove(directory.with_name(directory.name + ".progress"))


def _supervised(
    exp: Experiment, name: str, variables, task: Task, head: str, optim: OptimConfig, trainable_heads, seed: int,
    directory: Path, on_epoch=None, bookkeeping=None,
):  # fmt: skip
    """Trains ``head`` and the backbone (the other heads frozen when ``trainable_heads`` names the
    trainable ones) with CE on ``task.train`` for ``optim.epochs``, data-parallel over ``exp.mesh``
    (``steps.supervised_step``); mid-stage checkpoints beside ``directory``. The status it returns records
    the devices the stage ran on (``devices``)."""
    per_epoch = pipeline.steps_per_epoch(task.train, optim.batch_size)
    total = per_epoch * optim.epochs

    def build_step():
        trainable = heads_trainable(*trainable_heads) if trainable_heads else None
        tx = make_optimizer(optim, total, trainable)
        return tx, steps.supervised_step(exp.network, head, tx, mesh=exp.mesh)

    key = ("supervised", exp.config.model, head, optim, total, trainable_heads, exp.mesh)
    tx, step = exp.compiled.get(key, build_step)
    state = steps.init_state(variables, tx, seed)
    d = exp.config.data
    stream = pipeline.shuffled_batches(task.train, optim.batch_size, seed, mean=d.mean, std=d.std, flip=d.flip)
    progress = _progress(exp, directory)
    state, history, halted_at = run_steps(
        step, state, ((b,) for b in stream), total, desc=name, every=per_epoch, on_check=on_epoch, quiet=exp.quiet,
        progress=progress, bookkeeping=bookkeeping, writer=exp.writer,
    )  # fmt: skip
    if progress is not None:
        progress.close()
    resumed = progress.resumed_from if progress is not None else 0
    status = {"halted_at": halted_at, "resumed_from": resumed, "devices": exp.devices}
    return steps.variables_of(state), history, status


def initial_model(exp: Experiment) -> dict:
    """Backbone and source head at their (seeded) initialisation."""
    return exp.network.init(exp_key(exp, "pretrain-init"), exp.image_shape, {"source": exp.source.num_classes})


def exp_key(exp: Experiment, purpose: str, *index: int) -> jax.Array:
    return seeds.key(exp.config.seed, purpose, *index)


def pretrain(exp: Experiment) -> tuple[dict, dict]:
    """Stage 1: backbone + source head, cross-entropy on the source task."""
    c = exp.config
    directory = exp.checkpoint_dir(stage_key(c, "pretrain"))
    variables = initial_model(exp)
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, variables)
    start = time.perf_counter()
    seed = exp.stream("pretrain-batches")
    variables, history, status = _supervised(
        exp, "pretrain", variables, exp.source, "source", c.pretrain, None, seed, directory
    )
    meta = {"history": history, **status, "seconds": time.perf_counter() - start}
    _finish(directory, variables, meta)
    return variables, meta


def transfer(exp: Experiment, pretrained: dict) -> tuple[dict, dict]:
    """Stage 2: a fresh target head; backbone and target head fine-tuned on the target task (the source
    head is kept, frozen): the TL model."""
    c = exp.config
    directory = exp.checkpoint_dir(stage_key(c, "transfer"))
    feature_dim = pretrained["params"]["heads"]["source"]["kernel"].shape[0]
    head = init_head(exp_key(exp, "transfer-head"), feature_dim, exp.target.num_classes)
    variables = {
        "params": {
            "backbone": pretrained["params"]["backbone"],
            "heads": {**pretrained["params"]["heads"], "target": head},
        },
        "batch_stats": pretrained["batch_stats"],
    }
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, variables)
    start = time.perf_counter()
    seed = exp.stream("transfer-batches")
    variables, history, status = _supervised(
        exp, "transfer", variables, exp.target, "target", c.transfer, ("target",), seed, directory
    )
    meta = {"history": history, **status, "seconds": time.perf_counter() - start}
    _finish(directory, variables, meta)
    return variables, meta


def fit_head(
    exp: Experiment, head: dict, features: np.ndarray, labels: np.ndarray, optim: OptimConfig, seed: int
) -> tuple[dict, list[dict]]:
    """Fits a linear head on fixed features (CE, ``optim``'s optimiser, epochs and batch size; shuffled
    full batches, a split smaller than a batch sampled with replacement), data-parallel over ``exp.mesh``
    (``steps.DataParallel``: each batch of features split over the devices). Returns the head and the mean
    loss of every epoch."""
    n = len(labels)
    per_epoch = pipeline.steps_per_epoch(ImageSplit(features, labels), optim.batch_size)
    total = per_epoch * optim.epochs

    def build_step():
        tx = make_optimizer(optim, total)

        def step(head, opt_state, x, y):
            loss, grads = jax.value_and_grad(lambda h: cross_entropy(apply_head(h, x), y))(head)
            updates, opt_state = tx.update(grads, opt_state, head)
            return optax.apply_updates(head, updates), opt_state, loss

        return tx, steps.DataParallel(step, exp.mesh, replicated=2, donate_argnums=(0, 1))

    tx, step = exp.compiled.get(("head", optim, total, exp.mesh), build_step)
    head = jax.tree.map(jnp.array, head)
    opt_state = tx.init(head)
    rng = np.random.default_rng(seed)
    features, labels = np.asarray(features), np.asarray(labels, np.int32)
    history = []
    for epoch in range(optim.epochs):
        order = rng.permutation(n) if n >= optim.batch_size else rng.choice(n, optim.batch_size, replace=True)
        losses = []
        for i in range(per_epoch):
            index = order[i * optim.batch_size : (i + 1) * optim.batch_size]
            head, opt_state, loss = step(head, opt_state, features[index], labels[index])
            losses.append(loss)
        history.append({"step": (epoch + 1) * per_epoch, "loss": float(np.mean(jax.device_get(losses)))})
    return jax.device_get(head), history


def refit_source_head(exp: Experiment, tl: dict) -> tuple[dict, dict]:
    """Optional (``disposal.refit_source_head``): re-fit the stale source head on the frozen TL backbone;
    returns ``(variables, meta)``.

    The backbone is frozen in fact: its features of the source training data are computed once, in eval
    mode (BatchNorm statistics untouched), and the head (starting from its pre-trained values) is fitted
    on them with the transfer stage's optimiser and epochs. Checkpointed: every method shares it."""
    c = exp.config
    directory = exp.checkpoint_dir(stage_key(c, "refit"))
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, tl)
    start = time.perf_counter()
    _, features = exp.predict(tl, exp.source.train, "source")
    head, history = fit_head(
        exp, tl["params"]["heads"]["source"], features, exp.source.train.labels, c.transfer, exp.stream("refit")
    )
    variables = {
        "params": {"backbone": tl["params"]["backbone"], "heads": {**tl["params"]["heads"], "source": head}},
        "batch_stats": tl["batch_stats"],
    }
    meta = {"history": history, "devices": exp.devices, "seconds": time.perf_counter() - start}
    checkpoint.save(directory, variables, meta)
    return variables, meta


# ---------------------------------------------------------------------------------------------------
# Disposal


class DisposalMonitor(Bookkeeping):
    """Disposal's held-out checks, stopping rule and selection, and their record for mid-stage
    checkpoints.

    Every ``disposal.eval_every`` steps it measures (``check``) the target accuracy on ``target.val``,
    the source-head accuracy on ``source.val`` and a linear probe's source accuracy (fitted on a labelled
    draw of the attacker's size, scored on ``source.val``): validation splits only. When the target
    accuracy falls more than ``disposal.max_target_drop`` below the TL model's, the stage stops. The
    stage returns, among the checked states within the margin (the starting model included), the last
    one (``selection=last``) or the one with the lowest probe accuracy (``min_probe``). Without validation
    splits (``data.val_fraction=0``; config validation allows it only when neither rule is on) there are
    no checks and the last state is returned.
    """

    def __init__(self, exp: Experiment, start: dict, teacher: dict):
        self.exp = exp
        d = exp.config.disposal
        self.max_drop, self.selection = d.max_target_drop, d.selection
        self.enabled = len(exp.target.val) > 0 and len(exp.source.val) > 0
        per_class = budgets(exp.source, exp.config.piggyback.shots, exp.config.data.piggyback_fraction)[0]
        self.probe_train = few_shot_task(exp.source, per_class, exp.stream("probe-subset")).train
        self.tl_val = exp.accuracy(teacher, exp.target.val, "target") if self.enabled else None
        self.checks: list[dict] = []
        self.stopped_at: int | None = None
        self.best = {"step": 0, "probe": None, "variables": jax.device_get(start)}
        if self.enabled:
            first = self.check(0, start, self.tl_val)
            self.checks.append(first)
            self.best["probe"] = first["probe_acc"]

    def check(self, step: int, variables: dict, target_acc: float | None = None) -> dict:
        exp = self.exp
        if target_acc is None:
            target_acc = exp.accuracy(variables, exp.target.val, "target")
        val_logits, val_features = exp.predict(variables, exp.source.val, "source")
        _, train_features = exp.predict(variables, self.probe_train, "source")
        return {
            "step": step,
            "target_val_acc": target_acc,
            "source_val_acc": evaluate.accuracy(val_logits, exp.source.val.labels),
            "probe_acc": evaluate.linear_probe_accuracy(
                train_features, self.probe_train.labels, val_features, exp.source.val.labels
            ),
        }

    def on_check(self, state: dict, done: int) -> bool:
        """Measures the state after ``done`` steps; returns True to stop the stage."""
        variables = steps.variables_of(state)
        if not self.enabled:
            self.best.update(step=done, variables=jax.device_get(variables))
            return False
        check = self.check(done, variables)
        self.checks.append(check)
        if self.tl_val - check["target_val_acc"] > self.max_drop:
            self.stopped_at = done
            return True
        if self.selection == "last" or check["probe_acc"] <= self.best["probe"]:
            self.best.update(step=done, probe=check["probe_acc"], variables=jax.device_get(variables))
        return False

    def dump(self):
        data = {"checks": self.checks, "best_step": self.best["step"], "best_probe": self.best["probe"]}
        return {**data, "stopped": self.stopped_at}, self.best["variables"]

    def load(self, data, arrays):
        self.checks[:] = data["checks"]
        self.best.update(step=data["best_step"], probe=data["best_probe"], variables=arrays)
        self.stopped_at = data["stopped"]


def dispose(exp: Experiment, method: str, tl: dict) -> tuple[dict, dict]:
    """Stage 3: ``L_retain + λ · L_unlearn`` from the TL model (``method`` names ``L_unlearn``), watched
    by a ``DisposalMonitor``."""
    c = exp.config
    d = c.disposal
    directory = exp.checkpoint_dir(stage_key(c, "disposal", method))
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, tl)
    start_time = time.perf_counter()
    teacher = steps.replicate(exp.mesh, tl)  # an argument of the step: the seeds share its program
    start = refit_source_head(exp, tl)[0] if d.refit_source_head else tl

    def build_step():
        tx = make_optimizer(d.optim, d.steps)
        return tx, steps.disposal_step(exp.network, method, d, tx, exp.mesh)

    tx, step = exp.compiled.get(("disposal", c.model, method, d, exp.mesh), build_step)
    state = steps.replicate(exp.mesh, steps.init_state(start, tx, exp.stream("disposal-rng")))
    d_ = c.data
    source_seed = exp.stream("disposal-source-batches")
    if disposal_loss(method).collision and d.chunking == "by_class":
        source_batches = pipeline.class_chunked_batches(
            exp.source.train, d.source_batch_size, d.num_chunks, source_seed, mean=d_.mean, std=d_.std, flip=d_.flip
        )
    else:
        source_batches = pipeline.shuffled_batches(
            exp.source.train, d.source_batch_size, source_seed, mean=d_.mean, std=d_.std, flip=d_.flip
        )
    target_batches = exp.batches(exp.target.train, c.transfer.batch_size, "disposal-target-batches")
    monitor = DisposalMonitor(exp, start, teacher)
    progress = _progress(exp, directory)
    state, history, halted_at = run_steps(
        lambda state, s, t: step(state, teacher, s, t), state, zip(source_batches, target_batches), d.steps,
        desc=f"disposal {method}", every=d.eval_every,
        on_check=monitor.on_check, quiet=exp.quiet, progress=progress, bookkeeping=monitor, writer=exp.writer,
        place=lambda s, t: place_disposal_batches(exp.mesh, d.num_chunks, s, t),
    )  # fmt: skip
    if progress is not None:
        progress.close()
    meta = {
        "method": method,
        "history": history,
        "checks": monitor.checks,
        "tl_target_val_acc": monitor.tl_val,
        "stopped_at": monitor.stopped_at,
        "diverged": halted_at is not None,
        "halted_at": halted_at,
        "returned_step": monitor.best["step"],
        "resumed_from": progress.resumed_from if progress is not None else 0,
        "devices": int(exp.mesh.devices.size),
        "seconds": time.perf_counter() - start_time,
    }
    _finish(directory, monitor.best["variables"], meta)
    return monitor.best["variables"], meta


# ---------------------------------------------------------------------------------------------------
# Piggyback learning and evaluation


class _CurveBook(Bookkeeping):
    def __init__(self, curve: list):
        self.curve = curve

    def dump(self):
        return {"curve": self.curve}, {}

    def load(self, data, arrays):
        self.curve[:] = data["curve"]


def piggyback_run(exp: Experiment, model: str, variables: dict, shots: int, draw: int) -> dict:
    """One attack: ``variables``' backbone with a fresh head, fully fine-tuned on draw ``draw`` of
    ``shots`` labelled examples a class of the attacker's task for ``piggyback.epochs``; the test
    accuracy after every epoch (the PL curve). The labelled draw, the head's initialisation and the
    batch order depend on ``(seed, shots, draw)`` only, so every model compared faces the same attacker."""
    c = exp.config
    directory = exp.checkpoint_dir(stage_key(c, "piggyback", model, shots=shots, draw=draw))
    feature_dim = next(iter(variables["params"]["heads"].values()))["kernel"].shape[0]
    head = init_head(exp_key(exp, "piggyback-head", shots, draw), feature_dim, exp.attacker.num_classes)
    pl_vars = {
        "params": {"backbone": variables["params"]["backbone"], "heads": {"piggyback": head}},
        "batch_stats": variables["batch_stats"],
    }
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, {"head": head})[1]
    task = few_shot_task(exp.attacker, shots, exp.stream("piggyback-subset", shots, draw))
    per_epoch = pipeline.steps_per_epoch(task.train, c.piggyback.batch_size)
    curve: list[float] = []

    def on_epoch(state, done):
        epoch = done // per_epoch
        if epoch % c.piggyback.curve_every == 0 or epoch == c.piggyback.epochs:
            curve.append(exp.accuracy(steps.variables_of(state), task.test, "piggyback"))
        return False

    start = time.perf_counter()
    seed = exp.stream("piggyback-batches", shots, draw)
    name = f"piggyback {model} {shots}-shot #{draw}"
    pl_vars, history, status = _supervised(
        exp, name, pl_vars, task, "piggyback", c.piggyback, None, seed, directory, on_epoch, _CurveBook(curve)
    )
    # the attacker's final accuracy on the validation split too: what a search may select on (never test)
    val_acc = exp.accuracy(pl_vars, task.val, "piggyback") if len(task.val) else float("nan")
    meta = {
        "curve": curve,
        "acc": curve[-1] if curve else float("nan"),
        "val_acc": val_acc,
        **status,
        "seconds": time.perf_counter() - start,
    }
    _finish(directory, {"head": pl_vars["params"]["heads"]["piggyback"]}, meta)
    return meta


def piggyback_learning(exp: Experiment, model: str, variables: dict) -> dict:
    """Stage 4, the attack, at every budget of ``piggyback.shots`` with ``piggyback.repeats`` draws each.

    Returns ``{"pl": {shots: {"acc", "accs", "val_acc", "curve", "curves"}}, "pl_acc", "pl_val_acc",
    "pl_curve", "pl_curve_epochs"}``: per budget the mean over draws of the final test accuracy, of the
    final validation accuracy and of the curve (test accuracy after the epochs ``pl_curve_epochs``, every
    ``piggyback.curve_every``-th and the last), and the per-draw values; ``pl_acc``, ``pl_val_acc`` and
    ``pl_curve`` are the first budget's (the headline figures)."""
    c = exp.config
    per_budget = {}
    runs = []
    for shots in budgets(exp.attacker, c.piggyback.shots, c.data.piggyback_fraction):
        draws = [piggyback_run(exp, model, variables, shots, r) for r in range(c.piggyback.repeats)]
        runs += draws
        curves = [d["curve"] for d in draws]
        per_budget[str(shots)] = {
            "acc": float(np.mean([d["acc"] for d in draws])),
            "accs": [d["acc"] for d in draws],
            "val_acc": float(np.mean([d["val_acc"] for d in draws])),
            "curve": np.mean(curves, axis=0).tolist() if curves and curves[0] else [],
            "curves": curves,
        }
    first = next(iter(per_budget.values()))
    halted = [r["halted_at"] for r in runs if r.get("halted_at") is not None]
    every, epochs = c.piggyback.curve_every, c.piggyback.epochs
    return {
        "pl": per_budget,
        "pl_curve_epochs": sorted({*range(every, epochs + 1, every), epochs}),
        "pl_acc": first["acc"],
        "pl_val_acc": first["val_acc"],
        "pl_curve": first["curve"],
        "halted_at": halted[0] if halted else None,
        "devices": exp.devices,
        "seconds": float(sum(r.get("seconds", 0.0) for r in runs)),
    }


def random_init(exp: Experiment) -> dict:
    """The attacker's lower reference: the network at a random initialisation (its own stream)."""
    heads = {"source": exp.source.num_classes, "target": exp.target.num_classes}
    return exp.network.init(exp_key(exp, "random-init"), exp.image_shape, heads)


def evaluate_model(exp: Experiment, variables: dict) -> dict:
    """Target accuracy (target head), source accuracy (source head) and the loss-threshold MIA on the
    source head: members = source training examples, non-members = source test examples."""
    heads = variables["params"]["heads"]
    out = {"target_acc": exp.accuracy(variables, exp.target.test, "target") if "target" in heads else float("nan")}
    train_logits, _ = exp.predict(variables, exp.source.train, "source", features=False)
    test_logits, _ = exp.predict(variables, exp.source.test, "source", features=False)
    out["source_acc"] = evaluate.accuracy(test_logits, exp.source.test.labels)
    out["mia_acc"] = evaluate.loss_threshold_mia(
        evaluate.per_example_loss(train_logits, exp.source.train.labels),
        evaluate.per_example_loss(test_logits, exp.source.test.labels),
        seed=exp.stream("mia"),
    )
    return out
