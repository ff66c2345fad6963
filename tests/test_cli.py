"""The command line: user errors give one line and exit code 2; the pipeline end to end on a tiny config."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from dtl_jax import cli, dtl
from dtl_jax.errors import UserError
from dtl_jax.train import loop

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--set",
    "data.source.dataset=digits",
    "--set",
    "data.target.dataset=digits",
    "--set",
    "data.image_size=0",
    "--set",
    "data.channels=1",
    "--set",
    "model.name=mlp",
    "--set",
    "model.widths=16",
    "--set",
    "pretrain.epochs=1",
    "--set",
    "transfer.epochs=1",
    "--set",
    "disposal.steps=2",
    "--set",
    "piggyback.epochs=1",
    "--set",
    "piggyback.shots=2",
    "--set",
    "piggyback.repeats=1",
    "--quiet",
]


def _error_line(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dtl-jax: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["disposal.nope=1"], "unknown config key 'disposal.nope'"),
        (["data.source.dataset=imagenet_full"], "unknown dataset 'imagenet_full'"),
        (["model.name=vit"], "model.name='vit'"),
        (["disposal.methods=gc,forget"], "disposal.methods='forget'"),
        (["disposal.source_batch_size=50", "disposal.num_chunks=3"], "not divisible by disposal.num_chunks=3"),
        (["disposal.num_chunks=1"], "disposal.num_chunks=1: expected a number >= 2"),
        (["data.source.classes=0,1,12"], "[12] outside the 10 classes"),
        (["disposal.num_chunks=8", "disposal.source_batch_size=80"], "needs at least as many source classes"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, overrides, expected):
    argv = ["run", *TINY, "--workdir", str(tmp_path)]
    for o in overrides:
        argv += ["--set", o]
    assert expected in _error_line(capsys, argv)


def test_empty_task_and_unwritable_workdir(capsys, tmp_path):
    root = tmp_path / "imgs"
    for split, classes in (("train", ("a", "b")), ("test", ("c",))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / split / name / f"{i}.png")
    line = _error_line(capsys, ["run", *TINY, "--set", "data.source.classes=1", "--workdir", str(tmp_path / "w")])
    assert "needs at least 2 classes" in line
    folder = [
        "--set",
        "data.source.dataset=folder",
        "--set",
        f"data.source.root={root}",
        "--set",
        "data.source.classes=0,1",
        "--set",
        "disposal.num_chunks=2",
    ]
    line = _error_line(capsys, ["run", *TINY, *folder, "--workdir", str(tmp_path / "w")])
    assert "test/ holds no images" in line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _error_line(capsys, ["run", *TINY, "--workdir", str(blocker / "sub")])
    assert "is a file, expected a folder" in line


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "dtl_jax.cli", "run", "--set", "disposal.gc_lambda=big", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "dtl-jax: error: --set disposal.gc_lambda='big': expected a value of type float"
    help_text = subprocess.run(
        [sys.executable, "-m", "dtl_jax.cli", "run", "--help"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert "--set" in help_text and "results.json" in help_text


@pytest.mark.slow
def test_pipeline_end_to_end_and_stage_reuse(tmp_path, monkeypatch):
    config = tiny_config()
    results = dtl.run(config, tmp_path, quiet=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    names = ("random_init", "tl", "gc", "ngc", "rtf", "utf", "ga")
    assert tuple(saved["models"]) == names
    for name in names:
        row = saved["models"][name]
        for key in ("target_acc", "source_acc", "pl_acc", "mia_acc"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert len(row["pl_curve"]) == config.piggyback.epochs
        assert row["pl_acc"] == row["pl_curve"][-1]
    assert saved["models"]["tl"]["target_acc"] > 0.5  # digits is easy: transfer must work
    fit = saved["pretrain_fit"]  # the source model's fit after pre-training
    assert 0.3 < fit["train_acc"] <= 1.0 and 0.3 < fit["test_acc"] <= 1.0, fit
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert saved["versions"]["jax"]

    # A second run in the same workdir reuses every stage: the training loop must not run at all.
    def no_training(*args, **kwargs):
        raise AssertionError(f"stage re-ran: {kwargs.get('desc')}")

    monkeypatch.setattr(loop, "run_steps", no_training)
    again = dtl.run(config, tmp_path, quiet=True)
    assert again["models"] == results["models"]

    # Changing λ re-runs disposal (and PL of the disposed models) but reuses pre-training and transfer.
    ran = []
    monkeypatch.undo()
    original = loop.run_steps
    monkeypatch.setattr(loop, "run_steps", lambda *a, **k: (ran.append(k["desc"]), original(*a, **k))[1])
    changed = tiny_config(
        disposal=tiny_config().disposal.__class__(
            **{**tiny_config().disposal.__dict__, "gc_lambda": 0.5, "methods": ("gc",)}
        )
    )
    with pytest.raises(UserError, match="holds a 'run' run with another config"):
        dtl.run(changed, tmp_path, quiet=True)
    dtl.run(changed, tmp_path, quiet=True, overwrite=True)
    assert "pretrain" not in ran and "transfer" not in ran
    assert "disposal gc" in ran and "piggyback gc 4-shot #0" in ran
    assert not any(desc.startswith(("piggyback tl", "piggyback random_init", "disposal rtf")) for desc in ran)


@pytest.mark.slow
def test_divergence_is_caught_recorded_and_metrics_stay_finite(tmp_path):
    from dtl_jax.config import DisposalConfig, OptimConfig

    exploding = DisposalConfig(
        methods=("gc", "ga"), gc_lambda=1e8, fooling_lambda=1e8, steps=8, eval_every=4, num_chunks=4,
        source_batch_size=32, max_grad_norm=1e3, optim=OptimConfig(optimizer="sgd", learning_rate=10.0),
    )  # fmt: skip
    results = dtl.run(tiny_config(disposal=exploding), tmp_path, quiet=True)
    for method in ("gc", "ga"):
        record = results["disposal"][method]
        assert record["diverged"] is True and record["halted_at"] is not None
        stage = results["stages"][f"disposal {method}"]
        assert stage["diverged"] is True and stage["halted_at"] == record["halted_at"]
        row = results["models"][method]
        assert all(np.isfinite(row[k]) for k in ("target_acc", "source_acc", "pl_acc", "mia_acc"))
    assert results["stages"]["pretrain"]["diverged"] is False
    assert "refit" not in results["stages"]  # disposal.refit_source_head is off in this config
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["disposal"]["gc"]["diverged"] is True


@pytest.mark.slow
def test_same_seed_twice_is_bit_identical(tmp_path):
    config = tiny_config(disposal=dataclasses.replace(tiny_config().disposal, methods=("gc", "rtf")))
    first = dtl.run(config, tmp_path / "a", quiet=True)
    second = dtl.run(config, tmp_path / "b", quiet=True)
    assert first["models"] == second["models"]
    strip = lambda d: {m: {k: v for k, v in r.items() if k != "seconds"} for m, r in d["disposal"].items()}  # noqa: E731
    assert strip(first) == strip(second)
    assert first["versions"]["dtl_jax"] and first["config"]["seed"] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--set", "pretrain.learning_rate=nan"],
        ["run", "--set", "disposal.optim.learning_rate=inf"],
        ["run", "--set", "eval.batch_size=0"],
        ["run", "--set", "disposal.max_grad_norm=-1"],
        ["run", "--set", "disposal.gc_lambda=-5"],
        ["run", "--set", "data.val_fraction=0"],
        ["unlearn", "--forget-fraction", "0"],
        ["run", "--seeds", "4-1"],
    ],
)
def test_bad_values_exit_2_with_one_line_before_any_work(capsys, tmp_path, argv):
    line = _error_line(capsys, [*argv, "--workdir", str(tmp_path / "w"), "--quiet"])
    assert "=" in line or "--" in line
    assert not (tmp_path / "w").exists()  # refused before the workdir was claimed


def test_config_command_lists_every_key_with_value_comment_and_non_defaults(capsys):
    from dtl_jax import config as config_lib

    assert (
        cli.main(["config", "digits", "--set", "disposal.num_chunks=4", "--set", "disposal.source_batch_size=48"]) == 0
    )
    out = capsys.readouterr().out
    lines = {line.split(" = ")[0][2:]: line for line in out.splitlines() if " = " in line and not line.startswith("#")}
    config = config_lib.apply_overrides(config_lib.load("digits"), ["disposal.num_chunks=4"])
    assert set(lines) == {key for key, _ in config_lib.fields(config)}  # every key, nothing else
    gc = lines["disposal.gc_lambda"]  # from the config file: marked, with the default and the field's comment
    assert gc.startswith("* disposal.gc_lambda = 0.01 ") and "λ for GC and NGC" in gc and "[default: 0.003]" in gc
    assert lines["disposal.num_chunks"].startswith("* disposal.num_chunks = 4 ")  # from --set
    assert lines["eval.batch_size"].startswith("  eval.batch_size = 500 ")  # the default: not marked
    assert lines["disposal.methods"].startswith("  disposal.methods = gc,ngc,rtf,utf,ga ")  # as --set takes it
    assert "# every random choice derives from it" in lines["seed"]
    # the multi-line default's comment (after its closing parenthesis) belongs to the section
    assert "# unlearn.optim: FT, RL, L1-sparse, SalUn, Boundary shrink" in out
    assert _error_line(capsys, ["config", "--set", "disposal.nope=1"]).endswith("expected one of " + ", ".join(
        f.name for f in dataclasses.fields(config.disposal)))  # fmt: skip


def _flags(parser, path=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_flag_has_help_and_every_option_states_its_default():
    flags = list(_flags(cli._parser()))
    assert len(flags) > 30
    for command, action in flags:
        name = f"dtl-jax {command} {action.option_strings or action.dest}"
        assert action.help and len(action.help) > 10, name
        if action.option_strings or action.nargs == "?":
            assert "default" in action.help, name


def test_a_file_as_workdir_says_so(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for workdir in (blocker, blocker / "sub"):
        line = _error_line(capsys, ["run", *TINY, "--workdir", str(workdir)])
        assert f"{str(blocker)!r} is a file, expected a folder" in line, line


@pytest.mark.slow
def test_the_attackers_budgets_move_no_disposed_model(tmp_path):
    """``dtl-jax run configs/digits.py --set piggyback.shots=5,10`` and ``--set piggyback.shots=10,5`` give
    the same disposed models: the held-out probe is ``disposal.probe_shots``, not the first budget."""
    digits = str(ROOT / "configs" / "digits.py")
    rows = []
    for shots in ("5,10", "10,5"):
        workdir = tmp_path / shots.replace(",", "-")
        assert cli.main(["run", digits, "--quiet", "--workdir", str(workdir), "--set", f"piggyback.shots={shots}"]) == 0
        rows.append(json.loads((workdir / "results.json").read_text()))
    first, second = rows
    assert list(first["models"]) == list(second["models"])
    for name in first["models"]:
        assert first["models"][name]["target_acc"] == second["models"][name]["target_acc"], name
    for method, record in first["disposal"].items():
        assert record["checks"] == second["disposal"][method]["checks"], method
        assert record["returned_step"] == second["disposal"][method]["returned_step"], method
    assert first["models"]["tl"]["pl"].keys() == {"5", "10"}  # and both budgets were attacked
