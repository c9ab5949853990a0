"""A run dir from someone else, or damaged: symlinks, FIFOs, huge or random files, hostile
values. Every protocol reader and writer must refuse what is not a regular file inside the
run dir (one line naming it, promptly, nothing written outside), skip what is too big, and
never crash on wrong types."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from protocol_helpers import make_record

from protocol import jsonl, steplog
from protocol.alerts import AlertEngine
from protocol.catalogue import check_record, stage_shares
from protocol.jsonl import MAX_LINE, JsonlTailer, JsonlWriter, LineStats, read_jsonl
from protocol.rundir import (
    RunDirError,
    RunLock,
    RunPaths,
    append_event,
    create_run,
    effective_status,
    find_runs,
    is_locked,
    lock_holder,
    new_manifest,
    pid_alive,
    read_events,
    read_manifest,
    read_manifest_checked,
    resolve_run,
    switch_latest,
    update_manifest,
    write_manifest,
)
from protocol.safeio import RunFileError, open_run_fd, open_run_file
from protocol.steplog import StepLogTailer, StepLogWriter, encode_frame, iter_frames, read_steplog
from protocol.text import safe_text

ROOT = Path(__file__).resolve().parents[2]
FILES = ("steps.msgpack", "steps.jsonl", "events.jsonl", "run.json", "trainerd.log")


def _run(tmp_path: Path, rid: str = "r1") -> RunPaths:
    paths = create_run(tmp_path / "runs", rid)
    write_manifest(paths, new_manifest(paths, {"lr": 1e-5}, 7, {}, {}))
    return paths


def _one_line(e: BaseException, *words: str) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _writes(paths: RunPaths, name: str) -> list[Callable[[], Any]]:
    """Every protocol call that writes `name`."""
    if name == "steps.msgpack":
        return [
            lambda: StepLogWriter(paths.steps).write(make_record(1)),
            lambda: steplog.truncate_after_step(paths.steps, 0),
        ]
    if name == "steps.jsonl":
        return [
            lambda: JsonlWriter(paths.steps_jsonl).write(make_record(1)),
            lambda: jsonl.truncate_after_step(paths.steps_jsonl, 0),
        ]
    if name == "events.jsonl":
        return [lambda: append_event(paths, "started", step=0)]
    if name == "run.json":
        return [
            lambda: write_manifest(paths, {"status": "finished"}),
            lambda: update_manifest(paths, status="finished"),
        ]
    return [lambda: open_run_file(paths, name, "ab").write(b"x"), lambda: open_run_file(paths, name, "wb")]


def _reads(paths: RunPaths, name: str) -> list[Callable[[], Any]]:
    """Every protocol call that reads `name` and reports a refusal by raising."""
    if name == "steps.msgpack":
        return [lambda: read_steplog(paths.steps), lambda: list(iter_frames(paths.steps))]
    if name in ("steps.jsonl", "events.jsonl"):
        return [lambda: read_jsonl(paths.root / name)] + (
            [lambda: read_events(paths)] if name == "events.jsonl" else []
        )
    if name == "run.json":
        return [lambda: read_manifest(paths)]
    return [lambda: open_run_file(paths, name, "rb").read(), lambda: open_run_file(paths, name, "r").read()]


def _tailer(paths: RunPaths, name: str) -> StepLogTailer | JsonlTailer | None:
    if name == "steps.msgpack":
        return StepLogTailer(paths.steps)
    if name in ("steps.jsonl", "events.jsonl"):
        return JsonlTailer(paths.root / name)
    return None


def _promptly(fn: Callable[[], Any], timeout: float = 5.0) -> BaseException | None:
    """Run fn in a thread; fail if it has not returned within `timeout` (it blocked)."""
    box: dict[str, BaseException | None] = {"exc": None}

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["exc"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "blocked"
    return box["exc"]


# -- symlinks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_symlinked_file_is_refused_for_write_and_read_and_nothing_outside_changes(tmp_path, name):
    paths = _run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious"
    target.write_bytes(b"precious bytes\n")
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    link = paths.root / name
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    for op in _writes(paths, name) + _reads(paths, name):
        with pytest.raises(RunDirError) as e:
            op()
        _one_line(e.value, name, "symlink")
    t = _tailer(paths, name)
    if t is not None:
        assert t.poll() == [] and t.error is not None
        _one_line(RunDirError(t.error), name, "symlink")
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    # a dangling link: nothing is created where it points
    link.unlink()
    link.symlink_to(outside / "new")
    for op in _writes(paths, name):
        with pytest.raises(RunDirError):
            op()
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_symlinked_lock_file_is_refused_and_probes_see_no_writer(tmp_path):
    paths = _run(tmp_path)
    target = tmp_path / "elsewhere.lock"
    target.write_bytes(b"")
    paths.lock_file.symlink_to(target)
    with pytest.raises(RunDirError) as e:
        RunLock(paths).acquire()
    _one_line(e.value, "trainerd.lock", "symlink")
    assert target.read_bytes() == b""
    assert not is_locked(paths) and lock_holder(paths) is None
    assert effective_status(read_manifest(paths), paths) == "crashed"


def test_symlinked_subdir_dotdot_and_outside_paths_are_refused(tmp_path):
    paths = _run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rmdir(paths.checkpoints)
    paths.checkpoints.symlink_to(outside)
    with pytest.raises(RunDirError) as e:
        open_run_file(paths, "checkpoints/meta.json", "wb")
    _one_line(e.value, "checkpoints", "symlink or not a directory")
    with pytest.raises(RunDirError):
        open_run_file(paths, paths.checkpoints / "meta.json", "rb")
    for bad in ("../outside/x", "tb/../../outside/x", str(outside / "x"), ""):
        with pytest.raises(RunDirError) as e:
            open_run_file(paths, bad, "ab")
        _one_line(e.value)
    assert list(outside.iterdir()) == []
    # a real subdir is fine, by relative name or by path
    with open_run_file(paths, "profile/a.txt", "w") as f:
        f.write("hi")
    with open_run_file(paths.root, paths.profile / "a.txt", "r") as f:
        assert f.read() == "hi"


def test_latest_link_still_works_and_switch_latest_refuses_a_real_latest(tmp_path):
    paths = _run(tmp_path, "a")
    runs = paths.root.parent
    switch_latest(runs, "a")
    via_latest = resolve_run(runs)
    assert via_latest.run_id == "latest"
    append_event(via_latest, "started", step=0)  # the run dir reached through `latest` is writable
    assert [e["event"] for e in read_events(via_latest)] == ["started"]
    assert read_steplog(via_latest.steps)[0] == []  # missing file: nothing yet
    os.unlink(runs / "latest")
    (runs / "latest").mkdir()
    with pytest.raises(RunDirError) as e:
        switch_latest(runs, "a")
    _one_line(e.value, "latest", "not a symlink")
    with pytest.raises(RunDirError):
        switch_latest(runs, "../x")


def test_hard_linked_file_is_read_but_never_written(tmp_path):
    paths = _run(tmp_path)
    other = tmp_path / "other.msgpack"
    other.write_bytes(encode_frame(make_record(1)))
    os.link(other, paths.steps)
    assert [r["step"] for r in read_steplog(paths.steps)[0]] == [1]
    with pytest.raises(RunDirError) as e:
        StepLogWriter(paths.steps)
    _one_line(e.value, "steps.msgpack", "hard links")
    assert other.read_bytes() == encode_frame(make_record(1))


# -- FIFOs, devices, directories -----------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_fifo_in_place_of_a_file_is_refused_promptly(tmp_path, name):
    paths = _run(tmp_path)
    p = paths.root / name
    p.unlink(missing_ok=True)
    os.mkfifo(p)
    for op in _reads(paths, name) + _writes(paths, name):
        exc = _promptly(op)
        assert isinstance(exc, RunDirError), exc
        _one_line(exc, name)
    t = _tailer(paths, name)
    if t is not None:
        assert _promptly(t.poll) is None
        assert t.error is not None and "FIFO" in t.error


def test_fifo_with_a_writer_attached_is_still_refused(tmp_path):
    paths = _run(tmp_path)
    os.mkfifo(paths.events)
    r = os.open(paths.events, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so a writer's open would succeed
    try:
        exc = _promptly(lambda: append_event(paths, "started"))
        assert isinstance(exc, RunDirError)
        _one_line(exc, "events.jsonl", "FIFO")
        assert os.read(r, 100) == b""
    finally:
        os.close(r)


def test_dev_zero_and_directory_in_place_of_a_file(tmp_path):
    paths = _run(tmp_path)
    paths.manifest.unlink()
    paths.manifest.symlink_to("/dev/zero")
    paths.steps.symlink_to("/dev/zero")
    for op in (lambda: read_manifest(paths), lambda: read_steplog(paths.steps)):
        exc = _promptly(op)
        assert isinstance(exc, RunDirError)
        _one_line(exc, "symlink")
    paths.steps_jsonl.mkdir()
    for op in (lambda: read_jsonl(paths.steps_jsonl), lambda: JsonlWriter(paths.steps_jsonl)):
        exc = _promptly(op)
        assert isinstance(exc, RunDirError)
        _one_line(exc, "steps.jsonl", "directory")


def test_refusal_is_also_an_oserror_and_missing_files_are_not_refusals(tmp_path):
    paths = _run(tmp_path)
    os.mkfifo(paths.log)
    with pytest.raises(OSError):  # older code catching OSError keeps working
        open_run_file(paths, "trainerd.log", "rb")
    with pytest.raises(RunFileError):
        open_run_fd(paths, "trainerd.log")
    with pytest.raises(FileNotFoundError):
        open_run_file(paths, "nothing.txt", "rb")
    assert read_jsonl(paths.events) == [] and read_events(paths) == []
    assert read_steplog(paths.steps)[0] == [] and list(iter_frames(paths.steps)) == []
    t = StepLogTailer(paths.steps)
    assert t.poll() == [] and t.error is None


# -- run.json: size, encoding, shape, field types -------------------------------------------------


def test_huge_random_or_odd_run_json_is_a_one_line_error(tmp_path):
    paths = _run(tmp_path)
    rng = random.Random(3)
    cases = {
        b"{" + b" " * (5 << 20) + b"}": "too large",
        bytes(rng.randrange(256) for _ in range(4096)): "corrupt",
        b'{"status": "running", "x": "\xff\xfe"}': "not UTF-8",
        b"[" * 200_000 + b"]" * 200_000: "",
        b"[1, 2]": "not a JSON object",
        b"": "not valid JSON",
        b'{"a": 1' + b"0" * 5000 + b"}": "not valid JSON",  # an int over Python's digit limit
    }
    for data, words in cases.items():
        paths.manifest.write_bytes(data)
        with pytest.raises(RunDirError) as e:
            read_manifest(paths)
        _one_line(e.value, "run.json", words)
    assert find_runs(paths.root.parent) == []


def test_manifest_fields_of_wrong_types_are_dropped_with_a_note(tmp_path):
    paths = _run(tmp_path)
    good = read_manifest(paths)
    hostile = dict(
        good,
        started_at="yesterday",
        ended_at=[1],
        last_step=2**64,
        pid=2**64,
        status=["running"],
        host=None,
        last_checkpoint=3,
        config="x",
    )
    paths.manifest.write_text(json.dumps(hostile))
    m, notes = read_manifest_checked(paths)
    for k in ("started_at", "ended_at", "last_step", "pid", "status", "host", "last_checkpoint", "config"):
        assert k not in m
        assert any(n.startswith(f"run.json: {k} ") for n in notes), (k, notes)
    assert m["run_id"] == "r1" and m["seed"] == 7
    assert effective_status(m, paths) == "unknown"
    for bad in (-1, True, 1.5, "3"):
        paths.manifest.write_text(json.dumps(dict(good, last_step=bad, started_at=1e300)))
        m = read_manifest(paths)
        assert "last_step" not in m and "started_at" not in m
    paths.manifest.write_text(json.dumps(dict(good, started_at=100, ended_at=None, last_step=0)))
    m = read_manifest(paths)
    assert m["started_at"] == 100.0 and isinstance(m["started_at"], float) and m["ended_at"] is None
    # runs with hostile start times still sort
    other = _run(tmp_path, "r2")
    other.manifest.write_text(json.dumps(dict(good, run_id="r2", started_at="soon")))
    assert sorted(r.run_id for r in find_runs(paths.root.parent)) == ["r1", "r2"]
    assert not pid_alive(2**64) and not pid_alive(-1) and not pid_alive("1")


# -- JSONL line limit ------------------------------------------------------------------------------


def test_a_9_mib_events_line_is_skipped_and_later_lines_are_read(tmp_path):
    paths = _run(tmp_path)
    append_event(paths, "started", step=0)
    with open(paths.events, "ab") as f:
        f.write(b'{"event": "junk", "x": "' + b"a" * (9 << 20) + b'"}\n')
    append_event(paths, "checkpoint", step=5)
    append_event(paths, "finished", step=10)
    stats = LineStats()
    assert [e["event"] for e in read_events(paths, stats)] == ["started", "checkpoint", "finished"]
    assert stats.long_lines == 1 and stats.bad_lines == 1
    t = JsonlTailer(paths.events)
    got: list[dict] = []
    for _ in range(5):  # a poll reads a bounded amount; a few polls get everything
        got += t.poll()
    assert [e["event"] for e in got] == ["started", "checkpoint", "finished"]
    assert t.long_lines == 1 and t.bad_lines == 1


def test_a_long_line_being_written_is_counted_once_and_the_tailer_moves_on(tmp_path):
    p = tmp_path / "events.jsonl"
    w = JsonlWriter(p)
    w.write({"event": "a"})
    t = JsonlTailer(p)
    assert [e["event"] for e in t.poll()] == ["a"]
    with open(p, "ab") as f:
        f.write(b'{"x": "' + b"b" * (MAX_LINE + 10))  # no newline yet
    assert t.poll() == [] and t.long_lines == 1
    with open(p, "ab") as f:
        f.write(b"b" * (3 << 20))
    assert t.poll() == [] and t.long_lines == 1
    with open(p, "ab") as f:
        f.write(b'"}\n')
    w.write({"event": "c"})
    assert [e["event"] for e in t.poll()] == ["c"] and t.long_lines == 1 and t.bad_lines == 1
    with pytest.raises(ValueError, match="line limit"):
        w.write({"x": "y" * (MAX_LINE + 1)})
    w.close()


def test_deeply_nested_jsonl_line_is_a_bad_line_not_a_crash(tmp_path):
    p = tmp_path / "steps.jsonl"
    p.write_bytes(b"[" * 500_000 + b"\n" + b'{"step": 1}\n')
    stats = LineStats()
    assert read_jsonl(p, stats=stats) == [{"step": 1}] and stats.bad_lines == 1


def test_jsonl_truncate_passes_over_a_long_line(tmp_path):
    p = tmp_path / "steps.jsonl"
    p.write_bytes(b'{"step": 1}\n' + b"z" * (2 << 20) + b'\n{"step": 2}\n{"step": 3}\n')
    removed = jsonl.truncate_after_step(p, 1)
    assert [r["step"] for r in removed] == [2, 3]
    assert p.read_bytes() == b'{"step": 1}\n'


# -- hostile values in records ---------------------------------------------------------------------


def test_extreme_steps_do_not_crash_readers_and_are_flagged(tmp_path):
    paths = _run(tmp_path)
    recs = [make_record(1), dict(make_record(2), step=2**64 - 1), dict(make_record(3), step=-5)]
    with StepLogWriter(paths.steps) as w:
        for r in recs:
            w.write(r)
    got, stats = read_steplog(paths.steps)
    assert [r["step"] for r in got] == [1, 2**64 - 1, -5] and stats.corrupt_frames == 0
    assert check_record(got[0]) == []
    assert any("out of range" in p for p in check_record(got[1]))
    assert any("out of range" in p for p in check_record(got[2]))
    engine = AlertEngine()
    for r in got + [dict(make_record(4), kl=10**400, step="x"), {"step": None}]:
        engine.update(r)
    assert "non_finite" in engine.open  # an int too large for a float is not finite
    assert stage_shares({"rollout": 10**400, "reward": 1.0}) == {"rollout": 0.0, "reward": 1.0}
    removed = steplog.truncate_after_step(paths.steps, 1)
    assert [r["step"] for r in removed] == [2**64 - 1, -5]
    with JsonlWriter(paths.steps_jsonl) as jw:
        jw.write(dict(make_record(1), step=10**30))
    (rec,) = read_jsonl(paths.steps_jsonl)
    assert any("out of range" in p for p in check_record(rec))


# -- terminal safety --------------------------------------------------------------------------------


def test_safe_text_escapes_terminal_controls():
    assert safe_text("a\x1b]2;pwned\x07b") == "a\\x1b]2;pwned\\x07b"  # OSC 2: set the window title
    assert safe_text("\x1b[2J\x1b[H") == "\\x1b[2J\\x1b[H"  # clear screen, home
    assert safe_text("x\x9b31my\x9dz") == "x\\x9b31my\\x9dz"  # C1 CSI and OSC
    assert safe_text("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    assert safe_text("\u2066a\u2069\u200f") == "\\u2066a\\u2069\\u200f"
    assert safe_text("a\nb\tc\rd\x00\x7f") == "a\\nb\\tc\\rd\\x00\\x7f"
    assert safe_text("caf\u00e9 \u2014 \U0001f600 \\x1b") == "caf\u00e9 \u2014 \U0001f600 \\x1b"  # unchanged
    assert safe_text(b"\xff\x1bok") == "\\xff\\x1bok"
    assert safe_text("\udcff") == "\\udcff"  # a lone surrogate would raise when printed
    assert safe_text(None) == "None" and safe_text(3.5) == "3.5" and safe_text(["\x1b"]) == "['\\x1b']"
    assert safe_text("abcdef", 4) == "abc…" and safe_text("abcd", 4) == "abcd" and safe_text("ab", 0) == ""
    assert safe_text("\x1b\x1b\x1b", 6) == "\\x1b…"  # an escape is never cut in half
    assert safe_text("ab\x1b", 6) == "ab\\x1b"
    s = safe_text("\x1b" * 1000 + "z", 50)
    assert len(s) <= 50 and s.endswith("…")
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in safe_text(bytes(range(256))))


def test_error_messages_escape_hostile_file_names(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    evil = runs / "r\x1b]2;owned\x07"
    evil.mkdir()
    (evil / "run.json").write_bytes(b"\xff")
    with pytest.raises(RunDirError) as e:
        read_manifest(evil)
    msg = _one_line(e.value, "\\x1b]2;owned\\x07")
    assert "\x1b" not in msg and "\x07" not in msg
    with pytest.raises(RunDirError):
        create_run(runs, "bad\x1bid")


# -- liveness from the lock -----------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from protocol.rundir import RunLock, RunPaths
    lock = RunLock(RunPaths(Path(sys.argv[1]))).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_liveness_is_the_lock_not_the_pid(tmp_path):
    paths = _run(tmp_path)
    m = read_manifest(paths)
    assert m["status"] == "running" and pid_alive(os.getpid())
    assert effective_status(dict(m, pid=os.getpid()), paths) == "crashed"  # live but unrelated pid
    assert not paths.lock_file.exists()  # probing created nothing
    assert lock_holder(paths) is None and not paths.lock_file.exists()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(paths.root)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert effective_status(dict(m, pid=12345678), paths) == "running"  # whatever the pid says
        assert lock_holder(paths) == proc.pid
        assert paths.lock_file.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert effective_status(m, paths) == "crashed"
    assert lock_holder(paths) is None  # the pid is still in the file, but the lock is free
    with RunLock(paths):
        assert lock_holder(paths) == os.getpid()
    assert lock_holder(paths) is None


def test_probing_a_read_only_run_dir_creates_nothing(tmp_path):
    paths = _run(tmp_path)
    before = sorted(os.listdir(paths.root))
    os.chmod(paths.root, 0o555)
    try:
        assert effective_status(read_manifest(paths), paths) == "crashed"
        assert not is_locked(paths) and lock_holder(paths) is None
        assert read_events(paths) == [] and read_steplog(paths.steps)[0] == []
    finally:
        os.chmod(paths.root, 0o755)
    assert sorted(os.listdir(paths.root)) == before
