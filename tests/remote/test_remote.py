"""Remote runs over plain SSH (tui/remote.py), through a real OpenSSH server on loopback.

The monitor reads a run written on the "remote" side (the same machine, reached over sshd):
the records on screen are exactly the records on disk, also after the link is cut (the ssh
client killed, then the server's session killed) and restored. Bad inputs answer in one line,
in bounded time; shell metacharacters in the remote path are never run.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tui"))
from tui_helpers import LiveWriter, make_run, rendered, wait_for  # noqa: E402

from protocol.rundir import (  # noqa: E402
    HEARTBEAT_FILE,
    HEARTBEAT_TIMEOUT_S,
    SIGN_OF_LIFE_FILES,
    write_json_atomic,
    write_manifest,
)
from protocol.rundir import read_manifest as rundir_manifest  # noqa: E402
from protocol.steplog import StepLogTailer  # noqa: E402
from tui.app import MonitorApp  # noqa: E402
from tui.remote import RemoteError, RemoteSync, attach, parse_target  # noqa: E402
from tui.screens import RunPickerScreen  # noqa: E402
from tui.widgets.panels import AlertBanner, RunHeader  # noqa: E402
from tui.widgets.verify import VerifyPanel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SIZE = (160, 50)


@pytest.fixture
def remote_env(sshd, tmp_path, monkeypatch):
    for k, v in sshd.ssh_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return dict(os.environ)


def steps_on_disk(path: Path) -> list[int]:
    return [r["step"] for r in StepLogTailer(path).poll(10**6)]


def test_parse_target():
    assert parse_target("ssh://gpu-box/runs") == parse_target("ssh://gpu-box/runs/")
    t = parse_target("ssh://gpu-box/runs")
    assert (t.host, t.path, t.user, t.port) == ("gpu-box", "/runs", None, None)
    t = parse_target("ssh://me@gpu-box:2222/~/runs")
    assert (t.host, t.path, t.user, t.port) == ("gpu-box", "runs", "me", 2222)
    assert parse_target("ssh://gpu-box/~").path == "."
    assert parse_target("ssh://gpu-box/a%20b").path == "/a b"
    for bad in ("ssh://", "ssh://h:99999/x", "ssh://-oProxyCommand=x/y", "ssh://h:x/y"):
        with pytest.raises(RemoteError):
            parse_target(bad)


def _tui(url: str, env: dict, timeout: float = 40) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "tui.cli", url],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL,
    )
    return out, time.monotonic() - t


def test_bad_inputs_answer_in_one_line(remote_env, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cases = {
        "ssh://no-such-host.invalid/runs": "Could not resolve hostname",
        "ssh://rlhf-badkey/tmp": "Permission denied",
        f"ssh://rlhf-test{runs}/nope": "no such remote path",
        "ssh://rlhf-notail/tmp": "no 'tail'",
        f"ssh://rlhf-test{runs}": "no runs in the remote path",
    }
    for url, expected in cases.items():
        out, took = _tui(url, remote_env)
        assert out.returncode == 2, (url, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in out.stderr, (url, out.stderr)
        assert took < 20, (url, took)


def test_metacharacters_in_the_remote_path_are_never_run(remote_env, tmp_path):
    marker = tmp_path / "pwned"
    out, _ = _tui(f"ssh://rlhf-test/x;touch {marker}", remote_env)
    assert out.returncode == 2 and "no such remote path" in out.stderr, out.stderr
    for evil in (f"/x$(touch {marker})", f"/x`touch {marker}`", f"/x' ; touch {marker}; '", '/x"; touch {marker}'):
        with pytest.raises(RemoteError, match="no such remote path"):
            RemoteSync(parse_target(f"ssh://rlhf-test{evil}")).start()
    assert not marker.exists()
    # a real runs dir with such a name is watched like any other
    odd = tmp_path / f"runs;touch {marker} $(touch {marker})"
    make_run(odd, "r", 12)
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{odd}"), interval=0.2)
    try:
        local = sync.start()
        assert (local / "r" / "steps.msgpack").read_bytes() == (odd / "r" / "steps.msgpack").read_bytes()
    finally:
        sync.close()
    assert not marker.exists()


def _sshd_sessions(sshd) -> list[int]:
    """The per-connection sshd processes (children of the test's listening sshd)."""
    out = subprocess.run(["pgrep", "-P", str(sshd.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.asyncio
async def test_live_remote_run_survives_cut_links(remote_env, sshd, tmp_path):
    runs = tmp_path / "runs"
    paths = make_run(runs, "live", 5, status="running")
    w = LiveWriter(paths)
    total = 200
    stop = threading.Event()

    def write() -> None:  # ~8 s: the links are cut while it writes
        for step in range(6, total + 1):
            if stop.wait(0.04):
                return
            w.write(step)

    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.2)
    local = sync.start()
    app = MonitorApp(local, clock=sync.clock)
    attach(app, sync)
    links: list[str] = []
    on_link = sync.on_link
    sync.on_link = lambda text: (links.append(text), on_link(text))  # type: ignore[misc]
    writer = threading.Thread(target=write, daemon=True)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.drawn_step == 5, timeout=10, what="the first 5 steps")
            # alive by its heartbeat on the remote clock (the records' own times are old: stalled)
            assert "STALLED" in rendered(app.query_one(RunHeader))
            assert sync.writer_status(local / "live") == "running"
            writer.start()
            await wait_for(pilot, lambda: (app.drawn_step or 0) >= 40, timeout=15, what="live steps")
            sync._proc.kill()  # cut the link: the ssh client dies
            await wait_for(pilot, lambda: "down since" in app.model.link, timeout=5, what="link down")
            assert "down since" in rendered(app.query_one(AlertBanner))
            await wait_for(pilot, lambda: sync.connects >= 2 and not app.model.link, timeout=15, what="reconnect")
            seen = app.drawn_step or 0
            await wait_for(pilot, lambda: (app.drawn_step or 0) >= min(total, seen + 10), timeout=15, what="more steps")
            for pid in _sshd_sessions(sshd):  # cut it from the server's side
                os.kill(pid, 9)
            await wait_for(pilot, lambda: sync.connects >= 3 and not app.model.link, timeout=20, what="reconnect 2")
            writer.join(30)
            await wait_for(pilot, lambda: app.drawn_step == total, timeout=15, what="every step")
            await pilot.pause(0.3)
            on_disk = steps_on_disk(paths.steps)
            assert on_disk == list(range(1, total + 1))
            assert list(app.model.store.steps) == on_disk  # no record lost, none twice
            assert (local / "live" / "steps.msgpack").read_bytes() == paths.steps.read_bytes()
            assert any("down since" in x for x in links) and links[-1] == ""
    finally:
        stop.set()
        w.close()
        sync.close()


@pytest.mark.asyncio
async def test_picker_lists_remote_runs_and_verify_needs_trainerd_there(remote_env, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "first", 15, status="running")  # its files are fresh: running by its heartbeat
    make_run(runs, "second", 25)  # latest
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.2)
    local = sync.start()
    app = MonitorApp(local, clock=sync.clock)
    attach(app, sync)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.drawn_step == 25, timeout=10, what="the latest run")
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen))
            await wait_for(pilot, lambda: len(app.screen.rows) == 2, what="both remote runs listed")
            assert {r.run_id: r.status for r in app.screen.rows} == {"first": "running", "second": "finished"}
            await pilot.press("down", "enter")
            await wait_for(
                pilot, lambda: app.model.paths.run_id == "first" and app.drawn_step == 15, timeout=10, what="first"
            )
            assert sync.run_id == "first"
            # the session streams the run on screen only: another remote run is compared by
            # naming it on the command line, and the picker says how
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and len(app.screen.rows) == 2)
            other = next(i for i, r in enumerate(app.screen.rows) if r.run_id == "second")
            said = app.toggle_compare(app.screen.rows[other].paths)
            assert not app.comparison.active and f"ssh://rlhf-test{runs}/second" in said, said
            await pilot.press("escape")
            # the checks run on the remote box, and only if trainerd is there
            sync.target = dataclasses.replace(sync.target, host="rlhf-notail")
            await pilot.press("1")
            panel = app.query_one(VerifyPanel)
            await wait_for(pilot, lambda: bool(panel.last_result), timeout=15, what="the verify answer")
            assert panel.last_result["missing"]
            assert "not installed on rlhf-notail" in str(panel.query_one("#verify-output").render())
            # where trainerd is there: `trainerd verify m2 --json RUN` runs there, its JSON shown
            sync.target = dataclasses.replace(sync.target, host="rlhf-kit")
            sync._trainerd = None
            panel.last_result = None
            await pilot.press("2")
            await wait_for(pilot, lambda: bool(panel.last_result), timeout=15, what="the remote check's result")
            assert panel.last_result["rc"] == 0 and panel.last_result["data"]["passed"] is True
            assert panel.last_result["data"]["summary"] == f"remote args: verify m2 --json {runs}/first"
            assert "M2 PASS" in str(panel.query_one("#verify-output").render())
    finally:
        sync.close()


def test_a_new_session_resumes_from_the_mirror_and_notices_a_replaced_log(remote_env, tmp_path):
    runs = tmp_path / "runs"
    paths = make_run(runs, "r", 20)
    url = f"ssh://rlhf-test{runs}"
    first = RemoteSync(parse_target(url), interval=0.2)
    first.start()
    first.close()
    w = LiveWriter(paths)
    for step in range(21, 31):
        w.write(step)
    w.close()
    grown = paths.steps.stat().st_size
    before = (first.mirror / "r" / "steps.msgpack").stat().st_size
    again = RemoteSync(parse_target(url), interval=0.2)
    try:
        again.start()
        assert again.payload_by_file.get("steps.msgpack") == grown - before  # only the new bytes
        assert (again.mirror / "r" / "steps.msgpack").read_bytes() == paths.steps.read_bytes()
    finally:
        again.close()
    # the log replaced by one as long but different (a rewrite): sent again from 0
    data = bytearray(paths.steps.read_bytes())
    data[-5] ^= 0xFF
    paths.steps.write_bytes(bytes(data))
    third = RemoteSync(parse_target(url), interval=0.2)
    try:
        third.start()
        assert third.payload_by_file.get("steps.msgpack") == len(data)
        assert (third.mirror / "r" / "steps.msgpack").read_bytes() == bytes(data)
    finally:
        third.close()
    # two monitors of one address at once: the second gets a mirror of its own
    one, two = RemoteSync(parse_target(url), interval=0.2), RemoteSync(parse_target(url), interval=0.2)
    try:
        one.start()
        two.start()
        assert one.mirror != two.mirror
        assert (two.mirror / "r" / "steps.msgpack").read_bytes() == bytes(data)
    finally:
        one.close()
        two.close()
    assert not two.mirror.exists()


@pytest.mark.asyncio
async def test_follows_the_remote_latest_when_a_new_run_starts(remote_env, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "old", 10, status="running")
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.2)
    app = MonitorApp(sync.start(), clock=sync.clock)
    attach(app, sync)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.drawn_step == 10, timeout=10, what="the old run")
            make_run(runs, "new", 12, status="running")
            await wait_for(
                pilot,
                lambda: app.model.paths.run_id == "new" and app.drawn_step == 12,
                timeout=15,
                what="the switch to the new remote latest",
            )
            assert sync.run_id == "new"
    finally:
        sync.close()


def test_diff_of_a_local_and_a_remote_run(remote_env, tmp_path):
    from tui.compare import diff_runs

    local = make_run(tmp_path / "here", "a", 5)
    remote = make_run(tmp_path / "there", "b", 5)
    m = rundir_manifest(remote)
    m["config"]["kl_coef"] = 0.4
    write_manifest(remote, m)
    rc, text = diff_runs(str(local.root), f"ssh://rlhf-test{tmp_path / 'there'}")
    assert rc == 1 and "config.kl_coef" in text and "ssh://rlhf-test" in text, text


def test_heartbeat_by_the_remote_clock_and_not_crashed_by_a_down_link(tmp_path, monkeypatch):
    from tui import remote

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sync = RemoteSync(parse_target("ssh://gpu-box/runs"))
    sync.run_id = "r"
    now = 1_000_000.0
    sync.live = remote.Liveness(remote_now=now, local_at=time.monotonic(), newest=now - 10)
    assert abs(sync.clock() - now) < 1  # the remote clock, whatever the laptop's says
    assert sync.writer_status(sync.mirror / "r") == "running"
    sync.live.newest = now - remote.HEARTBEAT_TIMEOUT - 1
    assert sync.writer_status(sync.mirror / "r") == "crashed"
    sync.live = remote.Liveness(remote_now=now, local_at=time.monotonic() - 2 * remote.HEARTBEAT_TIMEOUT, newest=now)
    assert sync.writer_status(sync.mirror / "r") == "crashed"  # silent for long, link up: crashed
    sync.link_down_since = time.time()
    assert sync.writer_status(sync.mirror / "r") == "running"  # link down: as of the last word


def _age(paths, seconds: float, names=None) -> None:
    """Set the mtime of the run dir's files `seconds` into the past (default: all of them)."""
    then = time.time() - seconds
    for p in paths.root.iterdir():
        if p.is_file() and (names is None or p.name in names):
            os.utime(p, (then, then))


def test_a_fresh_heartbeat_keeps_a_run_with_old_files_running(remote_env, tmp_path):
    """A long stage writes nothing but the trainer's `heartbeat`: the remote loop counts it,
    for the followed run (T) and for the others (R/H); it is never mirrored."""
    runs = tmp_path / "runs"
    old = 3 * HEARTBEAT_TIMEOUT_S
    beating, silent, legacy = (make_run(runs, rid, 5, status="running") for rid in ("beating", "silent", "legacy"))
    for paths in (beating, silent):
        write_json_atomic(paths.heartbeat, {"time": time.time()}, root=paths.root)
    _age(beating, old, names=set(SIGN_OF_LIFE_FILES) - {HEARTBEAT_FILE})  # a long stage: only the beat is fresh
    _age(silent, old)  # the writer died: its heartbeat is as old as the rest
    _age(legacy, 10)  # a run from before the heartbeat: its other files decide, as they did
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.2, box=False)
    local = sync.start()
    try:
        for followed in ("beating", "silent", "legacy"):
            sync.follow(local / followed)
            others = {"beating", "silent", "legacy"} - {followed}
            wait_until(
                lambda rid=followed: sync.run_id == rid and sync.live.newest is not None, f"following {followed}"
            )
            wait_until(lambda rest=others: rest <= set(sync.live.others), "the other runs' times")
            assert sync.writer_status(local / "beating") == "running"
            assert sync.writer_status(local / "silent") == "crashed"
            assert sync.writer_status(local / "legacy") == "running"
            assert not (local / followed / HEARTBEAT_FILE).exists()  # stat'ed there, never mirrored
        write_json_atomic(silent.heartbeat, {"time": time.time()}, root=silent.root)  # it beats again
        wait_until(lambda: sync.writer_status(local / "silent") == "running", "the new beat")
    finally:
        sync.close()


def wait_until(ready, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_long_remote_log_is_copied_before_the_monitor_opens(remote_env, tmp_path):
    from tui import remote

    runs = tmp_path / "runs"
    paths = make_run(runs, "big", 13000, jsonl_mirror=False)
    size = paths.steps.stat().st_size
    assert size > 1.5 * remote.CHUNK_MAX, size
    seen: list[tuple[int, int]] = []
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=30)  # a long pause between polls
    try:
        t = time.monotonic()
        local = sync.start(progress=lambda have, total, *what: seen.append((have, total)))
        took = time.monotonic() - t
        assert (local / "big" / "steps.msgpack").read_bytes() == paths.steps.read_bytes()
        assert took < 20, took  # capped rounds follow each other without the 30 s pause
        assert all(total == size for _have, total in seen)
    finally:
        sync.close()
