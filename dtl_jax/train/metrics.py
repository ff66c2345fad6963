"""The one metrics writer: training metrics as JSONL (``WORKDIR/logs/metrics.jsonl``, read by the report)
and as a TensorBoard event file (``WORKDIR/logs/tensorboard/``, tags ``<stage>/<metric>``; the protos and
the record framing come from tensorboardX; without tensorboardX installed, a warning and the JSONL log
alone).

Each JSONL row is ``{"stage": ..., "step": ..., <metric>: value, ...}``. Every write goes to disk before
``write`` returns (no background thread), so a full disk or a lost permission raises ``OSError`` where
it happens. A stage that starts (``begin(stage, start)``: from scratch at 0, or resumed from a mid-stage
checkpoint at ``start``) first drops the rows of that stage after ``start`` from both logs, so a resumed
or re-run stage never logs a ``(stage, step)`` twice and its curves never double back, in TensorBoard or
any other reader; a line or record cut short by a kill or a full disk is dropped then too.
"""

from __future__ import annotations

import json
import os
import struct
import time
import warnings
from pathlib import Path

import jax

EVENTS = "events.out.tfevents.0.dtl_jax"  # one event file, appended to by every run in the workdir


def _protos():
    """tensorboardX's Event and Summary protos and its CRC, or None when it is not installed."""
    try:
        import tensorboardX  # noqa: F401  (first: a blocked package blocks its cached submodules too)
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
    except ImportError:
        return None
    return Event, Summary, masked_crc32c


def _record(data: bytes, crc) -> bytes:
    """TFRecord framing: length, its masked CRC-32C, the data, its masked CRC-32C."""
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", crc(header)) + data + struct.pack("I", crc(data))


def _records(blob: bytes):
    """``(start, end)`` of every whole record in ``blob``; a record cut short ends the iteration."""
    at = 0
    while at + 12 <= len(blob):
        (length,) = struct.unpack("Q", blob[at : at + 8])
        end = at + 12 + length + 4
        if end > len(blob):
            return
        yield at, end
        at = end


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class MetricsWriter:
    def __init__(self, workdir: str | Path):
        self.directory = Path(workdir) / "logs"
        self.enabled = jax.process_index() == 0
        self._tensorboard = None  # None: not tried yet; False: tensorboardX missing; else its protos

    @property
    def jsonl(self) -> Path:
        return self.directory / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.directory / "tensorboard" / EVENTS

    def _protos(self):
        if self._tensorboard is None:
            self._tensorboard = _protos() or False
            if not self._tensorboard:  # a declared dependency, but an image may lack it: the JSONL log is enough
                warnings.warn("tensorboardX is not installed: no TensorBoard events, metrics.jsonl only", stacklevel=3)
        return self._tensorboard

    def begin(self, stage: str, start: int = 0) -> None:
        """A stage starts at step ``start`` (0: from scratch): drops its rows with ``step > start`` (and any
        line or record cut short) from the JSONL log and the event file."""
        if not self.enabled:
            return
        if self.jsonl.exists():
            lines = self.jsonl.read_text().splitlines(keepends=True)
            kept = []
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:  # cut by a kill or a full disk
                    continue
                if line.endswith("\n") and not (row.get("stage") == stage and row.get("step", 0) > start):
                    kept.append(line)
            if len(kept) != len(lines):
                _replace(self.jsonl, "".join(kept).encode())
        protos = self._protos() if self.events.exists() else None
        if protos:
            event_type = protos[0]
            blob = self.events.read_bytes()
            kept, end = [], 0
            prefix = stage + "/"
            for first, end in _records(blob):
                event = event_type.FromString(blob[first + 12 : end - 4])
                tags = [v.tag for v in event.summary.value]
                if not (tags and tags[0].startswith(prefix) and event.step > start):
                    kept.append(blob[first:end])
            if sum(map(len, kept)) != len(blob):
                _replace(self.events, b"".join(kept))

    def write(self, stage: str, rows: list[dict]) -> None:
        """Appends ``rows`` (``{"step": ..., <metric>: value}``) of ``stage`` to both logs, on disk on return."""
        if not self.enabled or not rows:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as f:
            f.write("".join(json.dumps({"stage": stage, **row}) + "\n" for row in rows))
        protos = self._protos()
        if not protos:
            return
        event_type, summary_type, crc = protos
        self.events.parent.mkdir(exist_ok=True)
        data = []
        if not self.events.exists():
            version = event_type(wall_time=time.time(), file_version="brain.Event:2")
            data.append(_record(version.SerializeToString(), crc))
        for row in rows:
            values = [summary_type.Value(tag=f"{stage}/{k}", simple_value=v) for k, v in row.items() if k != "step"]
            event = event_type(wall_time=time.time(), step=int(row["step"]))
            event.summary.CopyFrom(summary_type(value=values))
            data.append(_record(event.SerializeToString(), crc))
        with open(self.events, "ab") as f:
            f.write(b"".join(data))

    def close(self) -> None:
        """Nothing is held open (kept for callers that close their writer)."""


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


def read_events(path: str | os.PathLike) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar in a TensorBoard event file, in file order (for tests and
    users without TensorBoard)."""
    protos = _protos()
    if protos is None:
        raise ImportError("tensorboardX is needed to read event files")
    blob = Path(path).read_bytes()
    out = []
    for first, end in _records(blob):
        event = protos[0].FromString(blob[first + 12 : end - 4])
        out += [(v.tag, int(event.step), float(v.simple_value)) for v in event.summary.value]
    return out
