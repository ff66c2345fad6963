"""``dtl-jax unlearn``: train (or reuse) the original model, run every method, measure, tabulate.

RT is the wall time of a method's run minus the time JAX spent tracing and compiling during it (read
from ``jax.monitoring``'s compile events); the compile time is reported beside it as ``compile_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np
from jax import monitoring

from dtl_jax import checkpoint, compilation_cache, cpu_conv, seeds
from dtl_jax.config import Config, to_dict, validate
from dtl_jax.data.tasks import make_task
from dtl_jax.evaluate import predict
from dtl_jax.models import build
from dtl_jax.stages import Compiled
from dtl_jax.summary import format_table as format_summary_table
from dtl_jax.summary import mean_ci, summarize
from dtl_jax.train import steps
from dtl_jax.train.metrics import MetricsWriter
from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn.metrics import gap_to_oracle, unlearning_metrics
from dtl_jax.unlearn.registry import HEAD, Context, load_methods, method_names
from dtl_jax.unlearn.scenario import make_scenario
from dtl_jax.workdir import claim, fingerprint, prepare, seed_dir, versions, write_json

REFERENCES = ("retrain", "ft")  # paired differences in summary.json are taken against these


@contextlib.contextmanager
def compile_seconds():
    """Counts the seconds JAX spends tracing and compiling inside the ``with`` block (``jax.monitoring``'s
    compile events): ``with compile_seconds() as spent: ...; spent[0]``. The listener lives only as long
    as the block."""
    spent = [0.0]

    def listener(name: str, seconds: float, **_) -> None:
        if name.startswith("/jax/core/compile/"):
            spent[0] += seconds

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield spent
    finally:
        monitoring.unregister_event_duration_listener(listener)


def _outputs(network, variables, scenario, config, compiled: Compiled | None = None) -> dict:
    # the eval-mode forward through the classifier head, data-parallel over every device: compiled once
    # for every evaluated model and every seed that shares ``compiled``
    compiled = compiled or Compiled()
    fn = compiled.get(("predict", config.model, HEAD), lambda: steps.predict_fn(network, HEAD))
    d = config.data
    out = {}
    for name in ("forget", "retain", "test"):
        split = getattr(scenario, name)
        logits, features = predict(fn, variables, split, batch_size=config.eval.batch_size, mean=d.mean, std=d.std)
        out[name] = (logits, features, split.labels)
    return out


METRIC_KEYS = ("ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia")


def _metrics(network, variables, scenario, config, compiled: Compiled | None = None) -> dict:
    """The metrics, or None for each when the model's outputs are not finite (a diverged method)."""
    outputs = _outputs(network, variables, scenario, config, compiled)
    if not all(np.isfinite(logits).all() and np.isfinite(features).all() for logits, features, _ in outputs.values()):
        return {**dict.fromkeys(METRIC_KEYS), "nonfinite_outputs": True}
    return {**unlearning_metrics(outputs, config.seed), "nonfinite_outputs": False}


def run(
    config: Config, workdir, *, quiet: bool = False, overwrite: bool = False, compiled: Compiled | None = None
) -> dict:
    """Unlearning with every configured method; writes ``workdir/results.json``. A workdir made by a run
    with another config is refused unless ``overwrite``. ``compiled`` (shared by ``run_seeds``) caches the
    jitted evaluation."""
    config = validate(config)
    compiled = compiled or Compiled()
    compilation_cache.enable(config.compilation_cache)
    workdir = prepare(Path(workdir), config, "unlearn", overwrite)
    start = time.perf_counter()
    u, d = config.unlearn, config.data
    task = make_task("unlearn", u.task, d, seeds.derive(config.seed, "unlearn-split"))
    scenario = make_scenario(task, u, d.val_fraction, seeds.derive(config.seed, "unlearn-scenario"))
    claim(workdir, config, "unlearn")
    writer = MetricsWriter(workdir)
    network = build(config.model)
    shape = tuple(scenario.retain.images.shape[1:])
    scenario_key = (config.seed, d, config.model, u.task, u.scenario, u.forget_fraction, u.forget_class)

    # The original model: trained on D_r ∪ D_f.
    original_dir = workdir / "checkpoints" / f"unlearn-original-{fingerprint(*scenario_key, u.original)}"
    variables = network.init(seeds.key(config.seed, "unlearn-original-init"), shape, {HEAD: scenario.num_classes})
    if checkpoint.exists(original_dir):
        original, original_meta = checkpoint.restore(original_dir, variables)
    else:
        progress_root = original_dir.with_name(original_dir.name + ".progress")
        ctx = Context(config, network, scenario, variables, config.seed, quiet, progress_root=progress_root,
                      writer=writer)  # fmt: skip
        total = ctx.steps_per_epoch(scenario.train, u.original.batch_size) * u.original.epochs
        tx = make_optimizer(u.original, total)
        stream = ((b,) for b in ctx.batches(scenario.train, u.original.batch_size, seed=20))
        original = ctx.train(steps.supervised_step(network, HEAD, tx), variables, tx, stream, total, "original")
        original_meta = {"history": ctx.history}
        checkpoint.save(original_dir, original, original_meta)
        checkpoint.remove(progress_root)

    methods = load_methods()
    histories = {"original": original_meta["history"]}
    rows = {"original": _metrics(network, original, scenario, config, compiled)}
    rows["original"].update(rt_s=0.0, compile_s=0.0, diverged=False, halted_at=None)
    fit = original_fit(rows["original"], scenario)
    rows["original"]["train_acc"] = fit["train_acc"]
    for name in u.methods or method_names():
        method_key = dataclasses.replace(u, methods=())  # the list of methods run does not change one
        directory = workdir / "checkpoints" / f"unlearn-{name}-{fingerprint(*scenario_key, method_key)}"
        if checkpoint.exists(directory):
            unlearned, meta = checkpoint.restore(directory, original)
        else:
            progress_root = directory.with_name(directory.name + ".progress")
            ctx = Context(config, network, scenario, original, config.seed, quiet, progress_root=progress_root,
                          writer=writer)  # fmt: skip
            with compile_seconds() as spent:
                t0 = time.perf_counter()
                unlearned = jax.block_until_ready(methods[name](ctx))
                wall = time.perf_counter() - t0
            compile_s = spent[0]
            meta = {"rt_s": wall - compile_s, "compile_s": compile_s, "history": ctx.history}
            checkpoint.save(directory, unlearned, meta)
            checkpoint.remove(progress_root)
        histories[name] = meta["history"]
        row = _metrics(network, unlearned, scenario, config, compiled)
        halted = [h["halted_at"] for h in meta["history"] if h.get("halted_at") is not None]
        row.update(rt_s=meta["rt_s"], compile_s=meta["compile_s"], diverged=bool(halted))
        row["halted_at"] = halted[0] if halted else None
        rows[name] = row
    oracle = rows.get("retrain")
    if oracle is not None and oracle["ua"] is None:
        oracle = None
    for row in rows.values():
        row["gap"] = gap_to_oracle(row, oracle) if oracle and row["ua"] is not None else None
        row["rrt"] = row["rt_s"] / oracle["rt_s"] if oracle and oracle["rt_s"] > 0 else None
    results = {
        "original_fit": fit,
        "methods": rows,
        "stages": _stages(histories),
        "scenario": {
            "name": scenario.name,
            "forget_class": u.forget_class if scenario.name != "random" else None,
            "sizes": {k: len(getattr(scenario, k)) for k in ("forget", "retain", "val", "test")},
            "indices": scenario.indices,
        },
        "config": dataclasses.asdict(config),
        "versions": versions(),
        "cpu_conv": cpu_conv.record(),
        "seconds": time.perf_counter() - start,
    }
    write_json(workdir / "results.json", results)
    writer.close()
    return results


def original_fit(row: dict, scenario) -> dict:
    """How well the original model fits its training data ``D_r ∪ D_f``: ``train_acc`` (its accuracy there,
    ``(RA·|D_r| + (1 − UA)·|D_f|) / (|D_r| + |D_f|)``), ``test_acc`` (TA) and ``loss_mia`` (the loss-threshold
    attack on forget vs test examples; 0.5 = the forget set looks unseen). None each for a non-finite model.
    The memorisation regime of the references (ResNet-18 on CIFAR-10) has train accuracy ≈ 1."""
    if row["ua"] is None:
        return dict.fromkeys(("train_acc", "test_acc", "loss_mia"))
    n_r, n_f = len(scenario.retain), len(scenario.forget)
    train_acc = (row["ra"] * n_r + (1.0 - row["ua"]) * n_f) / (n_r + n_f)
    return {"train_acc": float(train_acc), "test_acc": row["ta"], "loss_mia": row["loss_mia"]}


def _stages(histories: dict) -> dict:
    """Per stage (the original model's training, each method): the divergence guard's record and where its
    training steps ran, ``devices`` (the most devices any of its ``Context.run`` calls used; 1 for a
    checkpoint written before devices were recorded) and ``processes`` (every process when it used every
    device)."""
    out = {}
    for name, history in histories.items():
        halted = [h["halted_at"] for h in history if h.get("halted_at") is not None]
        devices = max((h.get("devices", 1) for h in history), default=1)
        processes = jax.process_count() if devices == jax.device_count() else 1
        out[name] = {"diverged": bool(halted), "halted_at": halted[0] if halted else None, "devices": devices,
                     "processes": processes}  # fmt: skip
    return out


def run_seeds(config: Config, seed_list: list[int], workdir, *, quiet: bool = False, overwrite: bool = False) -> dict:
    """``run`` for every seed in this process, each in ``workdir/seed-<s>``; writes and returns
    ``workdir/summary.json``: every method's metrics over seeds (mean, std, 95 % CI, n, values) and the
    paired per-seed differences to Retrain and to FT."""
    config = validate(config)
    start = time.perf_counter()
    compiled = Compiled()
    per_seed = {}
    for seed in seed_list:
        one = dataclasses.replace(config, seed=seed)
        results = run(one, seed_dir(workdir, seed), quiet=quiet, overwrite=overwrite, compiled=compiled)
        per_seed[seed] = {
            name: {k: v for k, v in row.items() if k in SUMMARY_KEYS} for name, row in results["methods"].items()
        }
    summary = summarize(per_seed, REFERENCES)
    summary.update(
        kind="unlearn", config=to_dict(dataclasses.replace(config, seed=seed_list[0])),
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    write_json(Path(workdir) / "summary.json", summary)
    return summary


COLUMNS = (
    ("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("mia_efficacy", "MIA-eff"), ("rep_mia", "rep-MIA"),
    ("loss_mia", "loss-MIA"), ("gap", "gap"), ("rt_s", "RT (s)"), ("rrt", "RRT"),
)  # fmt: skip


SUMMARY_KEYS = (*METRIC_KEYS, "gap", "rt_s", "rrt", "train_acc")  # train_acc: the original model's row only


def format_table(results: dict) -> str:
    """The table ``dtl-jax unlearn`` prints: one seed's results, or a summary's mean ± 95 % CI; above it,
    the original model's fit (``fit_line``)."""
    if "rows" in results:
        return fit_line(results) + "\n" + format_summary_table(results, COLUMNS[:-2], "method", width=15)
    header = f"{'method':<16}" + "".join(f"{title:>10}" for _, title in COLUMNS)
    lines = [fit_line(results), header, "-" * len(header)]
    for name, row in results["methods"].items():
        cells = "".join(f"{'-':>10}" if row[k] is None else f"{row[k]:>10.3f}" for k, _ in COLUMNS)
        lines.append(f"{name:<16}" + cells)
    return "\n".join(lines)


def fit_line(results: dict) -> str:
    """``original model: train acc (D_r ∪ D_f) 0.995, test acc 0.610, loss-MIA 0.668`` for one seed's
    results (its ``original_fit``) or a summary (mean ± 95 % CI of the original row's metrics)."""
    names = (("train_acc", "train acc (D_r ∪ D_f)"), ("test_acc", "test acc"), ("loss_mia", "loss-MIA"))
    if "rows" in results:
        row = results["rows"].get("original", {})
        entries = {"train_acc": row.get("train_acc"), "test_acc": row.get("ta"), "loss_mia": row.get("loss_mia")}
        cells = [f"{title} {'-' if entries[k] is None else mean_ci(entries[k])}" for k, title in names]
    else:
        fit = results.get("original_fit", {})
        cells = [f"{title} {'-' if fit.get(k) is None else format(fit[k], '.3f')}" for k, title in names]
    return "original model: " + ", ".join(cells)
