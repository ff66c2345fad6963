"""The report: every plot embedded, the numbers of results.json in the page, and the page renders with
all its images in headless Chromium."""

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from dtl_jax import dtl, report
from dtl_jax.errors import UserError


@pytest.fixture(scope="module")
def dtl_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("report")
    dtl.run(tiny_config(), workdir, quiet=True)
    return workdir


def _rows(page: str) -> dict[str, list[str]]:
    return {
        m.group(1): re.findall(r"<td>([^<]*)</td>", m.group(2))
        for m in re.finditer(r"<tr><th>([^<]+)</th>((?:<td>[^<]*</td>)+)</tr>", page)
    }


@pytest.mark.slow
def test_dtl_report_embeds_every_plot_and_the_exact_numbers(dtl_workdir):
    page = report.write_report(dtl_workdir).read_text()
    for name in ("pl_curves", "tradeoff", "training_curves"):
        assert (dtl_workdir / f"{name}.png").stat().st_size > 1000
        assert f'alt="{name}" src="data:image/png;base64,' in page
    assert 'src="http' not in page and 'src="file' not in page  # self-contained
    results = json.loads((dtl_workdir / "results.json").read_text())
    rows = _rows(page)
    assert set(rows) == set(results["models"])
    for name, row in results["models"].items():
        expected = [f"{row[k]:.3f}" for k in ("target_acc", "source_acc", "pl_acc", "mia_acc")]
        assert rows[name] == expected, name


def test_report_of_a_workdir_without_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        report.write_report(tmp_path)


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image(dtl_workdir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = report.write_report(dtl_workdir)
    # every embedded image is a PNG that decodes
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())
    assert len(uris) == 3
    for uri in uris:
        assert Image.open(io.BytesIO(base64.b64decode(uri))).size[0] > 100
    # and the page renders: a screenshot of it is far from blank
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path}", "--window-size=1000,2400",
             "--hide-scrollbars"]  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert (pixels < 200).mean() > 0.02, "the rendered page is (nearly) blank"


def test_training_curves_without_a_disposal_stage_warn_nothing(tmp_path):
    """An unlearning run logs no disposal stage: no disposal panel, no legend warning."""
    import warnings

    rows = [{"step": s, "loss": 1.0 / (s + 1), "accuracy": 0.1 * s} for s in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = report.training_curves({"original": rows}, tmp_path / "curves.png")
    assert path.stat().st_size > 1000


def test_summary_report_shows_intervals_per_seed_points_and_pl_by_budget(tmp_path):
    from dtl_jax.summary import summarize

    rng = np.random.default_rng(0)
    per_seed = {
        s: {m: {"target_acc": rng.random(), "pl_acc": rng.random(), "pl_acc@5": rng.random(), "pl_acc@10": rng.random(),
                "source_acc": rng.random(), "mia_acc": rng.random()} for m in ("random_init", "tl", "gc")}
        for s in (0, 1, 2)
    }  # fmt: skip
    summary = {**summarize(per_seed, ("tl",)), "kind": "run", "seconds": 1.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = report.write_report(tmp_path).read_text()
    assert (tmp_path / "seed_bars.png").stat().st_size > 1000 and (tmp_path / "pl_by_shots.png").stat().st_size > 1000
    gc = summary["rows"]["gc"]["pl_acc"]
    assert f"{gc['mean']:.3f} ± {gc['ci95']:.3f}" in page and "over seeds [0, 1, 2]" in page


@pytest.mark.parametrize("tensorboard", [True, False])
def test_metrics_writer_logs_jsonl_with_or_without_tensorboardx(tmp_path, monkeypatch, tensorboard):
    """The JSONL log (what the report reads) is written either way; TensorBoard events only with
    tensorboardX importable, and its absence is a warning, not a crash mid-run."""
    import sys

    from dtl_jax.train import metrics

    if not tensorboard:
        monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    writer = metrics.MetricsWriter(tmp_path)
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    if tensorboard:
        writer.write("pretrain", rows)
    else:
        with pytest.warns(UserWarning, match="tensorboardX is not installed"):
            writer.write("pretrain", rows)
    writer.write("pretrain", [{"step": 3, "loss": 1.0}])
    writer.close()
    assert [r["loss"] for r in metrics.read(tmp_path)["pretrain"]] == [2.0, 1.5, 1.0]
    events = list((tmp_path / "logs").glob("tensorboard/events.*"))
    assert bool(events) == tensorboard


# ---------------------------------------------------------------------------------------------------
# Readable at a glance: synthetic results, no training


def _synthetic_dtl(methods=("gc", "ngc", "rtf", "utf", "ga"), shots=("10",), draws=3):
    rng = np.random.default_rng(0)
    models = {}
    for name in ("random_init", "tl", *methods):
        pl = {}
        for s in shots:
            curves = rng.random((draws, 4)).cumsum(axis=1) / 4
            pl[s] = {"acc": float(curves[:, -1].mean()), "accs": curves[:, -1].tolist(), "val_acc": 0.5,
                     "curve": curves.mean(axis=0).tolist(), "curves": curves.tolist()}  # fmt: skip
        first = pl[shots[0]]
        models[name] = {
            "target_acc": rng.random(),
            "source_acc": rng.random(),
            "mia_acc": 0.5,
            "pl": pl,
            "pl_acc": first["acc"],
            "pl_curve": first["curve"],
            "pl_curve_epochs": [5, 10, 15, 20],
        }
        # fmt: skip
    checks = [{"step": s, "target_val_acc": rng.random(), "source_val_acc": 0.5, "probe_acc": rng.random()}
              for s in (0, 10, 20)]  # fmt: skip
    disposal = {m: {"checks": checks, "returned_step": 10} for m in methods}
    config = json.loads(json.dumps(dataclasses.asdict(tiny_config())))
    provenance = {"command": "dtl-jax run digits --set disposal.gc_lambda=0.5", "commit": "abc1234", "processes": 1,
                  "devices": "1 x cpu (cpu)", "cpu": "Some CPU", "dtype": "float32"}  # fmt: skip
    results = {"models": models, "disposal": disposal, "config": config, "provenance": provenance,
               "versions": {"dtl_jax": "0.1.0", "jax": "0.10.2"}, "seconds": 1.0}  # fmt: skip
    logged = {"pretrain": [{"step": s, "loss": 1 / s, "accuracy": 0.5} for s in range(1, 30)]}
    for stage in [f"disposal {m}" for m in (*methods, "stale")]:
        logged[stage] = [{"step": s, "loss": 1 / s, "unlearn": -s / 10, "retain": 0.1} for s in range(1, 21)]
    for name in ("random_init", "tl", *methods, "stale"):
        for d in range(draws):
            logged[f"piggyback {name} {shots[0]}-shot #{d}"] = [{"step": s, "loss": 2 / s} for s in range(1, 9)]
    return results, logged


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves: (file name, [(title, lines, legend entries) per panel], figure legends)."""
    saved = []
    real = report._save

    def save(fig, path):
        panels = [(ax.get_title(), len(ax.get_lines()) + len(ax.collections), ax.get_legend()) for ax in fig.axes]
        legends = [len(legend.get_texts()) for legend in fig.legends]
        saved.append((Path(path).name, panels, legends))
        return real(fig, path)

    monkeypatch.setattr(report, "_save", save)
    return saved


def _check_readable(saved):
    for name, panels, legends in saved:
        for title, drawn, legend in panels:
            assert drawn > 0, f"{name}: an empty panel ({title!r})"
            assert legend is None or len(legend.get_texts()) <= 10, f"{name}: a legend of {len(legend.get_texts())}"
        assert all(n <= 10 for n in legends), (name, legends)


def test_a_dtl_report_reads_at_a_glance(tmp_path, figures):
    results, logged = _synthetic_dtl(shots=("10", "5", "25"))
    (tmp_path / "results.json").write_text(json.dumps(results))
    writer = __import__("dtl_jax.train.metrics", fromlist=["x"]).MetricsWriter(tmp_path)
    for stage, rows in logged.items():
        writer.write(stage, rows)
    page = report.write_report(tmp_path).read_text()
    # the header: command, seed, every non-default config value, version and commit, devices, CPU, dtype
    assert "dtl-jax run digits --set disposal.gc_lambda=0.5" in page and "<dt>seed</dt><dd>0</dd>" in page
    for key in report.non_defaults(results["config"], ("disposal", "model", "piggyback")):
        assert f"<code>{key}=" in page, key
    assert "model.name=mlp" in page and "disposal.steps=6" in page and "unlearn." not in page  # run's sections
    assert "commit abc1234" in page and "1 x cpu (cpu)" in page and "Some CPU" in page and "float32" in page
    # every figure: a human title above, one line on how to read it below
    blocks = re.findall(r"<h2>([^<]+)</h2><img alt=\"([^\"]+)\"[^>]+><p class=\"how\">([^<]+)</p>", page)
    assert [alt for _, alt, _ in blocks] == ["pl_curves", "pl_by_budget", "tradeoff", "training_curves"]
    assert all(" " in title and "_" not in title and len(how) > 40 for title, _, how in blocks)
    _check_readable(figures)
    panels = dict((name, p) for name, p, _ in figures)
    assert [t for t, _, _ in panels["pl_curves.png"]] == ["gc", "ngc", "rtf", "utf", "ga"]  # one panel a method
    # PL curves show the draws' spread: a band (a filled collection) for the method and each reference
    assert all(drawn >= 6 for _, drawn, _ in panels["pl_curves.png"])
    # the stale method's logged stages are not drawn: 5 disposal lines (raw and smoothed at most) a panel
    disposal_panel = next(p for p in panels["training_curves.png"] if p[0] == "Disposal: total loss")
    assert disposal_panel[1] <= 10


def test_colours_are_one_map_the_same_in_every_figure():
    first = report.colours(["tl", "gc", "mine", "yours"])
    second = report.colours(["yours", "gc", "mine", "tl", "random_init"])
    assert first["gc"] == second["gc"] == report.KNOWN["gc"] and first["tl"] == "#000000"
    assert first["mine"] == second["mine"] and first["yours"] == second["yours"]  # unknown names: stable
    names = ["original", "retrain", *report.KNOWN, "mine", "yours"]
    unlearning = [n for n in names if n not in ("gc", "ngc", "rtf", "utf")]
    palette = report.colours(unlearning)
    assert len(set(palette.values())) == len(unlearning)  # every unlearning method its own colour


def test_only_the_last_commands_stages_are_drawn():
    results, logged = _synthetic_dtl(methods=("gc",))
    current = report._current_stages(logged, results)
    assert "disposal gc" in current and "disposal stale" not in current and "disposal ngc" not in current
    assert not any(stage.startswith("piggyback stale") for stage in current)
    unlearning = {"methods": {"original": {}, "ft": {}, "scrub": {}}}
    stages = {"original": [], "ft": [], "scrub max 1": [], "scrub min 1": [], "ga": [], "salun": []}
    assert set(report._current_stages(stages, unlearning)) == {"original", "ft", "scrub max 1", "scrub min 1"}


def test_an_unlearning_report_has_no_empty_panel(tmp_path, figures):
    rows = {m: {"ua": 0.5, "ra": 0.6, "ta": 0.5, "mia_efficacy": 0.4, "rep_mia": 0.3, "loss_mia": 0.5, "gap": 0.1,
                "rt_s": 1.0, "rrt": 1.0} for m in ("original", "retrain", "ft", "scrub")}  # fmt: skip
    config = json.loads(json.dumps(dataclasses.asdict(tiny_config())))
    results = {"methods": rows, "config": config, "versions": {"jax": "0.10.2"}, "seconds": 1.0}
    (tmp_path / "results.json").write_text(json.dumps(results))
    writer = __import__("dtl_jax.train.metrics", fromlist=["x"]).MetricsWriter(tmp_path)
    for stage in ("original", "retrain", "ft", "scrub max 1", "scrub min 1", "ga"):  # ga: a method run before
        writer.write(stage, [{"step": s, "loss": 1 / s} for s in range(1, 12)])
    page = report.write_report(tmp_path).read_text()
    assert "Disposal" not in page and "(not recorded)" in page  # an old results.json without provenance
    _check_readable(figures)
    panels = dict((name, p) for name, p, _ in figures)
    assert [t for t, _, _ in panels["training_curves.png"]] == ["original", "Retrain", "ft", "scrub"]
