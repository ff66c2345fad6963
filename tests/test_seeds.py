"""Seeds (docs/methods.md §3): independent streams per purpose, several seeds in one process, summaries."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from scipy import stats

from dtl_jax import cli, dtl, seeds, stages, summary
from dtl_jax.errors import UserError


def test_streams_are_distinct_per_seed_and_purpose():
    purposes = ("source-split", "target-split", "pretrain-init", "pretrain-batches", "piggyback-subset")
    drawn = {(s, p): seeds.derive(s, p) for s in range(5) for p in purposes}
    assert len(set(drawn.values())) == len(drawn)
    # no seed + offset structure: seed s's stream for one purpose is not seed s+1's for another
    assert seeds.derive(1, "source-split") != seeds.derive(0, "source-split") + 1


def test_seeds_0_and_1_share_no_split_batch_order_or_initialisation(tmp_path):
    exps = [stages.build_experiment(tiny_config(seed=s), tmp_path / str(s), quiet=True) for s in (0, 1)]
    a, b = exps
    # validation splits (the held-out part of every class) differ
    assert not np.array_equal(a.source.val.images, b.source.val.images)
    assert not np.array_equal(a.target.val.images, b.target.val.images)
    # initialisations differ
    ia, ib = stages.initial_model(a), stages.initial_model(b)
    kernels = lambda v: [x for path, x in jax.tree_util.tree_leaves_with_path(v["params"]) if "kernel" in str(path)]  # noqa: E731
    assert not any(np.array_equal(x, y) for x, y in zip(kernels(ia), kernels(ib)))  # biases start at 0
    # batch orders differ
    first = [next(e.batches(e.source.train, 16, "pretrain-batches"))["label"] for e in exps]
    assert not np.array_equal(*first)


def test_one_purpose_does_not_move_another(tmp_path):
    """A seed's PL draw of one budget does not depend on which other budgets are run."""
    exp = stages.build_experiment(tiny_config(), tmp_path, quiet=True)
    first = exp.stream("piggyback-subset", 4, 0)
    assert first == stages.build_experiment(tiny_config(), tmp_path / "b", quiet=True).stream("piggyback-subset", 4, 0)
    assert first != exp.stream("piggyback-subset", 8, 0) != exp.stream("piggyback-subset", 4, 1)


def test_describe_matches_scipy():
    values = [0.61, 0.55, 0.7, 0.58, 0.66]
    got = summary.describe(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert got["ci95"] == pytest.approx((high - low) / 2, abs=1e-12)
    assert got["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert got["n"] == 5 and got["values"] == values


def test_paired_differences_leave_out_missing_values():
    per_seed = {
        0: {"tl": {"a": 0.5}, "gc": {"a": 0.4}},
        1: {"tl": {"a": 0.6}, "gc": {"a": None}},
        2: {"tl": {"a": 0.7}, "gc": {"a": 0.5}},
    }
    out = summary.summarize(per_seed, ("tl",))
    paired = out["paired"]["tl"]["gc"]["a"]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(-0.15)
    assert out["rows"]["gc"]["a"]["values"] == [0.4, None, 0.5]


@pytest.mark.parametrize("spec, expected", [("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]), ("0-2,5,1", [0, 1, 2, 5])])
def test_seed_specs(spec, expected):
    assert cli.parse_seeds(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "-2", "0-"])
def test_bad_seed_specs_are_user_errors(spec):
    with pytest.raises(UserError, match="--seeds"):
        cli.parse_seeds(spec)


def _check_summary(workdir, seeds_, rows_key):
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["seeds"] == seeds_
    per_seed = {s: json.loads((workdir / f"seed-{s}" / "results.json").read_text())[rows_key] for s in seeds_}
    for name, metrics in saved["rows"].items():
        for key, entry in metrics.items():
            values = [per_seed[s][name].get(key) for s in seeds_ if key in per_seed[s][name]]
            if len(values) != len(seeds_) or any(v is None for v in values):
                continue
            assert entry["mean"] == pytest.approx(np.mean(values), abs=1e-9)
            if len(values) > 1:
                half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
                assert entry["ci95"] == pytest.approx(half, abs=1e-9)
    return saved, per_seed


@pytest.mark.slow
def test_run_with_seeds_writes_a_summary_equal_to_the_per_seed_results(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(["run", "digits", "--seeds", "0-2", "--workdir", str(workdir), "--quiet"]) == 0
    saved, per_seed = _check_summary(workdir, [0, 1, 2], "models")
    assert per_seed[0]["tl"]["target_acc"] != per_seed[1]["tl"]["target_acc"] or (
        per_seed[0]["gc"]["pl_acc"] != per_seed[1]["gc"]["pl_acc"]
    )
    paired = saved["paired"]["tl"]["gc"]["pl_acc"]
    diffs = [per_seed[s]["gc"]["pl_acc"] - per_seed[s]["tl"]["pl_acc"] for s in (0, 1, 2)]
    assert paired["mean"] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert "pl_acc@5" in saved["rows"]["gc"]
    out = capsys.readouterr().out
    assert "mean ± 95 % CI over seeds [0, 1, 2]" in out and "summary.json" in out
    assert (workdir / "report.html").is_file() and (workdir / "seed_bars.png").is_file()


@pytest.mark.slow
def test_unlearn_with_seeds_writes_a_summary(tmp_path):
    workdir = tmp_path / "u"
    argv = ["unlearn", "--seeds", "0-1", "--methods", "retrain,ft,sure", "--workdir", str(workdir), "--quiet"]
    argv += ["--set", "unlearn.original.epochs=2", "--set", "unlearn.optim.epochs=1"]
    assert cli.main(argv) == 0
    saved, per_seed = _check_summary(workdir, [0, 1], "methods")
    assert set(saved["paired"]) == {"retrain", "ft"}
    assert (
        per_seed[0]["retrain"]["ua"] != per_seed[1]["retrain"]["ua"]
        or per_seed[0]["ft"]["ta"] != per_seed[1]["ft"]["ta"]
    )


@pytest.mark.slow
def test_adding_a_method_does_not_move_another_methods_numbers(tmp_path):
    one = tiny_config(disposal=dataclasses.replace(tiny_config().disposal, methods=("gc",)))
    two = tiny_config(disposal=dataclasses.replace(tiny_config().disposal, methods=("rtf", "gc")))
    a = dtl.run(one, tmp_path / "a", quiet=True)
    b = dtl.run(two, tmp_path / "b", quiet=True)
    assert a["models"]["gc"] == b["models"]["gc"]
    assert a["models"]["tl"] == b["models"]["tl"]
