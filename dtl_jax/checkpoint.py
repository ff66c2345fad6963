"""The one place that knows orbax: save and restore pytrees of arrays, plus a JSON sidecar.

A checkpoint is complete only once orbax has finalised its directory (it writes to a temporary name
and renames), so a process killed mid-save leaves nothing that ``exists`` accepts.

A write or read that fails for a reason of the file system (full disk, no permission) raises ``OSError``
with the errno and the checkpoint's folder, whatever layer met it: orbax and tensorstore report it as a
``ValueError`` whose message carries ``[os_error_code='N']`` (and log it several times through absl, in
their background threads); here it is raised once as the ``OSError`` it wraps, and the logging is held back
while orbax works, since the error itself says it all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dtl_jax import runtime


def _path(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().resolve()


def _agreed(flag: bool) -> bool:
    """In a multi-process job every process must take the same branch: process 0's answer wins."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


_STRERRORS = {os.strerror(code): code for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO)}


def os_error_of(err: BaseException) -> int | None:
    """The errno an orbax/tensorstore error wraps (``[os_error_code='28']``, or a known ``strerror`` in its
    message), or None."""
    if isinstance(err, OSError):
        return err.errno
    text = str(err)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code is not None:
        return int(code.group(1))
    return next((c for message, c in _STRERRORS.items() if message in text), None)


@contextlib.contextmanager
def filesystem_errors(directory: str | os.PathLike):
    """Raises a file-system failure inside the block as ``OSError(errno, strerror, directory)``; holds back
    absl's (orbax's) error logging meanwhile."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(directory)) from err
        raise
    except Exception as err:
        code = os_error_of(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(directory)) from err
    finally:
        logger.setLevel(level)


def exists(directory: str | os.PathLike) -> bool:
    path = _path(directory)
    return _agreed((path / "state").is_dir() and (path / "meta.json").is_file())


def save(directory: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """Saves ``tree`` (arrays) and ``meta`` (JSON) under ``directory``; the JSON is written last, so
    its presence marks a finished checkpoint."""
    path = _path(directory)
    with runtime.deferred_interrupts(), filesystem_errors(path):  # Ctrl-C waits for the write (runtime)
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
    with runtime.deferred_interrupts(), filesystem_errors(path), ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path / "state", abstract)
        return tree, json.loads((path / "meta.json").read_text())


class Progress:
    """Mid-stage checkpoints (orbax ``CheckpointManager``, the two newest kept): the train state, the
    loop's bookkeeping and arrays of its own, every ``every`` steps. A checkpoint is listed only once
    orbax has finalised it, so a kill during a save falls back to the previous one.
    """

    def __init__(self, directory: str | os.PathLike, every: int):
        self.directory = _path(directory)
        self.every = every
        self.resumed_from = 0  # the step a run resumed from (set by the loop)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        with runtime.deferred_interrupts(), filesystem_errors(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def restore(self, like: Any) -> tuple[Any, dict] | None:
        """``(tree, extra)`` of the newest finished checkpoint, ``tree`` shaped like ``like``; or None."""
        step = _agreed_step(self._manager.latest_step())
        if step is None:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
        with runtime.deferred_interrupts(), filesystem_errors(self.directory):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
            )
        return restored["state"], restored["extra"]

    def save(self, step: int, tree: Any, extra: dict) -> None:
        with runtime.deferred_interrupts(), filesystem_errors(self.directory):  # Ctrl-C waits for the write
            state = ocp.args.StandardSave(jax.device_get(tree))
            self._manager.save(step, args=ocp.args.Composite(state=state, extra=ocp.args.JsonSave(extra)), force=True)
            self._manager.wait_until_finished()

    def close(self) -> None:
        with runtime.deferred_interrupts(), filesystem_errors(self.directory):
            self._manager.close()


def remove(directory: str | os.PathLike) -> None:
    """Deletes a folder of checkpoints (e.g. a stage's ``Progress`` once its final checkpoint is written);
    in a multi-process job, process 0 does it."""
    path = _path(directory)
    if jax.process_index() == 0 and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _agreed_step(step: int | None) -> int | None:
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    value = int(multihost_utils.broadcast_one_to_all(np.asarray(-1 if step is None else step)))
    return None if value < 0 else value
