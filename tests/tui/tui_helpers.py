"""Helpers for the monitor's tests: runs made by scripts/gen_run.py, and a live writer."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from protocol import jsonl, rundir
from protocol.steplog import StepLogWriter, encode_frame

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_run", ROOT / "scripts" / "gen_run.py")
gen_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_run)

T0 = 1_700_000_000.0  # fixed start time: snapshots must not depend on the clock
_LOCKS: list[rundir.RunLock] = []  # writer locks of "running" runs, released after each test


def make_run(runs_dir: Path, run_id: str, steps: int, status: str = "finished", **kw) -> rundir.RunPaths:
    root = gen_run.generate(str(runs_dir), run_id, steps, 0, status=status, start_time=T0, quiet=True, **kw)
    paths = rundir.RunPaths(Path(root))
    m = rundir.read_manifest(paths)
    if status == "running":
        m.update(status="running", ended_at=None, pid=os.getpid())  # a live writer: this test process
        _LOCKS.append(rundir.RunLock(paths).acquire())  # liveness is the writer's lock
    else:
        m.update(ended_at=T0 + steps * 0.5)
    rundir.write_manifest(paths, m)
    # fixed event times too (append_event stamps the wall clock)
    events = rundir.read_events(paths)
    for _i, e in enumerate(events):
        e["time"] = T0 + 0.5 * e.get("step", 0) if isinstance(e.get("step"), int) else T0
    paths.events.write_text("".join(jsonl.dumps(e) + "\n" for e in events))
    return paths


class LiveWriter:
    """Appends records to a run the way a trainer does."""

    def __init__(self, paths: rundir.RunPaths, steps_total: int = 1000, seed: int = 0):
        self.paths = paths
        self.model = gen_run.RunModel(steps_total, seed)
        self.w = StepLogWriter(paths.steps)

    def record(self, step: int, **override) -> dict:
        rec = self.model.record(step, T0 + 0.5 * step)
        rec.update(override)
        return rec

    def write(self, step: int, **override) -> dict:
        rec = self.record(step, **override)
        self.w.write(rec)
        return rec

    def write_corrupt(self, step: int) -> None:
        frame = bytearray(encode_frame(self.record(step)))
        frame[20] ^= 0xFF
        frame[30] ^= 0xFF
        with open(self.paths.steps, "ab") as f:
            f.write(bytes(frame))

    def close(self):
        self.w.close()


async def wait_for(pilot, cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def rendered(widget) -> str:
    """A widget's current text, as drawn."""
    return str(widget.render())


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def release_writer_locks():
    yield
    while _LOCKS:
        _LOCKS.pop().release()
