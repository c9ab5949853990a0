"""Data-parallel PPO on torchrun (two processes, gloo, this CPU box): one shared 2-process run
with a slow last rank, a 1-process run of the same global batch, and one 2-process run killed
mid-run and resumed. What a user checks: the run dir is complete with per-rank fields, the
numbers match one process within the stated tolerance and two 2-process runs bitwise, a killed
rank crashes the run cleanly and it resumes bitwise, the straggler alert names the slow rank."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from protocol.catalogue import RANK_FIELDS, STAGES, check_record, deterministic_fields
from protocol.rundir import RunPaths, read_events, read_manifest
from protocol.steplog import read_steplog

pytestmark = pytest.mark.slow

# a tiny config (as tests/trainerd/test_hardening.py's TINY) whose last rank sleeps from step 2
TINY2 = {
    "preset": "smoke",
    "steps": 8,
    "checkpoint_every": 3,
    "sft_steps": 20,
    "rm_steps": 20,
    "profile_steps": "2:3",
    "inject": "slow_rank@2",
}
# 2 processes vs 1 process of the same global batch: every deterministic field within this
# relative tolerance (with an absolute floor for values near 0, e.g. kl at step 1 ~ 1e-5)
REL_TOL, ABS_TOL = 1e-4, 1e-6


def _toml(path: Path, cfg: dict) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(paths: RunPaths) -> list[dict]:
    return read_steplog(paths.steps)[0]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory, trainerd_cli):
    """(2-process run, 1-process run, config file), each run once for the module."""
    d = tmp_path_factory.mktemp("dp")
    cfg = _toml(d / "tiny2.toml", TINY2)
    two = trainerd_cli(
        "start", "--config", str(cfg), "--foreground", "--runs-dir", str(d), "--run-id", "two", "--nproc-per-node", "2",
        timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = trainerd_cli(
        "start", "--config", str(cfg), "--foreground", "--runs-dir", str(d), "--run-id", "one", timeout=120
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return RunPaths(d / "two"), RunPaths(d / "one"), cfg


def test_two_process_run_writes_a_complete_run_dir_with_per_rank_fields(dp_runs):
    two, _, _ = dp_runs
    m = read_manifest(two)
    assert m["status"] == "finished" and m["distributed"]["world_size"] == 2
    assert m["distributed"]["backend"] == "gloo"
    beat = json.loads(two.heartbeat.read_text())  # rank 0 alone beats (not the launcher, run.json's pid)
    assert beat["pid"] != m["pid"] and beat["phase"] == "ppo"
    recs = _records(two)
    assert [r["step"] for r in recs] == list(range(1, TINY2["steps"] + 1))
    for r in recs:
        assert check_record(r) == []
        assert r["world_size"] == 2 and r["batch_size"] == 64  # the global batch, not a rank's share
        for key in RANK_FIELDS:
            assert key in r, key
        assert set(r["rank_step_time_s"]) == {"0", "1"}
        assert {f"{rank}.{s}" for rank in "01" for s in STAGES} == set(r["rank_stage_s"])
        for rank in "01":  # compute (in the stages, outside collectives) + collectives <= the step time
            total = r["rank_compute_s"][rank] + r["rank_comm_s"][rank]
            assert 0 < r["rank_compute_s"][rank] and total <= r["rank_step_time_s"][rank] * (1 + 1e-6)
    # every step checkpointed on schedule, each checkpoint holding both ranks' RNG states
    import torch

    state = torch.load(two.checkpoints / "step_000006" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two.tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"world_size", "comm_s", "rank_compute_s/1", "rank_stage_s/1.rollout"} <= tags
    # one profile per rank
    assert (two.profile / "summary.csv").is_file()
    assert (two.profile / "rank_1" / "summary.csv").is_file()
    assert (two.profile / "rank_1" / "chrome_trace.json").is_file()


def test_two_processes_match_one_process_of_the_same_global_batch(dp_runs):
    two, one, _ = dp_runs
    a, b = _records(one), _records(two)
    assert len(a) == len(b) == TINY2["steps"]
    worst = 0.0
    for x, y in zip(a, b):
        for k in deterministic_fields():
            if k not in x or k == "world_size":
                continue
            assert k in y, k
            if isinstance(x[k], int):
                assert x[k] == y[k], (x["step"], k)
                continue
            assert math.isclose(x[k], y[k], rel_tol=REL_TOL, abs_tol=ABS_TOL), (x["step"], k, x[k], y[k])
            worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-3))
    # the samples are the same draws (sampling keyed by the global sample index)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    print(f"2 vs 1 process: worst relative difference {worst:.2e}")


def test_slow_rank_raises_the_straggler_alert_naming_the_rank_and_stage(dp_runs):
    two, _, _ = dp_runs
    alerts = [e for e in read_events(two) if e.get("event") == "alert" and e.get("rule") == "straggler"]
    assert alerts, "no straggler alert"
    a = alerts[0]
    assert a["compared"]["rank"] == 1.0 and a["value"] > 1.25
    assert "rank 1" in a["message"] and "rollout" in a["message"]
    # the injection starts at step 2; 5 slow steps in a row fire it (step 1 may already count on
    # a busy machine, whose noise can make either rank slower for a step)
    assert a["first_step"] <= 2 and a["step"] <= 6


def test_resume_with_another_world_size_is_refused_in_one_line(dp_runs, trainerd_cli):
    two, _, _ = dp_runs
    p = trainerd_cli("resume", str(two.root), "--nproc-per-node", "1", "--foreground", timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained with 2 processes" in lines[0], p.stderr


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TRAINERD_LAUNCHER_PID={launcher_pid}".encode() in env and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def test_a_killed_rank_crashes_the_run_and_the_resume_is_bitwise_the_uninterrupted_run(dp_runs, trainerd_cli):
    two, _, cfg = dp_runs
    runs = two.root.parent
    p = trainerd_cli(
        "start", "--config", str(cfg), "--runs-dir", str(runs), "--run-id", "killed", "--nproc-per-node", "2",
        timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    paths = RunPaths(runs / "killed")
    try:
        launcher = int(read_manifest(paths)["pid"])  # the launcher holds the lock: `stop` signals it
        assert paths.pid_file.read_text().strip() == str(launcher)
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline:  # after the checkpoint at step 3
            if paths.steps_jsonl.exists() and paths.steps_jsonl.read_text().count("\n") >= 4:
                victim = _rank_pid(launcher, 1)
                break
            time.sleep(0.05)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        w = trainerd_cli("wait", str(paths.root), timeout=120)
        assert w.returncode != 0
        assert read_manifest(paths)["status"] == "crashed"
        crashed = [e for e in read_events(paths) if e.get("event") == "crashed"]
        assert len(crashed) == 1 and crashed[0]["rank"] == 1, crashed
        assert "SIGKILL" in crashed[0]["error"]
        assert _rank_pid(launcher, 0) is None  # no rank left behind

        r = trainerd_cli("resume", str(paths.root), timeout=60)
        assert r.returncode == 0, r.stderr
        w = trainerd_cli("wait", str(paths.root), timeout=150)
        assert w.returncode == 0, (w.stdout, w.stderr, paths.log.read_text()[-3000:])
    finally:
        trainerd_cli("stop", str(paths.root), timeout=150)
    a, b = _records(two), _records(paths)
    assert [r["step"] for r in b] == list(range(1, TINY2["steps"] + 1))  # no gap, no duplicate
    fields = deterministic_fields()
    for x, y in zip(a, b):  # bitwise: the uninterrupted 2-process run and the killed-and-resumed one
        assert {k: x.get(k) for k in fields} == {k: y.get(k) for k in fields}, x["step"]
    checks = [e for e in read_events(paths) if e.get("event") == "resume_check"]
    assert checks and checks[-1]["identical"] is True


def test_two_nodes_over_loopback_compute_the_same_steps_bitwise(dp_runs, trainerd_cli, tmp_path):
    """Multi-node: two torchrun agents (`--nnodes 2`, one process each) meet at 127.0.0.1; node 0
    writes the run dir, node 1 nothing; ranks are numbered node by node, so the steps are the
    single-node 2-process run's, bit for bit (the first 3 steps: still in the LR warm-up, where
    the total step count does not matter)."""
    import socket
    import subprocess
    import sys

    two, _, _ = dp_runs
    cfg = _toml(tmp_path / "mn.toml", {**TINY2, "steps": 3, "profile_steps": "", "inject": ""})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    group = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    node1 = subprocess.Popen(
        [sys.executable, "-m", "trainerd", "start", *group, "--node-rank", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        node0 = trainerd_cli(
            "start", "--config", str(cfg), "--foreground", "--runs-dir", str(tmp_path), "--run-id", "mn",
            *group, "--node-rank", "0", timeout=150,
        )  # fmt: skip
        out1, _ = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, out1[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "mn", "mn.toml"]  # one run dir, node 0's
    assert "joining the group" in out1
    mn = RunPaths(tmp_path / "mn")
    assert read_manifest(mn)["distributed"]["world_size"] == 2
    fields = deterministic_fields()
    for x, y in zip(_records(two)[:3], _records(mn), strict=True):
        assert {k: x.get(k) for k in fields} == {k: y.get(k) for k in fields}, x["step"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
        (["--nproc-per-node", "3"], "batch_size 64 must be divisible by the 3 processes"),
        (["--nnodes", "2", "--nproc-per-node", "1"], "--rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1"], "--node-rank must be in 0..1"),
        (["--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "nohostport"], "HOST:PORT"),
    ],
)
def test_bad_group_options_are_one_line_errors_before_anything_is_created(tmp_path, trainerd_cli, args, words):
    p = trainerd_cli("start", "--smoke", "--foreground", "--runs-dir", str(tmp_path / "runs"), *args, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert not (tmp_path / "runs").exists()
