"""`trainerd status` tells the truth about a run's past, not only what is open now."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from protocol.rundir import append_event, create_run, new_manifest, write_manifest


def status(run, tmp_path, *extra):
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "trainerd", "status", str(run), *extra], capture_output=True, text=True, env=env
    )


def test_status_remembers_a_cleared_critical_alert_and_says_how_to_resume_a_crashed_run(tmp_path):
    paths = create_run(tmp_path / "runs", "hacked")
    m = new_manifest(paths, {"steps": 60}, 0, {}, {})
    m["status"] = "running"  # but no one holds the lock: the trainer died
    write_manifest(paths, m)
    fired = {"rule": "reward_hacking", "metric": "reward_mean", "severity": "critical", "first_step": 22}
    append_event(paths, "alert", step=22, value=0.93, threshold=0.5, message="reward hacking", **fired)
    append_event(paths, "alert_cleared", step=32, value=0.1, threshold=0.5, **fired)

    r = status(paths.root, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("hacked: crashed")
    assert "health: CRITICAL: reward_hacking was critical at steps 22-32" in r.stdout
    assert f"next: the trainer died; resume with: trainerd resume {paths.root}" in r.stdout

    info = json.loads(status(paths.root, tmp_path, "--json").stdout)
    assert info["health"]["level"] == "critical" and info["open_alerts"] == []

    # acknowledged (per-user state, as the monitor's key does): no longer critical
    from protocol.health import ack_key, acknowledge

    acknowledge(
        [ack_key("hacked", {"rule": "reward_hacking", "first_step": 22})], tmp_path / "state/rlhf-kit/acks.json"
    )
    info = json.loads(status(paths.root, tmp_path, "--json").stdout)
    assert info["health"]["level"] == "healthy" and info["health"]["past"] == []
