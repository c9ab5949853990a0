"""`RunWriter`: where every step record goes.

One `write(record)` appends the record to steps.msgpack (framed, flushed at once) and
steps.jsonl, queues one TensorBoard event holding every numeric field (stage_s as
`stage_s/<name>`), and runs the record through the alert engine, appending fired, escalated
and cleared alerts to events.jsonl at once.

TensorBoard: one Summary proto per step with all scalars, handed to tensorboard's own
EventFileWriter (its background thread does the file I/O). This is ~30x cheaper than one
`SummaryWriter.add_scalar` per field, which is what keeps logging under 1% of step time.
The event file is flushed every `tb_flush_every` steps and at sync/close, not every step.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from pathlib import Path

from protocol import alerts as alerts_mod
from protocol.catalogue import METRICS, RANK_FIELDS
from protocol.jsonl import JsonlWriter
from protocol.rundir import RunPaths, append_event
from protocol.steplog import StepLogWriter

# `step` is the event step and `time` its wall_time; every other numeric field is a scalar.
_SCALARS = [m.name for m in METRICS.values() if m.kind in ("int", "float") and m.name not in ("step", "time")]


class TensorBoardScalars:
    """Minimal scalar writer over tensorboard's EventFileWriter (imported lazily: it is slow-ish)."""

    def __init__(self, logdir):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(logdir), max_queue_size=100, flush_secs=30)

    def add_record(self, record: dict) -> None:
        Value = self._Summary.Value
        values = [Value(tag=k, simple_value=float(record[k])) for k in _SCALARS if k in record]
        for name, secs in (record.get("stage_s") or {}).items():
            values.append(Value(tag=f"stage_s/{name}", simple_value=float(secs)))
        for key in RANK_FIELDS:  # data-parallel runs: rank_compute_s/1, rank_stage_s/1.rollout ...
            for sub, v in (record.get(key) or {}).items():
                values.append(Value(tag=f"{key}/{sub}", simple_value=float(v)))
        event = self._Event(
            wall_time=float(record.get("time", 0.0)), step=int(record["step"]), summary=self._Summary(value=values)
        )
        self._writer.add_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunWriter:
    def __init__(
        self, paths: RunPaths, rules=alerts_mod.DEFAULT_RULES, tb_flush_every: int = 25, tensorboard: bool = True
    ):
        self.paths = paths
        self.steplog = StepLogWriter(paths.steps)
        self.jsonl = JsonlWriter(paths.steps_jsonl)
        self.tb = TensorBoardScalars(paths.tb) if tensorboard else None
        self.alerts = alerts_mod.AlertEngine(rules)
        self.tb_flush_every = max(1, tb_flush_every)
        self._since_flush = 0

    def prime_alerts(self, records: list[dict]) -> None:
        """Feed already-logged records to the alert engine without emitting events, so a resumed
        run's rolling windows and open alerts are what they were (a resume re-fires nothing)."""
        for rec in records:
            self.alerts.update(rec)

    def write(self, record: dict) -> list:
        """Log one step record everywhere; returns the alert events [(event, Alert)] it caused.
        A failed write (a full disk) raises OSError naming the file."""
        with _naming(self.paths.steps):
            self.steplog.write(record)
        with _naming(self.paths.steps_jsonl):
            self.jsonl.write(record)
        if self.tb is not None:
            with _naming(self.paths.tb):
                self.tb.add_record(record)
                self._since_flush += 1
                if self._since_flush >= self.tb_flush_every:
                    self.tb.flush()
                    self._since_flush = 0
        fired = self.alerts.update(record)
        with _naming(self.paths.events):
            for event, alert in fired:
                append_event(self.paths, event, **alert.to_event(event))
        return fired

    def sync(self) -> None:
        """Make everything written so far durable (called at every checkpoint)."""
        with _naming(self.paths.steps):
            self.steplog.sync()
        with _naming(self.paths.steps_jsonl):
            self.jsonl.sync()
        if self.tb is not None:
            self.tb.flush()
            self._since_flush = 0

    def close(self) -> None:
        try:
            self.steplog.close()
            self.jsonl.close()
        finally:
            if self.tb is not None:
                self.tb.close()


@contextmanager
def _naming(path):
    """An OSError from a write without a file name (os.write on a full disk) gets `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def truncate_tensorboard_after_step(tb_dir: Path, step: int) -> int:
    """Cut every TensorBoard event file in `tb_dir` at its first event of a step after `step`
    (a resume recomputes those steps; their old points must not be drawn twice). The files are
    TFRecord framed (u64 length, u32 crc, payload, u32 crc), one Event per record, in step
    order as `TensorBoardScalars` writes them. Returns the number of events removed."""
    from tensorboard.compat.proto import event_pb2

    removed = 0
    if not tb_dir.is_dir() or tb_dir.is_symlink():
        return 0
    for f in sorted(tb_dir.iterdir()):
        if not f.name.startswith("events.out.tfevents.") or f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        off, cut = 0, None
        while off + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, off)
            end = off + 12 + n + 4
            if end > len(data):
                break
            ev = event_pb2.Event.FromString(data[off + 12 : off + 12 + n])
            if cut is None and ev.step > step and ev.HasField("summary"):
                cut = off
            if cut is not None:
                removed += 1
            off = end
        if cut is not None:
            with open(f, "r+b") as fh:
                fh.truncate(cut)
    return removed


def is_nonfinite_alert(event: str, alert) -> bool:
    return event == "alert" and alert.rule == "non_finite" and alert.severity == "critical"
