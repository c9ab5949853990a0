"""The run directory: layout, atomic manifest and latest link, the writer's lock, resolving runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from protocol import rundir
from protocol.rundir import (
    RunDirError,
    RunLock,
    RunLockedError,
    RunPaths,
    append_event,
    create_run,
    effective_status,
    find_runs,
    is_locked,
    new_manifest,
    read_events,
    read_manifest,
    resolve_run,
    switch_latest,
    update_manifest,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[2]


def _run(runs, rid, started_at=None, status="running"):
    paths = create_run(runs, rid)
    m = new_manifest(paths, {"lr": 1e-5}, 7, {"deterministic": True}, {"python": "3.11"})
    m["status"] = status
    if started_at is not None:
        m["started_at"] = started_at
    write_manifest(paths, m)
    return paths


def test_create_run_layout_and_refuses_existing(tmp_path):
    paths = create_run(tmp_path / "runs", "r1")
    assert paths.root == tmp_path / "runs" / "r1" and paths.run_id == "r1"
    for d in (paths.tb, paths.profile, paths.checkpoints):
        assert d.is_dir()
    assert paths.checkpoint_dir(12).name == "step_000012"
    with pytest.raises(RunDirError, match="already exists"):
        create_run(tmp_path / "runs", "r1")
    for bad in ("latest", "..", "a/b"):
        with pytest.raises(RunDirError):
            create_run(tmp_path / "runs", bad)
    # auto ids never collide, even within one second
    a, b = create_run(tmp_path / "runs"), create_run(tmp_path / "runs")
    assert a.root != b.root


def test_manifest_round_trip_and_atomic_write(tmp_path, monkeypatch):
    paths = _run(tmp_path, "r1")
    m = read_manifest(paths)
    for key in (
        "schema_version",
        "run_id",
        "config",
        "seed",
        "determinism",
        "versions",
        "host",
        "pid",
        "status",
        "started_at",
        "ended_at",
        "last_step",
        "last_checkpoint",
    ):
        assert key in m
    assert update_manifest(paths, last_step=5, status="finished")["last_step"] == 5
    assert read_manifest(paths)["status"] == "finished"
    # a crash mid-write leaves the old manifest whole, never a half-written one
    before = paths.manifest.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError):
        update_manifest(paths, last_step=6)
    monkeypatch.undo()
    assert paths.manifest.read_text() == before
    # readers running during many rewrites always see valid JSON
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                json.loads(paths.manifest.read_text())
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    for i in range(200):
        update_manifest(paths, last_step=i)
    stop.set()
    th.join()
    assert errors == []


def test_corrupt_or_missing_manifest_is_one_line_error(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(RunDirError) as e:
        read_manifest(tmp_path / "r")
    assert "no run.json" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        read_manifest(tmp_path / "r")


def test_switch_latest_is_atomic_rename(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "a")
    _run(runs, "b")
    switch_latest(runs, "a")
    assert os.readlink(runs / "latest") == "a"
    seen = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(os.readlink(runs / "latest"))
            except FileNotFoundError:
                seen.add(None)  # the link was ever missing: not atomic

    th = threading.Thread(target=reader)
    th.start()
    for i in range(300):
        switch_latest(runs, "b" if i % 2 == 0 else "a")
    stop.set()
    th.join()
    assert None not in seen
    assert os.readlink(runs / "latest") == "a"
    assert resolve_run(runs).run_id == "latest" and read_manifest(resolve_run(runs))["run_id"] == "a"
    assert not [p for p in runs.iterdir() if p.name.startswith(".latest")]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from protocol.rundir import RunLock, RunPaths
    lock = RunLock(RunPaths(__import__("pathlib").Path(sys.argv[1]))).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_lock_refuses_second_writer_in_another_process_and_frees_on_sigkill(tmp_path):
    paths = _run(tmp_path, "r1")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(paths.root)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert is_locked(paths)
        with pytest.raises(RunLockedError) as e:
            RunLock(paths).acquire()
        msg = str(e.value)
        assert "\n" not in msg and "locked" in msg and str(proc.pid) in msg and str(paths.root) in msg
        assert isinstance(e.value, RunDirError)
        # a reader never takes the lock and is never blocked
        assert read_manifest(paths)["status"] == "running"
        assert effective_status(read_manifest(paths), paths) == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_locked(paths)
    assert effective_status(read_manifest(paths), paths) == "crashed"  # writer died, status never updated
    with RunLock(paths) as lock:
        assert is_locked(paths)
        with pytest.raises(RunLockedError):  # a second writer in this process too
            RunLock(paths).acquire()
        assert lock is not None
    assert not is_locked(paths)


def test_lock_on_a_missing_run_dir_is_a_run_dir_error(tmp_path):
    with pytest.raises(RunDirError):
        RunLock(RunPaths(tmp_path / "gone")).acquire()


def test_effective_status_without_a_lock_is_crashed_whatever_the_pid(tmp_path):
    paths = _run(tmp_path, "r1")
    m = read_manifest(paths)
    assert m["pid"] == os.getpid()  # a live pid (ours), but nobody holds the lock
    assert effective_status(m, paths) == "crashed"
    assert effective_status(dict(m, status="finished"), paths) == "finished"
    assert effective_status(dict(m, status=5), paths) == "unknown"
    with pytest.raises(TypeError):
        effective_status(m)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        effective_status(m, None)  # type: ignore[arg-type]


def test_resolve_run(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(RunDirError) as e:
        resolve_run(tmp_path / "missing")
    assert "no such run" in str(e.value) and "\n" not in str(e.value)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        resolve_run(f)
    runs.mkdir()
    with pytest.raises(RunDirError, match="holds no runs"):
        resolve_run(runs)
    old = _run(runs, "old", started_at=100.0)
    new = _run(runs, "new", started_at=200.0)
    assert resolve_run(old.root).root == old.root  # a run dir is itself
    assert resolve_run(runs).root == new.root  # no latest: the newest run
    switch_latest(runs, "old")
    assert read_manifest(resolve_run(runs))["run_id"] == "old"  # latest wins


def test_find_runs_oldest_first_skips_junk(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "b", started_at=300.0, status="finished")
    _run(runs, "a", started_at=100.0, status="stopped")
    (runs / "not_a_run").mkdir()
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text("{")
    (runs / "stray.txt").write_text("x")
    switch_latest(runs, "b")
    found = find_runs(runs)
    assert [r.run_id for r in found] == ["a", "b"]
    assert [r.status for r in found] == ["stopped", "finished"]
    assert find_runs(tmp_path / "nothing") == []


def test_events_append_and_read(tmp_path):
    paths = _run(tmp_path, "r1")
    append_event(paths, "started", step=0)
    append_event(paths, "alert", rule="kl_runaway", value=float("nan"))
    ev = read_events(paths)
    assert [e["event"] for e in ev] == ["started", "alert"]
    assert ev[1]["value"] != ev[1]["value"] and all("time" in e for e in ev)
