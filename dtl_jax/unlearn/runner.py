"""``dtl-jax unlearn``: train (or reuse) the original model, run every method, measure, tabulate.

RT is the wall time of a method's run minus the time JAX spent tracing and compiling during it (read
from ``jax.monitoring``'s compile events); the compile time is reported beside it as ``compile_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from jax import monitoring

from dtl_jax import compilation_cache, cpu_conv, runs, runtime, seeds
from dtl_jax.code_version import code_version
from dtl_jax.config import Config, validate
from dtl_jax.data.tasks import make_task
from dtl_jax.evaluate import predict
from dtl_jax.models import build
from dtl_jax.summary import format_table as results_table
from dtl_jax.summary import mean_ci
from dtl_jax.train import steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.compiled import Compiled
from dtl_jax.train.mesh import data_mesh
from dtl_jax.train.metrics import MetricsWriter
from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn import registry
from dtl_jax.unlearn.metrics import gap_to_oracle, unlearning_metrics
from dtl_jax.unlearn.registry import HEAD, Context
from dtl_jax.unlearn.scenario import make_scenario
from dtl_jax.workdir import claim, fingerprint, prepare, provenance, versions, write_json

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
    mesh = data_mesh()
    fn = compiled.get(("predict", config.model, HEAD, mesh), lambda: steps.predict_fn(network, HEAD, mesh))
    d = config.data
    variables = fn.replicate(variables)  # placed once for the three splits
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


def selected_methods(config: Config) -> dict:
    """The methods ``unlearn.methods`` names (``()``: every registered method, Retrain first), resolved by the
    registry: an unknown name is a one-line ``UserError``."""
    return registry.resolve(config.unlearn.methods)


def stage_key(config: Config, name: str) -> str:
    """The checkpoint folder of the original model (``name="original"``) or of a method's run: a hash of the
    scenario, the settings the stage reads (the original's optimiser; a method's: every unlearning setting
    but the list of methods run) and the version of the code it runs (``dtl_jax.code_version``: this
    module's for the original model, the method's module's for a method), so that a stage whose code
    changed re-runs."""
    u, d = config.unlearn, config.data
    scenario = (config.seed, d, config.model, u.task, u.scenario, u.forget_fraction, u.forget_class)
    if name == "original":
        settings, module = u.original, __name__
    else:
        settings, module = dataclasses.replace(u, methods=()), registry.load_methods()[name].__module__
    return f"unlearn-{name}-{fingerprint(*scenario, settings, code_version(module))}"


def run(
    config: Config, workdir, *, quiet: bool = False, overwrite: bool = False, compiled: Compiled | None = None
) -> dict:
    """Unlearning with every configured method; writes ``workdir/results.json``. A workdir made by a run
    with another config is refused unless ``overwrite``. ``compiled`` (shared by ``run_seeds``) caches the
    jitted evaluation."""
    config = validate(config)
    methods = selected_methods(config)
    compiled = compiled or Compiled()
    compilation_cache.enable(config.compilation_cache)
    if config.deterministic:
        runtime.set_deterministic()  # before the first computation; recorded below
    runtime.start_profiling(config.profile)
    workdir = prepare(Path(workdir), config, "unlearn", overwrite)
    start = time.perf_counter()
    u, d = config.unlearn, config.data
    task = make_task("unlearn", u.task, d, seeds.derive(config.seed, "unlearn-split"))
    scenario = make_scenario(task, u, d.val_fraction, seeds.derive(config.seed, "unlearn-scenario"))
    claim(workdir, config, "unlearn")
    writer = MetricsWriter(workdir)
    network = build(config.model)
    shape = tuple(scenario.retain.images.shape[1:])

    def stage(name: str) -> CheckpointedStage:
        return CheckpointedStage(workdir / "checkpoints" / stage_key(config, name), config.checkpoint_every)

    # The original model: trained on D_r ∪ D_f.
    variables = network.init(seeds.key(config.seed, "unlearn-original-init"), shape, {HEAD: scenario.num_classes})

    def train_original(stage: CheckpointedStage):
        ctx = Context(config, network, scenario, variables, config.seed, quiet, stage=stage, writer=writer)
        total = ctx.steps_per_epoch(scenario.train, u.original.batch_size) * u.original.epochs
        tx = make_optimizer(u.original, total)
        stream = ((b,) for b in ctx.batches(scenario.train, u.original.batch_size, seed=20))
        trained = ctx.train(steps.supervised_step(network, HEAD, tx), variables, tx, stream, total, "original")
        return trained, {"history": ctx.history}

    original, original_meta = stage("original").run(variables, train_original)

    histories = {"original": original_meta["history"]}
    rows = {"original": _metrics(network, original, scenario, config, compiled)}
    rows["original"].update(rt_s=0.0, compile_s=0.0, diverged=False, halted_at=None)
    fit = original_fit(rows["original"], scenario)
    rows["original"]["train_acc"] = fit["train_acc"]
    for name, method in methods.items():

        def unlearn(stage: CheckpointedStage, method=method):
            ctx = Context(config, network, scenario, original, config.seed, quiet, stage=stage, writer=writer)
            with compile_seconds() as spent:
                t0 = time.perf_counter()
                unlearned = jax.block_until_ready(method(ctx))
                wall = time.perf_counter() - t0
            return unlearned, {"rt_s": wall - spent[0], "compile_s": spent[0], "history": ctx.history}

        unlearned, meta = stage(name).run(original, unlearn)
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
        "provenance": provenance(original),  # command, commit, devices, CPU, dtype: the report's header
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
        "runtime": {
            "compute_dtype": config.model.dtype,
            "deterministic": runtime.determinism_record(config.deterministic),
            "profile": config.profile or None,
        },
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
    training steps ran (``runs.stage_record``), ``devices`` being the most devices any of its ``Context.run``
    calls used (1 for a checkpoint written before devices were recorded)."""
    out = {}
    for name, history in histories.items():
        halted = [h["halted_at"] for h in history if h.get("halted_at") is not None]
        devices = max((h.get("devices", 1) for h in history), default=1)
        out[name] = runs.stage_record(halted[0] if halted else None, devices)
    return out


def run_seeds(
    config: Config, seed_list: list[int], workdir, *, quiet: bool = False, overwrite: bool = False,
    compiled: Compiled | None = None,
) -> dict:  # fmt: skip
    """``run`` for every seed in this process, each in ``workdir/seed-<s>`` (``runs.run_seeds``); writes
    and returns ``workdir/summary.json``: every method's metrics over seeds (mean, std, 95 % CI, n, values)
    and the paired per-seed differences to Retrain and to FT."""
    selected_methods(config)  # an unknown method is refused before the first seed

    def rows(results: dict) -> dict:
        return {name: {k: v for k, v in row.items() if k in SUMMARY_KEYS} for name, row in results["methods"].items()}

    return runs.run_seeds(
        run, config, seed_list, workdir, rows=rows, references=REFERENCES, kind="unlearn", quiet=quiet,
        overwrite=overwrite, compiled=compiled,
    )  # fmt: skip


COLUMNS = (
    ("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("mia_efficacy", "MIA-eff"), ("rep_mia", "rep-MIA"),
    ("loss_mia", "loss-MIA"), ("gap", "gap"), ("rt_s", "RT (s)"), ("rrt", "RRT"),
)  # fmt: skip


SUMMARY_KEYS = (*METRIC_KEYS, "gap", "rt_s", "rrt", "train_acc")  # train_acc: the original model's row only


def format_table(results: dict) -> str:
    """The table ``dtl-jax unlearn`` prints: one seed's results, or a summary's mean ± 95 % CI; above it,
    the original model's fit (``fit_line``)."""
    if "rows" in results:
        return (
            fit_line(results)
            + "\n"
            + results_table(results["rows"], COLUMNS[:-2], "method", width=15, seeds=results["seeds"])
        )
    return fit_line(results) + "\n" + results_table(results["methods"], COLUMNS, "method", width=10)


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
