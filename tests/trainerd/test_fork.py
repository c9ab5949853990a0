"""`trainerd fork`: a new run from another run's checkpoint, with changed settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_hardening import TINY, bits, cli, one_error_line, write_toml  # noqa: E402

from protocol.rundir import RunPaths, read_events, read_manifest  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> RunPaths:
    """A finished TINY run: 12 steps, checkpoints at 4, 8, 12 (0 pruned: keep 3)."""
    tmp = tmp_path_factory.mktemp("fork")
    cfg = write_toml(tmp / "tiny.toml", TINY)
    r = cli("start", "--config", str(cfg), "--runs-dir", str(tmp / "runs"), "--run-id", "parent", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    return RunPaths(tmp / "runs" / "parent")


def fork(parent: RunPaths, run_id: str, *args: str):
    return cli("fork", str(parent.root), "--run-id", run_id, "--foreground", *args)


def records(paths: RunPaths) -> list[dict]:
    return read_steplog(paths.steps)[0]


def test_a_fork_without_changes_is_bitwise_the_parent_after_k(parent):
    r = fork(parent, "same", "--from-step", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    child = RunPaths(parent.root.parent / "same")
    recs = records(child)
    assert [x["step"] for x in recs] == [9, 10, 11, 12]  # nothing of the parent's log is copied
    assert bits(recs) == bits(records(parent)[8:])
    m = read_manifest(child)
    assert m["status"] == "finished"
    assert m["parent"]["run_id"] == "parent" and m["parent"]["step"] == 8 and m["parent"]["changed"] == {}
    assert (parent.root.parent / "latest").resolve().name == "same"  # latest switched to the fork
    forked = [e for e in read_events(child) if e["event"] == "forked"]
    assert len(forked) == 1 and forked[0]["step"] == 8
    # the fork has its own checkpoint at 8, so it resumes (and verifies) like any run
    assert (child.checkpoints / "step_000008").is_dir()
    r = cli("resume", str(child.root), "--steps", "14", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in records(child)] == [9, 10, 11, 12, 13, 14]
    assert cli("status", str(child.root)).returncode == 0


def test_a_fork_with_a_changed_learning_rate_differs_and_records_its_lineage(parent):
    old_lr = read_manifest(parent)["config"]["learning_rate"]
    r = fork(parent, "lr", "--from-step", "8", "--set", "learning_rate=0.003", "--set", "kl_coef=0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    child = RunPaths(parent.root.parent / "lr")
    recs = records(child)
    assert [x["step"] for x in recs] == [9, 10, 11, 12]
    theirs = records(parent)[8:]
    assert all(a != b for a, b in zip(bits(recs), bits(theirs), strict=True))
    assert recs[0]["kl_coef"] == 0.5  # the controller's current coefficient is the one set
    m = read_manifest(child)
    assert m["parent"]["changed"] == {
        "learning_rate": [old_lr, 0.003],
        "kl_coef": [m["parent"]["changed"]["kl_coef"][0], 0.5],
    }
    assert m["parent"]["run_dir"] == str(parent.root.resolve()) and m["config"]["learning_rate"] == 0.003


def test_a_change_the_checkpoint_cannot_take_is_refused_before_anything_is_created(parent):
    before = sorted(p.name for p in parent.root.parent.iterdir())
    r = fork(parent, "bad", "--from-step", "8", "--set", "d_model=128")
    assert r.returncode == 2
    line = one_error_line(r)
    assert "d_model" in line and "shape" in line, line
    r = fork(parent, "bad", "--from-step", "8", "--set", "kl_coef=-1")  # ranges checked by the config
    assert r.returncode == 2 and "kl_coef" in one_error_line(r)
    assert sorted(p.name for p in parent.root.parent.iterdir()) == before


def test_a_step_between_checkpoints_forks_from_the_nearest_earlier_one(parent, tmp_path):
    r = cli(
        "fork", str(parent.root), "--from-step", "10", "--runs-dir", str(tmp_path / "forks"), "--run-id", "mid",
        "--set", "steps=13", "--foreground",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 8 (the nearest complete checkpoint before step 10)" in r.stderr
    child = RunPaths(tmp_path / "forks" / "mid")
    assert [x["step"] for x in records(child)] == [9, 10, 11, 12, 13]
    m = read_manifest(child)
    assert m["parent"]["step"] == 8 and m["parent"]["asked_step"] == 10
    assert m["parent"]["changed"] == {"steps": [12, 13]}
