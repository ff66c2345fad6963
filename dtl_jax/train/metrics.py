"""The one metrics writer: training metrics as JSONL (``WORKDIR/logs/metrics.jsonl``, read by the report)
and as TensorBoard event files (``WORKDIR/logs/tensorboard``, through tensorboardX; without tensorboardX
installed, a warning and the JSONL log alone).

Each row is ``{"stage": ..., "step": ..., <metric>: value, ...}``. After a resume, the steps between the
last checkpoint and the kill are logged again; readers keep the last row of a ``(stage, step)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(self, workdir: str | Path):
        self.directory = Path(workdir) / "logs"
        self._tensorboard = None
        self.enabled = jax.process_index() == 0

    def write(self, stage: str, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"stage": stage, **row}) + "\n")
        if self._tensorboard is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # a declared dependency, but an image may lack it: the JSONL log is enough
                warnings.warn("tensorboardX is not installed: no TensorBoard events, metrics.jsonl only", stacklevel=2)
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(str(self.directory / "tensorboard"))
        if self._tensorboard is False:
            return
        for row in rows:
            for key, value in row.items():
                if key != "step":
                    self._tensorboard.add_scalar(f"{stage}/{key}", value, row["step"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None


def read(workdir: str | Path) -> dict[str, list[dict]]:
    """The logged rows by stage, one per step (the last one written)."""
    path = Path(workdir) / "logs" / "metrics.jsonl"
    stages: dict[str, dict[int, dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            stages.setdefault(row.pop("stage"), {})[row["step"]] = row
    return {stage: [rows[s] for s in sorted(rows)] for stage, rows in stages.items()}
