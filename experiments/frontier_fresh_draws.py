"""Fresh attacker draws at the states a finished frontier selected (for a frontier made before
``attack_selected`` drew fresh attackers itself, e.g. the README's held-out study).

    python experiments/frontier_fresh_draws.py WORKDIR [--config frontier_study] [--set ...] [--first-draw 10]

Run it with the same code that made ``WORKDIR`` (its stage keys carry the code's version, so the
trajectories are restored, not re-run). For every seed of ``WORKDIR/frontier.json`` and every attack of
``piggyback.strategies``: TL and every selected state (each loss, each budget) attacked with
``piggyback.repeats`` draws numbered from ``--first-draw`` (draws the selection never saw); the cut is TL's
PL accuracy minus the state's on those same draws. Writes ``WORKDIR/frontier-fresh.json``:
``{"first_draw", "by_strategy": {strategy: {loss: {"<b>": describe}}}, "worst_case": {loss: {"<b>":
describe}}, "per_seed": ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dtl_jax import config as config_lib
from dtl_jax import stages
from dtl_jax.data.tasks import budgets
from dtl_jax.stages import frontier as frontier_stage
from dtl_jax.stages.keys import stage_key
from dtl_jax.stages.piggyback import piggyback_run
from dtl_jax.summary import describe
from dtl_jax.train import steps
from dtl_jax.train.compiled import Compiled
from dtl_jax.workdir import seed_dir, write_json


def fresh_attacks(exp, tl: dict, selected: dict, first_draw: int) -> dict:
    """``{strategy: {"tl": pl_acc, "losses": {loss: {"<b>": pl_acc}}}}`` on draws ``first_draw`` ..."""
    c = exp.config
    d = c.disposal
    shots = budgets(exp.attacker, c.piggyback.shots, c.data.piggyback_fraction)[0]
    draws = range(first_draw, first_draw + c.piggyback.repeats)
    teacher = steps.replicate(exp.mesh, tl)
    start = stages.refit_source_head(exp, tl)[0] if d.refit_source_head else tl
    start_key = stage_key(c, "refit" if d.refit_source_head else "transfer")
    tl_val = exp.accuracy(teacher, exp.target.val, "target")
    kept = {}

    def acc(name, variables, strategy, after):
        runs = [piggyback_run(exp, name, variables, shots, r, strategy, after) for r in draws]
        return sum(run["acc"] for run in runs) / len(runs)

    out = {}
    for strategy in c.piggyback.strategies:
        out[strategy] = {"tl": acc("tl", tl, strategy, None), "losses": {}}
        for loss, per_budget in selected.items():
            out[strategy]["losses"][loss] = {}
            for budget, choices in per_budget.items():
                mine = [x for x in choices if x["seed"] == c.seed]
                if not mine:
                    continue
                lam, step = mine[0]["lambda"], mine[0]["step"]
                if step == 0:
                    name, variables, after = "start", start, start_key
                else:
                    if (loss, lam) not in kept:
                        kept[(loss, lam)] = dict(frontier_stage.trajectory(exp, loss, lam, start, teacher, tl_val)[0])
                    after = f"{stage_key(c, 'trajectory', loss, lam=lam)}-step{step}"
                    name, variables = f"{loss}-lam{lam:g}-step{step}", kept[(loss, lam)][step]
                out[strategy]["losses"][loss][budget] = acc(name, variables, strategy, after)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--config", default="frontier_study", help="the config the frontier ran")
    parser.add_argument("--first-draw", type=int, default=10, help="the first fresh draw's number (default 10)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="the frontier's --set values")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    summary = json.loads((workdir / "frontier.json").read_text())
    config = config_lib.apply_overrides(config_lib.load(args.config), args.overrides)
    compiled = Compiled()
    per_seed = {}
    for seed in summary["seeds"]:
        one = dataclasses.replace(config, seed=seed)
        exp = stages.build_experiment(one, seed_dir(workdir, seed), True, compiled)
        tl, _ = stages.transfer(exp, stages.pretrain(exp)[0])
        per_seed[seed] = fresh_attacks(exp, tl, summary["selected"], args.first_draw)
        exp.writer.close()
        print(f"seed {seed} done", flush=True)
    seeds = sorted(per_seed)
    strategies = list(per_seed[seeds[0]])
    losses = list(summary["selected"])
    cut = {(st, loss, b): [per_seed[s][st]["tl"] - per_seed[s][st]["losses"][loss][str(b)] for s in seeds]
           for st in strategies for loss in losses for b in summary["budgets"]}  # fmt: skip
    out = {
        "first_draw": args.first_draw,
        "seeds": seeds,
        "by_strategy": {st: {loss: {str(b): describe(cut[(st, loss, b)]) for b in summary["budgets"]}
                             for loss in losses} for st in strategies},
        "worst_case": {loss: {str(b): describe([min(cut[(st, loss, b)][i] for st in strategies)
                                                for i in range(len(seeds))]) for b in summary["budgets"]}
                       for loss in losses},
        "per_seed": per_seed,
    }  # fmt: skip
    write_json(workdir / "frontier-fresh.json", out)
    print(json.dumps({st: {loss: round(v["0.03"]["mean"], 3) for loss, v in per.items()}
                      for st, per in out["by_strategy"].items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
