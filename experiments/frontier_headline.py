"""The README's frontier table from a finished ``dtl-jax frontier`` workdir.

    python experiments/frontier_headline.py WORKDIR [--loss gc]

Reads ``WORKDIR/frontier.json`` (and ``frontier-fresh.json`` when ``experiments/frontier_fresh_draws.py`` has
written it) and prints, per loss: the PL cut at 1/3/5/10 points of target cost against the frontier's
attacker, the area, the cut at 3 points as a fraction of the attacker's headroom (TL's PL accuracy minus
random init's, per seed), and the worst case over the attack suite at the same states; then the paired area
of ``--loss`` against every other loss, and whether a paper-sized effect (a cut of at least 25 % of the
headroom at 3 points of target cost) is excluded: the upper end of the 95 % interval of the fraction is
below 0.25. Means ± 95 % Student-t half-widths over the seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtl_jax.frontier import cuts
from dtl_jax.summary import describe, mean_ci

PAPER_FRACTION = 0.25  # a "paper-sized" cut: a quarter of the headroom, at 3 points of target cost


def headroom_fractions(summary: dict, loss: str, budget: float = 0.03) -> list[float | None]:
    """Per seed: the cut at ``budget`` against the frontier's attacker over that attacker's headroom."""
    tl = {r["seed"]: r for r in summary["reference"]["tl"]}
    rnd = {r["seed"]: r for r in summary["reference"]["random_init"]}
    out = []
    for seed in summary["seeds"]:
        points = [p for p in summary["points"][loss] if p["seed"] == seed]
        cut = cuts(points, tl[seed], [budget])[budget]
        headroom = tl[seed]["pl_acc"] - rnd[seed]["pl_acc"]
        out.append(None if cut is None or headroom <= 0 else cut / headroom)
    return out


def _fresh_per_seed(summary: dict, fresh: dict, cut_of) -> dict:
    """``describe`` over the seeds of ``cut_of(attacks)``, ``attacks`` a seed's fresh-draw results by attack
    (``experiments/frontier_fresh_draws.py``); ``None`` for a seed the fresh draws did not cover."""
    per_seed = [fresh["per_seed"].get(str(seed)) for seed in summary["seeds"]]
    return describe([None if attacks is None else cut_of(seed, attacks) for seed, attacks in
                     zip(summary["seeds"], per_seed, strict=True)])  # fmt: skip


def fresh_cut(summary: dict, fresh: dict, loss: str, budget: str) -> dict:
    """The cut at ``budget`` against each seed's frontier attacker on fresh draws (draws the selection never
    saw: ``experiments/frontier_fresh_draws.py``)."""

    def cut(seed, attacks):
        attack = attacks[summary["attacker"][str(seed)]]
        return attack["tl"] - attack["losses"][loss][budget]

    return _fresh_per_seed(summary, fresh, cut)


def worst_case(summary: dict, loss: str, budget: str, exclude: tuple[str, ...]) -> dict:
    """Per seed, the smallest cut at ``budget`` over the attacks of the suite but ``exclude``."""
    attacks = [a for a in summary["attackers"] if a not in exclude]
    per = [summary["attackers"][a][loss][budget]["values"] for a in attacks]
    return describe([None if None in column else min(column) for column in zip(*per, strict=True)])


def attack_means(summary: dict, budget: str = "0.03") -> str:
    """Each attack's mean cut at ``budget`` per loss, and TL's and random init's PL accuracy under it."""
    losses = list(summary["cut"])
    lines = ["| attack | TL PL acc | random init PL acc | " + " | ".join(losses) + " |"]
    lines.append("|" + "---|" * (len(losses) + 3))
    for attack, per_loss in summary["attackers"].items():
        tl = describe([summary["strategies"][str(s)][attack]["tl"]["pl_acc"] for s in summary["seeds"]])
        rnd = describe([summary["strategies"][str(s)][attack]["random_init"]["pl_acc"] for s in summary["seeds"]])
        cells = [mean_ci(per_loss[loss][budget]) for loss in losses]
        lines.append(f"| {attack} | {mean_ci(tl)} | {mean_ci(rnd)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fresh_worst_case(summary: dict, fresh: dict, loss: str, budget: str, exclude: tuple[str, ...]) -> dict:
    """Per seed, the smallest cut on fresh draws over the attacks but ``exclude``."""

    def worst(seed, attacks):
        return min(a["tl"] - a["losses"][loss][budget] for name, a in attacks.items() if name not in exclude)

    return _fresh_per_seed(summary, fresh, worst)


def table(summary: dict, fresh: dict | None, exclude: tuple[str, ...] = ()) -> str:
    budgets = [str(b) for b in summary["budgets"]]
    head = "| loss | " + " | ".join(f"cut @{round(float(b) * 100)} pts" for b in budgets)
    head += " | area | cut @3 / headroom | worst case @3 |"
    head += " fresh draws: cut @3 | fresh draws: worst case @3 |" if fresh else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for loss in summary["cut"]:
        cells = [mean_ci(summary["cut"][loss][b]) for b in budgets]
        cells.append(mean_ci(summary["area"][loss]))
        cells.append(mean_ci(describe(headroom_fractions(summary, loss))))
        cells.append(mean_ci(worst_case(summary, loss, "0.03", exclude)))
        if fresh:
            cells.append(mean_ci(fresh_cut(summary, fresh, loss, "0.03")))
            cells.append(mean_ci(fresh_worst_case(summary, fresh, loss, "0.03", exclude)))
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--loss", default="gc")
    parser.add_argument("--exclude", default="", help="attacks left out of the worst case (comma list)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    summary = json.loads((workdir / "frontier.json").read_text())
    fresh_path = workdir / "frontier-fresh.json"
    fresh = json.loads(fresh_path.read_text()) if fresh_path.exists() else None
    print(f"seeds {summary['seeds']}; attacker per seed {summary['attacker']}\n")
    exclude = tuple(a for a in args.exclude.split(",") if a)
    print(table(summary, fresh, exclude))
    print(f"\n(worst case over every attack but {', '.join(exclude) or 'none'})\n")
    print(attack_means(summary))
    print()
    loss = args.loss
    for key, entry in summary["paired"].items():
        a, b = key.split("-", 1)
        if loss not in (a, b):
            continue
        sign = 1.0 if a == loss else -1.0
        area = entry["area"]
        values = [None if v is None else sign * v for v in area["values"]]
        print(f"area {loss} − {b if a == loss else a}: {mean_ci(describe(values))}")
    if fresh:
        mine = fresh_cut(summary, fresh, loss, "0.03")["values"]
        for other in summary["cut"]:
            if other != loss:
                theirs = fresh_cut(summary, fresh, other, "0.03")["values"]
                diff = [None if a is None or b is None else a - b for a, b in zip(mine, theirs, strict=True)]
                print(f"fresh draws, cut @3 pts {loss} − {other}: {mean_ci(describe(diff))}")
    for attack in summary["attackers"]:
        cut = summary["attackers"][attack][loss]["0.03"]["values"]
        room = [summary["strategies"][str(s)][attack]["tl"]["pl_acc"] - summary["strategies"][str(s)][attack]
                ["random_init"]["pl_acc"] for s in summary["seeds"]]  # fmt: skip
        share = describe([None if c is None or r <= 0 else c / r for c, r in zip(cut, room, strict=True)])
        print(f"{loss} against {attack} at the selected states: cut @3 pts / headroom {mean_ci(share)}")
    fraction = describe(headroom_fractions(summary, loss))
    upper = fraction["mean"] + fraction["ci95"]
    verdict = "excluded" if upper < PAPER_FRACTION else "not excluded"
    print(
        f"\n{loss}: cut @3 pts / headroom {mean_ci(fraction)}, upper end {upper:.3f}: a paper-sized effect "
        f"(>= {PAPER_FRACTION}) is {verdict}"
    )


if __name__ == "__main__":
    main()
