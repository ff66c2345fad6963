"""Kill -9 in the middle of a stage, run again, and get the results of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dtl_jax.train import metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "run", str(ROOT / "configs" / "digits.py"), "--quiet",
    "--set", "checkpoint_every=4", "--set", "pretrain.epochs=6", "--set", "disposal.steps=40",
    "--set", "disposal.eval_every=8", "--set", "piggyback.epochs=3", "--set", "disposal.methods=gc,utf",
]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(args: list[str], workdir: Path, kill_when: str | None = None, sig=signal.SIGKILL) -> int:
    """Runs ``dtl-jax ARGS --workdir WORKDIR``; with ``kill_when`` (a glob under the workdir), sends it
    ``sig`` (SIGKILL) as soon as that appears. Returns the exit code (asserting success when not killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtl_jax.cli", *args, "--workdir", str(workdir)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if kill_when is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return proc.returncode
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list(workdir.glob(kill_when)):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    return proc.returncode


def _run(workdir: Path, kill_when: str | None = None, sig=signal.SIGKILL) -> int:
    return _cli(TINY, workdir, kill_when, sig)


def _logged_once(workdir: Path) -> None:
    """Every (stage, step) once in metrics.jsonl and in the TensorBoard event file."""
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    twice = [key for key, n in Counter((r["stage"], r["step"]) for r in rows).items() if n > 1]
    assert not twice, f"{len(twice)} (stage, step) logged twice, e.g. {twice[:3]}"
    events = metrics.read_events(workdir / "logs" / "tensorboard" / metrics.EVENTS)
    twice = [key for key, n in Counter((tag, step) for tag, step, _ in events).items() if n > 1]
    assert not twice, f"{len(twice)} (tag, step) events twice, e.g. {twice[:3]}"


def _comparable(results: dict) -> dict:
    disposal = {
        m: {k: v for k, v in d.items() if k not in ("seconds", "resumed_from")} for m, d in results["disposal"].items()
    }
    return {"models": results["models"], "disposal": disposal}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    _run(workdir)
    return _comparable(json.loads((workdir / "results.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_when",
    [
        "checkpoints/pretrain-*.progress/8",  # mid pre-training
        "checkpoints/disposal-gc-*.progress/16",  # mid disposal, after stopping-rule checks
    ],
)
def test_sigkill_mid_stage_then_resume_gives_the_same_results(tmp_path, uninterrupted, kill_when):
    code = _run(tmp_path, kill_when)
    assert code == -signal.SIGKILL, f"the run ended ({code}) before it could be killed at {kill_when}"
    assert not (tmp_path / "results.json").exists()
    assert list(tmp_path.glob(kill_when.rsplit("/", 1)[0]))  # a mid-stage checkpoint is there to resume from
    _run(tmp_path)
    resumed = _comparable(json.loads((tmp_path / "results.json").read_text()))
    assert resumed == uninterrupted
    stage = kill_when.split("/")[1].split("-")[0]
    metas = [json.loads(p.read_text()) for p in tmp_path.glob(f"checkpoints/{stage}-*/meta.json")]
    assert any(m.get("resumed_from", 0) > 0 for m in metas), "the stage started over instead of resuming"
    assert not list(tmp_path.glob("checkpoints/*.progress"))  # cleaned up once the stages finished
    _logged_once(tmp_path)


@pytest.mark.slow
def test_ctrl_c_mid_stage_then_resume_logs_every_step_once(tmp_path, uninterrupted):
    """SIGINT (Ctrl-C) mid pre-training: exit 130 and the message; the resumed run logs each (stage, step)
    once although the steps after the newest mid-stage checkpoint were logged before the interrupt."""
    kill_when = "checkpoints/pretrain-*.progress/8"
    code = _run(tmp_path, kill_when, signal.SIGINT)
    assert code == 130, f"the run ended ({code}) before it could be interrupted at {kill_when}"
    before = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    _run(tmp_path)
    meta = [json.loads(p.read_text()) for p in tmp_path.glob("checkpoints/pretrain-*/meta.json")]
    assert meta and meta[0]["resumed_from"] > 0
    assert max(before) >= meta[0]["resumed_from"]  # steps were logged up to (or past) the resume point
    _logged_once(tmp_path)
    assert _comparable(json.loads((tmp_path / "results.json").read_text())) == uninterrupted


UNLEARN = [
    "unlearn", "--quiet", "--methods", "retrain,ft,sure", "--set", "unlearn.task.dataset=digits",
    "--set", "data.image_size=0", "--set", "data.channels=1", "--set", "data.flip=false", "--set", "model.name=mlp",
    "--set", "model.widths=32", "--set", "unlearn.original.epochs=3", "--set", "unlearn.optim.epochs=2",
    "--set", "checkpoint_every=4",
]  # fmt: skip


def _unlearn(workdir: Path, kill_when: str | None = None) -> dict | int:
    code = _cli(UNLEARN, workdir, kill_when)
    if kill_when is not None:
        return code
    rows = json.loads((workdir / "results.json").read_text())["methods"]
    timing = ("rt_s", "compile_s", "rrt")
    return {m: {k: v for k, v in r.items() if k not in timing} for m, r in rows.items()}


@pytest.mark.slow
def test_unlearn_sigkill_mid_method_then_resume(tmp_path):
    whole = _unlearn(tmp_path / "whole")
    kill_when = "checkpoints/unlearn-sure-*.progress/sure/8"
    assert _unlearn(tmp_path / "killed", kill_when) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.json").exists()
    assert _unlearn(tmp_path / "killed") == whole
