"""File-system errors while a run writes (full disk, no permission, a file in the way) end with one line
naming the path, what failed and what to do, exit code 2, and a workdir that a re-run resumes from."""

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import TINY

from dtl_jax import checkpoint, cli, dtl
from dtl_jax.train import loop, metrics
from dtl_jax.workdir import os_error

ROOT = Path(__file__).resolve().parent.parent
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/x/state.orbax-checkpoint-tmp/": '
    "Failed writing: \"/x/d/1f\": Failed to write 2542 bytes to file 11: No space left on device [os_error_code='28']"
)  # what orbax 0.12 raised on a full tmpfs


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtl-jax: error: "), err
    return err[0]


def test_orbax_and_tensorstore_errors_become_the_oserror_they_wrap(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise ValueError(TENSORSTORE_ENOSPC)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(OSError) as err:
        checkpoint.save(tmp_path / "ck", {"a": np.ones(3)})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "ck")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    progress = checkpoint.Progress(tmp_path / "progress", every=1)
    with pytest.raises(OSError, match="No space left"):
        progress.save(1, {"a": np.ones(3)}, {"done": 1})
    message = str(os_error(err.value))
    assert message.startswith(f"{str(tmp_path / 'ck')!r}: no space left on the device: free some space")
    assert message.endswith("then run the same command again (finished stages are reused)")
    assert os_error(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None  # not a file-system error: a bug
    assert os_error(OSError(errno.ENOENT, "gone")) is None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device: free some space"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied: make it writable"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system: choose another --workdir"),
    ],
)
def test_an_os_error_during_a_run_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, error, expected):
    def failing_run(config, workdir, **kwargs):
        from dtl_jax.workdir import prepare

        prepare(workdir, config, "run")  # the run made its workdir, then failed before its first stage
        error.filename = str(Path(workdir) / "logs" / "metrics.jsonl")
        raise error

    monkeypatch.setattr(dtl, "run", failing_run)
    assert cli.main(["run", *TINY, "--workdir", str(tmp_path / "w")]) == 2
    line = _one_line(capsys)
    assert f"{str(tmp_path / 'w' / 'logs' / 'metrics.jsonl')!r}: {expected}" in line, line
    assert not (tmp_path / "w").exists()  # no empty workdir left behind


def test_a_run_that_fails_before_its_first_stage_leaves_no_workdir(capsys, tmp_path):
    argv = ["run", *TINY, "--set", "disposal.num_chunks=8", "--set", "disposal.source_batch_size=80"]
    assert cli.main([*argv, "--workdir", str(tmp_path / "new" / "w")]) == 2
    assert "needs at least as many source classes" in _one_line(capsys)  # found after the workdir was made
    assert not (tmp_path / "new" / "w").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is left alone
    assert cli.main([*argv, "--workdir", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_a_full_disk_mid_run_then_a_rerun_resumes(capsys, tmp_path, monkeypatch, where):
    """ENOSPC injected at the third checkpoint save (after pre-training and transfer) or the fourth metrics
    write: one line, exit 2; the same command again reuses what was finished and completes."""
    calls = []
    if where == "checkpoint":  # as orbax raises it, inside checkpoint.save's guard
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", _nth_fails(3, calls))
    else:
        real_write = metrics.MetricsWriter.write

        def write(self, stage, rows):
            calls.append(stage)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.jsonl))
            return real_write(self, stage, rows)

        monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    argv = ["run", *TINY, "--workdir", str(tmp_path / "w")]
    assert cli.main(argv) == 2
    assert "no space left on the device" in _one_line(capsys)
    assert not (tmp_path / "w" / "results.json").exists()
    monkeypatch.undo()
    ran = []
    original = loop.run_steps
    monkeypatch.setattr(loop, "run_steps", lambda *a, **k: (ran.append(k["desc"]), original(*a, **k))[1])
    assert cli.main(argv) == 0
    assert (tmp_path / "w" / "results.json").is_file()
    assert "pretrain" not in ran  # finished before the disk filled: reused


def _nth_fails(n: int, calls: list):
    real = ocp.StandardCheckpointer.save

    def save(self, *args, **kwargs):
        calls.append(args[0] if args else None)
        if len(calls) == n:
            raise ValueError(TENSORSTORE_ENOSPC)
        return real(self, *args, **kwargs)

    return save


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MB tmpfs at tmp_path/fs (Linux, root); skipped where mounting is not permitted."""
    mount = shutil.which("mount")
    target = tmp_path / "fs"
    target.mkdir()
    if mount is None or sys.platform != "linux":
        pytest.skip("needs Linux's mount")
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", f"dtl-{uuid.uuid4().hex[:6]}", str(target)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): not root, or not permitted")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.slow
def test_digits_on_a_1mb_filesystem_exits_2_with_one_line_then_resumes(tiny_filesystem):
    """The issue's check: `dtl-jax run configs/digits.py --workdir X/w` on a 1 MB file system exits 2 with
    at most 3 lines on stderr (no traceback, no orbax log); with room made, the same command finishes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "dtl_jax.cli", "run", str(ROOT / "configs" / "digits.py")]
    argv += ["--workdir", str(tiny_filesystem / "w")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 1 <= len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no space left on the device" in lines[-1] and str(tiny_filesystem / "w") in lines[-1]
    finished = sorted(p.name for p in (tiny_filesystem / "w" / "checkpoints").glob("pretrain-*"))
    assert finished  # pre-training finished before the disk filled
    stamp = (tiny_filesystem / "w" / "checkpoints" / finished[0] / "meta.json").stat().st_mtime_ns
    subprocess.run(["mount", "-o", "remount,size=100m", str(tiny_filesystem)], check=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tiny_filesystem / "w" / "results.json").is_file()
    assert (tiny_filesystem / "w" / "checkpoints" / finished[0] / "meta.json").stat().st_mtime_ns == stamp  # reused
