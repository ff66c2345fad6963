"""The trade-off frontier of one seed (docs/methods.md §1.4): disposal trajectories, their kept states, and
the attacks on them.

For every loss of ``disposal.methods`` and every strength λ on its grid (``frontier.<loss>``), a
*trajectory*: ``disposal.steps`` steps of ``L_retain + λ · L_unlearn`` from the disposal stage's starting
model (the TL model with its re-fitted source head), with no stopping rule and no selection. Its state is
kept every ``frontier.keep_every`` steps (a checkpointed stage of its own, ``trajectory-<loss>-lam<λ>``);
a trajectory stops early once its held-out target accuracy falls more than ``frontier.stop_drop`` below
TL's (no later state could be selected at any budget). Every kept state is measured on the target task
(validation and test) and attacked by the frontier's attacker (``frontier.attacker``; ``"strongest"``: the
strategy of ``piggyback.strategies`` with the highest PL accuracy on TL's source *validation* split),
``frontier.repeats`` draws, giving the point ``{seed, lambda, step, target_val, pl_val, target_acc,
pl_acc}`` (``dtl_jax.frontier``). The starting model is every loss's point at λ = 0, step 0.

Selection (``dtl_jax.frontier.select``) reads validation only; the selected states are then attacked by
every strategy of ``piggyback.strategies`` (with ``piggyback.repeats`` draws), so that each strategy's cut
at the selected states is reported beside the frontier's attacker's.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from dtl_jax.data.tasks import budgets
from dtl_jax.stages.disposal import run_disposal
from dtl_jax.stages.experiment import Experiment
from dtl_jax.stages.keys import stage_key
from dtl_jax.stages.piggyback import attack
from dtl_jax.stages.supervised import refit_source_head
from dtl_jax.train import steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.loop import Bookkeeping


def grid(exp: Experiment, method: str) -> tuple[float, ...]:
    """The λ grid of ``method`` (``frontier.<method>``)."""
    return tuple(getattr(exp.config.frontier, method))


def _name(method: str, lam: float, step: int) -> str:
    return f"{method}-lam{lam:g}-step{step}"


class TrajectoryMonitor(Bookkeeping):
    """Keeps the state every ``frontier.keep_every`` steps with its held-out target accuracy, and stops the
    trajectory once that accuracy falls more than ``frontier.stop_drop`` below TL's. The kept states live in
    a fixed number of slots (one per possible kept step), so that a mid-stage checkpoint has one shape."""

    def __init__(self, exp: Experiment, start: dict, tl_val: float):
        self.exp = exp
        f = exp.config.frontier
        self.every, self.stop_drop, self.tl_val = f.keep_every, f.stop_drop, tl_val
        self.slots = exp.config.disposal.steps // self.every
        self.kept: list[dict] = []  # {"step", "target_val"}
        self.arrays = {f"slot{i}": jax.device_get(start) for i in range(self.slots)}
        self.stopped_at: int | None = None

    def on_check(self, state: dict, done: int) -> bool:
        if done % self.every or len(self.kept) >= self.slots:
            return False
        if bool(jax.device_get(state["halted"])):  # the divergence guard stopped it: nothing new to keep
            return True
        variables = steps.variables_of(state)  # already placed on the mesh: evaluated where it is
        target_val = self.exp.accuracy(variables, self.exp.target.val, "target")
        self.arrays[f"slot{len(self.kept)}"] = jax.device_get(variables)
        self.kept.append({"step": done, "target_val": target_val})
        if self.tl_val - target_val > self.stop_drop:
            self.stopped_at = done
            return True
        return False

    def dump(self):
        return {"kept": self.kept, "stopped": self.stopped_at}, self.arrays

    def load(self, data, arrays):
        self.kept[:] = data["kept"]
        self.stopped_at = data["stopped"]
        self.arrays = dict(arrays)


def trajectory(exp: Experiment, method: str, lam: float, start: dict, teacher, tl_val: float) -> tuple[list, dict]:
    """``method``'s trajectory at strength ``lam``: ``([(step, variables), ...], meta)`` of its kept states
    (checkpointed stage ``trajectory-<method>-lam<λ>``; restored when it is finished)."""
    stage = exp.stage(stage_key(exp.config, "trajectory", method, lam=lam))
    if stage.done:  # the kept steps are in the finished stage's meta: they give the saved tree its shape
        meta = json.loads((stage.directory / "meta.json").read_text())
        like = {f"slot{i}": start for i in range(len(meta["kept"]))} or {"none": np.zeros((), np.float32)}
        tree, meta = stage.restore(like)
        return [(k["step"], tree[f"slot{i}"]) for i, k in enumerate(meta["kept"])], meta

    def compute(stage: CheckpointedStage):
        begin = time.perf_counter()
        monitor = TrajectoryMonitor(exp, start, tl_val)
        _, history, halted_at = run_disposal(
            exp, method, start, teacher, lam, stage, desc=f"trajectory {method} λ={lam:g}", monitor=monitor,
            on_check=monitor.on_check, every=monitor.every,
        )  # fmt: skip
        tree = {f"slot{i}": monitor.arrays[f"slot{i}"] for i in range(len(monitor.kept))}
        tree = tree or {"none": np.zeros((), np.float32)}  # orbax saves no empty tree: a trajectory that kept nothing
        meta = {"method": method, "lambda": lam, "kept": monitor.kept, "stopped_at": monitor.stopped_at,
                "halted_at": halted_at, "history": history, "seconds": time.perf_counter() - begin}  # fmt: skip
        return tree, meta

    tree, meta = stage.run({}, compute)  # ``run`` saves what compute returns (the ``like`` is unused then)
    return [(k["step"], tree[f"slot{i}"]) for i, k in enumerate(meta["kept"])], meta


def _attacked(exp: Experiment, name: str, variables: dict, strategy: str, repeats: int, after: str | None,
              first_draw: int = 0) -> dict:  # fmt: skip
    shots = budgets(exp.attacker, exp.config.piggyback.shots, exp.config.data.piggyback_fraction)[0]
    return attack(exp, name, variables, strategy, shots, repeats, after, first_draw)


def run_seed(exp: Experiment, tl: dict, random: dict) -> dict:
    """One seed's frontier: ``{"points": {loss: [point, ...]}, "reference": {"tl": row, "random_init": row},
    "attacker", "strategies": {strategy: {"tl": row, "random_init": row}}, "trajectories", "seconds"}``."""
    c = exp.config
    begin = time.perf_counter()
    d = c.disposal
    teacher = steps.replicate(exp.mesh, tl)
    start = refit_source_head(exp, tl)[0] if d.refit_source_head else tl
    placed = steps.replicate(exp.mesh, tl)
    tl_val = exp.accuracy(placed, exp.target.val, "target")

    def target(variables) -> tuple[float, float]:
        v = steps.replicate(exp.mesh, variables)
        return exp.accuracy(v, exp.target.val, "target"), exp.accuracy(v, exp.target.test, "target")

    # The references and the choice of attacker: every strategy on TL and on random init (validation decides).
    strategies = {}
    for strategy in c.piggyback.strategies:
        rows = {}
        for name, variables in (("tl", tl), ("random_init", random)):
            pl = _attacked(exp, name, variables, strategy, c.frontier.repeats, None)
            t_val, t_acc = target(variables) if name == "tl" else (float("nan"), float("nan"))
            rows[name] = {"seed": c.seed, "target_val": t_val, "pl_val": pl["val_acc"], "target_acc": t_acc,
                          "pl_acc": pl["acc"]}  # fmt: skip
        strategies[strategy] = rows
    attacker = c.frontier.attacker
    if attacker == "strongest":
        attacker = max(c.piggyback.strategies, key=lambda s: strategies[s]["tl"]["pl_val"])
    elif attacker not in strategies:
        strategies[attacker] = {}
        for name, variables in (("tl", tl), ("random_init", random)):
            pl = _attacked(exp, name, variables, attacker, c.frontier.repeats, None)
            t_val, t_acc = target(variables) if name == "tl" else (float("nan"), float("nan"))
            strategies[attacker][name] = {"seed": c.seed, "target_val": t_val, "pl_val": pl["val_acc"],
                                          "target_acc": t_acc, "pl_acc": pl["acc"]}  # fmt: skip
    reference = {name: dict(row) for name, row in strategies[attacker].items()}

    start_key = stage_key(c, "refit" if d.refit_source_head else "transfer")
    pl = _attacked(exp, "start", start, attacker, c.frontier.repeats, start_key)
    t_val, t_acc = target(start)
    start_point = {"seed": c.seed, "lambda": 0.0, "step": 0, "target_val": t_val, "pl_val": pl["val_acc"],
                   "target_acc": t_acc, "pl_acc": pl["acc"]}  # fmt: skip
    points, trajectories = {}, {}
    for method in d.methods:
        points[method] = [dict(start_point)]
        for lam in grid(exp, method):
            kept, meta = trajectory(exp, method, lam, start, teacher, tl_val)
            trajectories[f"{method} {lam:g}"] = {k: v for k, v in meta.items() if k != "history"}
            after = stage_key(c, "trajectory", method, lam=lam)
            for (step, variables), record in zip(kept, meta["kept"]):
                name = _name(method, lam, step)
                pl = _attacked(exp, name, variables, attacker, c.frontier.repeats, f"{after}-step{step}")
                _, t_acc = target(variables)
                points[method].append({"seed": c.seed, "lambda": lam, "step": step, "target_val": record["target_val"],
                                       "pl_val": pl["val_acc"], "target_acc": t_acc, "pl_acc": pl["acc"]})  # fmt: skip
    return {
        "points": points,
        "reference": reference,
        "attacker": attacker,
        "strategies": strategies,
        "trajectories": trajectories,
        "seconds": time.perf_counter() - begin,
    }


def attack_selected(exp: Experiment, tl: dict, selected: dict) -> dict:
    """Every strategy of ``piggyback.strategies`` against the states selected on this seed (``selected``:
    ``frontier.summarize``'s ``selected``) and against TL, with ``piggyback.repeats`` *fresh* attacker draws
    (numbered after the ``frontier.repeats`` draws the selection saw, so that the selection's luck does not
    carry into what is reported), the states restored from their finished trajectories:
    ``{strategy: {"tl": {"pl_val", "pl_acc"}, "losses": {loss: {"<b>": point}}}}`` with each point's
    ``pl_val`` and ``pl_acc`` under that strategy."""
    c = exp.config
    d = c.disposal
    first = c.frontier.repeats
    teacher = steps.replicate(exp.mesh, tl)
    start = refit_source_head(exp, tl)[0] if d.refit_source_head else tl
    start_key = stage_key(c, "refit" if d.refit_source_head else "transfer")
    tl_val = exp.accuracy(teacher, exp.target.val, "target")
    states = {}

    def state(loss: str, lam: float, step: int):
        if step == 0:
            return "start", start, start_key
        if (loss, lam) not in states:
            states[(loss, lam)] = dict(trajectory(exp, loss, lam, start, teacher, tl_val)[0])
        after = stage_key(c, "trajectory", loss, lam=lam)
        return _name(loss, lam, step), states[(loss, lam)][step], f"{after}-step{step}"

    out: dict = {}
    for strategy in c.piggyback.strategies:
        reference = _attacked(exp, "tl", tl, strategy, c.piggyback.repeats, None, first)
        out[strategy] = {"tl": {"pl_val": reference["val_acc"], "pl_acc": reference["acc"]}, "losses": {}}
        for loss, per_budget in selected.items():
            out[strategy]["losses"][loss] = {}
            for budget, choices in per_budget.items():
                mine = [x for x in choices if x["seed"] == c.seed]
                if mine:
                    name, variables, after = state(loss, mine[0]["lambda"], mine[0]["step"])
                    pl = _attacked(exp, name, variables, strategy, c.piggyback.repeats, after, first)
                    out[strategy]["losses"][loss][budget] = {**mine[0], "pl_val": pl["val_acc"], "pl_acc": pl["acc"]}
    return out


def strategy_cuts(per_seed_attacks: dict[int, dict], budgets) -> dict:
    """Each strategy's cut at the selected states over seeds (``attack_selected``'s fresh draws), and the worst
    case: ``{"by_strategy": {strategy: {loss: {"<b>": describe}}}, "worst_case": {loss: {"<b>": describe}}}``.
    A strategy's cut is its PL accuracy on TL minus on the selected state (test, the same fresh draws); the
    worst case, per seed, the smallest cut over the strategies (a defence is as strong as the attack it stops
    least)."""
    from dtl_jax.summary import describe

    seeds = sorted(per_seed_attacks)
    if not seeds:
        return {"by_strategy": {}, "worst_case": {}}
    strategies = list(per_seed_attacks[seeds[0]])
    losses = list(per_seed_attacks[seeds[0]][strategies[0]]["losses"]) if strategies else []
    values: dict = {}  # (strategy, loss, b) -> per-seed cut or None
    for strategy in strategies:
        for loss in losses:
            for b in budgets:
                row = []
                for s in seeds:
                    attacks = per_seed_attacks[s][strategy]
                    entry = attacks["losses"].get(loss, {}).get(str(b))
                    row.append(None if entry is None else attacks["tl"]["pl_acc"] - entry["pl_acc"])
                values[(strategy, loss, b)] = row
    by_strategy = {st: {loss: {str(b): describe(values[(st, loss, b)]) for b in budgets} for loss in losses}
                   for st in strategies}  # fmt: skip
    worst = {}
    for loss in losses:
        worst[loss] = {}
        for b in budgets:
            per_seed = []
            for i in range(len(seeds)):
                cuts = [values[(st, loss, b)][i] for st in strategies]
                per_seed.append(None if any(c is None for c in cuts) else min(cuts))
            worst[loss][str(b)] = describe(per_seed)
    return {"by_strategy": by_strategy, "worst_case": worst}
