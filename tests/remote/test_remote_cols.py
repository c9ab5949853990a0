"""The mirror's columnar side file (steps.cols), built locally from the mirrored step log.

A remote run is mirrored through a real OpenSSH server on loopback (tests/remote/sshd.py). The
remote steps.cols is never copied: the monitor's RemoteSync makes the mirror's own from the log
bytes it writes (tui/remote.py, MirrorColumns). Whatever happens to the link or to the remote log
(cuts, frames torn across chunks, a resume that truncates it, a replaced log, a mirror left by an
older monitor), the side file must be exactly the one ColumnWriter builds from the mirrored log,
and the history the monitor loads from it must be the records on disk, value for value.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tui"))
from tui_helpers import LiveWriter, make_run  # noqa: E402

from protocol.columns import ColumnWriter, columns_path  # noqa: E402
from protocol.rundir import RunPaths  # noqa: E402
from protocol.steplog import StepLogTailer, encode_frame, read_steplog, truncate_after_step  # noqa: E402
from tui.fastload import load_columns  # noqa: E402
from tui.remote import RemoteSync, parse_target  # noqa: E402
from tui.store import RunStore  # noqa: E402


@pytest.fixture
def remote_env(sshd, tmp_path, monkeypatch):
    for k, v in sshd.ssh_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return dict(os.environ)


def wait_until(ready, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def reference_cols(log: Path, tmp: Path) -> bytes:
    """The side file ColumnWriter builds from scratch from this log (what the mirror's must be)."""
    tmp.mkdir(parents=True, exist_ok=True)
    copy = tmp / "steps.msgpack"
    copy.write_bytes(log.read_bytes())
    w = ColumnWriter(columns_path(copy), tmp, copy, copy.stat().st_size)
    w.close()
    assert not w.broken
    return Path(columns_path(copy)).read_bytes()


def assert_cols_match_log(run_dir: Path, tmp: Path) -> None:
    """The mirror's steps.cols covers its whole log, every row trusted, every value the log's."""
    paths = RunPaths(run_dir)
    size = paths.steps.stat().st_size
    cols = Path(columns_path(paths.steps))
    assert cols.read_bytes() == reference_cols(paths.steps, tmp / "ref")
    loaded = load_columns(paths, size)
    assert loaded is not None
    records, stats = read_steplog(paths.steps)
    assert stats.corrupt_frames == 0
    assert loaded.end == size and loaded.rows == len(records)
    ref = RunStore()
    ref.extend(RunStore.columnize(records))
    got = loaded.store
    assert list(got.steps) == list(ref.steps) == [r["step"] for r in records]
    assert bytes(got.times) == bytes(ref.times)
    assert set(got.columns) == set(ref.columns)
    for k, c in ref.columns.items():
        assert bytes(got.columns[k].values) == bytes(c.values), k  # bit for bit
    for k, c in ref.stages.items():
        assert bytes(got.stages[k].values) == bytes(c.values), k


def settled(sync: RemoteSync, remote_log: Path) -> None:
    """The mirror holds the remote log and its side file has caught up with it."""
    local = sync.mirror / remote_log.parent.name / "steps.msgpack"
    wait_until(lambda: local.exists() and local.read_bytes() == remote_log.read_bytes(), "the mirror")
    assert sync.columns is not None
    assert sync.columns.settled(30)


def _sshd_sessions(sshd) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(sshd.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_side_file_of_a_live_run_through_cut_links_and_torn_frames(remote_env, sshd, tmp_path):
    runs = tmp_path / "runs"
    paths = make_run(runs, "live", 200, status="running")
    model = LiveWriter(paths, steps_total=5000)
    model.close()  # frames are written by hand below: some torn across the loop's polls
    total = 3000
    stop = threading.Event()
    fd = os.open(paths.steps, os.O_WRONLY | os.O_APPEND)

    def write() -> None:
        for step in range(201, total + 1):
            if stop.is_set():
                return
            frame = encode_frame(model.record(step))
            if step % 250 == 0:  # a frame half written while the loop polls: it arrives in two chunks
                os.write(fd, frame[:7])
                time.sleep(0.3)
                os.write(fd, frame[7:40])
                time.sleep(0.3)
                os.write(fd, frame[40:])
            else:
                os.write(fd, frame)
            if step % 20 == 0:
                time.sleep(0.02)

    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.1, box=False)
    writer = threading.Thread(target=write, daemon=True)
    try:
        local = sync.start() / "live"
        settled(sync, paths.steps)
        assert_cols_match_log(local, tmp_path / "a")  # the first copy
        writer.start()
        wait_until(lambda: len(StepLogTailer(local / "steps.msgpack").poll()) >= 1000, "live steps")
        sync._proc.kill()  # cut the link: the ssh client dies
        wait_until(lambda: sync.connects >= 2 and sync.link_down_since is None, "reconnect")
        wait_until(lambda: len(StepLogTailer(local / "steps.msgpack").poll()) >= 2000, "more live steps")
        for pid in _sshd_sessions(sshd):  # cut it from the server's side
            os.kill(pid, 9)
        wait_until(lambda: sync.connects >= 3 and sync.link_down_since is None, "reconnect 2")
        writer.join(60)
        assert not writer.is_alive()
        settled(sync, paths.steps)
        assert [r["step"] for r in read_steplog(local / "steps.msgpack")[0]] == list(range(1, total + 1))
        assert_cols_match_log(local, tmp_path / "b")
        assert sync.columns is not None and sync.columns.end == paths.steps.stat().st_size
        assert sync.columns.rebuilds == 0 and not sync.columns.broken
        assert not (local / "steps.cols").samefile(paths.root / "steps.cols")
        assert "steps.cols" not in sync.payload_by_file  # built here, never copied
    finally:
        stop.set()
        writer.join(10)
        os.close(fd)
        sync.close()


def test_side_file_after_a_resume_truncates_the_remote_log(remote_env, tmp_path):
    runs = tmp_path / "runs"
    paths = make_run(runs, "r", 1500, status="running")
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.1, box=False)
    try:
        local = sync.start() / "r"
        settled(sync, paths.steps)
        assert_cols_match_log(local, tmp_path / "a")
        # a resume from step 1000: the log is cut there (it shrinks), and steps 1001.. are written
        # again, with other values
        sent = sync.payload_by_file["steps.msgpack"]
        truncate_after_step(paths.steps, 1000)
        cut = paths.steps.stat().st_size
        wait_until(lambda: (local / "steps.msgpack").stat().st_size == cut, "the shrink mirrored")
        assert sync.payload_by_file["steps.msgpack"] == sent + cut  # sent again from 0
        w = LiveWriter(paths, seed=7)
        for step in range(1001, 1601):
            w.write(step)
        w.close()
        settled(sync, paths.steps)
        assert_cols_match_log(local, tmp_path / "b")
        assert not sync.columns.broken
        # between two sessions the remote log is replaced by another run's, longer (the remote loop
        # sees the bytes before the mirror's offset differ and sends it again from 0)
        sync.close()
        make_run(tmp_path / "other", "r", 1800, seed=5)
        os.replace(tmp_path / "other" / "r" / "steps.msgpack", paths.steps)
        again = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.1, box=False)
        try:
            again.start()
            settled(again, paths.steps)
            assert again.payload_by_file["steps.msgpack"] == paths.steps.stat().st_size
            assert_cols_match_log(local, tmp_path / "c")
        finally:
            again.close()
    finally:
        sync.close()


def test_a_mirror_left_without_a_side_file_gets_one_and_a_stale_one_is_rebuilt(remote_env, tmp_path):
    runs = tmp_path / "runs"
    paths = make_run(runs, "old", 2000)
    url = f"ssh://rlhf-test{runs}"
    older = RemoteSync(parse_target(url), interval=0.2, box=False, columns=False)  # as an older monitor
    local = older.start() / "old"
    older.close()
    assert not (local / "steps.cols").exists()
    nxt = RemoteSync(parse_target(url), interval=0.2, box=False)
    try:
        nxt.start()  # nothing new to copy: built from the mirror as it is, before the monitor opens
        assert nxt.payload_by_file.get("steps.msgpack", 0) == 0
        assert nxt.columns is not None and nxt.columns.end == paths.steps.stat().st_size
        assert_cols_match_log(local, tmp_path / "a")
    finally:
        nxt.close()
    # a side file of another log (the mirror's log replaced behind its back): rebuilt, not continued
    other = tmp_path / "other"
    make_run(other, "old", 2000, seed=3)
    (local / "steps.cols").write_bytes(Path(columns_path(other / "old" / "steps.msgpack")).read_bytes())
    third = RemoteSync(parse_target(url), interval=0.2, box=False)
    try:
        third.start()
        assert third.columns is not None and third.columns.rebuilds == 1
        assert_cols_match_log(local, tmp_path / "b")
    finally:
        third.close()
