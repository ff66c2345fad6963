"""Disposable transfer learning end to end (METHODS.md §1): the four stages and the results table.

    pre-train (source) ─▶ transfer (target) ─▶ disposal (gc, ngc, rtf, utf, ga) ─▶ piggyback learning
                                                                                   ─▶ results.json

Every stage is checkpointed under ``workdir/checkpoints/<stage>-<hash>``, the hash covering exactly the
config sections the stage depends on, so a second run in the same workdir reuses what is still valid
(change ``disposal.gc_lambda`` and only disposal and PL run again).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import jax
from jax.sharding import Mesh

from dtl_jax import checkpoint, evaluate
from dtl_jax.checkpoint import Progress
from dtl_jax.config import Config, UserError, to_dict, validate
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import Task, make_task, piggyback_task
from dtl_jax.models import Network, build, init_head
from dtl_jax.train import steps
from dtl_jax.train.loop import Bookkeeping, run_steps
from dtl_jax.train.mesh import check_divisible, data_mesh, shard_batch
from dtl_jax.train.metrics import MetricsWriter
from dtl_jax.train.optim import heads_trainable, make_optimizer
from dtl_jax.workdir import claim, fingerprint, prepare, versions, write_json


@dataclasses.dataclass
class Experiment:
    """What every stage needs: config, tasks, network, and the jitted functions compiled once."""

    config: Config
    workdir: Path
    source: Task
    target: Task
    piggyback: Task
    network: Network
    mesh: Mesh
    writer: MetricsWriter
    quiet: bool = False

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.source.train.images.shape[1:])

    def batches(self, split, batch_size, seed, flip=None):
        d = self.config.data
        return pipeline.shuffled_batches(
            split, batch_size, seed, mean=d.mean, std=d.std, flip=d.flip if flip is None else flip
        )

    def predict(self, variables, split, head):
        fn = _predict_cache(self.network, head)
        d = self.config.data
        return evaluate.predict(fn, variables, split, batch_size=self.config.eval.batch_size, mean=d.mean, std=d.std)

    def accuracy(self, variables, split, head) -> float:
        logits, _ = self.predict(variables, split, head)
        return evaluate.accuracy(logits, split.labels)

    def checkpoint_dir(self, stage: str, *parts) -> Path:
        return self.workdir / "checkpoints" / f"{stage}-{fingerprint(*parts)}"


_PREDICT: dict = {}
_STEPS: dict = {}


def _predict_cache(network: Network, head: str):
    key = (id(network.backbone), head)
    if key not in _PREDICT:
        _PREDICT[key] = (network, steps.predict_fn(network, head))
    return _PREDICT[key][1]


def build_experiment(config: Config, workdir: str | os.PathLike, quiet: bool = False) -> Experiment:
    config = validate(config)
    c = config
    source = make_task("source", c.data.source, c.data, c.seed)
    target = make_task("target", c.data.target, c.data, c.seed + 1)
    if source.train.images.shape[1:] != target.train.images.shape[1:]:
        raise UserError(
            f"source images {source.train.images.shape[1:]} and target images {target.train.images.shape[1:]} "
            "differ: set data.image_size and data.channels so that they match"
        )
    piggyback = piggyback_task(source, c.data, c.seed)
    d = c.disposal
    if any(m in ("gc", "ngc") for m in d.methods) and d.chunking == "by_class" and d.num_chunks > source.num_classes:
        raise UserError(
            f"disposal.num_chunks={d.num_chunks} with chunking=by_class needs at least as many source classes; "
            f"the source task has {source.num_classes}"
        )
    mesh = data_mesh(d.devices)
    check_divisible(mesh, d.num_chunks, d.source_batch_size, c.transfer.batch_size)
    return Experiment(c, Path(workdir), source, target, piggyback, build(c.model), mesh, MetricsWriter(workdir), quiet)


# ---------------------------------------------------------------------------------------------------
# Stages


def _progress(exp: Experiment, directory: Path) -> Progress | None:
    every = exp.config.checkpoint_every
    return Progress(directory.with_name(directory.name + ".progress"), every) if every else None


def _drop_progress(directory: Path) -> None:
    """Removes a stage's mid-stage checkpoints once its final checkpoint is written."""
    checkpoint.remove(directory.with_name(directory.name + ".progress"))


def _supervised(
    exp: Experiment, name: str, variables, task: Task, head: str, optim, trainable, seed, directory: Path,
    on_epoch=None, bookkeeping=None,
):  # fmt: skip
    """Trains ``head`` (and what ``trainable`` marks) with CE on ``task.train`` for ``optim.epochs``;
    mid-stage checkpoints beside ``directory``, removed once the stage's own checkpoint is written."""
    per_epoch = pipeline.steps_per_epoch(task.train, optim.batch_size)
    total = per_epoch * optim.epochs
    key = (id(exp.network.backbone), head, optim, total, trainable is None)
    if trainable is not None or key not in _STEPS:  # one compilation for all runs of a frozen-free stage
        tx = make_optimizer(optim, total, trainable)
        _STEPS[key] = (exp.network, tx, steps.supervised_step(exp.network, head, tx))
    _, tx, step = _STEPS[key]
    state = steps.init_state(variables, tx, seed)
    batches = ((b,) for b in exp.batches(task.train, optim.batch_size, seed))
    progress = _progress(exp, directory)
    state, history, halted_at = run_steps(
        step, state, batches, total, desc=name, every=per_epoch, on_check=on_epoch, quiet=exp.quiet,
        progress=progress, bookkeeping=bookkeeping, writer=exp.writer,
    )  # fmt: skip
    if progress is not None:
        progress.close()
    resumed = progress.resumed_from if progress is not None else 0
    return steps.variables_of(state), history, {"halted_at": halted_at, "resumed_from": resumed}


def pretrain(exp: Experiment) -> tuple[dict, dict]:
    """Stage 1: backbone + source head, cross-entropy on the source task."""
    c = exp.config
    directory = exp.checkpoint_dir("pretrain", c.seed, c.data, c.model, c.pretrain)
    variables = exp.network.init(jax.random.PRNGKey(c.seed), exp.image_shape, {"source": exp.source.num_classes})
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, variables)
    start = time.perf_counter()
    variables, history, status = _supervised(
        exp, "pretrain", variables, exp.source, "source", c.pretrain, None, c.seed, directory
    )
    meta = {"history": history, **status, "seconds": time.perf_counter() - start}
    checkpoint.save(directory, variables, meta)
    _drop_progress(directory)
    return variables, meta


def transfer(exp: Experiment, pretrained: dict) -> tuple[dict, dict]:
    """Stage 2: a fresh target head, backbone and target head fine-tuned on the target task (the source
    head is kept, frozen): the TL model."""
    c = exp.config
    directory = exp.checkpoint_dir("transfer", c.seed, c.data, c.model, c.pretrain, c.transfer)
    feature_dim = pretrained["params"]["heads"]["source"]["kernel"].shape[0]
    variables = copy.copy(pretrained)
    variables["params"] = {
        "backbone": pretrained["params"]["backbone"],
        "heads": {
            **pretrained["params"]["heads"],
            "target": init_head(jax.random.PRNGKey(c.seed + 11), feature_dim, exp.target.num_classes),
        },
    }
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, variables)
    start = time.perf_counter()
    variables, history, status = _supervised(
        exp, "transfer", variables, exp.target, "target", c.transfer, heads_trainable("target"), c.seed + 12,
        directory,
    )  # fmt: skip
    meta = {"history": history, **status, "seconds": time.perf_counter() - start}
    checkpoint.save(directory, variables, meta)
    _drop_progress(directory)
    return variables, meta


def refit_source_head(exp: Experiment, tl: dict) -> dict:
    """Optional (``disposal.refit_source_head``): re-fit the stale source head on the frozen TL backbone
    (a linear probe with the transfer stage's optimiser and epochs). Checkpointed: all methods share it."""
    c = exp.config
    directory = exp.checkpoint_dir("refit-source-head", c.seed, c.data, c.model, c.pretrain, c.transfer)
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, tl)[0]
    trainable = heads_trainable("source", backbone=False)
    variables, history, _ = _supervised(
        exp, "refit source head", tl, exp.source, "source", c.transfer, trainable, c.seed + 21, directory
    )
    checkpoint.save(directory, variables, {"history": history})
    _drop_progress(directory)
    return variables


def dispose(exp: Experiment, method: str, tl: dict) -> tuple[dict, dict]:
    """Stage 3: ``L_retain + λ · L_unlearn`` from the TL model, with the held-out stopping rule.

    Every ``disposal.eval_every`` steps the held-out checks of ``_check`` run (validation splits, never
    the test split). When the target accuracy falls more than ``disposal.max_target_drop`` below the TL
    model's, the stage stops. It returns, among the checked states within the margin (the TL model
    included), the last one (``disposal.selection=last``) or the one with the lowest linear-probe source
    accuracy (``min_probe``).
    """
    c = exp.config
    d = c.disposal
    directory = exp.checkpoint_dir(f"disposal-{method}", c.seed, c.data, c.model, c.pretrain, c.transfer, d)
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, tl)
    start = time.perf_counter()
    teacher = tl
    if d.refit_source_head:
        tl = refit_source_head(exp, tl)
    tx = make_optimizer(d.optim, d.steps)
    state = steps.init_state(tl, tx, c.seed + 31)
    step = steps.disposal_step(exp.network, method, d, tx, teacher, exp.mesh)
    seed = c.seed + 32
    if method in ("gc", "ngc") and d.chunking == "by_class":
        d_ = c.data
        source_batches = pipeline.class_chunked_batches(
            exp.source.train, d.source_batch_size, d.num_chunks, seed, mean=d_.mean, std=d_.std, flip=d_.flip
        )
    else:
        source_batches = exp.batches(exp.source.train, d.source_batch_size, seed)
    target_batches = exp.batches(exp.target.train, c.transfer.batch_size, seed + 1)
    batches = zip(source_batches, target_batches)

    val_split = exp.target.val if len(exp.target.val) else exp.target.train
    tl_val = exp.accuracy(teacher, val_split, "target")
    checks = [_check(exp, 0, tl, val_split, tl_val)]
    best = {"step": 0, "probe": checks[0]["probe_acc"], "variables": jax.device_get(tl)}
    stopped = {"at": None}
    book = _DisposalBook(checks, best, stopped)

    def on_check(state, done):
        variables = steps.variables_of(state)
        check = _check(exp, done, variables, val_split)
        checks.append(check)
        if tl_val - check["target_val_acc"] > d.max_target_drop:
            stopped["at"] = done
            return True
        if d.selection == "last" or check["probe_acc"] <= best["probe"]:
            best.update(step=done, probe=check["probe_acc"], variables=jax.device_get(variables))
        return False

    progress = _progress(exp, directory)
    state, history, halted_at = run_steps(
        step, state, batches, d.steps, desc=f"disposal {method}", every=d.eval_every, on_check=on_check,
        quiet=exp.quiet, progress=progress, bookkeeping=book, writer=exp.writer,
        place=lambda s, t: (shard_batch(exp.mesh, s), shard_batch(exp.mesh, t)),
    )  # fmt: skip
    meta = {
        "method": method,
        "history": history,
        "checks": checks,
        "tl_target_val_acc": tl_val,
        "stopped_at": stopped["at"],
        "diverged": halted_at is not None,
        "halted_at": halted_at,
        "returned_step": best["step"],
        "resumed_from": progress.resumed_from if progress is not None else 0,
        "seconds": time.perf_counter() - start,
    }
    checkpoint.save(directory, best["variables"], meta)
    if progress is not None:
        progress.close()
    _drop_progress(directory)
    return best["variables"], meta


class _DisposalBook(Bookkeeping):
    """Disposal's host-side record (checks, the best state so far, the stop) for mid-stage checkpoints."""

    def __init__(self, checks: list, best: dict, stopped: dict):
        self.checks, self.best, self.stopped = checks, best, stopped

    def dump(self):
        meta = {"checks": self.checks, "best_step": self.best["step"], "best_probe": self.best["probe"]}
        return {**meta, "stopped": self.stopped["at"]}, self.best["variables"]

    def load(self, data, arrays):
        self.checks[:] = data["checks"]
        self.best.update(step=data["best_step"], probe=data["best_probe"], variables=arrays)
        self.stopped["at"] = data["stopped"]


def _check(exp: Experiment, step: int, variables: dict, val_split, target_acc: float | None = None) -> dict:
    """Held-out measurements during disposal: target accuracy (target.val), source accuracy through the
    current source head (source.val), and a linear probe's source accuracy on the backbone's features,
    fitted on the attacker's few-shot data (piggyback.train) and scored on source.val: a cheap stand-in
    for piggyback learning."""
    if target_acc is None:
        target_acc = exp.accuracy(variables, val_split, "target")
    split = exp.source.val if len(exp.source.val) else exp.source.test
    val_logits, val_features = exp.predict(variables, split, "source")
    _, train_features = exp.predict(variables, exp.piggyback.train, "source")
    return {
        "step": step,
        "target_val_acc": target_acc,
        "source_val_acc": evaluate.accuracy(val_logits, split.labels),
        "probe_acc": evaluate.linear_probe_accuracy(
            train_features, exp.piggyback.train.labels, val_features, split.labels
        ),
    }


def piggyback_learning(exp: Experiment, name: str, variables: dict, identity: str) -> dict:
    """Stage 4, the attack: the model's backbone with a fresh head, fully fine-tuned on the piggyback data
    for ``piggyback.epochs``; test accuracy after every epoch (the PL curve), the last one is PL accuracy.
    The head's initialisation and the batch order are the same for every model compared. ``identity``
    names where ``variables`` came from, so that the stage's checkpoint is reused only for that model."""
    c = exp.config
    directory = exp.checkpoint_dir(f"piggyback-{name}", identity, c.seed, c.data, c.piggyback)
    feature_dim = next(iter(variables["params"]["heads"].values()))["kernel"].shape[0]
    pl_vars = {
        "params": {
            "backbone": variables["params"]["backbone"],
            "heads": {"piggyback": init_head(jax.random.PRNGKey(c.seed + 41), feature_dim, exp.piggyback.num_classes)},
        },
        "batch_stats": variables["batch_stats"],
    }
    if checkpoint.exists(directory):
        return checkpoint.restore(directory, pl_vars)[1]
    curve: list[float] = []

    def on_epoch(state, done):
        curve.append(exp.accuracy(steps.variables_of(state), exp.piggyback.test, "piggyback"))
        return False

    start = time.perf_counter()
    pl_vars, history, status = _supervised(
        exp, f"piggyback {name}", pl_vars, exp.piggyback, "piggyback", c.piggyback, None, c.seed + 42, directory,
        on_epoch, _CurveBook(curve),
    )  # fmt: skip
    meta = {
        "pl_curve": curve,
        "pl_acc": curve[-1] if curve else float("nan"),
        **status,
        "seconds": time.perf_counter() - start,
    }
    checkpoint.save(directory, pl_vars, meta)
    _drop_progress(directory)
    return meta


class _CurveBook(Bookkeeping):
    def __init__(self, curve: list):
        self.curve = curve

    def dump(self):
        return {"curve": self.curve}, {}

    def load(self, data, arrays):
        self.curve[:] = data["curve"]


def evaluate_model(exp: Experiment, variables: dict) -> dict:
    """Target accuracy (target head), source accuracy (source head) and the loss-threshold MIA on the
    source head: members = source training examples, non-members = source test examples."""
    heads = variables["params"]["heads"]
    out = {"target_acc": exp.accuracy(variables, exp.target.test, "target") if "target" in heads else float("nan")}
    train_logits, _ = exp.predict(variables, exp.source.train, "source")
    test_logits, _ = exp.predict(variables, exp.source.test, "source")
    out["source_acc"] = evaluate.accuracy(test_logits, exp.source.test.labels)
    out["mia_acc"] = evaluate.loss_threshold_mia(
        evaluate.per_example_loss(train_logits, exp.source.train.labels),
        evaluate.per_example_loss(test_logits, exp.source.test.labels),
        seed=exp.config.seed,
    )
    return out


def run(
    config: Config, workdir: str | os.PathLike | None = None, *, quiet: bool = False, overwrite: bool = False
) -> dict:
    """The whole DTL experiment; writes ``workdir/results.json`` (atomically) and returns the results.
    A workdir made by a run with another config is refused unless ``overwrite``."""
    workdir = prepare(Path(workdir or config.workdir), validate(config), "run", overwrite)
    start = time.perf_counter()
    exp = build_experiment(config, workdir, quiet)
    claim(workdir, exp.config, "run")
    c = exp.config
    pretrained, pretrain_meta = pretrain(exp)
    tl, transfer_meta = transfer(exp, pretrained)
    stages = {"pretrain": pretrain_meta, "transfer": transfer_meta}
    tl_id = exp.checkpoint_dir("transfer", c.seed, c.data, c.model, c.pretrain, c.transfer).name
    random_init = exp.network.init(
        jax.random.PRNGKey(c.seed + 51),
        exp.image_shape,
        {"source": exp.source.num_classes, "target": exp.target.num_classes},
    )
    models = {"random_init": (random_init, f"random-init-{c.seed}"), "tl": (tl, tl_id)}
    disposal = {}
    for method in c.disposal.methods:
        variables, meta = dispose(exp, method, tl)
        disposal[method] = meta
        models[method] = (
            variables,
            exp.checkpoint_dir(f"disposal-{method}", c.seed, c.data, c.model, c.pretrain, c.transfer, c.disposal).name,
        )
    results = {"models": {}, "disposal": {}}
    for name, (variables, identity) in models.items():
        row = evaluate_model(exp, variables)
        pl = piggyback_learning(exp, name, variables, identity)
        stages[f"piggyback {name}"] = pl
        row.update(pl_acc=pl["pl_acc"], pl_curve=pl["pl_curve"])
        results["models"][name] = row
    stages.update({f"disposal {m}": meta for m, meta in disposal.items()})
    # The divergence guard's record for every stage: a halted stage kept its last good state.
    results["stages"] = {
        name: {"diverged": meta.get("halted_at") is not None, "halted_at": meta.get("halted_at")}
        for name, meta in stages.items()
    }
    for method, meta in disposal.items():
        results["disposal"][method] = {k: v for k, v in meta.items() if k != "history"}
        results["disposal"][method]["final_unlearn"] = meta["history"][-1]["unlearn"] if meta["history"] else None
    results["tasks"] = {
        t.name: {"classes": list(t.class_names), "train": len(t.train), "val": len(t.val), "test": len(t.test)}
        for t in (exp.source, exp.target, exp.piggyback)
    }
    results["config"] = to_dict(c)
    results["versions"] = versions()
    results["seconds"] = time.perf_counter() - start
    write_json(workdir / "results.json", results)
    exp.writer.close()
    return results


TABLE_COLUMNS = (
    ("target_acc", "target acc"),
    ("source_acc", "source acc"),
    ("pl_acc", "PL acc"),
    ("mia_acc", "MIA acc"),
)


def format_table(results: dict) -> str:
    """The results table as printed by ``dtl-jax run``."""
    header = f"{'model':<12}" + "".join(f"{title:>12}" for _, title in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in results["models"].items():
        lines.append(f"{name:<12}" + "".join(f"{row[key]:>12.3f}" for key, _ in TABLE_COLUMNS))
    return "\n".join(lines)
