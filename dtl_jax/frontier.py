"""The trade-off frontier of disposal losses (docs/methods.md §1.4): from kept states to cuts and areas.

A *point* is one kept disposal state of one seed: the loss that made it, its strength ``lambda``, the
disposal ``step`` it was kept at, and four accuracies::

    {"seed", "lambda", "step", "target_val", "pl_val", "target_acc", "pl_acc"}

``target_*`` is the target task's accuracy (validation split / test split), ``pl_*`` the attacker's
piggyback-learning accuracy on the source task (validation / test). The *reference* rows are the TL model
(upper: what an attacker gets from undisposed weights) and a random initialisation (lower: no stolen
knowledge), one per seed, with the same fields but ``lambda`` and ``step``. The starting point of every
frontier (λ = 0, the TL model with its re-fitted source head) belongs to every loss's points.

**Selection uses validation data only.** For a target-cost budget ``b``, a seed and a loss, the selected
state is, among the loss's points whose held-out target drop ``target_val(TL) − target_val`` is at most
``b``, the one with the lowest ``pl_val`` (ties: the higher ``target_val``, then the smaller λ and step).
It is then *reported* on test:

    cut_b  = pl_acc(TL) − pl_acc(selected)                       (per seed; > 0: the attack got worse)
    area   = mean over b in {0.01, 0.02, ..., 0.10} of cut_b / (pl_acc(TL) − pl_acc(random init))

(the area is the mean fraction of the attacker's headroom removed over target costs up to ten points;
undefined, ``None``, on a seed without headroom). Over seeds each is ``dtl_jax.summary.describe``'s
mean, std, 95 % interval, n and values, and ``paired["<loss>-<other>"]`` the per-seed difference of two
losses' cuts and areas with its own interval. ``summarize`` computes all of it from the points and the
references alone, so a ``frontier.json`` can be checked by recomputing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dtl_jax.summary import describe

BUDGETS = (0.01, 0.03, 0.05, 0.1)  # the target costs reported (fractions of accuracy)
AREA_BUDGETS = tuple(round(0.01 * i, 2) for i in range(1, 11))  # the area's grid: 1 ... 10 points
POINT_FIELDS = ("seed", "lambda", "step", "target_val", "pl_val", "target_acc", "pl_acc")
_TOLERANCE = 1e-9  # a drop of exactly b (in float) is within the budget


def _by_seed(rows: Sequence[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in rows:
        out.setdefault(int(row["seed"]), []).append(row)
    return out


def select(points: Sequence[dict], tl: dict, budget: float) -> dict | None:
    """The point chosen for target cost ``budget`` among one seed's ``points`` (validation only)."""
    allowed = [p for p in points if tl["target_val"] - p["target_val"] <= budget + _TOLERANCE]
    if not allowed:
        return None
    return min(allowed, key=lambda p: (p["pl_val"], -p["target_val"], p["lambda"], p["step"]))


def cuts(points: Sequence[dict], tl: dict, budgets: Sequence[float]) -> dict[float, float | None]:
    """``{b: cut_b}`` for one seed and loss (``None`` where nothing is within the budget)."""
    out = {}
    for b in budgets:
        chosen = select(points, tl, b)
        out[b] = None if chosen is None else tl["pl_acc"] - chosen["pl_acc"]
    return out


def area(points: Sequence[dict], tl: dict, random_init: dict) -> float | None:
    """The mean fraction of the attacker's headroom removed over ``AREA_BUDGETS`` (one seed and loss)."""
    headroom = tl["pl_acc"] - random_init["pl_acc"]
    values = list(cuts(points, tl, AREA_BUDGETS).values())
    if headroom <= 0 or any(v is None for v in values):
        return None
    return sum(values) / len(values) / headroom


def pareto(points: Sequence[dict]) -> list[dict]:
    """The points not dominated in (higher ``target_acc``, lower ``pl_acc``), by increasing PL accuracy."""
    front = []
    for p in sorted(points, key=lambda p: (p["pl_acc"], -p["target_acc"])):
        if not front or p["target_acc"] > front[-1]["target_acc"]:
            front.append(p)
    return front


def _key(b: float) -> str:
    return str(b)


def summarize(points: dict[str, list[dict]], reference: dict[str, list[dict]], budgets=BUDGETS) -> dict:
    """``frontier.json`` from the points of every loss and the per-seed references (``"tl"``,
    ``"random_init"``): cuts at ``budgets``, areas, paired differences between losses (each pair once,
    in the order of ``points``), and the inputs themselves. Also ``selected[loss][b]``: the (seed, λ,
    step) chosen on each seed, for evaluating those states against other attackers."""
    tl, rand = _by_seed(reference["tl"]), _by_seed(reference["random_init"])
    seeds = sorted(tl)
    per_seed: dict[str, dict[int, dict]] = {}
    cut_out, area_out, selected = {}, {}, {}
    for loss, rows in points.items():
        mine = _by_seed(rows)
        per_seed[loss] = {}
        selected[loss] = {_key(b): [] for b in budgets}
        for seed in seeds:
            candidates = mine.get(seed, [])
            if not candidates:
                continue
            entry = {
                "cut": cuts(candidates, tl[seed][0], budgets),
                "area": area(candidates, tl[seed][0], rand[seed][0]),
            }
            per_seed[loss][seed] = entry
            for b in budgets:
                chosen = select(candidates, tl[seed][0], b)
                if chosen is not None:
                    selected[loss][_key(b)].append({k: chosen[k] for k in ("seed", "lambda", "step")})
        cut_out[loss] = {
            _key(b): describe([per_seed[loss].get(s, {}).get("cut", {}).get(b) for s in seeds]) for b in budgets
        }
        area_out[loss] = describe([per_seed[loss].get(s, {}).get("area") for s in seeds])
    paired = {}
    losses = list(points)
    for i, loss in enumerate(losses):
        for other in losses[i + 1 :]:
            a, o = per_seed[loss], per_seed[other]

            def diff(x, y):
                return None if x is None or y is None else x - y

            paired[f"{loss}-{other}"] = {
                "cut": {
                    _key(b): describe(
                        [diff(a.get(s, {}).get("cut", {}).get(b), o.get(s, {}).get("cut", {}).get(b)) for s in seeds]
                    )
                    for b in budgets
                },
                "area": describe([diff(a.get(s, {}).get("area"), o.get(s, {}).get("area")) for s in seeds]),
            }
    return {
        "budgets": list(budgets),
        "seeds": seeds,
        "cut": cut_out,
        "area": area_out,
        "paired": paired,
        "points": points,
        "reference": reference,
        "selected": selected,
    }


def best_other(summary: dict, loss: str) -> str | None:
    """The loss, other than ``loss``, with the largest mean area (the one ``loss`` must beat)."""
    others = [(v["mean"], k) for k, v in summary["area"].items() if k != loss and v["n"] and math.isfinite(v["mean"])]
    return max(others)[1] if others else None


def paired_entry(summary: dict, loss: str, other: str) -> tuple[dict, float]:
    """``(paired[...], sign)``: the stored pair for ``loss`` and ``other`` in either order, and the sign that
    turns it into ``loss − other``."""
    if f"{loss}-{other}" in summary["paired"]:
        return summary["paired"][f"{loss}-{other}"], 1.0
    return summary["paired"][f"{other}-{loss}"], -1.0


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights near ``ys`` at least ``gap`` apart (same order), for direct labels that do not collide."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        placed[i] = max(ys[i], last + gap)
        last = placed[i]
    return placed


def plot(summary: dict, path, colors: dict | None = None) -> None:
    """``frontier.png``: (left) the PL cut (TL's PL accuracy minus that of the state selected on validation,
    test, in points) against the target cost allowed, mean over seeds with its 95 % band (paired per seed,
    so the seeds' common variation cancels), one curve per loss, with TL (0) and the random
    initialisation (the whole headroom) as references; (right) every kept state of every seed (target vs
    PL accuracy, test) with the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = colors or {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets = [0.0, *AREA_BUDGETS]
    xs = [100 * b for b in budgets]
    tl, rand = _by_seed(summary["reference"]["tl"]), _by_seed(summary["reference"]["random_init"])
    seeds = summary["seeds"]
    headroom = 100 * sum(tl[s][0]["pl_acc"] - rand[s][0]["pl_acc"] for s in seeds) / len(seeds)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    ends, low, high = [], 0.0, headroom
    for i, (loss, rows) in enumerate(summary["points"].items()):
        color = colors.get(loss, cycle[i % len(cycle)])
        mine = _by_seed(rows)
        means, lows, highs = [], [], []
        for b in budgets:
            values = [100 * v if (v := cuts(mine.get(s, []), tl[s][0], [b])[b]) is not None else None for s in seeds]
            d = describe(values)
            half = d["ci95"] if math.isfinite(d["ci95"]) else 0.0
            means.append(d["mean"])
            lows.append(d["mean"] - half)
            highs.append(d["mean"] + half)
        low, high = min(low, *means), max(high, *means)
        left.plot(xs, means, "-", color=color, linewidth=1.8)
        left.fill_between(xs, lows, highs, color=color, alpha=0.12, linewidth=0)
        ends.append((loss, means[-1], color))
        right.scatter([r["pl_acc"] for r in rows], [r["target_acc"] for r in rows], s=9, color=color, alpha=0.5,
                      label=loss)  # fmt: skip
    left.axhline(0, color="black", linestyle="--", linewidth=1)
    left.text(0.2, 0, " TL (nothing disposed)", va="bottom", fontsize=9)
    left.axhline(headroom, color="black", linestyle=":", linewidth=1)
    left.text(0.2, headroom, " random init (all of it)", va="bottom", fontsize=9)
    margin = 0.08 * (high - low or 1.0)
    left.set_ylim(low - margin, high + 2 * margin)  # the bands may reach beyond: the means stay in view
    heights = _spread_labels([y for _, y, _ in ends], gap=0.05 * (high - low + 3 * margin))
    for (loss, _, color), y in zip(ends, heights):
        left.text(xs[-1] + 0.15, y, loss, color=color, va="center", fontsize=9, fontweight="bold")
    left.set_xlim(0, xs[-1] + 1.6)
    left.set(xlabel="target cost allowed (points of held-out target accuracy)",
             ylabel="PL cut vs TL (points of source test accuracy)",
             title=f"Attack accuracy removed at each target cost ({len(seeds)} seeds, 95% band)")  # fmt: skip
    for name, marker, refs in (("TL", "*", tl), ("random init", "x", rand)):
        pl, target = [refs[s][0]["pl_acc"] for s in seeds], [refs[s][0]["target_acc"] for s in seeds]
        if all(math.isfinite(t) for t in target):
            right.scatter(pl, target, s=40, marker=marker, color="black", label=name)
        else:  # no target head (random init): where its PL accuracy is, as a line, not an invisible marker
            right.axvline(sum(pl) / len(pl), color="black", linestyle=":", linewidth=1, label=f"{name} (PL, mean)")
    right.set(xlabel="attacker's PL accuracy (source test)", ylabel="target accuracy (test)",
              title="Every kept disposal state, every seed")  # fmt: skip
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
