"""A checkpointed stage: restore it, or run it (resuming from its newest mid-stage checkpoint), save it and
remove its mid-stage checkpoints. One helper for the DTL stages, the unlearning runner's original model and
methods, and an unlearning method's ``Context``.

Layout, for a stage directory ``D`` (``WORKDIR/checkpoints/<stage key>``): ``D/state`` and ``D/meta.json``
once the stage is finished (``checkpoint.save``; ``meta.json`` is written last, so its presence marks a
finished stage); while it runs, its mid-stage checkpoints (``checkpoint.Progress``) in ``D.progress/``, or,
for a stage of several loops (an unlearning method's phases), one folder a loop, ``D.progress/<part>/``.
They are removed once the stage is saved.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dtl_jax import checkpoint
from dtl_jax.checkpoint import Progress


class CheckpointedStage:
    """A stage's directory, its mid-stage checkpoints every ``checkpoint_every`` steps (0: none) and its
    final save::

        stage = CheckpointedStage(directory, checkpoint_every)
        variables, meta = stage.run(like, compute)   # restores a finished stage, else compute(stage)

    where ``compute(stage)`` trains, passing ``stage.progress()`` (a context manager) to its loops, and
    returns ``(tree, meta)``, which ``run`` saves before removing the mid-stage checkpoints."""

    def __init__(self, directory: str | os.PathLike, checkpoint_every: int):
        self.directory = Path(directory)
        self.every = checkpoint_every
        self.resumed_from = 0  # the step the stage's loop (the first that resumed) started from

    @property
    def progress_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + ".progress")

    @property
    def done(self) -> bool:
        """Whether the stage finished (in a multi-process job, process 0's answer)."""
        return checkpoint.exists(self.directory)

    def restore(self, like: Any) -> tuple[Any, dict]:
        """``(tree, meta)`` of the finished stage, ``tree`` shaped like ``like``."""
        return checkpoint.restore(self.directory, like)

    @contextlib.contextmanager
    def progress(self, part: str = "") -> Iterator[Progress | None]:
        """The mid-stage checkpoints of one training loop (``part``: its name within a stage of several
        loops), for ``train.loop.run_steps(..., progress=...)``; ``None`` when ``checkpoint_every`` is 0."""
        if not self.every:
            yield None
            return
        progress = Progress(self.progress_dir / part if part else self.progress_dir, self.every)
        try:
            yield progress
        finally:
            progress.close()
            self.resumed_from = self.resumed_from or progress.resumed_from

    def save(self, tree: Any, meta: dict) -> None:
        """Writes the stage's checkpoint, then removes its mid-stage checkpoints."""
        checkpoint.save(self.directory, tree, meta)
        checkpoint.remove(self.progress_dir)

    def run(self, like: Any, compute: Callable[[CheckpointedStage], tuple[Any, dict]]) -> tuple[Any, dict]:
        """The finished stage restored (shaped like ``like``), or ``compute(self)`` run and saved."""
        if self.done:
            return self.restore(like)
        tree, meta = compute(self)
        self.save(tree, meta)
        return tree, meta
