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

from dtl_jax.config import UserError  # noqa: E402
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
        ax.plot(range(1, len(row["pl_curve"]) + 1), row["pl_curve"], style, label=name)
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
<body><h1>{title}</h1><p>{summary}</p>{table}{images}
<script>
window.addEventListener("load", function () {{
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) if (images[i].complete && images[i].naturalWidth > 0) ok++;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
}});
</script></body></html>
"""


def write_report(workdir: str | Path) -> Path:
    """Writes the PNGs and ``report.html`` into ``workdir``; returns the page's path."""
    workdir = Path(workdir)
    path = workdir / "results.json"
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
    curves = training_curves(metrics.read(workdir), workdir / "training_curves.png")
    if curves is not None:
        figures.append(curves)
    images = "".join(
        f'<h2>{html.escape(f.stem.replace("_", " "))}</h2><img alt="{f.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        for f in figures
    )
    summary = html.escape(f"{workdir} · {results.get('seconds', 0):.0f} s · jax {results['versions']['jax']}")
    page = workdir / "report.html"
    page.write_text(PAGE.format(title=title, summary=summary, table=table, images=images))
    return page
