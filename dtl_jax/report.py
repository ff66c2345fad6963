"""``dtl-jax report WORKDIR``: PNG plots and a self-contained ``report.html`` a researcher reads at a glance.

The page opens with a header (the command, the seed(s), every config value that differs from the built-in
default, package version and git commit, devices, CPU and dtype; from ``results.json``'s ``provenance``),
then the results table (the numbers of ``results.json``, three decimals) and the figures, each under a
human title with one line on how to read it. Every figure gives a model or method the same colour
(``colours``: the one map, for any later figure too) and keeps its legend short: small multiples (one
panel per method, references drawn in each) or direct labels, never one legend entry per stage.

A DTL run (``models``): piggyback-learning curves per disposal method against TL and random init, with
the spread over the attacker's draws; PL accuracy against the attacker's budget (several budgets);
target against PL accuracy (the trade-off); training curves by kind of stage, and disposal's held-out
checks. An unlearning run (``methods``): UA / RA / TA / MIA-efficacy per method with Retrain's and the
original model's levels; one training-loss panel per method; SURE's game. Only what the last command
ran is shown: logged stages of methods no longer in ``results.json`` are left out.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from dtl_jax.errors import UserError  # noqa: E402
from dtl_jax.summary import mean_ci  # noqa: E402
from dtl_jax.train import metrics  # noqa: E402

DPI = 100  # figures are at most 10 in wide: 1000 px, the page's width, so text shows at its size
WIDTH = 10.0
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "axes.grid": True,
                     "grid.alpha": 0.3})  # fmt: skip

# ---------------------------------------------------------------------------------------------------
# The one name -> colour map: references in black and grey, each method its own colour in every figure.

REFERENCES = {"tl": ("#000000", "--"), "random_init": ("#8c8c8c", ":"),  # DTL
              "retrain": ("#000000", "--"), "original": ("#8c8c8c", ":")}  # fmt: skip  # unlearning
KNOWN = {
    # disposal methods
    "gc": "#1f77b4", "ngc": "#ff7f0e", "rtf": "#2ca02c", "utf": "#d62728", "ga": "#9467bd",
    # unlearning methods (GA as above)
    "sure": "#1f77b4", "ft": "#8c564b", "rl": "#e377c2", "l1_sparse": "#bcbd22", "salun": "#17becf",
    "scrub": "#2ca02c", "boundary_shrink": "#d62728",
}  # fmt: skip
EXTRA = ("#393b79", "#e6550d", "#637939", "#7b4173", "#3182bd", "#843c39", "#31a354", "#de9ed6", "#bd9e39")
LABELS = {"tl": "TL", "random_init": "random init", "retrain": "Retrain", "original": "original"}


def colours(names) -> dict[str, str]:
    """A colour for every name: the references' and known methods' fixed ones, then ``EXTRA`` for other
    names (e.g. a user's own method) in sorted order, so the same set of names gets the same colours."""
    out = {n: REFERENCES[n][0] if n in REFERENCES else KNOWN[n] for n in names if n in REFERENCES or n in KNOWN}
    used = set(out.values())
    free = [c for c in EXTRA if c not in used] or list(EXTRA)
    for i, name in enumerate(sorted(n for n in names if n not in out)):
        out[name] = free[i % len(free)] if i < len(free) else EXTRA[zlib.crc32(name.encode()) % len(EXTRA)]
    return out


def style(name: str) -> str:
    """Dashed for the upper reference (TL, Retrain), dotted for the lower one (random init, original)."""
    return REFERENCES[name][1] if name in REFERENCES else "-"


def label(name: str) -> str:
    return LABELS.get(name, name)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, ncols: int = 3, height: float = 2.8):
    """``n`` panels in rows of ``ncols`` (the unused slots of the last row removed: no empty panels)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, height * nrows + 0.4), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _end_labels(ax, ends: list[tuple[float, float, str, str]]) -> None:
    """Direct labels ``(x, y, text, colour)`` at the right ends of lines, moved apart vertically (at least
    4.5 % of the axis' height) so that none covers another."""
    ends = [e for e in ends if e[1] == e[1]]  # not NaN
    if not ends:
        return
    low, high = ax.get_ylim()
    heights = _spread([y for _, y, _, _ in ends], (high - low) * 0.045)
    for (x, _, text, colour), height in zip(ends, heights):
        ax.annotate(text, (x, height), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                    color=colour, annotation_clip=False)  # fmt: skip


def _log_ticks(ax, values) -> None:
    """A log x axis with a tick at each value and no minor tick labels."""
    ax.set_xscale("log")
    ax.set_xticks(values, [str(v) for v in values])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low, high = min(values), max(values)
    ax.set_xlim(low / 1.15, high * 1.6)  # room for the labels


# ---------------------------------------------------------------------------------------------------
# DTL


def _first_budget(row: dict) -> tuple[str, dict] | None:
    return next(iter(row.get("pl", {}).items()), None)


def _draws(row: dict) -> tuple[list, np.ndarray]:
    """The epochs and the per-draw PL curves (draws x epochs) of a model's first budget."""
    epochs = row.get("pl_curve_epochs") or list(range(1, len(row["pl_curve"]) + 1))
    first = _first_budget(row)
    curves = first[1].get("curves") if first else None
    curves = np.asarray(curves if curves else [row["pl_curve"]], float)
    return epochs, curves


def pl_curves(results: dict, path: Path) -> Path:
    """One panel per disposal method: its PL curve (mean over the attacker's draws, band = their range)
    against TL's (dashed) and random init's (dotted)."""
    models = results["models"]
    palette = colours(models)
    methods = [m for m in models if m not in REFERENCES] or list(models)
    fig, axes = _grid(len(methods))
    for ax in axes:
        ax.sharey(axes[0])
    for i, (ax, method) in enumerate(zip(axes, methods)):
        ends = []
        for name in [r for r in ("random_init", "tl") if r in models and r != method] + [method]:
            epochs, curves = _draws(models[name])
            mean = curves.mean(axis=0)
            ax.plot(epochs, mean, style(name), color=palette[name], marker="." if name == method else None,
                    linewidth=2 if name == method else 1.2)  # fmt: skip
            if len(curves) > 1:
                ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), color=palette[name], alpha=0.15,
                                linewidth=0)  # fmt: skip
            if name != method:
                ends.append((epochs[-1], mean[-1], label(name), palette[name]))
        _end_labels(ax, ends)
        ax.set_title(label(method), color=palette[method], fontweight="bold")
        ax.set(xlabel="attacker's epoch", ylabel="PL accuracy (source test)" if i % 3 == 0 else "")
        low, high = ax.get_xlim()
        ax.set_xticks([t for t in ax.get_xticks() if low <= t <= high])
        ax.set_xlim(low, high + (high - low) * 0.22)  # room for the direct labels
    fig.tight_layout()
    return _save(fig, path)


def pl_by_budget(results: dict, path: Path) -> Path | None:
    """PL accuracy against the attacker's budget (labelled examples a class), one line per model, band =
    the range over draws; None with a single budget."""
    models = results["models"]
    budgets = sorted({int(s) for row in models.values() for s in row.get("pl", {})})
    if len(budgets) < 2:
        return None
    palette = colours(models)
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ends = []
    for name, row in models.items():
        entries = [row["pl"].get(str(s)) for s in budgets]
        xs = [s for s, e in zip(budgets, entries) if e]
        accs = [e["accs"] or [e["acc"]] for e in entries if e]
        means = [float(np.mean(a)) for a in accs]
        ax.plot(xs, means, style(name), color=palette[name], marker="o", markersize=3)
        ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], color=palette[name], alpha=0.12, lw=0)
        ends.append((xs[-1], means[-1], label(name), palette[name]))
    _log_ticks(ax, budgets)
    _end_labels(ax, ends)
    ax.set(xlabel="labelled source examples a class (attacker's budget)", ylabel="PL accuracy (source test)")
    return _save(fig, path)


def _spread(values: list[float], gap: float) -> list[float]:
    """Label heights near ``values``, at least ``gap`` apart, in the same order."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = list(values)
    for previous, current in zip(order, order[1:]):
        out[current] = max(out[current], out[previous] + gap)
    shift = (max(out) - max(values)) / 2 if values else 0.0  # centre the column of labels on the points
    return [v - shift for v in out]


def tradeoff(results: dict, path: Path, x: str = "pl_acc", y: str = "target_acc") -> Path:
    """Every model as a point (``x``, ``y``) in its colour, the horizontal bar the range of the attacker's
    draws, dashed lines at TL's values; models at the same point share one label, and labels are spread
    so that they do not overlap."""
    models = results["models"]
    palette = colours(models)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    groups: dict[tuple, list[str]] = {}
    shown = {n: r for n, r in models.items() if n != "random_init"} or models  # random init: far off, in words
    for name, row in shown.items():
        first = _first_budget(row)
        accs = first[1].get("accs") if first and x == "pl_acc" else None
        if accs and len(accs) > 1:
            ax.plot([min(accs), max(accs)], [row[y]] * 2, color=palette[name], alpha=0.5, linewidth=2)
        ax.scatter(row[x], row[y], s=50, color=palette[name], zorder=3, marker="s" if name in REFERENCES else "o")
        groups.setdefault((round(row[x], 3), round(row[y], 3)), []).append(name)
    if "tl" in models:
        ax.axvline(models["tl"][x], color="0.4", linestyle="--", linewidth=0.8)
        ax.axhline(models["tl"][y], color="0.4", linestyle="--", linewidth=0.8)
    points = list(groups.items())
    ax.margins(x=0.08, y=0.15)
    low, high = ax.get_ylim()
    heights = _spread([p[1] for p, _ in points], (high - low) * 0.055)
    (left, right) = ax.get_xlim()
    for ((px, py), names), height in zip(points, heights):
        text = ", ".join(label(n) for n in names)
        ax.annotate(text, (px, py), xytext=(px + (right - left) * 0.03, height), textcoords="data", fontsize=8,
                    va="center", color=palette[names[0]] if len(names) == 1 else "0.2",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6})  # fmt: skip
    ax.set_xlim(left, right + (right - left) * 0.25)  # room for the labels
    ax.set(xlabel="PL accuracy (lower = better disposal)", ylabel="target accuracy (higher = task kept)")
    if "random_init" in models and shown is not models:
        ref = models["random_init"]
        ax.set_title(f"random init, off the plot: PL {ref[x]:.3f}, target {ref[y]:.3f}", fontsize=8, loc="left",
                     color="0.35")  # fmt: skip
    return _save(fig, path)


def _current_stages(logged: dict[str, list[dict]], results: dict | None) -> dict[str, list[dict]]:
    """The logged stages that belong to ``results`` (what the last command ran): for a DTL run, training,
    disposal of its methods and piggyback learning of its models at its budgets and draws; for an
    unlearning run, its methods' stages (``<method>[ <phase>]``)."""
    if results is None:
        return logged
    if "models" in results:
        models = results["models"]
        repeats = results.get("config", {}).get("piggyback", {}).get("repeats", 1)
        keep = {"pretrain", "transfer"}
        keep |= {f"disposal {m}" for m in models}
        keep |= {f"piggyback {m} {s}-shot #{d}" for m, row in models.items() for s in row.get("pl", {})
                 for d in range(repeats)}  # fmt: skip
        return {stage: rows for stage, rows in logged.items() if stage in keep}
    names = set(results.get("methods", {}))
    return {stage: rows for stage, rows in logged.items() if stage.split(" ")[0] in names}


def _smoothed(ax, steps, values, colour, linestyle="-", window: int = 0, text=None):
    values = np.asarray(values, float)
    window = window or max(1, len(values) // 40)
    if window > 1:
        ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.7, linestyle=linestyle)
        values = np.asarray(_smooth(list(values), window))
    ax.plot(steps, values, color=colour, linewidth=1.4, linestyle=linestyle, label=text)


def dtl_training(logged: dict[str, list[dict]], results: dict, path: Path) -> Path | None:
    """Training by kind of stage: pre-training and transfer loss; disposal's loss and unlearning term per
    method; disposal's held-out checks (source probe and target accuracy on validation splits, the
    returned step marked); piggyback learning's loss per model (first budget, mean over draws)."""
    models = results["models"]
    palette = colours(models)
    panels = []  # (title, ylabel, draw(ax))
    supervised = [s for s in ("pretrain", "transfer") if s in logged]
    if supervised:

        def draw(ax):
            for stage, colour in zip(supervised, ("0.2", "#8c564b")):
                rows = logged[stage]
                _smoothed(ax, [r["step"] for r in rows], [r["loss"] for r in rows], colour, text=stage)
            ax.legend()

        panels.append(("Pre-training and transfer", "loss", draw))
    disposal = [m for m in models if f"disposal {m}" in logged]
    for key, title, ylabel in (("loss", "Disposal: total loss", "L_retain + λ·L_unlearn"),
                               ("unlearn", "Disposal: unlearning term", "L_unlearn (GC value for gc)")):  # fmt: skip
        if disposal and key in logged[f"disposal {disposal[0]}"][0]:

            def draw(ax, key=key):
                for m in disposal:
                    rows = logged[f"disposal {m}"]
                    _smoothed(ax, [r["step"] for r in rows], [r[key] for r in rows], palette[m])
                if key == "unlearn":
                    ax.set_yscale("symlog", linthresh=1e-3)

            panels.append((title, ylabel, draw))
    checks = {m: d.get("checks") for m, d in results.get("disposal", {}).items() if m in models and d.get("checks")}
    for key, title in (("probe_acc", "Disposal checks: source probe (val)"),
                       ("target_val_acc", "Disposal checks: target (val)")):  # fmt: skip
        if checks:

            def draw(ax, key=key):
                for m, rows in checks.items():
                    ax.plot([c["step"] for c in rows], [c[key] for c in rows], "-o", color=palette[m], markersize=3)
                    returned = results["disposal"][m].get("returned_step")
                    chosen = [c[key] for c in rows if c["step"] == returned]
                    if chosen:
                        ax.scatter([returned], chosen, marker="*", s=120, color=palette[m], zorder=4,
                                   edgecolor="k", linewidth=0.5)  # fmt: skip

            panels.append((title, "accuracy", draw))
    piggyback = {}
    for name, row in models.items():
        first = _first_budget(row)
        runs = [logged[s] for s in logged if first and s.startswith(f"piggyback {name} {first[0]}-shot #")]
        if runs:
            length = min(len(r) for r in runs)
            piggyback[name] = ([r["step"] for r in runs[0][:length]],
                               np.mean([[r["loss"] for r in run[:length]] for run in runs], axis=0))  # fmt: skip
    if piggyback:

        def draw(ax):
            for name, (steps, loss) in piggyback.items():
                ax.plot(steps, loss, style(name), color=palette[name], linewidth=1.4)

        panels.append(("Piggyback learning (attacker)", "loss, mean over draws", draw))
    if not panels:
        return None
    fig, axes = _grid(len(panels), 3, 2.9)
    for ax, (title, ylabel, draw) in zip(axes, panels):
        draw(ax)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
    names = [n for n in models if n in disposal or n in piggyback]
    handles = [plt.Line2D([], [], color=palette[n], linestyle=style(n), linewidth=2) for n in names]
    fig.legend(handles, [label(n) for n in names], loc="upper center", ncol=len(names), frameon=False,
               bbox_to_anchor=(0.5, 1.0 + 0.12 / math.ceil(len(panels) / 3)))  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Unlearning


def unlearning_bars(results: dict, path: Path) -> Path:
    """One panel per metric (UA, RA, TA, MIA-efficacy): a bar per method in its colour, Retrain's level
    dashed, the original model's dotted."""
    rows = results["methods"]
    palette = colours(rows)
    methods = [m for m in rows if m != "original"]
    keys = (("ua", "UA (1 − forget acc)"), ("ra", "RA (retain acc)"), ("ta", "TA (test acc)"),
            ("mia_efficacy", "MIA-efficacy"))  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(WIDTH, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        values = [rows[m][key] if rows[m][key] is not None else np.nan for m in methods]
        ax.bar(range(len(methods)), values, color=[palette[m] for m in methods])
        for ref in ("retrain", "original"):
            if ref in rows and rows[ref][key] is not None:
                ax.axhline(rows[ref][key], color=palette[ref], linestyle=style(ref), linewidth=1.6)
        ax.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=55, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel("fraction")
    return _save(fig, path)


def training_curves(logged: dict[str, list[dict]], path: Path, results: dict | None = None) -> Path | None:
    """Training loss per step: for a DTL run (``results`` with ``models``) by kind of stage
    (``dtl_training``); otherwise one panel per method (its phases, e.g. SCRUB's max and min, one after
    another on a common step axis), the method's colour, a moving average over the raw steps."""
    logged = _current_stages(logged, results)
    if not logged:
        return None
    if results is not None and "models" in results:
        return dtl_training(logged, results, path)
    groups: dict[str, list[str]] = {}
    for stage in logged:
        groups.setdefault(stage.split(" ")[0], []).append(stage)
    order = [m for m in (results or {}).get("methods", {}) if m in groups] or list(groups)
    palette = colours(order)
    fig, axes = _grid(len(order), 4, 2.3)
    for ax, method in zip(axes, order):
        offset, steps, losses = 0, [], []
        for stage in groups[method]:
            rows = logged[stage]
            steps += [offset + r["step"] for r in rows]
            losses += [r["loss"] for r in rows]
            offset = steps[-1] if steps else offset
        _smoothed(ax, steps, losses, palette[method], style(method))
        ax.set_title(label(method), color=palette[method], fontweight="bold")
        ax.set(xlabel="step")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
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
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH, 3.3))
    games = (("domain_acc_forget", "on forget", "#d62728"), ("domain_acc_val", "on validation", "#1f77b4"))
    for key, text, colour in games:
        _smoothed(axes[0], steps, [r[key] for r in rows], colour, window=20, text=text)
    axes[0].axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    axes[0].set(
        xlabel="step", ylabel="domain classifier accuracy", title="G_d accuracy (½ = chance)", ylim=(-0.02, 1.02)
    )
    axes[1].plot(steps, [r["alpha"] for r in rows], color="0.25")
    axes[1].set(xlabel="step", ylabel="α", title="gradient reversal α")
    axes[2].plot(steps, _smooth([r["ce"] for r in rows], 20), label="retain CE", color="#2ca02c")
    axes[2].plot(steps, _smooth([r["domain_bce"] for r in rows], 20), label="domain BCE", color="#9467bd")
    axes[2].axhline(0.6931, color="0.5", linestyle=":", linewidth=1)
    axes[2].set(xlabel="step", ylabel="loss (20-step mean)", title="losses (ln 2 = chance)")
    for ax in (axes[0], axes[2]):
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# The page

DTL_COLUMNS = {"target_acc": "target acc", "source_acc": "source acc", "pl_acc": "PL acc", "mia_acc": "MIA acc"}
UNLEARN_COLUMNS = {"ua": "UA", "ra": "RA", "ta": "TA", "mia_efficacy": "MIA-eff", "rep_mia": "rep-MIA",
                   "loss_mia": "loss-MIA", "gap": "gap", "rt_s": "RT (s)", "rrt": "RRT"}  # fmt: skip


def _table(rows: dict, columns: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns.values()])
    body = []
    for name, row in rows.items():
        cells = "".join(f"<td>{'-' if row.get(c) is None else f'{row[c]:.3f}'}</td>" for c in columns)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dtl_jax report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1040px;margin:1.5em auto;color:#222;line-height:1.35}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
img{{max-width:100%}}p.how{{color:#555;font-size:90%;margin:.2em 0 1.6em}}h2{{margin:1.2em 0 .3em;font-size:125%}}
dl.head{{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:90%;background:#f6f6f6;
padding:8px 12px;border-radius:4px}}dl.head dt{{font-weight:bold}}dl.head dd{{margin:0}}
code{{background:#eee;padding:0 3px;border-radius:2px;font-size:95%}}</style></head>
<body><h1>{title}</h1>{header}<h2>Results</h2>{table}<p class="how">{how}</p>{figures}</body></html>
"""


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tuple(tree) if isinstance(tree, list) else tree


def non_defaults(config: dict, sections: tuple[str, ...] | None = None) -> dict:
    """The keys of a saved config (``results.json``'s ``config``) whose value differs from the built-in
    default config's, in ``sections`` (top-level names) if given."""
    from dtl_jax.config import Config

    default = dict(_flat(json.loads(json.dumps(dataclasses.asdict(Config())))))
    return {
        key: value
        for key, value in _flat(config)
        if default.get(key, object()) != value and (sections is None or key.split(".")[0] in sections)
    }


def _header(entries: list[tuple[str, str]]) -> str:
    return '<dl class="head">' + "".join(f"<dt>{html.escape(k)}</dt><dd>{v}</dd>" for k, v in entries) + "</dl>"


def _config_entry(config: dict, sections) -> str:
    from dtl_jax.config import format_value

    changed = non_defaults(config, sections)
    if not changed:
        return "none (the built-in defaults)"
    return " ".join(f"<code>{html.escape(k)}={html.escape(format_value(v))}</code>" for k, v in changed.items())


def header(results: dict, workdir: Path, command: str, seeds: str) -> str:
    """The header's entries: command, seed(s), non-default config, versions and commit, devices, time."""
    from dtl_jax.workdir import SECTIONS

    prov = results.get("provenance", {})
    versions = results.get("versions", {})
    config = results.get("config", {})
    sections = (*SECTIONS[command], *(k for k, v in config.items() if not isinstance(v, dict)))  # + top-level keys
    entries = [("command", f"<code>{html.escape(prov.get('command') or '(not recorded)')}</code>"), ("seed", seeds),
               ("non-default config", _config_entry(config, sections))]  # fmt: skip
    version = ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"
    entries.append(("version", html.escape(f"{version}; commit {prov.get('commit') or 'unknown'}")))
    if prov:
        where = f"{prov['devices']}, {prov['processes']} process(es), CPU {prov['cpu']}; dtype {prov['dtype']}"
        compute = results.get("runtime", {}).get("compute_dtype")
        if compute and compute != prov["dtype"]:
            where += f" (backbone computes in {compute})"
        conv = results.get("cpu_conv", {}).get("xla_flags")
        if conv is not None:  # XLA:CPU's convolution path (dtl_jax/cpu_conv.py): a seed's numbers depend on it
            where += f"; XLA_FLAGS {conv or '(none)'}"
        entries.append(("ran on", html.escape(where)))
    entries.append(("workdir", html.escape(f"{workdir} ({results.get('seconds', 0):.0f} s)")))
    return _header(entries)


def _page(workdir: Path, title: str, head: str, table: str, how: str, figures: list[tuple[str, Path, str]]) -> Path:
    """``figures``: (title, PNG, how to read it)."""
    parts = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{f.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        f'<p class="how">{html.escape(text)}</p>'
        for name, f, text in figures
    )
    page = workdir / "report.html"
    page.write_text(PAGE.format(title=title, header=head, table=table, how=html.escape(how), figures=parts))
    return page


def _dtl_figures(results: dict, workdir: Path) -> list[tuple[str, Path, str]]:
    models = results["models"]
    first = next((_first_budget(r) for r in models.values() if _first_budget(r)), None)
    shots = f"{first[0]} labelled source examples a class" if first else "the attacker's labelled data"
    draws = len(first[1].get("accs") or [1]) if first else 1
    spread = f"band = the range over the {draws} draws" if draws > 1 else "one draw"
    figures = [
        ("Piggyback learning: can an attacker recover the source task?", pl_curves(results, workdir / "pl_curves.png"),
         f"Source test accuracy of an attacker who fine-tunes each model on {shots}, after each epoch; line = mean, "
         f"{spread}. Below TL (dashed) = the disposal removed something; random init (dotted) = no stolen knowledge."),
    ]  # fmt: skip
    by_budget = pl_by_budget(results, workdir / "pl_by_budget.png")
    if by_budget is not None:
        figures.append(("PL accuracy against the attacker's budget", by_budget,
                        "Final PL accuracy at each budget; band = the range over draws. The gap between TL and "
                        "random init is what stolen knowledge is worth to the attacker."))  # fmt: skip
    figures.append((
        "Trade-off: target accuracy kept against PL accuracy", tradeoff(results, workdir / "tradeoff.png"),
        "Up = the target task is kept, left = harder to piggyback; dashed lines cross at TL. A good disposal sits "
        "up and to the left of TL; a horizontal bar is the range over the attacker's draws.",
    ))  # fmt: skip
    return figures


def write_report(workdir: str | Path) -> Path:
    """Writes the PNGs and ``report.html`` into ``workdir`` (a run's, or a multi-seed run's with
    ``summary.json``); returns the page's path."""
    workdir = Path(workdir)
    path = workdir / "results.json"
    if not path.is_file() and (workdir / "frontier.json").is_file():
        return write_frontier_report(workdir)
    if not path.is_file() and (workdir / "summary.json").is_file():
        return write_summary_report(workdir)
    if not path.is_file():
        raise UserError(f"no results.json in {str(workdir)!r}: run `dtl-jax run` or `dtl-jax unlearn` there first")
    results = json.loads(path.read_text())
    seed = str(results.get("config", {}).get("seed", "?"))
    if "models" in results:
        title, command = "Disposable transfer learning", "run"
        table = _table(results["models"], DTL_COLUMNS)
        how = ("target acc: target test accuracy (target head); source acc: the source head's test accuracy; PL acc: "
               "the attacker's source test accuracy after piggyback learning (lower = better disposal); MIA acc: "
               "loss-threshold membership inference on the source head (0.5 = chance). random_init and tl are the "
               "references: no stolen knowledge, and the model before disposal.")  # fmt: skip
        figures = _dtl_figures(results, workdir)
    elif "methods" in results:
        title, command = "Selective unlearning", "unlearn"
        table = _table(results["methods"], UNLEARN_COLUMNS)
        how = ("UA = 1 − forget accuracy, RA = retain accuracy, TA = test accuracy, MIA-eff = fraction of the forget "
               "set an SVM calls non-member, rep-MIA = fraction a kNN on features calls member, loss-MIA = loss-"
               "threshold attack accuracy (0.5 = chance), gap = mean |difference| to Retrain over UA, RA, TA, MIA-eff "
               "(lower = closer to the oracle), RT = seconds without compilation, RRT = RT / Retrain's.")  # fmt: skip
        figures = [("Unlearning metrics per method", unlearning_bars(results, workdir / "unlearning_bars.png"),
                    "Each method's value; dashed = Retrain (the oracle: the closer, the better), dotted = the "
                    "original model before unlearning.")]  # fmt: skip
    else:
        raise UserError(f"{str(path)!r} is not a dtl_jax results file (no 'models' or 'methods')")
    if (workdir / "sweep.png").is_file():  # written by `dtl-jax sweep`
        figures.append(("Sweep", workdir / "sweep.png", "Target and PL accuracy of each method at every swept value; "
                        "TL dashed, random init dotted."))  # fmt: skip
    logged = metrics.read(workdir)
    curves = training_curves(logged, workdir / "training_curves.png", results)
    if curves is not None:
        how_curves = (
            "Loss per step of each stage (thin: raw, thick: moving average); the held-out checks are what disposal's "
            "stopping rule and selection saw (validation splits only), a star = the state it returned."
            if command == "run"
            else "Training loss per step of each method (thin: raw, thick: moving average), its phases one after "
            "another; the original model's training first."
        )
        figures.append(("Training curves", curves, how_curves))
    sure = sure_panel(_current_stages(logged, results), workdir / "sure.png")
    if sure is not None:
        figures.append((
            "SURE's adversarial game", sure,
            "The domain classifier should sit near chance (½) on both forget and validation examples once SURE has "
            "made them look alike; α ramps up the reversal.",
        ))  # fmt: skip
    return _page(workdir, title, header(results, workdir, command, seed), table, how, figures)


# ---------------------------------------------------------------------------------------------------
# Several seeds: summary.json


def _summary_table(summary: dict, columns: list[str]) -> str:
    names = {**DTL_COLUMNS, **UNLEARN_COLUMNS}
    head = "".join(f"<th>{html.escape(names.get(c, c))}</th>" for c in ["", *columns])
    body = []
    for name, row in summary["rows"].items():
        cells = "".join(f"<td>{html.escape(mean_ci(row[c])) if c in row else '-'}</td>" for c in columns)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (
        f"<p>mean ± 95 % CI (Student t) over seeds {summary['seeds']}</p><table><tr>{head}</tr>{''.join(body)}</table>"
    )


def seed_bars(summary: dict, keys: list[str], path: Path) -> Path:
    """One panel per metric: every row's mean with its 95 % interval (error bar) and each seed's value
    as a dot beside it (the per-seed strip), each row in its colour."""
    names = list(summary["rows"])
    palette = colours(names)
    ncols = min(4, len(keys))
    fig, axes = _grid(len(keys), ncols, 3.0)
    for ax, key in zip(axes, keys):
        for i, name in enumerate(names):
            entry = summary["rows"][name].get(key)
            if entry is None or entry["n"] == 0:
                continue
            ci = 0.0 if entry["ci95"] != entry["ci95"] else entry["ci95"]
            ax.bar(i, entry["mean"], yerr=ci, capsize=3, color=palette[name], alpha=0.6)
            values = [v for v in entry["values"] if v is not None]
            ax.scatter([i + 0.25] * len(values), values, s=9, color="k", zorder=3)
        ax.set_xticks(range(len(names)), [label(n) for n in names], rotation=55, ha="right", fontsize=8)
        ax.set_title(key)
        ax.grid(axis="x", visible=False)
    fig.tight_layout()
    return _save(fig, path)


def pl_by_shots(summary: dict, path: Path) -> Path | None:
    """PL accuracy against the attacker's labelled examples a class, mean and 95 % interval over seeds,
    one line per model (TL dashed and random init dotted: the two references), labelled at its end."""
    shots = sorted({int(k.split("@")[1]) for row in summary["rows"].values() for k in row if k.startswith("pl_acc@")})
    if not shots:
        return None
    palette = colours(summary["rows"])
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ends = []
    for name, row in summary["rows"].items():
        entries = [row.get(f"pl_acc@{s}") for s in shots]
        means = [e["mean"] if e else float("nan") for e in entries]
        cis = [0.0 if not e or e["ci95"] != e["ci95"] else e["ci95"] for e in entries]
        ax.errorbar(shots, means, yerr=cis, fmt="o", linestyle=style(name), color=palette[name], capsize=3,
                    markersize=3)  # fmt: skip
        ends.append((shots[-1], means[-1], label(name), palette[name]))
    _log_ticks(ax, shots)
    _end_labels(ax, ends)
    ax.set(xlabel="labelled source examples a class (attacker's budget)", ylabel="PL accuracy")
    return _save(fig, path)


def write_summary_report(workdir: Path) -> Path:
    """The report of a multi-seed run (``summary.json``): the header, the mean ± CI table, error bars with
    the per-seed strip, and (for DTL) PL accuracy against the attacker's budget."""
    summary = json.loads((workdir / "summary.json").read_text())
    if summary.get("kind") == "run":
        title, command, columns = "Disposable transfer learning over seeds", "run", list(DTL_COLUMNS)
    else:
        title, command = "Selective unlearning over seeds", "unlearn"
        columns = ["ua", "ra", "ta", "mia_efficacy", "rep_mia", "loss_mia", "gap"]
    first = workdir / f"seed-{summary['seeds'][0]}" / "results.json"  # the provenance of the first seed's run
    one = json.loads(first.read_text()) if first.is_file() else {}
    details = {**one, "config": summary.get("config", {}), "seconds": summary.get("seconds", 0)}
    head = header(details, workdir, command, ", ".join(map(str, summary["seeds"])))
    figures = [("Every metric over seeds", seed_bars(summary, columns, workdir / "seed_bars.png"),
                "Bar = mean over seeds with its 95 % interval; dots = each seed's value.")]  # fmt: skip
    by_shots = pl_by_shots(summary, workdir / "pl_by_shots.png")
    if by_shots is not None:
        figures.append(("PL accuracy against the attacker's budget", by_shots,
                        "Mean over seeds with its 95 % interval; TL dashed, random init dotted."))  # fmt: skip
    how = "Each cell: mean ± the half-width of the Student-t 95 % interval over the seeds."
    return _page(workdir, title, head, _summary_table(summary, columns), how, figures)


def write_frontier_report(workdir: Path) -> Path:
    """The report of ``dtl-jax frontier`` (``frontier.json``): the header, each loss's PL cut at every
    target-cost budget and its area with their intervals, every attack strategy's cut at the selected
    states, and the frontier figure."""
    from dtl_jax import frontier
    from dtl_jax.summary import mean_ci

    summary = json.loads((workdir / "frontier.json").read_text())
    budgets = summary["budgets"]
    seeds = ", ".join(map(str, summary["seeds"]))
    head = header({**summary, "config": summary.get("config", {})}, workdir, "frontier", seeds)
    cells = ["<tr><th>loss</th>" + "".join(f"<th>cut @ {100 * b:g} pts</th>" for b in budgets) + "<th>area</th></tr>"]
    for loss, cuts in summary["cut"].items():
        row = "".join(f"<td>{mean_ci(cuts[str(b)])}</td>" for b in budgets)
        cells.append(f"<tr><th>{html.escape(loss)}</th>{row}<td>{mean_ci(summary['area'][loss])}</td></tr>")
    blocks = list(summary.get("attackers", {}).items())
    if summary.get("worst_case") and len(blocks) > 1:
        blocks.append(("the worst case of them", summary["worst_case"]))
    for strategy, per_loss in blocks:
        cells.append(f'<tr><th colspan="{len(budgets) + 2}">attack: {html.escape(strategy)}</th></tr>')
        for loss, cuts in per_loss.items():
            row = "".join(f"<td>{mean_ci(cuts[str(b)])}</td>" for b in budgets)
            cells.append(f"<tr><th>{html.escape(loss)}</th>{row}<td></td></tr>")
    table = "<table>" + "".join(cells) + "</table>"
    png = workdir / "frontier.png"
    frontier.plot(summary, png, colours(list(summary["points"])))
    attackers = ", ".join(sorted(set(summary.get("attacker", {}).values())))
    how = (f"PL cut = TL's PL accuracy minus that of the disposal state selected on validation data for the "
           f"target cost allowed (held-out target accuracy at most b below TL's), reported on test, mean ± 95 % "
           f"interval over the seeds; area = the mean cut over b = 1..10 points as a fraction of TL's headroom over "
           f"random init. The frontier's attacker: {attackers}; the rows under 'attack:' are every strategy "
           f"against the same selected states.")  # fmt: skip
    figures = [("The trade-off frontier", png, "Left: the cut at each target cost (mean and 95 % band over seeds, "
                "paired per seed); TL at 0, random init at the whole headroom. Right: every kept state of every "
                "seed.")]  # fmt: skip
    return _page(workdir, "Disposal trade-off frontier", head, table, how, figures)
