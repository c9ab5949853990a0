"""Liveness of runs written on another host (protocol.rundir.register_writer_elsewhere): the
copy's lock says nothing; the registered judge (the writer's heartbeat) decides."""

from __future__ import annotations

from pathlib import Path

from protocol import rundir


def test_a_copy_of_a_remote_run_is_judged_by_its_writer(tmp_path):
    mirror = tmp_path / "mirror"
    paths = rundir.create_run(mirror, "r")
    here = rundir.create_run(tmp_path / "local", "r")
    m = {"status": "running"}
    assert rundir.effective_status(m, paths) == "crashed"  # no lock held: before registration
    judged: list = []
    rundir.register_writer_elsewhere(mirror, lambda d: judged.append(d) or "running")
    assert rundir.effective_status(m, paths) == "running"
    assert judged == [paths.root.resolve()]
    assert rundir.effective_status({"status": "finished"}, paths) == "finished"  # only "running" is judged
    assert rundir.effective_status(m, here) == "crashed"  # other runs: by their lock, as before


def test_the_heartbeat_judges_a_run_written_elsewhere_by_the_writer_hosts_clock():
    now = 1_000_000.0  # the writer host's clock; the newest mtime of the run's sign-of-life files
    assert rundir.heartbeat_status(now, now - 2 * rundir.HEARTBEAT_INTERVAL_S) == "running"
    assert rundir.heartbeat_status(now, now - rundir.HEARTBEAT_TIMEOUT_S + 1) == "running"
    assert rundir.heartbeat_status(now, now - rundir.HEARTBEAT_TIMEOUT_S - 1) == "crashed"
    assert rundir.heartbeat_status(now, None) == "running"  # nothing heard yet
    assert rundir.SIGN_OF_LIFE_FILES[0] == rundir.HEARTBEAT_FILE == rundir.RunPaths(Path("r")).heartbeat.name
