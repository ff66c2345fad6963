"""The frontier's analysis (dtl_jax/frontier.py): selection on validation only, cuts, areas, pairs, Pareto."""

import math

import pytest

from dtl_jax import frontier


def point(seed, lam, step, target_val, pl_val, target_acc, pl_acc):
    return dict(seed=seed, step=step, target_val=target_val, pl_val=pl_val, target_acc=target_acc, pl_acc=pl_acc,
                **{"lambda": lam})  # fmt: skip


TL = {0: dict(seed=0, target_val=0.80, pl_val=0.50, target_acc=0.78, pl_acc=0.52),
      1: dict(seed=1, target_val=0.70, pl_val=0.40, target_acc=0.71, pl_acc=0.42)}  # fmt: skip
RAND = {0: dict(seed=0, target_val=0.1, pl_val=0.30, target_acc=0.1, pl_acc=0.32),
        1: dict(seed=1, target_val=0.1, pl_val=0.20, target_acc=0.1, pl_acc=0.22)}  # fmt: skip


def start(seed):
    t = TL[seed]
    return point(seed, 0.0, 0, t["target_val"], t["pl_val"], t["target_acc"], t["pl_acc"])


def test_selection_reads_validation_never_test():
    points = [
        start(0),
        point(0, 1.0, 10, 0.79, 0.45, 0.70, 0.49),  # 1 point of held-out cost, the lowest validation PL
        point(0, 1.0, 20, 0.79, 0.47, 0.77, 0.30),  # the lowest *test* PL: must not be chosen for that
        point(0, 2.0, 10, 0.74, 0.35, 0.74, 0.40),  # 6 points of cost
    ]
    assert frontier.select(points, TL[0], 0.01)["step"] == 10
    assert frontier.select(points, TL[0], 0.01)["lambda"] == 1.0
    assert frontier.select(points, TL[0], 0.05)["step"] == 10  # 6 points is over the budget
    assert frontier.select(points, TL[0], 0.1)["lambda"] == 2.0
    assert frontier.select(points, TL[0], 0.0) is points[0]  # the start is always within budget
    # a drop of exactly b counts as within it, despite float rounding (0.80 - 0.79 > 0.01 in binary)
    assert 0.80 - 0.79 > 0.01


def test_cut_and_area_by_hand():
    points = [start(0), point(0, 1.0, 10, 0.79, 0.45, 0.70, 0.49), point(0, 2.0, 10, 0.74, 0.35, 0.74, 0.40)]
    cuts = frontier.cuts(points, TL[0], frontier.AREA_BUDGETS)
    assert cuts[0.01] == pytest.approx(0.52 - 0.49)
    assert cuts[0.05] == pytest.approx(0.03)
    assert cuts[0.06] == pytest.approx(0.52 - 0.40)
    expected = (5 * 0.03 + 5 * 0.12) / 10 / (0.52 - 0.32)
    assert frontier.area(points, TL[0], RAND[0]) == pytest.approx(expected)
    no_headroom = dict(RAND[0], pl_acc=0.60)
    assert frontier.area(points, TL[0], no_headroom) is None


def test_summary_pairs_and_recomputation():
    points = {
        "gc": [start(0), point(0, 1.0, 10, 0.80, 0.40, 0.78, 0.42), start(1), point(1, 1.0, 5, 0.70, 0.35, 0.71, 0.37)],
        "rtf": [start(0), point(0, 1.0, 10, 0.78, 0.45, 0.76, 0.47), start(1)],
    }
    reference = {"tl": list(TL.values()), "random_init": list(RAND.values())}
    s = frontier.summarize(points, reference)
    assert s["budgets"] == [0.01, 0.03, 0.05, 0.1] and s["seeds"] == [0, 1]
    assert s["cut"]["gc"]["0.01"]["values"] == pytest.approx([0.10, 0.05])
    assert s["cut"]["rtf"]["0.01"]["values"] == pytest.approx([0.0, 0.0])
    assert s["cut"]["rtf"]["0.03"]["values"] == pytest.approx([0.05, 0.0])
    assert s["area"]["gc"]["values"] == pytest.approx([0.10 / 0.20, 0.05 / 0.20])
    pair = s["paired"]["gc-rtf"]
    assert pair["cut"]["0.01"]["values"] == pytest.approx([0.10, 0.05])
    assert pair["cut"]["0.03"]["values"] == pytest.approx([0.05, 0.05])
    assert pair["cut"]["0.03"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert "rtf-gc" not in s["paired"]
    assert s["selected"]["gc"]["0.01"] == [
        {"seed": 0, "lambda": 1.0, "step": 10},
        {"seed": 1, "lambda": 1.0, "step": 5},
    ]
    assert frontier.best_other(s, "gc") == "rtf"
    entry, sign = frontier.paired_entry(s, "rtf", "gc")
    assert sign == -1.0 and entry is pair
    again = frontier.summarize(s["points"], s["reference"], s["budgets"])
    assert again["cut"] == s["cut"] and again["area"] == s["area"]


def test_pareto_front():
    pts = [point(0, 1, i, 0, 0, t, p) for i, (t, p) in enumerate([(0.7, 0.5), (0.6, 0.4), (0.65, 0.45), (0.5, 0.45)])]
    front = frontier.pareto(pts)
    assert [(p["target_acc"], p["pl_acc"]) for p in front] == [(0.6, 0.4), (0.65, 0.45), (0.7, 0.5)]


def test_labels_do_not_collide():
    placed = frontier._spread_labels([0.50, 0.501, 0.30, 0.502], gap=0.02)
    ordered = sorted(placed)
    assert all(b - a >= 0.02 - 1e-12 for a, b in zip(ordered, ordered[1:]))
    assert placed[2] == 0.30


def test_plot_writes_a_png(tmp_path):
    points = {"gc": [start(0), point(0, 1.0, 10, 0.80, 0.40, 0.78, 0.42), start(1)], "rtf": [start(0), start(1)]}
    s = frontier.summarize(points, {"tl": list(TL.values()), "random_init": list(RAND.values())})
    frontier.plot(s, tmp_path / "frontier.png")
    data = (tmp_path / "frontier.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert math.isfinite(s["area"]["gc"]["mean"])


def test_strategy_cuts_and_the_worst_case():
    from dtl_jax.stages.frontier import strategy_cuts

    def state(pl):
        return {"seed": 0, "lambda": 1.0, "step": 10, "pl_val": pl, "pl_acc": pl}

    def attacks(tl, pl):
        return {"tl": {"pl_val": tl, "pl_acc": tl}, "losses": {"gc": {"0.01": state(pl)}}}

    per_seed = {0: {"a": attacks(0.50, 0.40), "b": attacks(0.32, 0.30)},
                1: {"a": attacks(0.55, 0.50), "b": attacks(0.50, 0.45)}}  # fmt: skip
    out = strategy_cuts(per_seed, [0.01])
    assert out["by_strategy"]["a"]["gc"]["0.01"]["values"] == pytest.approx([0.10, 0.05])
    assert out["by_strategy"]["b"]["gc"]["0.01"]["values"] == pytest.approx([0.02, 0.05])
    assert out["worst_case"]["gc"]["0.01"]["values"] == pytest.approx([0.02, 0.05])
