"""The workdir: writable, owned by one config, written atomically.

A workdir remembers the config of the run that made it (``config-<command>.json``). Stage checkpoints
are keyed by a hash of the settings they depend on, so reusing a workdir never reads a stale stage;
but a run with a different config would replace that workdir's ``results.json``, so it is refused
unless ``overwrite`` is given (then valid stage checkpoints are still reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from dtl_jax.config import Config, to_dict
from dtl_jax.errors import UserError

SECTIONS = {
    "run": ("seed", "data", "model", "pretrain", "transfer", "disposal", "piggyback", "eval"),
    "unlearn": ("seed", "data", "model", "eval", "unlearn"),
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


def prepare(workdir: Path, config: Config, command: str, overwrite: bool = False) -> Path:
    """Checks that ``workdir`` can be written and is not another config's (see ``claim``)."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"  # one per process: jobs share a workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"workdir {str(workdir)!r} cannot be written: {err.strerror or err}") from None
    record, current = _record(workdir, config, command)
    if record.exists() and not overwrite:
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            before = None
        if before is not None and before != current:
            old, new = dict(_flat(before)), dict(_flat(current))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            first = changed[0]
            raise UserError(
                f"workdir {str(workdir)!r} holds a '{command}' run with another config ({len(changed)} keys differ, "
                f"e.g. {first}: {old.get(first)!r} -> {new.get(first)!r}): pass --overwrite to replace its results "
                "(valid stage checkpoints are kept), or choose another --workdir"
            )
    return workdir


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
