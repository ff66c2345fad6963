"""The driver of the SURE settings search (experiments/sure_search.md) and of its held-out comparison.

Two commands, one process each (the data, the original models and Retrain/FT are built once per seed and
checkpointed under WORKDIR/seed<S>/, keyed by a hash of the settings they depend on, so a later call
reuses them):

    python experiments/sure_search.py search WORKDIR [--seeds 0,1,2,3,4] [--log LOG] [--md MD] \\
        'name1:unlearn.sure_alpha=0.3,unlearn.sure_domain_weight=0.5' 'name2:...' ...
    python experiments/sure_search.py compare WORKDIR --seeds 100,101,102,103,104 \\
        'before:unlearn.sure_optim.learning_rate=0.01,...' 'after:...'

Each positional argument is ``name:key=value,key=value`` (``--set`` syntax; ``name:`` alone is the
library's defaults).

``search`` never touches the test split. Per seed, 10 % of every class of the task's training split is
held out first (``D_h``, its own seed stream) and takes the test split's place: the scenario (D_f, D_v,
D_r) is drawn from what remains, and every metric that the library computes on the test set is computed on
``D_h`` instead (``va`` = accuracy on D_h, ``mia_v`` = the SVM attack with D_h as non-members, ``rep_v`` =
the representation attack with D_h as non-members). The original model, Retrain and FT are trained once
per seed on that scenario. For each SURE setting and seed:

    gap5 = mean |SURE − Retrain| over UA, RA, VA, MIA-eff_v, rep-MIA_v       (the objective, per seed)
    gap4 = the same without rep-MIA_v (docs/methods.md's gap with D_h for the test set)

and the summary gives the mean over seeds with a 95 % Student-t interval (n − 1 dof), the paired
differences to FT (gap5, rep-MIA_v), UA's standard deviation over seeds against Retrain's, and the
adversarial game's diagnostics (mean domain-classifier accuracy on forget / validation examples over the
first and the last quarter of the steps, the largest 20-step mean retain CE, the last domain BCE).

``compare`` runs the library itself (``dtl_jax.unlearn.runner.run``, i.e. ``dtl-jax unlearn --seed S``: its
splits, its test metrics) for Retrain, every baseline and each SURE setting, and prints per-method
means with 95 % intervals and the paired SURE − baseline differences; it is for the reporting seeds
(100-104), never for tuning.

A JSON line per SURE setting goes to LOG (default WORKDIR/log.jsonl); with ``--md`` a table row is appended
to that markdown file as each setting finishes, so partial results survive an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from dtl_jax import checkpoint
from dtl_jax import config as C
from dtl_jax.data.tasks import Task, make_task, stratified_split
from dtl_jax.models import build
from dtl_jax.train import steps
from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn.metrics import gap_to_oracle
from dtl_jax.unlearn.registry import HEAD, Context, load_methods
from dtl_jax.unlearn.runner import _metrics
from dtl_jax.unlearn.scenario import make_scenario
from dtl_jax.workdir import fingerprint

HOLDOUT = 0.1  # fraction of each class of the task's training split held out as D_h (search only)
HOLDOUT_STREAM = 271828  # D_h's seed stream: np.random.default_rng([seed, HOLDOUT_STREAM])


class Capture:
    """A ``MetricsWriter`` stand-in that keeps the logged rows in memory."""

    def __init__(self):
        self.rows: dict[str, list[dict]] = {}

    def write(self, stage: str, rows: list[dict]) -> None:
        self.rows.setdefault(stage, []).extend(rows)

    def close(self) -> None:
        pass


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [a for a in rest.split(",") if a.strip()]


class Seed:
    """One seed's task, scenario, original model and reference methods (cached on disk)."""

    def __init__(self, workdir: Path, seed: int, holdout: float, base: list[str]):
        self.seed, self.holdout = seed, holdout
        self.config = C.validate(C.apply_overrides(dataclasses.replace(C.Config(), seed=seed), base))
        cfg, u, d = self.config, self.config.unlearn, self.config.data
        task = make_task("unlearn", u.task, d, seed)
        if holdout:  # D_h takes the test split's place; the test split is never read
            train, held = stratified_split(task.train, holdout, [seed, HOLDOUT_STREAM])
            task = Task(task.name, train, task.val, held, task.class_names)
        self.scenario = make_scenario(task, u, d.val_fraction, seed)
        self.network = build(cfg.model)
        key = (seed, holdout, d, cfg.model, u.task, u.scenario, u.forget_fraction, u.forget_class)
        self.key, self.dir = key, workdir / f"seed{seed}"
        shape = tuple(self.scenario.retain.images.shape[1:])
        init = self.network.init(jax.random.PRNGKey(seed), shape, {HEAD: self.scenario.num_classes})
        directory = self.dir / f"original-{fingerprint(*key, u.original)}"
        if checkpoint.exists(directory):
            self.original = checkpoint.restore(directory, init)[0]
        else:  # as dtl_jax.unlearn.runner.run trains it
            ctx = Context(cfg, self.network, self.scenario, init, seed, True)
            total = ctx.steps_per_epoch(self.scenario.train, u.original.batch_size) * u.original.epochs
            tx = make_optimizer(u.original, total)
            stream = ((b,) for b in ctx.batches(self.scenario.train, u.original.batch_size, seed=20))
            step = steps.supervised_step(self.network, HEAD, tx)
            self.original = ctx.train(step, init, tx, stream, total, "original")
            checkpoint.save(directory, self.original, {})

    def method(self, name: str, overrides: list[str] = ()) -> tuple[dict, dict]:
        """Runs (or restores) ``name`` under the seed's config plus ``overrides``: (metrics row, diagnostics)."""
        cfg = C.validate(C.apply_overrides(self.config, list(overrides)))
        # Retrain depends on the original model's recipe only; the others on the whole unlearn section
        depends = cfg.unlearn.original if name == "retrain" else dataclasses.replace(cfg.unlearn, methods=())
        directory = self.dir / f"{name}-{fingerprint(*self.key, depends)}"
        capture = Capture()
        if checkpoint.exists(directory):
            unlearned, meta = checkpoint.restore(directory, self.original)
        else:
            ctx = Context(cfg, self.network, self.scenario, self.original, self.seed + 1000, True, writer=capture)
            start = time.perf_counter()
            unlearned = jax.block_until_ready(load_methods()[name](ctx))
            meta = {"wall_s": time.perf_counter() - start, "diagnostics": diagnostics(capture.rows.get(name, []))}
            meta["halted"] = any(h["halted_at"] is not None for h in ctx.history)
            checkpoint.save(directory, unlearned, meta)
        return _metrics(self.network, unlearned, self.scenario, cfg), meta


def diagnostics(rows: list[dict]) -> dict:
    """Summaries of SURE's per-step log (empty for other methods)."""
    if not rows or "domain_acc_forget" not in rows[0]:
        return {}
    q = max(1, len(rows) // 4)
    ce = np.array([r["ce"] for r in rows])
    window = min(20, len(ce))
    running = np.convolve(ce, np.ones(window) / window, mode="valid")

    def mean(key, part):
        return float(np.mean([r[key] for r in part]))

    return {
        "acc_f_first": mean("domain_acc_forget", rows[:q]),
        "acc_v_first": mean("domain_acc_val", rows[:q]),
        "acc_f_last": mean("domain_acc_forget", rows[-q:]),
        "acc_v_last": mean("domain_acc_val", rows[-q:]),
        "bce_last": mean("domain_bce", rows[-q:]),
        "ce_max20": float(running.max()),
        "ce_last": mean("ce", rows[-q:]),
        "steps": len(rows),
    }


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (n − 1 dof)."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def gap5(row: dict, oracle: dict) -> float:
    return float(np.mean([abs(row[k] - oracle[k]) for k in ("ua", "ra", "ta", "mia_efficacy", "rep_mia")]))


def search(args) -> None:
    seeds = [Seed(args.workdir, s, HOLDOUT, args.base) for s in args.seeds]
    refs = {s.seed: {m: s.method(m)[0] for m in ("retrain", "ft")} for s in seeds}
    ua_retrain_sd = float(np.std([refs[s]["retrain"]["ua"] for s in refs], ddof=1))
    ft_gap5 = [gap5(refs[s]["ft"], refs[s]["retrain"]) for s in refs]
    for m in ("retrain", "ft"):
        ua = [refs[s][m]["ua"] for s in refs]
        print(f"{m}: UA {np.round(ua, 3).tolist()} (sd {np.std(ua, ddof=1):.3f})", flush=True)
    print("FT gap5 {:.3f} ± {:.3f}".format(*interval(ft_gap5)), flush=True)
    log = Path(args.log or args.workdir / "log.jsonl")
    for text in args.settings:
        name, overrides = parse_setting(text)
        start = time.perf_counter()
        per_seed = []
        for s in seeds:
            row, meta = s.method("sure", overrides)
            oracle, ft = refs[s.seed]["retrain"], refs[s.seed]["ft"]
            per_seed.append({
                "seed": s.seed, **{k: row[k] for k in ("ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia")},
                "gap5": None if row["ua"] is None else gap5(row, oracle),
                "gap4": None if row["ua"] is None else gap_to_oracle(row, oracle),
                "retrain_ua": oracle["ua"], "retrain_rep": oracle["rep_mia"], "ft_rep": ft["rep_mia"],
                "ft_ua": ft["ua"], "ft_gap5": gap5(ft, oracle), "halted": meta.get("halted"),
                **meta.get("diagnostics", {}),
            })  # fmt: skip
        ok = all(p["gap5"] is not None for p in per_seed)
        summary = {"name": name, "overrides": overrides, "seconds": round(time.perf_counter() - start, 1)}
        if ok:
            summary.update(
                gap5=interval([p["gap5"] for p in per_seed]),
                gap4=interval([p["gap4"] for p in per_seed]),
                d_gap5_ft=interval([p["gap5"] - p["ft_gap5"] for p in per_seed]),
                d_rep_ft=interval([p["rep_mia"] - p["ft_rep"] for p in per_seed]),
                d_rep_retrain=interval([p["rep_mia"] - p["retrain_rep"] for p in per_seed]),
                ua=interval([p["ua"] for p in per_seed]),
                ua_sd_ratio=float(np.std([p["ua"] for p in per_seed], ddof=1)) / ua_retrain_sd,
                ra=interval([p["ra"] for p in per_seed]),
                va=interval([p["ta"] for p in per_seed]),
                acc_f_last=float(np.mean([p.get("acc_f_last", np.nan) for p in per_seed])),
                acc_v_last=float(np.mean([p.get("acc_v_last", np.nan) for p in per_seed])),
                ce_max20=float(np.max([p.get("ce_max20", np.nan) for p in per_seed])),
            )
        with open(log, "a") as f:
            f.write(json.dumps({**summary, "per_seed": per_seed}) + "\n")
        line = md_row(summary) if ok else f"| {name} | `{' '.join(overrides)}` | diverged / non-finite | | | | | | |"
        print(line, flush=True)
        if args.md:
            with open(args.md, "a") as f:
                f.write(line + "\n")


MD_HEADER = (
    "| name | overrides | gap5 (objective) | gap4 | SURE−FT gap5 | SURE−FT rep-MIA_v | UA (sd / Retrain's) "
    "| G_d acc forget/val, last ¼ | max CE | s |\n|---|---|---|---|---|---|---|---|---|---|"
)


def md_row(s: dict) -> str:
    def ci(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    return (
        f"| {s['name']} | `{' '.join(o.replace('unlearn.', '') for o in s['overrides'])}` | {ci(s['gap5'])} "
        f"| {ci(s['gap4'])} | {ci(s['d_gap5_ft'])} | {ci(s['d_rep_ft'])} | {s['ua'][0]:.3f} ({s['ua_sd_ratio']:.2f}x) "
        f"| {s['acc_f_last']:.2f}/{s['acc_v_last']:.2f} | {s['ce_max20']:.2f} | {s['seconds']:.0f} |"
    )


COMPARE_METRICS = ("ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia", "gap")
BASELINES = ("retrain", "ft", "ga", "rl", "l1_sparse", "salun", "scrub", "boundary_shrink")


def compare(args) -> None:
    """The library's own runs (``dtl_jax.unlearn.runner.run``, what ``dtl-jax unlearn --seed S`` does) in
    WORKDIR/seed-S: Retrain, every baseline and SURE under the first setting, then SURE alone under
    each further setting in the same workdir (the original model is reused; its gap is taken to the first
    run's Retrain of the same seed)."""
    from dtl_jax.unlearn import runner

    table: dict[str, list[dict]] = {}
    for seed in args.seeds:
        rows = {}
        for i, text in enumerate(args.settings):
            name, overrides = parse_setting(text)
            cfg = C.apply_overrides(dataclasses.replace(C.Config(), seed=seed), args.base + overrides)
            methods = (*BASELINES, "sure") if i == 0 else ("sure",)
            cfg = dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, methods=methods))
            res = runner.run(cfg, args.workdir / f"seed-{seed}", quiet=True, overwrite=True)
            for m in methods:
                rows[m if m != "sure" else f"sure[{name}]"] = res["methods"][m]
        for name, row in rows.items():
            row["gap"] = gap_to_oracle(row, rows["retrain"])
            table.setdefault(name, []).append(row)
        print(f"seed {seed}: " + ", ".join(f"{n} UA {r['ua']:.3f} gap {r['gap']:.3f}" for n, r in rows.items()))
    out = {"seeds": args.seeds, "base": args.base, "settings": args.settings, "rows": table, "summary": {}}
    for name, rows in table.items():
        out["summary"][name] = {k: interval([r[k] for r in rows]) for k in COMPARE_METRICS}
        out["summary"][name]["ua_sd"] = float(np.std([r["ua"] for r in rows], ddof=1))
    for name in [n for n in table if n.startswith("sure[")]:
        for ref in BASELINES[1:]:
            for k in ("gap", "rep_mia"):
                diffs = [a[k] - b[k] for a, b in zip(table[name], table[ref])]
                out.setdefault("paired", {})[f"{name} - {ref} {k}"] = interval(diffs)
    Path(args.out or args.workdir / "compare.json").write_text(json.dumps(out, indent=1))
    header = f"{'method':<22}" + "".join(f"{k:>16}" for k in COMPARE_METRICS) + f"{'UA sd':>8}"
    print(header)
    for name, summary in out["summary"].items():
        cells = "".join(f"{summary[k][0]:>8.3f}±{summary[k][1]:<7.3f}" for k in COMPARE_METRICS)
        print(f"{name:<22}{cells}{summary['ua_sd']:>8.3f}")
    for key, (mean, half) in out.get("paired", {}).items():
        print(f"{key:<40} {mean:+.3f} ± {half:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("search", "compare"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("settings", nargs="*", default=["defaults:"])
    parser.add_argument("--seeds", default="0,1,2,3,4", type=lambda t: [int(s) for s in t.split(",")])
    parser.add_argument("--base", default="", type=lambda t: [a for a in t.split(",") if a],
                        help="overrides applied to every run (e.g. unlearn.task.dataset=digits)")  # fmt: skip
    parser.add_argument("--log", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_intermixed_args(argv)
    (search if args.command == "search" else compare)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
