"""Liveness of runs written on another host (protocol.rundir.register_writer_elsewhere): the
copy's lock says nothing; the registered judge (the writer's heartbeat) decides."""

from __future__ import annotations

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
