"""``dtl-jax report WORKDIR``: PNG plots and a self-contained ``report.html`` from a workdir's results.

For a DTL run (``results.json`` with ``models``): PL accuracy against piggyback epochs for every model,
target accuracy against PL accuracy (the trade-off), and the training curves of every stage (loss, GC
value, accuracy) from ``logs/metrics.jsonl``. For an unlearning run (``methods``): UA / RA / TA /
MIA-efficacy bars per method with Retrain's level marked, and the training curves. The page embeds the
images as data URIs and prints the numbers of ``results.json`` as they are (three decimals).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dtl_jax.errors import UserError  # noqa: E402
from dtl_jax.summary import mean_ci  # noqa: E402
from dtl_jax.train import metrics  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pl_curves(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, row in results["models"].items():
        style = "--" if name in ("random_init", "tl") else "-"
        epochs = row.get("pl_curve_epochs") or range(1, len(row["pl_curve"]) + 1)
        ax.plot(epochs, row["pl_curve"], style, marker=".", label=name)
    ax.set(xlabel="piggyback epoch", ylabel="PL accuracy (source test)", title="Piggyback learning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def tradeoff(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    for name, row in results["models"].items():
        ax.scatter(row["pl_acc"], row["target_acc"], s=40)
        ax.annotate(name, (row["pl_acc"], row["target_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="PL accuracy (lower = better disposal)", ylabel="target accuracy", title="Target vs PL")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def unlearning_bars(results: dict, path: Path) -> Path:
    keys = ("ua", "ra", "ta", "mia_efficacy")
    methods = [m for m in results["methods"] if m != "original"]
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [results["methods"][m][key] for m in methods]
        bars = ax.bar([j + i * width for j in range(len(methods))], values, width, label=key.upper())
        oracle = results["methods"].get("retrain")
        if oracle is not None:
            ax.axhline(oracle[key], color=bars[0].get_facecolor(), linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, fontsize=8)
    ax.set(ylabel="fraction", title="Unlearning metrics (dotted: Retrain)")
    ax.legend(fontsize=8, ncol=4)
    return _save(fig, path)


def training_curves(logged: dict[str, list[dict]], path: Path) -> Path | None:
    if not logged:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    for stage, rows in logged.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=stage)
        if "unlearn" in rows[0]:
            axes[1].plot(steps, [r["unlearn"] for r in rows], label=stage)
        if "accuracy" in rows[0]:
            axes[2].plot(steps, [r["accuracy"] for r in rows], label=stage)
    axes[0].set(xlabel="step", ylabel="loss", title="Training loss per stage")
    axes[1].set(xlabel="step", ylabel="unlearning loss (GC value for gc)", title="Disposal")
    axes[1].set_yscale("symlog")
    axes[2].set(xlabel="step", ylabel="training batch accuracy", title="Accuracy (supervised stages)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:  # e.g. no disposal stage in an unlearning run
            ax.text(0.5, 0.5, "not part of this run", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def sure_panel(logged: dict[str, list[dict]], path: Path) -> Path | None:
    """SURE's adversarial game per step (stage ``sure``): the domain classifier's accuracy on the forget and
    the validation examples of each batch (½ = chance, raw and a 20-step moving average), α, and the two
    losses (retain CE, balanced domain BCE; ln 2 = a classifier at chance)."""
    rows = logged.get("sure")
    if not rows or "domain_acc_forget" not in rows[0]:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (("domain_acc_forget", "on forget"), ("domain_acc_val", "on validation")):
        values = [r[key] for r in rows]
        line = axes[0].plot(steps, values, alpha=0.25, linewidth=0.8)[0]
        axes[0].plot(steps, _smooth(values, 20), color=line.get_color(), label=label)
    axes[0].axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    axes[0].set(xlabel="step", ylabel="domain classifier accuracy", title="SURE: G_d accuracy", ylim=(-0.02, 1.02))
    axes[1].plot(steps, [r["alpha"] for r in rows])
    axes[1].set(xlabel="step", ylabel="α", title="SURE: gradient reversal α")
    axes[2].plot(steps, _smooth([r["ce"] for r in rows], 20), label="retain CE")
    axes[2].plot(steps, _smooth([r["domain_bce"] for r in rows], 20), label="domain BCE")
    axes[2].axhline(0.6931, color="0.5", linestyle=":", linewidth=1)
    axes[2].set(xlabel="step", ylabel="loss (20-step mean)", title="SURE: losses")
    for ax in (axes[0], axes[2]):
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _table(rows: dict, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
    body = []
    for name, row in rows.items():
        cells = "".join(f"<td>{'-' if row.get(c) is None else f'{row[c]:.3f}'}</td>" for c in columns)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dtl_jax report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>{title}</h1><p>{summary}</p>{table}{images}</body></html>
"""


def _page(workdir: Path, title: str, summary: str, table: str, figures: list[Path]) -> Path:
    images = "".join(
        f'<h2>{html.escape(f.stem.replace("_", " "))}</h2><img alt="{f.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        for f in figures
    )
    page = workdir / "report.html"
    page.write_text(PAGE.format(title=title, summary=html.escape(summary), table=table, images=images))
    return page


# ---------------------------------------------------------------------------------------------------
# Several seeds: summary.json


def _summary_table(summary: dict, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
    body = []
    for name, row in summary["rows"].items():
        cells = "".join(f"<td>{html.escape(mean_ci(row[c])) if c in row else '-'}</td>" for c in columns)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (
        f"<p>mean ± 95 % CI (Student t) over seeds {summary['seeds']}</p><table><tr>{head}</tr>{''.join(body)}</table>"
    )


def seed_bars(summary: dict, keys: list[str], path: Path) -> Path:
    """One panel per metric: every row's mean with its 95 % interval (error bar) and each seed's value
    as a dot beside it (the per-seed strip)."""
    names = list(summary["rows"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, name in enumerate(names):
            entry = summary["rows"][name].get(key)
            if entry is None or entry["n"] == 0:
                continue
            ci = 0.0 if entry["ci95"] != entry["ci95"] else entry["ci95"]
            ax.bar(i, entry["mean"], yerr=ci, capsize=3, color="C0", alpha=0.55)
            values = [v for v in entry["values"] if v is not None]
            ax.scatter([i + 0.25] * len(values), values, s=9, color="k", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def pl_by_shots(summary: dict, path: Path) -> Path | None:
    """PL accuracy against the attacker's labelled examples a class, mean and 95 % interval over seeds,
    one line per model (TL and random-init dashed: the two references)."""
    shots = sorted({int(k.split("@")[1]) for row in summary["rows"].values() for k in row if k.startswith("pl_acc@")})
    if not shots:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, row in summary["rows"].items():
        entries = [row.get(f"pl_acc@{s}") for s in shots]
        means = [e["mean"] if e else float("nan") for e in entries]
        cis = [0.0 if not e or e["ci95"] != e["ci95"] else e["ci95"] for e in entries]
        style = "--" if name in ("random_init", "tl") else "-"
        ax.errorbar(shots, means, yerr=cis, fmt=style + "o", capsize=3, markersize=3, label=name)
    ax.set_xscale("log")
    ax.set(xlabel="labelled source examples a class (attacker's budget)", ylabel="PL accuracy", title="PL vs budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_summary_report(workdir: Path) -> Path:
    """The report of a multi-seed run (``summary.json``): the mean ± CI table, error bars with the
    per-seed strip, and (for DTL) PL accuracy against the attacker's budget."""
    summary = json.loads((workdir / "summary.json").read_text())
    if summary.get("kind") == "run":
        title, columns = "Disposable transfer learning over seeds", ["target_acc", "source_acc", "pl_acc", "mia_acc"]
    else:
        title = "Selective unlearning over seeds"
        columns = ["ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia", "gap"]
    figures = [seed_bars(summary, columns, workdir / "seed_bars.png")]
    by_shots = pl_by_shots(summary, workdir / "pl_by_shots.png")
    if by_shots is not None:
        figures.append(by_shots)
    text = f"{workdir} · {len(summary['seeds'])} seeds · {summary.get('seconds', 0):.0f} s"
    return _page(workdir, title, text, _summary_table(summary, columns), figures)


def write_report(workdir: str | Path) -> Path:
    """Writes the PNGs and ``report.html`` into ``workdir`` (a run's, or a multi-seed run's with
    ``summary.json``); returns the page's path."""
    workdir = Path(workdir)
    path = workdir / "results.json"
    if not path.is_file() and (workdir / "summary.json").is_file():
        return write_summary_report(workdir)
    if not path.is_file():
        raise UserError(f"no results.json in {str(workdir)!r}: run `dtl-jax run` or `dtl-jax unlearn` there first")
    results = json.loads(path.read_text())
    figures = []
    if "models" in results:
        title = "Disposable transfer learning"
        columns = ["target_acc", "source_acc", "pl_acc", "mia_acc"]
        table = _table(results["models"], columns)
        figures += [pl_curves(results, workdir / "pl_curves.png"), tradeoff(results, workdir / "tradeoff.png")]
    elif "methods" in results:
        title = "Selective unlearning"
        columns = ["ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia", "gap", "rt_s", "rrt"]
        table = _table(results["methods"], columns)
        figures.append(unlearning_bars(results, workdir / "unlearning_bars.png"))
    else:
        raise UserError(f"{str(path)!r} is not a dtl_jax results file (no 'models' or 'methods')")
    if (workdir / "sweep.png").is_file():  # written by `dtl-jax sweep`
        figures.append(workdir / "sweep.png")
    logged = metrics.read(workdir)
    for figure in (training_curves(logged, workdir / "training_curves.png"), sure_panel(logged, workdir / "sure.png")):
        if figure is not None:
            figures.append(figure)
    summary = f"{workdir} · {results.get('seconds', 0):.0f} s · jax {results['versions']['jax']}"
    return _page(workdir, title, summary, table, figures)
