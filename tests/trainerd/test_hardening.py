"""The trainer at the edges a user can push it to: bad configs, planted links, a full disk,
resumes that must not log twice, checkpoint retention and honest step-time accounting.

Every case runs the real `trainerd` CLI in a fresh interpreter and checks what a user sees:
one line on stderr, exit 2, nothing created or written where it must not be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from protocol.catalogue import deterministic_fields
from protocol.rundir import RunPaths, read_events, read_manifest
from protocol.steplog import read_steplog

# A small run: smoke-sized models, few steps, frequent checkpoints.
TINY = {"preset": "smoke", "steps": 12, "checkpoint_every": 4, "sft_steps": 20, "rm_steps": 20, "profile_steps": ""}


def cli(*args: str, timeout: float = 240, bootstrap: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    code = (bootstrap + "\n" if bootstrap else "") + "from trainerd.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


def write_toml(path: Path, cfg: dict) -> Path:
    lines = []
    for k, v in cfg.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, float) else repr(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def bits(records: list[dict]) -> list[tuple]:
    keys = deterministic_fields()
    return [tuple(struct.pack("<d", float(r[k])) if k in r else None for k in keys) for r in records]


# -- configs: refused completely, before anything exists on disk --------------------------------------

BAD_CONFIGS = {
    "batch_size = 100000000 (memory)": ({"batch_size": 10**8, "n_prompts": 10**8, "minibatch_size": 10**8}, "memory"),
    "batch_size = 1e9 (a float)": ({"batch_size": 1e9}, "integer"),
    "learning_rate = nan": ({"learning_rate": float("nan")}, "finite"),
    "device = cuda:7": ({"device": "cuda:7"}, "cuda:7"),
    "seed = -1": ({"seed": -1}, "seed"),
    "seed = 2^63": ({"seed": 2**63}, "seed"),
    "n_letters = 100000": ({"n_letters": 100000}, "n_letters"),
    "clip_range = -1": ({"clip_range": -1.0}, "clip_range"),
    "gamma = 2": ({"gamma": 2.0}, "gamma"),
    "unknown key": ({"learning_rat": 0.1}, "unknown config key"),
    "lr_schedule = linear": ({"lr_schedule": "linear"}, "lr_schedule"),
}


def test_bad_configs_are_refused_in_one_line_before_a_run_dir_exists(tmp_path):
    runs = tmp_path / "runs"
    good = cli(
        "start",
        "--config",
        str(write_toml(tmp_path / "good.toml", {**TINY, "steps": 1})),
        "--runs-dir",
        str(runs),
        "--run-id",
        "good",
        "--foreground",
    )
    assert good.returncode == 0, good.stderr[-2000:]
    before = sorted(p.name for p in runs.iterdir())
    for name, (over, expect) in BAD_CONFIGS.items():
        cfg_file = write_toml(tmp_path / "bad.toml", {**TINY, **over})
        r = cli("start", "--config", str(cfg_file), "--runs-dir", str(runs), "--foreground")
        assert r.returncode == 2, (name, r.returncode, r.stderr)
        line = one_error_line(r)
        assert expect in line, (name, line)
        assert sorted(p.name for p in runs.iterdir()) == before, name  # no run dir was created
        assert os.readlink(runs / "latest") == "good", name  # and `latest` did not move


# -- links planted in a run dir: refused, nothing written through them ---------------------------------


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory) -> RunPaths:
    d = tmp_path_factory.mktemp("tiny")
    cfg = write_toml(d / "tiny.toml", {**TINY, "steps": 4})
    r = cli("start", "--config", str(cfg), "--runs-dir", str(d / "runs"), "--run-id", "tiny", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    return RunPaths(d / "runs" / "tiny")


@pytest.mark.parametrize("name", ["steps.msgpack", "steps.jsonl", "events.jsonl", "trainerd.log", "run.json"])
def test_resume_refuses_a_symlink_planted_in_the_run_dir(finished_tiny_run, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run.root, run, symlinks=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    os.utime(victim, (1_000_000_000, 1_000_000_000))
    target = run / name
    if target.exists():
        target.unlink()
    target.symlink_to(victim)
    r = cli("resume", str(run), "--steps", "6", "--foreground")
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert name in line and ("link" in line or "regular" in line), line
    assert victim.read_bytes() == b"precious\n" and victim.stat().st_mtime == 1_000_000_000


# -- retention and the step clock ---------------------------------------------------------------------


def test_retention_keeps_the_newest_and_every_nth_checkpoint_and_resume_still_works(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", {**TINY, "checkpoint_every": 2, "keep_checkpoints": 2, "keep_every": 8})
    r = cli("start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--run-id", "r", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    paths = RunPaths(tmp_path / "runs" / "r")
    left = sorted(int(p.name.removeprefix("step_")) for p in paths.checkpoints.glob("step_*"))
    assert left == [0, 8, 10, 12], left
    pruned = [s for e in read_events(paths) if e["event"] == "checkpoint" for s in e.get("pruned", [])]
    assert sorted(pruned) == [2, 4, 6], pruned
    r = cli("resume", str(paths.root), "--steps", "14", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    recs, _ = read_steplog(paths.steps)
    assert [x["step"] for x in recs] == list(range(1, 15))


def test_step_time_is_wall_time_between_step_boundaries(tmp_path):
    """Sum of step_time_s over steps 2..N equals the wall clock between the end of step 1
    and the end of step N (the record's `time`), so log writing, checkpoints and the
    healthy-state copy are no longer left out; the stages plus `other` sum to each step."""
    cfg = write_toml(tmp_path / "c.toml", {**TINY, "steps": 16, "checkpoint_every": 3, "profile_steps": "4:6"})
    r = cli("start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--run-id", "t", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    paths = RunPaths(tmp_path / "runs" / "t")
    recs, _ = read_steplog(paths.steps)
    summed = sum(x["step_time_s"] for x in recs[1:])
    wall = recs[-1]["time"] - recs[0]["time"]
    assert abs(summed / wall - 1) < 0.01, (summed, wall)
    for x in recs:
        assert abs(sum(x["stage_s"].values()) - x["step_time_s"]) < 1e-6
        assert x["rss_bytes"] > 0 and x["peak_rss_bytes"] >= x["rss_bytes"]
    events = read_events(paths)
    assert all("seconds" in e for e in events if e["event"] == "checkpoint")
    prof = [e for e in events if e["event"] == "profile"]
    assert len(prof) == 1 and prof[0]["export_s"] > 0 and prof[0]["window"] == "4:6"


# -- a resume logs nothing twice ---------------------------------------------------------------------

KILL_AFTER_STEP = textwrap.dedent("""
    import os, signal
    import trainerd.run.trainer as _t
    _orig = _t.Trainer.ppo_step
    def _ppo_step(self, step):
        if step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return _orig(self, step)
    _t.Trainer.ppo_step = _ppo_step
""")


def tb_steps(tb_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("summary") and any(v.tag == "kl" for v in ev.summary.value):
                steps.append(ev.step)
    return steps


def test_resume_leaves_no_duplicate_alert_events_or_tensorboard_points(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", {**TINY, "tb_flush_every": 1, "inject": "kl_blowup@2"})
    args = ("start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--foreground")
    ref = cli(*args, "--run-id", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = cli(*args, "--run-id", "k", bootstrap=KILL_AFTER_STEP.format(step=11))
    assert killed.returncode == -signal.SIGKILL
    paths, ref_paths = RunPaths(tmp_path / "runs" / "k"), RunPaths(tmp_path / "runs" / "ref")
    fired_before = [e for e in read_events(paths) if e["event"].startswith("alert")]
    assert any(e["step"] > 8 for e in fired_before), "the injected fault fired nothing after the checkpoint"
    r = cli("resume", str(paths.root), "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]

    def alert_keys(p):
        return [(e["event"], e["rule"], e["step"]) for e in read_events(p) if e["event"].startswith("alert")]

    assert alert_keys(paths) == alert_keys(ref_paths)  # the same alerts, once each, in order
    assert tb_steps(paths.tb) == list(range(1, 13))
    resumed = [e for e in read_events(paths) if e["event"] == "resumed"][0]
    assert resumed["removed_alert_events"] > 0 and resumed["removed_tensorboard_points"] == 2
    assert bits(read_steplog(paths.steps)[0]) == bits(read_steplog(ref_paths.steps)[0])


# -- a full disk -----------------------------------------------------------------------------------


def _small_fs(path: Path, size: str) -> str | None:
    """A tmpfs of `size` at `path` (root only); None where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return "tmpfs" if r.returncode == 0 else None


def test_disk_full_says_which_file_marks_the_run_crashed_leaves_no_temp_and_resumes(tmp_path):
    mnt = tmp_path / "small"
    if _small_fs(mnt, "3m") is None:
        pytest.skip("cannot mount a tmpfs here (not root); the ulimit -f variant below covers the path")
    try:
        cfg = write_toml(tmp_path / "c.toml", {**TINY, "steps": 40})
        r = cli("start", "--config", str(cfg), "--runs-dir", str(mnt / "runs"), "--run-id", "full", "--foreground")
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and str(mnt / "runs" / "full") in last, last
        paths = RunPaths(mnt / "runs" / "full")
        st = cli("status", str(paths.root), "--json")
        assert json.loads(st.stdout)["status"] == "crashed", st.stdout + st.stderr
        leftovers = [p for p in paths.root.rglob("*") if p.name.startswith((".tmp-", ".export-"))]
        assert leftovers == []
        subprocess.run(["mount", "-o", "remount,size=200m", str(mnt)], check=True)
        r = cli("resume", str(paths.root), "--foreground")
        assert r.returncode == 0, r.stderr[-2000:]
        assert read_manifest(paths)["status"] == "finished"
        recs, stats = read_steplog(paths.steps)
        assert [x["step"] for x in recs] == list(range(1, 41)) and stats.corrupt_frames == 0
        ref = cli(
            "start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--run-id", "ref", "--foreground"
        )
        assert ref.returncode == 0
        assert bits(recs) == bits(read_steplog(tmp_path / "runs" / "ref" / "steps.msgpack")[0])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_write_error_without_root_names_the_file(tmp_path):
    """The same path without a tmpfs: a file-size limit makes the writes fail (EFBIG)."""
    cfg = write_toml(tmp_path / "c.toml", {**TINY, "steps": 40})
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))"
    r = cli(
        "start",
        "--config",
        str(cfg),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run-id",
        "big",
        "--foreground",
        bootstrap=limit,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "File too large" in last and str(tmp_path / "runs" / "big") in last, last
    time.sleep(0.2)
    st = cli("status", str(tmp_path / "runs" / "big"), "--json")
    assert json.loads(st.stdout)["status"] == "crashed"
    assert [p for p in (tmp_path / "runs" / "big").rglob("*") if p.name.startswith((".tmp-", ".export-"))] == []
