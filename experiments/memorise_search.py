"""The driver of the memorisation-regime search (issue 22; experiments/memorise_search.md).

Three commands, one process each; the data, the original models and the methods' results are built once
per seed and setting and checkpointed under WORKDIR/seed<S>/ (keyed by a hash of what they depend on),
so a later call reuses them:

    python experiments/memorise_search.py fit WORKDIR [--seeds 0] 'name:key=value;key=value' ...
    python experiments/memorise_search.py search WORKDIR --method ft [--seeds 0,1,2,3,4] \\
        'name1:unlearn.optim.learning_rate=0.01' 'name2:...' ...
    python experiments/memorise_search.py paired SUMMARY_JSON

Each positional setting is ``name:key=value;key=value`` (``--set`` syntax, ``;`` between assignments, so
that a value may hold commas; ``name:`` alone is the library's defaults), applied on top of ``--base``
(``;``-separated overrides applied to every run).

``fit`` trains the original model exactly as ``dtl-jax unlearn`` does (``dtl_jax.unlearn.runner.run``: its
split, scenario, initialisation and batch streams) and reports its fit: accuracy on ``D_r ∪ D_f`` (train),
on the test split (test), the loss-threshold MIA (forget vs test) and the training's wall seconds. It
chooses nothing by the test accuracy: the recipe is chosen by train accuracy (≥ 0.98) and wall time.

``search`` never reads the test split (experiments/sure_search.md's protocol): per seed, 10 % of every
class of the task's training split is held out first (``D_h``, its own seed stream) and takes the test
split's place; the scenario is drawn from the rest; the original model and Retrain are trained once per
seed. For each setting of ``--method`` and each seed:

    gap5 = mean |method − Retrain| over UA, RA, VA, MIA-eff_v, rep-MIA_v      (the objective, per seed)
    gap4 = the same without rep-MIA_v

with VA the accuracy on D_h and the attacks' non-members D_h; the summary is the mean over seeds with a
95 % Student-t interval, UA's standard deviation against Retrain's, and whether a run diverged.

``paired`` reads a ``summary.json`` of ``dtl-jax unlearn --seeds ...`` and prints the paired per-seed
differences SURE − every other method (gap, rep-MIA, |rep-MIA − Retrain's| as ``rep_gap``, UA, MIA-eff)
with 95 % Student-t intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from dtl_jax import checkpoint, seeds
from dtl_jax import config as C
from dtl_jax.data.tasks import Task, make_task, stratified_split
from dtl_jax.evaluate import predict
from dtl_jax.models import build
from dtl_jax.stages import Compiled
from dtl_jax.train import steps
from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn.metrics import gap_to_oracle
from dtl_jax.unlearn.registry import HEAD, Context, load_methods
from dtl_jax.unlearn.runner import _metrics
from dtl_jax.unlearn.scenario import make_scenario
from dtl_jax.workdir import fingerprint

HOLDOUT = 0.1  # fraction of each class of the task's training split held out as D_h (search only)


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [a.strip() for a in rest.split(";") if a.strip()]


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (n − 1 dof)."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def load_avg() -> float:
    return os.getloadavg()[0]


class Seed:
    """One seed's task, scenario and original model, made as ``dtl_jax.unlearn.runner.run`` makes them;
    with ``holdout``, D_h (10 % of every class of the training split) replaces the test split first."""

    compiled = Compiled()

    def __init__(self, workdir: Path, seed: int, holdout: bool, overrides: list[str], config: str | None = None):
        self.seed, self.holdout = seed, holdout
        base = dataclasses.replace(C.load(config, "unlearn"), seed=seed)  # None: dtl-jax unlearn's default
        self.config = C.validate(C.apply_overrides(base, overrides))
        cfg, u, d = self.config, self.config.unlearn, self.config.data
        task = make_task("unlearn", u.task, d, seeds.derive(seed, "unlearn-split"))
        if holdout:  # D_h takes the test split's place; the test split is never read
            train, held = stratified_split(task.train, HOLDOUT, seeds.derive(seed, "memorise-holdout"))
            task = Task(task.name, train, task.val, held, task.class_names)
        self.scenario = make_scenario(task, u, d.val_fraction, seeds.derive(seed, "unlearn-scenario"))
        self.network = build(cfg.model)
        self.key = (seed, holdout, d, cfg.model, u.task, u.scenario, u.forget_fraction, u.forget_class)
        self.dir = workdir / f"seed{seed}"
        shape = tuple(self.scenario.retain.images.shape[1:])
        init = self.network.init(seeds.key(seed, "unlearn-original-init"), shape, {HEAD: self.scenario.num_classes})
        directory = self.dir / f"original-{fingerprint(*self.key, u.original)}"
        if checkpoint.exists(directory):
            self.original, meta = checkpoint.restore(directory, init)
        else:  # as dtl_jax.unlearn.runner.run trains it
            ctx = Context(cfg, self.network, self.scenario, init, seed, True)
            total = ctx.steps_per_epoch(self.scenario.train, u.original.batch_size) * u.original.epochs
            tx = make_optimizer(u.original, total)
            stream = ((b,) for b in ctx.batches(self.scenario.train, u.original.batch_size, seed=20))
            load0, start = load_avg(), time.perf_counter()
            self.original = jax.block_until_ready(
                ctx.train(steps.supervised_step(self.network, HEAD, tx), init, tx, stream, total, "original")
            )
            meta = {"wall_s": time.perf_counter() - start, "load": [load0, load_avg()], "steps": total}
            checkpoint.save(directory, self.original, meta)
        self.original_meta = meta

    def accuracy(self, variables: dict, split) -> float:
        fn = self.compiled.get(("predict", self.config.model, HEAD), lambda: steps.predict_fn(self.network, HEAD))
        d = self.config.data
        logits, _ = predict(fn, variables, split, batch_size=500, mean=d.mean, std=d.std, features=False)
        return float(np.mean(np.argmax(logits, -1) == split.labels))

    def metrics(self, variables: dict) -> dict:
        return _metrics(self.network, variables, self.scenario, self.config, self.compiled)

    def method(self, name: str, overrides: list[str] = ()) -> tuple[dict, dict]:
        """Runs (or restores) ``name`` under the seed's config plus ``overrides``: (metrics row, meta)."""
        cfg = C.validate(C.apply_overrides(self.config, list(overrides)))
        depends = cfg.unlearn.original if name == "retrain" else dataclasses.replace(cfg.unlearn, methods=())
        directory = self.dir / f"{name}-{fingerprint(*self.key, self.config.unlearn.original, depends)}"
        if checkpoint.exists(directory):
            unlearned, meta = checkpoint.restore(directory, self.original)
        else:
            ctx = Context(cfg, self.network, self.scenario, self.original, self.seed, True)
            start = time.perf_counter()
            unlearned = jax.block_until_ready(load_methods()[name](ctx))
            meta = {"wall_s": time.perf_counter() - start, "load": load_avg()}
            meta["halted"] = any(h["halted_at"] is not None for h in ctx.history)
            checkpoint.save(directory, unlearned, meta)
        return _metrics(self.network, unlearned, self.scenario, cfg, self.compiled), meta


# ------------------------------------------------------------------------------------------------------
# fit: the original model's fit under a recipe


def fit(args) -> None:
    for text in args.settings:
        name, overrides = parse_setting(text)
        for seed in args.seeds:
            s = Seed(args.workdir, seed, False, args.base + overrides, args.config)
            row = s.metrics(s.original)
            out = {
                "name": name, "overrides": overrides, "seed": seed,
                "train_acc": s.accuracy(s.original, s.scenario.train), "test_acc": row["ta"],
                "loss_mia": row["loss_mia"], "ua": row["ua"], "mia_efficacy": row["mia_efficacy"],
                "rep_mia": row["rep_mia"], **s.original_meta,
            }  # fmt: skip
            with open(args.log or args.workdir / "fit.jsonl", "a") as f:
                f.write(json.dumps(out) + "\n")
            print(
                f"| {name} | `{' '.join(overrides)}` | {seed} | {out['train_acc']:.3f} | {out['test_acc']:.3f} "
                f"| {out['loss_mia']:.3f} | {out.get('wall_s', float('nan')):.0f} "
                f"| {'/'.join(f'{x:.1f}' for x in out.get('load', []))} |",
                flush=True,
            )


# ------------------------------------------------------------------------------------------------------
# search: one method's settings on the tuning seeds, D_h for the test split


def gap5(row: dict, oracle: dict) -> float:
    return float(np.mean([abs(row[k] - oracle[k]) for k in ("ua", "ra", "ta", "mia_efficacy", "rep_mia")]))


def search(args) -> None:
    seeds_ = [Seed(args.workdir, s, True, args.base, args.config) for s in args.seeds]
    for s in seeds_:  # the original model's fit on this seed (D_h for the test split)
        row = s.metrics(s.original)
        print(
            f"seed {s.seed}: original train acc {s.accuracy(s.original, s.scenario.train):.3f}, D_h acc "
            f"{row['ta']:.3f}, loss-MIA_v {row['loss_mia']:.3f} ({s.original_meta.get('wall_s', 0):.0f} s)",
            flush=True,
        )
    refs = {s.seed: s.method("retrain")[0] for s in seeds_}
    retrain_ua_sd = float(np.std([r["ua"] for r in refs.values()], ddof=1))
    log = Path(args.log or args.workdir / "search.jsonl")
    for text in args.settings:
        name, overrides = parse_setting(text)
        start, per_seed = time.perf_counter(), []
        for s in seeds_:
            row, meta = s.method(args.method, overrides)
            oracle = refs[s.seed]
            ok = row["ua"] is not None
            per_seed.append({
                "seed": s.seed, **{k: row[k] for k in ("ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia")},
                "gap5": gap5(row, oracle) if ok else None, "gap4": gap_to_oracle(row, oracle) if ok else None,
                "retrain": {k: oracle[k] for k in ("ua", "ra", "ta", "mia_efficacy", "rep_mia")}, **meta,
            })  # fmt: skip
        ok = all(p["gap5"] is not None for p in per_seed)
        summary = {"method": args.method, "name": name, "overrides": overrides, "load": load_avg(),
                   "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        if ok:
            summary.update({k: interval([p[k] for p in per_seed]) for k in ("gap5", "gap4", "ua", "ra", "ta")})
            summary["ua_sd_ratio"] = float(np.std([p["ua"] for p in per_seed], ddof=1)) / retrain_ua_sd
            summary["rep_mia"] = interval([p["rep_mia"] for p in per_seed])
            summary["mia_efficacy"] = interval([p["mia_efficacy"] for p in per_seed])
        summary["halted"] = sum(bool(p.get("halted")) for p in per_seed)
        with open(log, "a") as f:
            f.write(json.dumps({**summary, "per_seed": per_seed}) + "\n")
        line = md_row(summary) if ok else f"| {args.method} | {name} | `{' '.join(overrides)}` | non-finite |"
        print(line, flush=True)
        if args.md:
            with open(args.md, "a") as f:
                f.write(line + "\n")


def md_row(s: dict) -> str:
    def ci(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    return (
        f"| {s['method']} | {s['name']} | `{' '.join(o.replace('unlearn.', '') for o in s['overrides'])}` "
        f"| {ci(s['gap5'])} | {ci(s['gap4'])} | {ci(s['ua'])} ({s['ua_sd_ratio']:.2f}x) | {ci(s['ra'])} "
        f"| {ci(s['ta'])} | {ci(s['mia_efficacy'])} | {ci(s['rep_mia'])} | {s['halted']} | {s['seconds']:.0f} "
        f"| {s['load']:.1f} |"
    )


# ------------------------------------------------------------------------------------------------------
# paired: SURE − every method, from a summary.json of `dtl-jax unlearn --seeds ...`


def paired(args) -> None:
    summary = json.loads(Path(args.workdir).read_text())
    rows = summary["rows"]
    values = {m: {k: v["values"] for k, v in r.items() if "values" in v} for m, r in rows.items()}
    oracle = values["retrain"]["rep_mia"]
    for row in values.values():  # the representation attack's distance to Retrain's, per seed
        row["rep_gap"] = [None if a is None else abs(a - b) for a, b in zip(row["rep_mia"], oracle)]
    keys = ("gap", "rep_mia", "rep_gap", "ua", "mia_efficacy")
    print("| method − | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for ref in values:
        if ref in ("sure", "original"):
            continue
        cells = []
        for k in keys:
            a, b = values["sure"].get(k), values[ref].get(k)
            if a is None or b is None or None in a or None in b:
                cells.append("-")
                continue
            mean, half = interval(np.subtract(a, b))
            bold = "**" if abs(mean) > half else ""
            cells.append(f"{bold}{mean:+.3f} ± {half:.3f}{bold}")
        print(f"| SURE − {ref} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("fit", "search", "paired"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("settings", nargs="*", default=["defaults:"])
    parser.add_argument("--seeds", default="0,1,2,3,4", type=lambda t: [int(s) for s in t.split(",")])
    parser.add_argument("--base", default="", type=lambda t: [a.strip() for a in t.split(";") if a.strip()],
                        help="overrides applied to every run (e.g. unlearn.scenario=random)")  # fmt: skip
    parser.add_argument("--method", default="sure")
    parser.add_argument("--config", default=None, help="a config file or name (default: dtl-jax unlearn's default)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_intermixed_args(argv)
    {"fit": fit, "search": search, "paired": paired}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
