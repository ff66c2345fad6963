"""Disposable transfer learning end to end (docs/methods.md §1): one seed's ``results.json``, or several seeds
with ``summary.json``, and the printed tables.

    pre-train ─▶ transfer ─▶ disposal (gc, ngc, rtf, utf, ga) ─▶ piggyback learning ─▶ results.json
    (dtl_jax/stages/: each stage checkpointed under its stage key and reused when unchanged)

``run_seeds`` runs every seed in one process, sharing the compiled steps, each seed in
``WORKDIR/seed-<s>/`` exactly as a single-seed run writes it (and resumable in the same way), then writes
``WORKDIR/summary.json`` (``dtl_jax.summary``): every model's metrics as mean, std, 95 % CI, n and values,
and ``paired`` differences to TL.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from dtl_jax import compilation_cache, cpu_conv, frontier, runs, runtime, stages
from dtl_jax.config import Config, to_dict
from dtl_jax.stages import frontier as frontier_stage
from dtl_jax.summary import format_table as results_table
from dtl_jax.summary import mean_ci, shown
from dtl_jax.train.compiled import Compiled
from dtl_jax.workdir import claim, prepare, provenance, seed_dir, versions, write_json

REFERENCE = "tl"  # paired differences in summary.json are taken against the TL model


def run(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: Compiled | None = None,
) -> dict:
    """The whole DTL experiment for ``config.seed``; writes ``workdir/results.json`` (atomically) and
    returns the results. A workdir made by a run with another config is refused unless ``overwrite``."""
    config = stages.check(config)
    compilation_cache.enable(config.compilation_cache)
    if config.deterministic:
        runtime.set_deterministic()  # before the first computation; recorded below
    runtime.start_profiling(config.profile)
    workdir = prepare(Path(workdir or config.workdir), config, "run", overwrite)
    start = time.perf_counter()
    exp = stages.build_experiment(config, workdir, quiet, compiled)
    claim(workdir, exp.config, "run")
    c = exp.config
    pretrained, pretrain_meta = stages.pretrain(exp)
    tl, transfer_meta = stages.transfer(exp, pretrained)
    records = {"pretrain": pretrain_meta, "transfer": transfer_meta}
    models = {"random_init": stages.random_init(exp), "tl": tl}
    if c.disposal.methods and c.disposal.refit_source_head:  # shared by every method (checkpointed)
        records["refit"] = stages.refit_source_head(exp, tl)[1]
    disposal = {}
    for method in c.disposal.methods:
        models[method], disposal[method] = stages.dispose(exp, method, tl)
    results = {"models": {}, "disposal": {}}
    results["provenance"] = provenance(tl)  # command, commit, devices, CPU, dtype: the report's header
    for name, variables in models.items():
        row = stages.evaluate_model(exp, variables)
        pl = stages.piggyback_learning(exp, name, variables)
        records[f"piggyback {name}"] = pl
        row.update(pl_acc=pl["pl_acc"], pl_val_acc=pl["pl_val_acc"], pl_curve=pl["pl_curve"])
        row.update(pl_curve_epochs=pl["pl_curve_epochs"], pl=pl["pl"])
        if name in disposal:  # the held-out target accuracy of the returned state (validation, for searches)
            returned = [c for c in disposal[name]["checks"] if c["step"] == disposal[name]["returned_step"]]
            row["target_val_acc"] = returned[0]["target_val_acc"] if returned else float("nan")
        elif name == "tl":
            row["target_val_acc"] = (
                exp.accuracy(variables, exp.target.val, "target") if len(exp.target.val) else float("nan")
            )
        results["models"][name] = row
    records.update({f"disposal {m}": meta for m, meta in disposal.items()})
    # Per stage: the divergence guard's record (a halted stage kept its last good state), and where it ran.
    results["stages"] = {name: runs.stage_record(meta.get("halted_at"), meta.get("devices", 1))
                         for name, meta in records.items()}  # fmt: skip
    for method, meta in disposal.items():
        results["disposal"][method] = {k: v for k, v in meta.items() if k != "history"}
        results["disposal"][method]["final_unlearn"] = meta["history"][-1]["unlearn"] if meta["history"] else None
    # The source model's fit after pre-training: accuracy on the source task's training and test splits
    # (the paper's ResNet-18 fits its training data: train accuracy ≈ 1).
    results["pretrain_fit"] = {
        "train_acc": exp.accuracy(pretrained, exp.source.train, "source"),
        "test_acc": exp.accuracy(pretrained, exp.source.test, "source"),
    }
    results["tasks"] = {
        t.name: {"classes": list(t.class_names), "train": len(t.train), "val": len(t.val), "test": len(t.test)}
        for t in (exp.source, exp.target, exp.attacker)
    }
    results["config"] = to_dict(c)
    results["versions"] = versions()
    results["cpu_conv"] = cpu_conv.record()
    results["runtime"] = {
        "compute_dtype": c.model.dtype,
        "deterministic": runtime.determinism_record(c.deterministic),
        "profile": c.profile or None,
    }
    results["seconds"] = time.perf_counter() - start
    write_json(workdir / "results.json", results)
    exp.writer.close()
    return results


def run_seeds(
    config: Config,
    seeds: list[int],
    workdir: str | os.PathLike,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: Compiled | None = None,
) -> dict:
    """``run`` for every seed of ``seeds`` in this process (the compiled steps shared), each in
    ``workdir/seed-<s>`` (``runs.run_seeds``); writes and returns ``workdir/summary.json``."""
    stages.check(config)  # an unknown disposal loss is refused before the first seed

    def rows(results: dict) -> dict:
        return {name: _scalars(row) for name, row in results["models"].items()}

    return runs.run_seeds(
        run, config, seeds, workdir, rows=rows, references=(REFERENCE,), kind="run", quiet=quiet,
        overwrite=overwrite, compiled=compiled,
    )  # fmt: skip


def _scalars(row: dict) -> dict:
    """A model's scalar metrics, with PL accuracy at every budget as ``pl_acc@<shots>``."""
    out = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for shots, entry in row.get("pl", {}).items():
        out[f"pl_acc@{shots}"] = entry["acc"]
    return out


TABLE_COLUMNS = (
    ("target_acc", "target acc"),
    ("source_acc", "source acc"),
    ("pl_acc", "PL acc"),
    ("mia_acc", "MIA acc"),
)


def format_table(results: dict) -> str:
    """The results table as printed by ``dtl-jax run`` (one seed), or the mean ± 95 % CI table of a
    ``summary.json`` (several seeds)."""
    if "rows" in results:
        return results_table(results["rows"], TABLE_COLUMNS, "model", seeds=results["seeds"])
    return results_table(results["models"], TABLE_COLUMNS, "model", label_width=12, width=12)


# ---------------------------------------------------------------------------------------------------
# `dtl-jax frontier`: the trade-off frontier over seeds (docs/methods.md §1.4)


def run_frontier(
    config: Config,
    seeds: list[int],
    workdir: str | os.PathLike,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: Compiled | None = None,
) -> dict:
    """The frontier of every loss of ``disposal.methods`` on every seed of ``seeds`` (each in
    ``workdir/seed-<s>``, its stages checkpointed and reused like a run's), then ``workdir/frontier.json``
    (``dtl_jax.frontier.summarize``: cuts at the target-cost budgets, areas, paired differences between the
    losses, the points and references; plus every attack strategy's cut at the selected states) and
    ``workdir/frontier.png``. Returns the summary."""
    config = stages.check(config)
    compilation_cache.enable(config.compilation_cache)
    if config.deterministic:
        runtime.set_deterministic()
    runtime.start_profiling(config.profile)
    workdir = Path(workdir)
    compiled = compiled or Compiled()
    begin = time.perf_counter()
    points: dict[str, list] = {m: [] for m in config.disposal.methods}
    reference: dict[str, list] = {"tl": [], "random_init": []}
    per_seed, experiments = {}, {}
    for seed in seeds:
        one = dataclasses.replace(config, seed=seed)
        directory = prepare(seed_dir(workdir, seed), one, "frontier", overwrite)
        exp = stages.build_experiment(one, directory, quiet, compiled)
        claim(directory, exp.config, "frontier")
        tl, _ = stages.transfer(exp, stages.pretrain(exp)[0])
        result = frontier_stage.run_seed(exp, tl, stages.random_init(exp))
        write_json(directory / "frontier-seed.json", result)
        exp.writer.close()
        for method, rows in result["points"].items():
            points[method] += rows
        for name, row in result["reference"].items():
            reference[name].append(row)
        per_seed[seed] = result
        experiments[seed] = (one, directory)
    summary = frontier.summarize(points, reference)
    attacks = {}
    for seed, (one, directory) in experiments.items():  # every strategy against the selected states
        exp = stages.build_experiment(one, directory, True, compiled)
        tl, _ = stages.transfer(exp, stages.pretrain(exp)[0])
        attacks[seed] = frontier_stage.attack_selected(exp, tl, summary["selected"])
        exp.writer.close()
    cuts = frontier_stage.strategy_cuts(attacks, summary["budgets"])
    summary["attackers"], summary["worst_case"] = cuts["by_strategy"], cuts["worst_case"]
    summary["attacker"] = {str(s): r["attacker"] for s, r in per_seed.items()}
    summary["strategies"] = {str(s): r["strategies"] for s, r in per_seed.items()}
    summary["config"] = to_dict(dataclasses.replace(config, seed=seeds[0]))
    summary["provenance"] = provenance()
    summary["seconds"] = time.perf_counter() - begin
    write_json(workdir / "frontier.json", summary)
    from dtl_jax.report import colours  # the report's colours: a loss looks the same in every figure

    frontier.plot(summary, workdir / "frontier.png", colours(list(summary["points"])))
    return summary


def format_frontier(summary: dict) -> str:
    """The frontier's table: each loss's PL cut at each target-cost budget and its area (mean ± 95 % CI over
    seeds), then the paired area differences of the first loss against each other."""
    budgets = summary["budgets"]
    header = f"{'loss':<14}" + "".join(f"{'cut @' + format(100 * b, 'g') + ' pts':>18}" for b in budgets)
    header += f"{'area':>18}"
    attackers = sorted(set(summary.get("attacker", {}).values()))
    lines = [f"PL cut (TL's PL accuracy minus the selected state's, test) over seeds {summary['seeds']}; "
             f"attacker: {', '.join(attackers)}", header, "-" * len(header)]  # fmt: skip
    for loss, cuts in summary["cut"].items():
        cells = "".join(f"{mean_ci(cuts[str(b)]):>18}" for b in budgets)
        lines.append(f"{loss:<14}{cells}{mean_ci(summary['area'][loss]):>18}")
    if summary.get("attackers"):
        lines += ["", "fresh attacker draws (not those the selection saw) at the same selected states:"]
        for strategy, per_loss in summary["attackers"].items():
            for loss, cuts in per_loss.items():
                lines.append(
                    f"{strategy + ' ' + loss:<26}"[:26] + "".join(f"{mean_ci(cuts[str(b)]):>18}" for b in budgets)
                )
    if summary.get("worst_case") and len(summary.get("attackers", {})) > 1:
        lines += ["", f"the worst case over the attacks {', '.join(summary['attackers'])} at the same selected states:"]
        for loss, cuts in summary["worst_case"].items():
            lines.append(f"{loss:<14}" + "".join(f"{mean_ci(cuts[str(b)]):>18}" for b in budgets))
    losses = list(summary["cut"])
    if len(losses) > 1:
        first = losses[0]
        other = frontier.best_other(summary, first)
        lines.append("")
        for loss in losses[1:]:
            entry, sign = frontier.paired_entry(summary, first, loss)
            mean = sign * entry["area"]["mean"]
            flipped = {**entry["area"], "mean": mean}
            mark = "  (the best other loss)" if loss == other else ""
            lines.append(f"area {first} − {loss}: {mean_ci(flipped)} ({shown(flipped)}){mark}")
    return "\n".join(lines)
