"""Stage 4, piggyback learning (the attack, docs/methods.md §1, §3), and the evaluation of every model."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from dtl_jax import evaluate
from dtl_jax.config import OptimConfig
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import budgets, few_shot_task
from dtl_jax.models import apply_head, init_head
from dtl_jax.stages.experiment import Experiment
from dtl_jax.stages.keys import stage_key
from dtl_jax.stages.supervised import fit_head, supervised
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


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How the attacker fine-tunes (NTLBench's attacks, docs/methods.md §1.4): with a ``fresh`` head or the
    model's ``own`` source head, training ``all`` layers or the ``head`` only (frozen features: a linear
    probe), at ``lr_scale`` times ``piggyback.learning_rate``."""

    head: str  # fresh | own
    train: str  # all | head
    lr_scale: float = 1.0


STRATEGIES = {
    "fresh_all": Strategy("fresh", "all"),  # RTAL: what piggyback learning always did
    "fresh_head": Strategy("fresh", "head"),  # InitFC_FC: a linear probe on the frozen backbone
    "own_all": Strategy("own", "all"),  # FTAL: the released source head and every layer
    "own_head": Strategy("own", "head"),  # Direct_FC: the released source head, re-fitted alone
    "fresh_all_lr10": Strategy("fresh", "all", 10.0),  # RTAL at 10x the learning rate: a stronger attacker
}
DEFAULT_STRATEGY = "fresh_all"


def piggyback_run(
    exp: Experiment, model: str, variables: dict, shots: int, draw: int, strategy: str = DEFAULT_STRATEGY,
    after: str | None = None,
) -> dict:  # fmt: skip
    """One attack: ``variables``' backbone with a fresh head (or its own source head), fine-tuned on draw
    ``draw`` of ``shots`` labelled examples a class of the attacker's task, as ``strategy`` says
    (``STRATEGIES``): every layer for ``piggyback.epochs`` with the piggyback optimiser, the PL curve being
    the test accuracy after every ``curve_every`` epochs; or the head alone on the frozen backbone's eval-mode
    features (Adam at ``piggyback.head_learning_rate``, ``head_epochs`` full-batch epochs). The labelled
    draw, the fresh head's initialisation and the batch order depend on ``(seed, shots, draw)`` only, so
    every model compared faces the same attacker. ``after``: the key of the stage that made ``variables``
    when it is not ``model``'s own (a kept state of a frontier trajectory)."""
    c = exp.config
    how = STRATEGIES[strategy]
    feature_dim = next(iter(variables["params"]["heads"].values()))["kernel"].shape[0]
    if how.head == "own":
        head = variables["params"]["heads"]["source"]
    else:
        head = init_head(exp.key("piggyback-head", shots, draw), feature_dim, exp.attacker.num_classes)
    task = few_shot_task(exp.attacker, shots, exp.stream("piggyback-subset", shots, draw))

    def fine_tune_all(stage: CheckpointedStage):
        pl_vars = {
            "params": {"backbone": variables["params"]["backbone"], "heads": {"piggyback": head}},
            "batch_stats": variables["batch_stats"],
        }
        optim = c.piggyback
        if how.lr_scale != 1.0:
            optim = dataclasses.replace(optim, learning_rate=optim.learning_rate * how.lr_scale)
        per_epoch = pipeline.steps_per_epoch(task.train, optim.batch_size)
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
            exp, name, pl_vars, task, "piggyback", optim, None, seed, stage, on_epoch, _CurveBook(curve)
        )
        if status["halted_at"] is not None:  # halted by the divergence guard: the last good parameters' accuracy
            curve.append(exp.accuracy(pl_vars, task.test, "piggyback"))
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

    def fine_tune_head(stage: CheckpointedStage):
        del stage  # seconds long: no mid-stage checkpoints
        start = time.perf_counter()
        placed = steps.replicate(exp.mesh, variables)
        features = {name: exp.predict(placed, getattr(task, name), "source")[1] for name in ("train", "val", "test")}
        optim = OptimConfig(optimizer="adam", learning_rate=c.piggyback.head_learning_rate,
                            epochs=c.piggyback.head_epochs, batch_size=max(len(task.train), 1))  # fmt: skip
        fitted, history = fit_head(
            exp, head, features["train"], task.train.labels, optim, exp.stream("piggyback-batches", shots, draw)
        )

        def accuracy(split: str) -> float:
            if not len(getattr(task, split)):
                return float("nan")
            return evaluate.accuracy(np.asarray(apply_head(fitted, features[split])), getattr(task, split).labels)

        acc = accuracy("test")
        meta = {"curve": [acc], "acc": acc, "val_acc": accuracy("val"), "history": history, "halted_at": None,
                "resumed_from": 0, "devices": exp.devices, "seconds": time.perf_counter() - start}  # fmt: skip
        return {"head": fitted}, meta

    extra = {} if strategy == DEFAULT_STRATEGY else {"strategy": strategy}
    stage = exp.stage(stage_key(c, "piggyback", model, after=after, shots=shots, draw=draw, **extra))
    return stage.run({"head": head}, fine_tune_all if how.train == "all" else fine_tune_head)[1]


def budget_area(shots: list[int], accs: list[float]) -> float | None:
    """The area under PL accuracy against the attacker's budget, normalised to a mean accuracy: the trapezoid
    rule over ``log2(shots)`` divided by its span (``None`` with fewer than two budgets)."""
    if len(shots) < 2:
        return None
    order = np.argsort(shots)
    x, y = np.log2(np.asarray(shots, float)[order]), np.asarray(accs, float)[order]
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def mean_curve(curves: list[list[float]]) -> list[float]:
    """The mean PL curve over draws; a draw halted by the divergence guard has a shorter curve, which counts
    with its last value (its attacker's model stays at the last good parameters) for the epochs it missed."""
    curves = [list(c) for c in curves if len(c)]
    if not curves:
        return []
    n = max(len(c) for c in curves)
    return np.mean([c + [c[-1]] * (n - len(c)) for c in curves], axis=0).tolist()


def attack(exp: Experiment, model: str, variables: dict, strategy: str, shots: int, repeats: int,
           after: str | None = None, first_draw: int = 0) -> dict:  # fmt: skip
    """``repeats`` draws of one attack at one budget (draws ``first_draw`` ...): ``{"acc", "accs", "val_acc",
    "curve", "curves", "runs"}`` (means over the draws and the per-draw values)."""
    draws = [piggyback_run(exp, model, variables, shots, r, strategy, after)
             for r in range(first_draw, first_draw + repeats)]  # fmt: skip
    curves = [d["curve"] for d in draws]
    return {
        "acc": float(np.mean([d["acc"] for d in draws])),
        "accs": [d["acc"] for d in draws],
        "val_acc": float(np.mean([d["val_acc"] for d in draws])),
        "curve": mean_curve(curves),
        "curves": curves,
        "runs": draws,
    }


def piggyback_learning(exp: Experiment, model: str, variables: dict) -> dict:
    """Stage 4, the attack, at every budget of ``piggyback.shots`` with ``piggyback.repeats`` draws each, by
    every strategy of ``piggyback.strategies`` (the first is the headline attack).

    Returns ``{"pl": {shots: {"acc", "accs", "val_acc", "curve", "curves"}}, "pl_acc", "pl_val_acc",
    "pl_curve", "pl_curve_epochs", "pl_area", "strategies"}``: per budget the mean over draws of the final
    test accuracy, of the final validation accuracy and of the curve (test accuracy after the epochs
    ``pl_curve_epochs``, every ``piggyback.curve_every``-th and the last), and the per-draw values;
    ``pl_acc``, ``pl_val_acc`` and ``pl_curve`` are the first budget's (the headline figures); ``pl_area`` the
    area under PL accuracy against the budget (``budget_area``, None with one budget); ``strategies``: every
    strategy's ``{"pl": {shots: ...}, "pl_acc", "pl_val_acc", "pl_area"}``."""
    c = exp.config
    shots_list = budgets(exp.attacker, c.piggyback.shots, c.data.piggyback_fraction)
    by_strategy, runs = {}, []
    for strategy in c.piggyback.strategies:
        per_budget = {}
        for shots in shots_list:
            entry = attack(exp, model, variables, strategy, shots, c.piggyback.repeats)
            runs += entry.pop("runs")
            per_budget[str(shots)] = entry
        first = next(iter(per_budget.values()))
        area = budget_area(shots_list, [per_budget[str(s)]["acc"] for s in shots_list])
        by_strategy[strategy] = {"pl": per_budget, "pl_acc": first["acc"], "pl_val_acc": first["val_acc"],
                                 "pl_area": area}  # fmt: skip
    headline = by_strategy[c.piggyback.strategies[0]]
    first = next(iter(headline["pl"].values()))
    halted = [r["halted_at"] for r in runs if r.get("halted_at") is not None]
    every, epochs = c.piggyback.curve_every, c.piggyback.epochs
    return {
        "pl": headline["pl"],
        "pl_curve_epochs": sorted({*range(every, epochs + 1, every), epochs}),
        "pl_acc": first["acc"],
        "pl_val_acc": first["val_acc"],
        "pl_curve": first["curve"],
        "pl_area": headline["pl_area"],
        "strategies": {
            name: {k: v for k, v in entry.items() if k != "pl"}
            | {
                "pl": {
                    shots: {k: v for k, v in b.items() if k in ("acc", "accs", "val_acc")}
                    for shots, b in entry["pl"].items()
                }
            }
            for name, entry in by_strategy.items()
        },
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
