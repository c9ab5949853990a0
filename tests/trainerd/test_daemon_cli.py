"""The daemon for real (start detached, status, stop, resume, wait) and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.jsonl import read_jsonl
from protocol.rundir import RunLock, RunPaths, read_events, read_manifest
from protocol.steplog import read_steplog

# A short run: small warm start and reward model, checkpoints every 5 steps.
FAST = """preset = "smoke"
steps = 25
checkpoint_every = 5
sft_steps = 20
rm_steps = 20
profile_steps = ""
"""


@pytest.fixture(autouse=True)
def _cli(trainerd_cli):
    global trainerd
    trainerd = trainerd_cli


trainerd = None  # set by the _cli fixture: the real CLI in a subprocess


def _fast_config(tmp_path: Path) -> Path:
    p = tmp_path / "fast.toml"
    p.write_text(FAST)
    return p


def _status(run: Path) -> dict:
    r = trainerd("status", str(run), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _wait_for_step(run: Path, step: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _status(run)
        if s["step"] >= step or s["status"] != "running":
            return s
        time.sleep(0.3)
    raise AssertionError(f"run did not reach step {step}")


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _assert_steps_exact(paths: RunPaths, n: int) -> None:
    recs, stats = read_steplog(paths.steps)
    assert stats.corrupt_frames == 0
    assert [r["step"] for r in recs] == list(range(1, n + 1))  # no gap, no duplicate
    assert [r["step"] for r in read_jsonl(paths.steps_jsonl)] == list(range(1, n + 1))


def test_daemon_lifecycle(tmp_path):
    runs = tmp_path / "runs"
    cfg = _fast_config(tmp_path)
    t0 = time.monotonic()
    r = trainerd("start", "--config", str(cfg), "--runs-dir", str(runs), "--run-id", "life")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 15  # returns at once (no torch import in the parent)
    run = Path(r.stdout.strip())
    assert run == (runs / "life").resolve()
    assert os.readlink(runs / "latest") == "life"
    paths = RunPaths(run)
    s = _status(run)
    assert s["status"] == "running" and s["pid"] != os.getpid()
    assert paths.pid_file.exists() or s["step"] == 0

    s = _wait_for_step(run, 3)
    assert s["status"] == "running"
    r = trainerd("stop", str(runs))  # RUN may be the runs dir: its latest
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("stopped")
    s = _status(run)
    assert s["status"] == "stopped"
    stopped_at = s["step"]
    assert 3 <= stopped_at < 25
    assert read_manifest(paths)["last_checkpoint"] == f"checkpoints/step_{stopped_at:06d}"
    # the text status names the state too
    assert "stopped" in trainerd("status", str(run)).stdout

    r = trainerd("resume", str(run))
    assert r.returncode == 0, r.stderr
    r = trainerd("wait", str(run))
    assert r.returncode == 0, r.stderr + r.stdout
    s = _status(run)
    assert s["status"] == "finished" and s["step"] == 25
    _assert_steps_exact(paths, 25)
    kinds = [e["event"] for e in read_events(paths)]
    assert kinds.count("started") == 1 and "stopped" in kinds and "resumed" in kinds
    assert kinds[-1] == "finished"
    assert "run" not in trainerd("status", str(run)).stderr


def test_sigkill_then_resume_recomputes_and_keeps_old_records(tmp_path):
    """A trainer killed after step 7 (checkpoint at 5) resumes from 5: steps 6..7 are cut,
    kept aside, recomputed identically; the final log has no gap and no duplicate."""
    runs = tmp_path / "runs"
    cfg = _fast_config(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainerd",
            "start",
            "--foreground",
            "--config",
            str(cfg),
            "--runs-dir",
            str(runs),
            "--run-id",
            "k",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    paths = RunPaths(runs / "k")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        recs, _ = read_steplog(paths.steps) if paths.steps.exists() else ([], None)
        if recs and recs[-1]["step"] >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_steplog(paths.steps)[0][-1]["step"]
    assert trainerd("status", str(paths.root), "--json").stdout.count('"crashed"') == 1
    r = trainerd("resume", str(paths.root), "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_steps_exact(paths, 25)
    resumed = [e for e in read_events(paths) if e["event"] == "resumed"][-1]
    k = resumed["step"]
    assert k == (killed_at // 5) * 5 and resumed["removed_steps"] == killed_at - k
    old = read_jsonl(paths.root / resumed["old_records"])
    assert [o["step"] for o in old] == list(range(k + 1, killed_at + 1))
    checks = [e for e in read_events(paths) if e["event"] == "resume_check"]
    if checks:  # written when trainerd/resume_check.py (M1) is present
        assert checks[-1]["result"] == "identical", checks[-1]
    new = {rec["step"]: rec for rec in read_steplog(paths.steps)[0]}
    for o in old:  # the recomputed steps are bitwise equal in every deterministic field
        n = new[o["step"]]
        for field in ("reward_mean", "kl", "policy_loss", "grad_norm", "kl_coef", "value_loss"):
            assert o[field].hex() == n[field].hex(), (o["step"], field)


# -- one clear line for every user error ----------------------------------------------------------


def test_bad_config_key_and_values(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rat = 0.1\n")
    line = _one_line_error(trainerd("start", "--config", str(bad), "--runs-dir", str(tmp_path / "r")))
    assert "unknown config key 'learning_rat'" in line
    bad.write_text("steps = 'many'\n")
    assert "steps must be an integer" in _one_line_error(trainerd("start", "--config", str(bad)))
    bad.write_text("steps = [\n")
    assert "not valid TOML" in _one_line_error(trainerd("start", "--config", str(bad)))
    assert "does not exist" in _one_line_error(trainerd("start", "--config", str(tmp_path / "none.toml")))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_missing_run(tmp_path):
    for cmd in ("status", "wait", "stop", "resume"):
        line = _one_line_error(trainerd(cmd, str(tmp_path / "nope")))
        assert "no such run" in line, line
    line = _one_line_error(trainerd("status", str(tmp_path)))
    # neither a kit run nor anything an adapter reads: one line naming what was looked for
    assert "nothing to read here" in line and "kit run dir" in line and "TensorBoard" in line, line


def test_locked_run_dir(trainer_smoke_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trainer_smoke_run.paths.root, run)
    with RunLock(RunPaths(run)):
        line = _one_line_error(trainerd("resume", str(run), "--foreground"))
    assert "locked" in line and str(os.getpid()) in line


def test_corrupt_checkpoint(trainer_smoke_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trainer_smoke_run.paths.root, run)
    state = run / "checkpoints" / "step_000060" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    line = _one_line_error(trainerd("resume", str(run), "--foreground", "--steps", "70"))
    assert "corrupt" in line and "step_000060" in line


def test_finished_run_refuses_resume_and_unknown_verify(trainer_smoke_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trainer_smoke_run.paths.root, run)
    line = _one_line_error(trainerd("resume", str(run), "--foreground"))
    assert "already finished" in line
    assert _one_line_error(trainerd("verify", "m9"))
    r = trainerd("wait", str(run))
    assert r.returncode == 0 and "finished" in r.stdout
