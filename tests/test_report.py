"""The report: every plot embedded, the numbers of results.json in the page, and the page renders with
all its images in headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

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
    """An unlearning run logs no disposal stage: its empty panel says so instead of a legend warning."""
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
