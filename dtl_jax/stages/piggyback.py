"""Stage 4, piggyback learning (the attack, docs/methods.md §1, §3), and the evaluation of every model."""

from __future__ import annotations

import time

import numpy as np

from dtl_jax import evaluate
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import budgets, few_shot_task
from dtl_jax.models import init_head
from dtl_jax.stages.experiment import Experiment
from dtl_jax.stages.keys import stage_key
from dtl_jax.stages.supervised import supervised
from dtl_jax.train import steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.loop import Bookkeeping


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
    feature_dim = next(iter(variables["params"]["heads"].values()))["kernel"].shape[0]
    head = init_head(exp.key("piggyback-head", shots, draw), feature_dim, exp.attacker.num_classes)

    def compute(stage: CheckpointedStage):
        pl_vars = {
            "params": {"backbone": variables["params"]["backbone"], "heads": {"piggyback": head}},
            "batch_stats": variables["batch_stats"],
        }
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
        pl_vars, history, status = supervised(
            exp, name, pl_vars, task, "piggyback", c.piggyback, None, seed, stage, on_epoch, _CurveBook(curve)
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
        return {"head": pl_vars["params"]["heads"]["piggyback"]}, meta

    stage = exp.stage(stage_key(c, "piggyback", model, shots=shots, draw=draw))
    return stage.run({"head": head}, compute)[1]


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
    return exp.network.init(exp.key("random-init"), exp.image_shape, heads)


def evaluate_model(exp: Experiment, variables: dict) -> dict:
    """Target accuracy (target head), source accuracy (source head) and the loss-threshold MIA on the
    source head: members = source training examples, non-members = source test examples."""
    variables = steps.replicate(exp.mesh, variables)  # placed once for the three predictions
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
