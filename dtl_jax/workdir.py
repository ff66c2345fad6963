"""The workdir: writable, owned by one experiment, written atomically.

A workdir remembers the config of its last run (``config-<command>.json``). Stage checkpoints are keyed
by a hash of the settings they depend on, so reusing a workdir never reads a stale stage. A run that
only selects differently (``SELECTION``: which disposal or unlearning methods run, the attacker budgets
after the first) is the same experiment: it is accepted, and its ``results.json`` holds exactly what it
ran. A run with another config otherwise (a λ, a seed, a dataset...) would replace the results of
another experiment, so it is refused unless ``overwrite`` is given (then valid stage checkpoints are
still reused).

A file-system error (full disk, no permission, a file where a folder should be) while a run writes its
workdir is the user's to fix, not a bug: ``os_error`` turns it into a one-line ``UserError`` naming the
path, what failed and what to do; a re-run resumes from the checkpoints written before it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from dtl_jax.config import Config, to_dict
from dtl_jax.errors import UserError

SECTIONS = {
    "run": ("seed", "data", "model", "pretrain", "transfer", "disposal", "piggyback", "eval"),
    "unlearn": ("seed", "data", "model", "eval", "unlearn"),
    "frontier": ("seed", "data", "model", "pretrain", "transfer", "disposal", "piggyback", "eval", "frontier"),
}


# Keys that only choose what runs, per command: changing them keeps a workdir's finished stages valid.
# ``piggyback.shots`` counts only while its first budget (the headline PL accuracy, and the labelled draw
# of disposal's held-out probe) is unchanged.
SELECTION = {
    "run": ("disposal.methods", "piggyback.shots"),
    "unlearn": ("unlearn.methods",),
    # a frontier with other losses, attack strategies or λ grids reuses every trajectory it shares
    "frontier": (
        "disposal.methods",
        "piggyback.shots",
        "piggyback.strategies",
        *(
            f"frontier.{name}"
            for name in ("gc", "ngc", "gc_sep", "gc_bound", "gc_sep_bound", "rtf", "utf", "ga", "sophon")
        ),
    ),
}


def seed_dir(workdir: str | os.PathLike, seed: int) -> Path:
    """Where one seed of a multi-seed run (``--seeds``) writes, as a single run would."""
    return Path(workdir) / f"seed-{seed}"


def fingerprint(*parts) -> str:
    """A short hash of config sections (dataclasses) and plain values."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def _record(workdir: Path, config: Config, command: str) -> tuple[Path, dict]:
    current = json.loads(json.dumps({k: to_dict(config)[k] for k in SECTIONS[command]}))
    return workdir / f"config-{command}.json", current


def claim(workdir: Path, config: Config, command: str) -> None:
    """Records ``config`` as the workdir's, once the run's inputs have been checked."""
    write_json(*_record(Path(workdir), config, command))


def _selects(command: str, key: str, before, after) -> bool:
    """Whether changing ``key`` from ``before`` to ``after`` only selects what runs (``SELECTION``)."""
    if key not in SELECTION[command]:
        return False
    if key == "piggyback.shots":
        return bool(before) and bool(after) and before[0] == after[0]
    return True


def file_in_the_way(path: Path) -> Path | None:
    """The first existing path along ``path`` (a parent, or itself) that is not a folder, or None."""
    for candidate in (*reversed(Path(path).parents), Path(path)):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def prepare(workdir: Path, config: Config, command: str, overwrite: bool = False) -> Path:
    """Checks that ``workdir`` can be written and is not another experiment's (see ``SELECTION``)."""
    workdir = Path(workdir)
    blocker = file_in_the_way(workdir)
    if blocker is not None:
        raise UserError(
            f"workdir {str(workdir)!r}: {str(blocker)!r} is a file, expected a folder: choose another --workdir"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"  # one per process: jobs share a workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise os_error(err, workdir) or UserError(
            f"workdir {str(workdir)!r} cannot be written: {err.strerror or err}"
        ) from None
    record, current = _record(workdir, config, command)
    if record.exists() and not overwrite:
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            before = None
        if before is not None and before != current:
            old, new = dict(_flat(before)), dict(_flat(current))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            changed = [k for k in changed if not _selects(command, k, old.get(k), new.get(k))]
            if changed:
                first = changed[0]
                raise UserError(
                    f"workdir {str(workdir)!r} holds a '{command}' run with another config ({len(changed)} keys "
                    f"differ, e.g. {first}: {old.get(first)!r} -> {new.get(first)!r}): pass --overwrite to replace "
                    "its results (valid stage checkpoints are kept), or choose another --workdir (another choice of "
                    f"{' or '.join(SELECTION[command])} needs neither)"
                )
    return workdir


# errno -> (what failed, what to do)
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another --workdir"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --workdir"),
    errno.EFBIG: ("file too large for the file system", "choose another --workdir"),
    errno.EACCES: ("permission denied", "make it writable or choose another --workdir"),
    errno.EPERM: ("operation not permitted", "make it writable or choose another --workdir"),
    errno.EROFS: ("read-only file system", "choose another --workdir"),
    errno.EIO: ("input/output error", "check the disk or choose another --workdir"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter --workdir"),
}


def os_error(err: BaseException, workdir: str | os.PathLike | None = None) -> UserError | None:
    """The one-line ``UserError`` for a file-system error (``OSError``, or an orbax/tensorstore error that
    wraps one): the path, what failed, what to do, and that a re-run resumes; None for any other error."""
    from dtl_jax.checkpoint import os_error_of

    code = os_error_of(err)
    path = getattr(err, "filename", None) or (str(workdir) if workdir is not None else None)
    again = "then run the same command again (finished stages are reused)"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR) and path is not None:
        blocker = file_in_the_way(Path(path))
        if blocker is not None:
            return UserError(f"{str(blocker)!r} is a file, expected a folder: move it away or choose another --workdir")
    if code not in _OS_ERRORS:
        return None
    what, todo = _OS_ERRORS[code]
    if code in (errno.EACCES, errno.EPERM) and path and not (workdir and _inside(path, workdir)):
        todo = "check its permissions"  # e.g. a data folder the run reads
    where = f"{str(path)!r}: " if path else ""
    return UserError(f"{where}{what}: {todo}, {again}")


def _inside(path, folder) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def remove_if_empty(workdir: str | os.PathLike) -> None:
    """Removes ``workdir`` if it holds nothing but empty folders (a run that failed before its first stage)."""
    root = Path(workdir)
    if not root.is_dir():
        return
    if any(files for _, _, files in os.walk(root)):
        return
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            return


def write_json(path: Path, data: dict) -> None:
    """Writes JSON atomically (temporary file, then rename): a reader never sees a partial file. In a
    multi-process job only process 0 writes."""
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    tmp.replace(path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


def versions() -> dict:
    """The versions saved beside every result."""
    import flax
    import optax

    from dtl_jax import __version__

    return {"dtl_jax": __version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


_COMMAND: list[str] = []  # the command line, as the CLI was called (set_command)


def set_command(argv: list[str]) -> None:
    """Records the command line a run was started with (``dtl-jax`` and its arguments) for ``provenance``."""
    _COMMAND[:] = ["dtl-jax", *argv]


def _commit() -> str | None:
    """The git commit of the checkout the package runs from (``+dirty`` with uncommitted changes to tracked
    files), or None for an installed package or without git."""
    package = Path(__file__).resolve().parent
    try:
        git = ["git", "-C", str(package)]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() / "dtl_jax" != package:
            return None  # not our checkout (e.g. a venv inside another repository)
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def provenance(variables=None) -> dict:
    """Where and how a result was made, for the report's header: the command line, the git commit, the
    devices (count and kind), processes, the CPU model (a single seed's numbers depend on its float
    rounding) and the floating-point dtypes of ``variables`` (a model's parameters)."""
    devices = jax.devices()
    dtypes = sorted({str(np.asarray(x).dtype) for x in jax.tree.leaves(variables)}) if variables is not None else []
    return {
        "command": shlex.join(_COMMAND) if _COMMAND else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": _commit(),
        "devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
        "processes": jax.process_count(),
        "cpu": _cpu_model(),
        "dtype": ", ".join(dtypes) or None,
    }
