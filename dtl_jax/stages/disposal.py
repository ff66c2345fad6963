"""Stage 3, knowledge disposal (docs/methods.md §1): ``L_retain + λ · L_unlearn`` from the TL model
(``dtl_jax.disposal_objective``, sharded by ``dtl_jax.train.disposal_step.disposal_step``), watched by a
``DisposalMonitor`` on validation splits only."""

from __future__ import annotations

import time

import jax

from dtl_jax import evaluate
from dtl_jax.config import DisposalConfig
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import budgets, few_shot_task
from dtl_jax.disposal_objective import DisposalObjective, weights
from dtl_jax.losses import disposal_loss
from dtl_jax.stages.experiment import Experiment
from dtl_jax.stages.keys import stage_key
from dtl_jax.stages.supervised import refit_source_head
from dtl_jax.train import loop, steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.disposal_step import disposal_step, disposal_weights
from dtl_jax.train.loop import Bookkeeping
from dtl_jax.train.mesh import place_disposal_batches
from dtl_jax.train.optim import make_optimizer, shapes_program


class DisposalMonitor(Bookkeeping):
    """Disposal's held-out checks, stopping rule and selection, and their record for mid-stage
    checkpoints.

    Every ``disposal.eval_every`` steps it measures (``check``) the target accuracy on ``target.val``,
    the source-head accuracy on ``source.val`` and a linear probe's source accuracy (fitted on a labelled
    draw of ``disposal.probe_shots`` examples a class of the source training data, scored on
    ``source.val``): validation splits only. When the target accuracy falls more than
    ``disposal.max_target_drop`` below the TL model's, the stage stops. The stage returns, among the checked
    states within the margin (the starting model included), the last one (``selection=last``) or the one
    with the lowest probe accuracy (``min_probe``). Without validation splits (``data.val_fraction=0``;
    config validation allows it only when neither rule is on) there are no checks and the last state is
    returned.
    """

    def __init__(self, exp: Experiment, start: dict, teacher: dict):
        self.exp = exp
        d = exp.config.disposal
        self.max_drop, self.selection = d.max_target_drop, d.selection
        self.enabled = len(exp.target.val) > 0 and len(exp.source.val) > 0
        self.probe_train = few_shot_task(exp.source, probe_shots(exp), exp.stream("probe-subset")).train
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


def probe_shots(exp: Experiment) -> int:
    """The held-out probe's labelled examples a class: ``disposal.probe_shots``, or (0) the fraction
    ``data.piggyback_fraction`` of the smallest source class. Never the attacker's budgets: adding a budget
    to ``piggyback.shots`` moves no disposed model."""
    shots = exp.config.disposal.probe_shots
    return budgets(exp.source, (shots,) if shots else (), exp.config.data.piggyback_fraction)[0]


def program_key(d: DisposalConfig, method: str = "gc") -> tuple:
    """What of ``disposal`` shapes ``method``'s disposal step's program: its objective's settings
    (``DisposalObjective.settings``: only its family's), the optimiser (with the step count only where its
    schedule reads it) and the divergence bound. Not λ, which is an argument of the step
    (``disposal_objective.weights``)."""
    objective = DisposalObjective.from_config(None, method, d)
    return (objective.settings(), d.max_grad_norm, shapes_program(d.optim, d.steps))


def program(exp: Experiment, method: str):
    """``(tx, step)``: ``method``'s jitted disposal step and its optimiser, compiled once per program key for
    every seed, λ and trajectory that share ``exp.compiled``."""
    d = exp.config.disposal

    def build_step():
        tx = make_optimizer(d.optim, d.steps)
        objective = DisposalObjective.from_config(exp.network, method, d)
        return tx, disposal_step(objective, tx, exp.mesh, d.max_grad_norm)

    return exp.compiled.get(("disposal", exp.config.model, method, program_key(d, method), exp.mesh), build_step)


def batches(exp: Experiment, method: str):
    """The disposal stage's stream of ``(source batch, target batch)``: class-chunked source batches for the
    GC family with ``chunking=by_class``, shuffled ones otherwise; the target batches at the transfer
    stage's batch size. Seeded, so every trajectory of one seed sees the same batches."""
    c, d, data = exp.config, exp.config.disposal, exp.config.data
    source_seed = exp.stream("disposal-source-batches")
    if disposal_loss(method).collision and d.chunking == "by_class":
        source_batches = pipeline.class_chunked_batches(
            exp.source.train, d.source_batch_size, d.num_chunks, source_seed, mean=data.mean, std=data.std,
            flip=data.flip,
        )  # fmt: skip
    else:
        source_batches = pipeline.shuffled_batches(
            exp.source.train, d.source_batch_size, source_seed, mean=data.mean, std=data.std, flip=data.flip
        )
    target_batches = exp.batches(exp.target.train, c.transfer.batch_size, "disposal-target-batches")
    return zip(source_batches, target_batches)


def run_disposal(exp: Experiment, method: str, start: dict, teacher, lam: float, stage: CheckpointedStage, *,
                 desc: str, monitor: Bookkeeping, on_check, every: int):  # fmt: skip
    """Runs ``disposal.steps`` steps of ``method`` at strength ``lam`` from ``start`` (``teacher`` placed on
    the mesh), checkpointed in ``stage``; ``on_check(state, done)`` every ``every`` steps (True stops).
    Returns ``(state, history, halted_at)`` of ``train.loop.run_steps``."""
    d = exp.config.disposal
    tx, step = program(exp, method)
    dtype = jax.tree.leaves(start["params"])[0].dtype
    loss_weights = disposal_weights(exp.mesh, {"retain": 1.0, "unlearn": float(lam)}, dtype)  # placed once
    state = steps.init_state(start, tx, exp.stream("disposal-rng"), exp.mesh)
    parts = DisposalObjective.from_config(None, method, d).num_chunks
    with stage.progress() as progress:
        return loop.run_steps(
            lambda state, s, t: step(state, teacher, loss_weights, s, t), state, batches(exp, method),
            d.steps, desc=desc, every=every, on_check=on_check, quiet=exp.quiet,
            progress=progress, bookkeeping=monitor, writer=exp.writer,
            place=lambda s, t: place_disposal_batches(exp.mesh, parts, s, t),
        )  # fmt: skip


def dispose(exp: Experiment, method: str, tl: dict) -> tuple[dict, dict]:
    """Stage 3: ``L_retain + λ · L_unlearn`` from the TL model (``method`` names ``L_unlearn``), watched
    by a ``DisposalMonitor``."""
    c = exp.config

    def compute(stage: CheckpointedStage):
        return _dispose(exp, method, tl, stage)

    return exp.stage(stage_key(c, "disposal", method)).run(tl, compute)


def _dispose(exp: Experiment, method: str, tl: dict, stage: CheckpointedStage) -> tuple[dict, dict]:
    d = exp.config.disposal
    start_time = time.perf_counter()
    teacher = steps.replicate(exp.mesh, tl)  # an argument of the step: the seeds share its program
    start = refit_source_head(exp, tl)[0] if d.refit_source_head else tl
    monitor = DisposalMonitor(exp, start, teacher)
    lam = weights(method, d)["unlearn"]
    state, history, halted_at = run_disposal(
        exp, method, start, teacher, lam, stage, desc=f"disposal {method}", monitor=monitor,
        on_check=monitor.on_check, every=d.eval_every,
    )  # fmt: skip
    meta = {
        "method": method,
        "history": history,
        "checks": monitor.checks,
        "tl_target_val_acc": monitor.tl_val,
        "stopped_at": monitor.stopped_at,
        "diverged": halted_at is not None,
        "halted_at": halted_at,
        "returned_step": monitor.best["step"],
        "resumed_from": stage.resumed_from,
        "devices": exp.devices,
        "seconds": time.perf_counter() - start_time,
    }
    return monitor.best["variables"], meta
