"""A workdir accepts another selection (the README's own sequences): other methods, more attacker budgets;
results.json and the report then hold exactly what the last command ran. A change that makes another
experiment (a λ, the first budget) is still refused without --overwrite."""

import json
import re

import pytest

from dtl_jax import cli

UNLEARN = [
    "unlearn", "--quiet", "--set", "unlearn.task.dataset=digits", "--set", "data.image_size=0",
    "--set", "data.channels=1", "--set", "data.flip=false", "--set", "model.name=mlp", "--set", "model.widths=16",
    "--set", "unlearn.original.epochs=1", "--set", "unlearn.optim.epochs=1", "--set", "unlearn.sure_optim.epochs=1",
    "--set", "unlearn.ga_epochs=1", "--set", "unlearn.scrub_epochs=1", "--set", "unlearn.scrub_max_epochs=1",
]  # fmt: skip


def _results(workdir):
    return json.loads((workdir / "results.json").read_text())


def _report_names(workdir) -> set[str]:
    """The row names of report.html's table."""
    return set(re.findall(r"<tr><th>([^<]+)</th><td>", (workdir / "report.html").read_text()))


@pytest.mark.slow
def test_run_then_another_method_list_and_more_budgets_in_the_same_workdir(tmp_path, capsys):
    workdir = ["--workdir", str(tmp_path)]
    assert cli.main(["run", "digits", "--quiet", *workdir]) == 0
    assert set(_results(tmp_path)["models"]) == {"random_init", "tl", "gc", "ngc", "rtf", "utf", "ga"}
    assert cli.main(["run", "digits", "--quiet", "--set", "disposal.methods=gc,ngc", *workdir]) == 0
    assert list(_results(tmp_path)["models"]) == ["random_init", "tl", "gc", "ngc"]
    assert _report_names(tmp_path) == {"random_init", "tl", "gc", "ngc"}
    # more attacker budgets after the first: the same experiment, every budget in results.json
    more = ["--set", "disposal.methods=gc", "--set", "piggyback.shots=5,3"]
    assert cli.main(["run", "digits", "--quiet", *more, *workdir]) == 0
    assert set(_results(tmp_path)["models"]["gc"]["pl"]) == {"5", "3"}
    capsys.readouterr()
    # another first budget (the headline PL accuracy and disposal's probe) or another λ: another experiment
    for change in ("piggyback.shots=3,5", "disposal.gc_lambda=0.5"):
        assert cli.main(["run", "digits", "--quiet", "--set", change, *workdir]) == 2
        line = capsys.readouterr().err.strip()
        assert f"e.g. {change.split('=')[0]}:" in line and "pass --overwrite" in line, line
    assert list(_results(tmp_path)["models"]) == ["random_init", "tl", "gc"]  # untouched by the refusals


@pytest.mark.slow
def test_unlearn_then_another_method_list_in_the_same_workdir(tmp_path):
    workdir = ["--workdir", str(tmp_path)]
    assert cli.main([*UNLEARN, "--methods", "retrain,ft,ga", *workdir]) == 0
    assert list(_results(tmp_path)["methods"]) == ["original", "retrain", "ft", "ga"]
    assert cli.main([*UNLEARN, "--methods", "retrain,ft", *workdir]) == 0
    assert list(_results(tmp_path)["methods"]) == ["original", "retrain", "ft"]
    assert _report_names(tmp_path) == {"original", "retrain", "ft"}
    page = (tmp_path / "report.html").read_text()
    assert ">ga<" not in page and "ga" not in re.findall(r'alt="([^"]+)"', page)
