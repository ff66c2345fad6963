"""The one place that knows orbax: save and restore pytrees of arrays, plus a JSON sidecar.

A checkpoint is complete only once orbax has finalised its directory (it writes to a temporary name
and renames), so a process killed mid-save leaves nothing that ``exists`` accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _path(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().resolve()


def _agreed(flag: bool) -> bool:
    """In a multi-process job every process must take the same branch: process 0's answer wins."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def exists(directory: str | os.PathLike) -> bool:
    path = _path(directory)
    return _agreed((path / "state").is_dir() and (path / "meta.json").is_file())


def save(directory: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """Saves ``tree`` (arrays) and ``meta`` (JSON) under ``directory``; the JSON is written last, so
    its presence marks a finished checkpoint."""
    path = _path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "state", jax.device_get(tree), force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta or {}, indent=1))
        tmp.replace(path / "meta.json")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"checkpoint {path}")


def restore(directory: str | os.PathLike, like: Any) -> tuple[Any, dict]:
    """Restores the tree saved under ``directory`` with the structure, shapes and dtypes of ``like``."""
    path = _path(directory)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path / "state", abstract)
    return tree, json.loads((path / "meta.json").read_text())
