"""`dtl-jax frontier` end to end on digits (slow), the attack strategies, and λ as an argument of the
disposal step (one compilation for any number of λ)."""

import json
import os
import re
import subprocess
import sys

import pytest

from dtl_jax import frontier

FIELDS = {"seed", "lambda", "step", "target_val", "pl_val", "target_acc", "pl_acc"}


def _cli(argv, env=None, timeout=1200):
    done = subprocess.run([sys.executable, "-m", "dtl_jax.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_frontier_on_digits_writes_the_schema_and_agrees_with_its_points(tmp_path):
    workdir = tmp_path / "w"
    argv = ["frontier", "digits", "--seeds", "0-1", "--workdir", str(workdir), "--quiet",
            "--set", "frontier.gc=0.01,0.1", "--set", "frontier.ngc=1,10", "--set", "frontier.rtf=1",
            "--set", "frontier.utf=1", "--set", "frontier.ga=0.1", "--set", "frontier.keep_every=10",
            "--set", "piggyback.strategies=fresh_all,own_head"]  # fmt: skip
    out = _cli(argv).stdout
    summary = json.loads((workdir / "frontier.json").read_text())
    losses = ["gc", "ngc", "rtf", "utf", "ga"]  # digits' disposal.methods
    assert summary["budgets"] == [0.01, 0.03, 0.05, 0.1]
    assert list(summary["cut"]) == losses and list(summary["area"]) == losses and list(summary["points"]) == losses
    for loss in losses:
        assert set(summary["cut"][loss]) == {"0.01", "0.03", "0.05", "0.1"}
        assert {"mean", "std", "ci95", "n", "values"} <= set(summary["area"][loss])
        assert all(FIELDS <= set(p) for p in summary["points"][loss])
        steps = {(p["seed"], p["lambda"], p["step"]) for p in summary["points"][loss]}
        assert (0, 0.0, 0) in steps and (1, 0.0, 0) in steps  # the starting point belongs to every frontier
        assert any(step > 0 for _, _, step in steps)
    assert set(summary["paired"]) == {f"{a}-{b}" for i, a in enumerate(losses) for b in losses[i + 1 :]}
    assert {"cut", "area"} <= set(summary["paired"]["gc-ngc"])
    assert [r["seed"] for r in summary["reference"]["tl"]] == [0, 1]
    assert set(summary["reference"]) == {"tl", "random_init"}
    again = frontier.summarize(summary["points"], summary["reference"], summary["budgets"])
    assert again["cut"] == summary["cut"] and again["area"] == summary["area"] and again["paired"] == summary["paired"]
    assert set(summary["attackers"]) == {"fresh_all", "own_head"} and set(summary["worst_case"]) == set(losses)
    assert set(summary["attacker"].values()) <= {"fresh_all", "own_head"}
    png = (workdir / "frontier.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    page = (workdir / "report.html").read_text()
    assert "The trade-off frontier" in page and "data:image/png;base64" in page
    assert "cut @1 pts" in out and "area gc" in out


def _compilations(stderr: str) -> int:
    return len(re.findall(r"Finished XLA compilation|Compiling [^\n]*", stderr))


@pytest.mark.slow
def test_lambda_is_an_argument_not_a_constant(tmp_path):
    """A sweep over four λ compiles no more programs than over two (compilation cache off)."""
    counts = []
    for lambdas in ("0.1,0.2", "0.1,0.2,0.3,0.4"):
        argv = ["sweep", "digits", "--workdir", str(tmp_path / lambdas), "--quiet", "--set", "disposal.methods=gc",
                "--set", f"disposal.gc_lambda={lambdas}", "--set", "compilation_cache=off"]  # fmt: skip
        done = _cli(argv, env={"JAX_LOG_COMPILES": "1"})
        counts.append(_compilations(done.stderr))
    assert counts[0] > 0
    assert counts[1] <= counts[0], counts


def test_own_head_attack_needs_the_source_task():
    from dataclasses import replace

    from dtl_jax.config import Config, TaskConfig
    from dtl_jax.errors import UserError
    from dtl_jax.stages import check

    config = Config()
    config = replace(config, piggyback=replace(config.piggyback, strategies=("fresh_all", "own_all")),
                     data=replace(config.data, piggyback=TaskConfig(dataset="digits")))  # fmt: skip
    with pytest.raises(UserError, match="own_all"):
        check(config)


def test_budget_area_is_a_mean_over_log_budgets():
    from dtl_jax.stages.piggyback import budget_area

    assert budget_area([10], [0.5]) is None
    assert budget_area([5, 10, 20], [0.4, 0.5, 0.6]) == pytest.approx(0.5)
    assert budget_area([20, 5, 10], [0.6, 0.4, 0.5]) == pytest.approx(0.5)  # order does not matter
    assert budget_area([5, 50], [0.2, 0.6]) == pytest.approx(0.4)


def test_mean_curve_counts_a_halted_draw_with_its_last_value():
    """A draw halted by the divergence guard has a shorter PL curve (a 10x-learning-rate attacker can diverge):
    the mean over draws pads it with its last value instead of failing on a ragged array."""
    from dtl_jax.stages.piggyback import mean_curve

    assert mean_curve([[0.2, 0.4, 0.6], [0.3, 0.5, 0.7]]) == pytest.approx([0.25, 0.45, 0.65])
    assert mean_curve([[0.2, 0.4, 0.6], [0.3]]) == pytest.approx([0.25, 0.35, 0.45])
    assert mean_curve([[0.2, 0.4], []]) == pytest.approx([0.2, 0.4])
    assert mean_curve([[], []]) == []


@pytest.mark.slow
def test_gpu_study_tiny_mode_reports_after_every_piece(tmp_path):
    """experiments/gpu_dtl_study.py --tiny: GC and RTF, seeds 0 and 1, a frontier after every piece; a zero
    budget starts nothing and says so."""
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "gpu_dtl_study.py")
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, script, "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert [(p["seed"], p["loss"]) for p in study["pieces"]] == [(0, "gc"), (0, "rtf"), (0, "rtf"), (1, "gc"),
                                                                 (1, "rtf"), (1, "rtf")]  # fmt: skip
    assert not study["stopped_by_budget"]
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["cut"]) == {"gc", "rtf"}
    assert (out / "report.html").is_file() and (out / "frontier.png").is_file()
    stopped = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path / "none"), "--budget-s", "0"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    record = json.loads((tmp_path / "none" / "study.json").read_text())
    assert record["stopped_by_budget"] and record["pieces"] == []


@pytest.mark.slow
def test_a_trajectory_that_keeps_nothing_is_saved_and_restored(tmp_path):
    """GA at λ = 1e9 diverges at its first step (the guard halts it): the trajectory keeps no state, its
    frontier is the starting point alone, and a second run restores it instead of failing."""
    argv = ["frontier", "digits", "--seeds", "0", "--workdir", str(tmp_path / "w"), "--quiet",
            "--set", "disposal.methods=ga", "--set", "frontier.ga=1e9", "--set", "frontier.keep_every=3"]  # fmt: skip
    for _ in range(2):
        _cli(argv)
        summary = json.loads((tmp_path / "w" / "frontier.json").read_text())
        assert [(p["lambda"], p["step"]) for p in summary["points"]["ga"]] == [(0.0, 0)]
        assert summary["cut"]["ga"]["0.01"]["values"] == [pytest.approx(0.0)]
