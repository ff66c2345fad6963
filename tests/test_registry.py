"""The method registry is the only list of unlearning methods: a method added as one new file under
``dtl_jax/unlearn/methods/`` is validated, listed by the CLI and run by ``dtl-jax unlearn``."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dtl_jax.unlearn.methods as methods_package
from dtl_jax import config as C
from dtl_jax.errors import UserError
from dtl_jax.unlearn import runner
from dtl_jax.unlearn.registry import method_names

ROOT = Path(__file__).resolve().parent.parent

MINE = textwrap.dedent(
    '''
    """A test method: fine-tuning on the retain set, written as a user would (deleted after the test)."""

    from dtl_jax.unlearn.methods._common import supervised
    from dtl_jax.unlearn.registry import Context, register


    @register("{name}")
    def mine(ctx: Context) -> dict:
        total = ctx.steps_per_epoch(ctx.scenario.retain)
        return supervised(ctx, ctx.original, ctx.batches(ctx.scenario.retain), total, "{name}", ctx.optimizer(total))
    '''
)


def test_every_registered_method_is_valid_and_retrain_comes_first():
    """Names are checked where methods are resolved (the runner, through the registry), not by config
    validation, which knows no registry."""
    names = method_names()
    assert names[0] == "retrain" and len(names) == len(set(names)) >= 9
    config = C.validate(C.apply_overrides(C.Config(), ["unlearn.methods=" + ",".join(names)]))
    assert tuple(runner.selected_methods(config)) == names
    assert tuple(runner.selected_methods(C.Config())) == names  # () = every method
    bad = C.validate(C.apply_overrides(C.Config(), ["unlearn.methods=retrain,nope"]))
    with pytest.raises(UserError, match="unlearn.methods='nope': expected one of retrain"):
        runner.selected_methods(bad)


def test_an_unknown_method_is_refused_before_any_work(tmp_path):
    bad = C.apply_overrides(C.Config(), ["unlearn.methods=retrain,nope"])
    with pytest.raises(UserError, match="unlearn.methods='nope'"):
        runner.run(bad, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_method_added_as_one_file_runs_through_the_cli(tmp_path):
    name = f"zz_test_method_{os.getpid()}"
    path = Path(methods_package.__path__[0]) / f"{name}.py"
    path.write_text(MINE.format(name=name))
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        help_text = subprocess.run(
            [sys.executable, "-m", "dtl_jax.cli", "unlearn", "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        ).stdout
        assert name in help_text
        argv = ["unlearn", "--methods", f"retrain,{name}", "--workdir", str(tmp_path), "--quiet"]
        argv += ["--set", "unlearn.original.epochs=1", "--set", "unlearn.optim.epochs=1", "--set", "checkpoint_every=0"]
        proc = subprocess.run(
            [sys.executable, "-m", "dtl_jax.cli", *argv], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert name in proc.stdout and "retrain" in proc.stdout
    finally:
        path.unlink()


def test_a_method_whose_code_changed_reruns_and_only_it(monkeypatch):
    """The unlearning checkpoints carry the version of the code each stage runs: editing SURE's code re-runs
    SURE alone (not the original model, not another method); rewording its docstring re-runs nothing."""
    from dtl_jax import code_version

    config = C.Config()
    names = ("original", *method_names())
    before = {name: runner.stage_key(config, name) for name in names}
    real, module = code_version.source, "dtl_jax.unlearn.methods.sure"
    text = real(module)
    for edited, expected in ((text.replace('"""SURE', '"""Reworded: SURE', 1), set()), (text + "\nX = 1\n", {"sure"})):
        monkeypatch.setattr(
            code_version, "source", lambda name, edited=edited: edited if name == module else real(name)
        )
        code_version.code_version.cache_clear()
        assert {name for name in names if runner.stage_key(config, name) != before[name]} == expected
    monkeypatch.undo()
    code_version.code_version.cache_clear()
    other = C.apply_overrides(config, ["unlearn.methods=retrain,sure"])  # the list run changes no stage
    assert {name: runner.stage_key(other, name) for name in names} == before
