"""The writer's heartbeat (trainerd/run/heartbeat.py): the `heartbeat` file of a run dir is
rewritten every few seconds from the start of a run (setup included) to its end, and never
after; a failed write never reaches training; no random generator is touched."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from protocol.rundir import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TIMEOUT_S,
    RunPaths,
    create_run,
    read_manifest,
)
from trainerd.run.heartbeat import INTERVAL_ENV, Heartbeat, heartbeat_interval

# A short run with a setup long enough to be seen (warm start and reward model).
SHORT = """preset = "smoke"
steps = 6
checkpoint_every = 3
sft_steps = 40
rm_steps = 40
profile_steps = ""
"""
FAST_BEAT_S = 0.2


def read_beat(paths: RunPaths) -> dict:
    return json.loads(paths.heartbeat.read_text())


def wait_until(what: str, ready, timeout: float = 120.0, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_viewer_timeout_is_many_beats():
    assert HEARTBEAT_TIMEOUT_S >= 20 * HEARTBEAT_INTERVAL_S


def test_the_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert heartbeat_interval() == HEARTBEAT_INTERVAL_S
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert heartbeat_interval() == 0.5
    for bad in ("", "soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        assert heartbeat_interval() == HEARTBEAT_INTERVAL_S, bad


def test_beats_until_stopped_and_says_the_phase_and_step(tmp_path):
    paths = create_run(tmp_path, "r")
    states = (random.getstate(), torch.get_rng_state())
    beat = Heartbeat(paths, log=lambda msg: None, interval=0.05).start()
    try:
        first = wait_until("the first beat", lambda: paths.heartbeat.exists() and read_beat(paths))
        assert first["phase"] == "setup" and "last_step" not in first
        assert first["host"] and first["pid"] > 0 and first["interval_s"] == 0.05
        beat.note(phase="ppo", last_step=3)
        later = wait_until("a later beat", lambda: (b := read_beat(paths))["time"] > first["time"] and b)
        later = wait_until("the noted step", lambda: (b := read_beat(paths)).get("last_step") == 3 and b)
        assert later["phase"] == "ppo"
    finally:
        beat.stop()
    last = paths.heartbeat.read_bytes()
    time.sleep(0.3)
    assert paths.heartbeat.read_bytes() == last  # stopped: no beat after stop() returned
    assert [p.name for p in paths.root.iterdir() if p.name.endswith(".tmp")] == []
    assert (random.getstate(), torch.get_rng_state().tolist()) == (states[0], states[1].tolist())


def test_a_write_that_fails_is_said_once_and_never_raised(tmp_path):
    paths = create_run(tmp_path, "r")
    paths.heartbeat.mkdir()  # not a regular file: every beat is refused
    said: list[str] = []
    beat = Heartbeat(paths, log=said.append, interval=0.02).start()
    time.sleep(0.3)
    beat.stop()
    assert len(said) == 1 and "heartbeat" in said[0] and "training goes on" in said[0]
    assert paths.heartbeat.is_dir()


def test_a_real_run_beats_from_its_setup_to_its_end_and_not_after(tmp_path, trainerd_cli):
    runs = tmp_path / "runs"
    cfg = tmp_path / "short.toml"
    cfg.write_text(SHORT)
    env = {INTERVAL_ENV: str(FAST_BEAT_S)}
    r = trainerd_cli("start", "--config", str(cfg), "--runs-dir", str(runs), "--run-id", "beat", env_extra=env)
    assert r.returncode == 0, r.stderr
    paths = RunPaths(Path(r.stdout.strip()))

    def first_beat():
        try:
            return read_beat(paths), paths.steps.exists() and paths.steps.stat().st_size > 0
        except (OSError, ValueError):  # not there yet
            return None

    first, steps_written = wait_until("the first beat", first_beat, poll_s=0.02)
    assert not steps_written, "the heartbeat starts with the run's setup, before the first step"
    assert first["pid"] == read_manifest(paths)["pid"]
    # alive: the beat moves on (reads a second apart, while run.json says running)
    times = [first["time"]]
    while read_manifest(paths)["status"] == "running" and len(times) < 3:
        time.sleep(1.0)
        times.append(read_beat(paths)["time"])
    assert len(times) == 3 and times[0] < times[1] < times[2], times

    r = trainerd_cli("wait", str(paths.root))
    assert r.returncode == 0, r.stderr + r.stdout
    assert read_manifest(paths)["status"] == "finished"
    last = read_beat(paths)
    assert last["phase"] == "ppo" and 1 <= last["last_step"] <= 6  # as of the last beat (a beat may miss the end)
    mtime = paths.heartbeat.stat().st_mtime_ns
    time.sleep(5 * FAST_BEAT_S)
    assert read_beat(paths) == last and paths.heartbeat.stat().st_mtime_ns == mtime  # the run ended: no beat


def test_status_says_a_slow_step_is_alive_by_its_heartbeat(tmp_path):
    """`trainerd status` of a running run whose last record is minutes old: the trainer is
    alive if its heartbeat is fresh (a long step, a warm start), and says what it does."""
    import os

    from protocol.rundir import RunLock, new_manifest, write_manifest
    from trainerd.cli import _liveness_line, run_status

    paths = create_run(tmp_path / "runs", "slow")
    m = new_manifest(paths, {"steps": 100}, 0, {}, {})
    m.update(status="running", pid=os.getpid(), started_at=time.time() - 400)
    write_manifest(paths, m)
    lock = RunLock(paths).acquire()
    try:
        # status reads the tail of the JSONL mirror the trainer writes beside the step log
        with open(paths.steps_jsonl, "w") as f:
            for step in range(1, 41):
                f.write(json.dumps({"step": step, "time": time.time() - 400 + 5 * step}) + "\n")  # the last 200 s ago
        paths.heartbeat.write_text(json.dumps({"time": time.time() - 1, "phase": "ppo", "last_step": 40}))
        info = run_status(paths)
        assert info["status"] == "running" and info["heartbeat"]["phase"] == "ppo"
        line = _liveness_line(info)
        assert (
            line.startswith("no new step for 3m") and "the trainer is alive: heartbeat 0m01s ago (ppo, step 40)" in line
        )
        # a fresh step: both said, plainly
        paths.heartbeat.write_text(json.dumps({"time": time.time(), "phase": "ppo", "last_step": 40}))
        with open(paths.steps_jsonl, "a") as f:
            f.write(json.dumps({"step": 41, "time": time.time()}) + "\n")
        assert _liveness_line(run_status(paths)).startswith("last record 0m0")
        # a heartbeat that cannot be trusted is no heartbeat; the status still answers
        for bad in (b"not json", b'{"phase": "ppo"}', b'{"time": "soon"}', b"[1, 2]"):
            paths.heartbeat.write_bytes(bad)
            info = run_status(paths)
            assert info["heartbeat"] is None and "no heartbeat file" in _liveness_line(info)
        paths.heartbeat.unlink()
        os.mkfifo(paths.heartbeat)  # never opened for reading (it would block)
        assert run_status(paths)["heartbeat"] is None
    finally:
        lock.release()
