"""Disposable transfer learning end to end (METHODS.md §1): one seed's ``results.json``, or several seeds
with ``summary.json``, and the printed tables.

    pre-train ─▶ transfer ─▶ disposal (gc, ngc, rtf, utf, ga) ─▶ piggyback learning ─▶ results.json
    (dtl_jax/stages.py: each stage checkpointed under its stage key and reused when unchanged)

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

from dtl_jax import compilation_cache, cpu_conv, stages
from dtl_jax.config import Config, to_dict, validate
from dtl_jax.summary import format_table as format_summary_table
from dtl_jax.summary import summarize
from dtl_jax.workdir import claim, prepare, seed_dir, versions, write_json

REFERENCE = "tl"  # paired differences in summary.json are taken against the TL model


def run(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: stages.Compiled | None = None,
) -> dict:
    """The whole DTL experiment for ``config.seed``; writes ``workdir/results.json`` (atomically) and
    returns the results. A workdir made by a run with another config is refused unless ``overwrite``."""
    config = validate(config)
    compilation_cache.enable(config.compilation_cache)
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
    devices, processes = _topology()
    # Per stage: the divergence guard's record (a halted stage kept its last good state), and where it ran.
    results["stages"] = {
        name: {
            "diverged": meta.get("halted_at") is not None,
            "halted_at": meta.get("halted_at"),
            "devices": meta.get("devices", 1),
            "processes": processes if meta.get("devices", 1) == devices else 1,
        }
        for name, meta in records.items()
    }
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
    results["seconds"] = time.perf_counter() - start
    write_json(workdir / "results.json", results)
    exp.writer.close()
    return results


def _topology() -> tuple[int, int]:
    import jax

    return len(jax.devices()), jax.process_count()


def run_seeds(
    config: Config,
    seeds: list[int],
    workdir: str | os.PathLike,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: stages.Compiled | None = None,
) -> dict:
    """``run`` for every seed of ``seeds`` in this process (the compiled steps shared), each in
    ``workdir/seed-<s>``; writes and returns ``workdir/summary.json``."""
    config = validate(config)
    compiled = compiled or stages.Compiled()
    start = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        one = dataclasses.replace(config, seed=seed)
        results = run(one, seed_dir(workdir, seed), quiet=quiet, overwrite=overwrite, compiled=compiled)
        per_seed[seed] = {name: _scalars(row) for name, row in results["models"].items()}
    summary = summarize(per_seed, (REFERENCE,))
    summary.update(
        kind="run", config=to_dict(dataclasses.replace(config, seed=seeds[0])), seconds=time.perf_counter() - start
    )
    write_json(Path(workdir) / "summary.json", summary)
    return summary


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
        return format_summary_table(results, TABLE_COLUMNS, "model")
    header = f"{'model':<12}" + "".join(f"{title:>12}" for _, title in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in results["models"].items():
        lines.append(f"{name:<12}" + "".join(f"{row[key]:>12.3f}" for key, _ in TABLE_COLUMNS))
    return "\n".join(lines)
