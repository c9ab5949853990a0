"""Determinism settings (SPEC section 7): recorded in run.json, and a resume whose settings
differ from the run's is refused with one clear line unless --force.

The runs are real `trainerd` processes (shared through m1_fixtures). A mismatch is made the
way it happens in practice: the run was recorded elsewhere (another torch, another device),
or its config now asks for another thread count, which is what a resume would apply.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from m1_fixtures import (  # noqa: E402
    EVERY,
    child_env,
    edit_manifest,
    killed_run_copy,
    records,
    reference_run,
    resume_checks,
    resume_until_resume_check,
    trainerd,
)

from protocol.rundir import read_events, read_manifest  # noqa: E402
from trainerd.run.determinism import RESUME_MUST_MATCH, settings_mismatch  # noqa: E402
from trainerd.run.resume_check import first_difference  # noqa: E402

KILLED_AFTER = 2 * EVERY  # the shared killed run's last complete checkpoint


def test_settings_are_recorded_in_run_json():
    det = read_manifest(reference_run())["determinism"]
    assert det["intra_op_threads"] == 1
    assert det["deterministic_algorithms"] is True
    assert det["device"] == "cpu"
    assert det["torch_version"].startswith("2.")
    assert det["tf32_matmul"] is False and det["cudnn_deterministic"] is True and det["cudnn_benchmark"] is False
    assert det["seed"] == read_manifest(reference_run())["seed"]


def test_settings_mismatch_names_each_setting_that_must_match():
    base = {k: v for k, v in read_manifest(reference_run())["determinism"].items()}
    assert settings_mismatch(base, dict(base)) == []
    for key in (
        "intra_op_threads",
        "torch_version",
        "device",
        "deterministic_algorithms",
        "tf32_matmul",
        "cudnn_deterministic",
    ):
        if key not in RESUME_MUST_MATCH:
            pytest.fail(f"{key} is not checked on resume")
        changed = {**base, key: "something else"}
        (msg,) = settings_mismatch(base, changed)
        assert key in msg


def _assert_refused(paths, r, mentions: str):
    """Refused in one line, nothing touched: same step log, no resumed event."""
    assert r.returncode != 0
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert mentions in err[0] and "--force" in err[0], err[0]
    assert not [e for e in read_events(paths) if e["event"] == "resumed"]


@pytest.mark.slow
@pytest.mark.parametrize("key,recorded", [("torch_version", "2.12.0+cpu"), ("device", "cuda:0")])
def test_resume_refused_when_run_was_recorded_with_other_settings(key, recorded):
    paths = killed_run_copy(f"refuse_{key}")
    edit_manifest(paths, determinism={key: recorded})
    before = paths.steps.read_bytes()
    r = trainerd("resume", str(paths.root), "--foreground")
    _assert_refused(paths, r, key)
    assert paths.steps.read_bytes() == before  # the log was not truncated by a refused resume


@pytest.mark.slow
def test_force_resumes_despite_recorded_torch_version_and_records_it():
    """The run was really computed with this torch, so the forced resume is still identical;
    what matters is that the override is recorded."""
    paths = killed_run_copy("force_torch_version")
    edit_manifest(paths, determinism={"torch_version": "2.12.0+cpu"})
    r = trainerd("resume", str(paths.root), "--foreground", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(paths)
    assert m["resumes"][-1]["forced"] is True
    assert m["determinism_resumed"]["torch_version"] != "2.12.0+cpu"
    (ev,) = resume_checks(paths)
    assert ev["result"] == "identical", ev


@pytest.mark.slow
def test_other_thread_count_is_refused_and_under_force_breaks_bitwise_equality():
    paths = killed_run_copy("force_two_threads")
    edit_manifest(paths, config={"threads": 2})
    r = trainerd("resume", str(paths.root), "--foreground")
    _assert_refused(paths, r, "intra_op_threads")

    # Forced: 2 intra-op threads change matmul/reduction order, so the recomputed steps
    # differ, and the resume check must say so. (OMP_WAIT_POLICY=ACTIVE: the default passive
    # wait makes 2 threads ~100x slower on small ops; the resume is stopped once its check
    # is written, the steps after it would only cost time.)
    ev = resume_until_resume_check(paths, "--force", env=child_env(OMP_WAIT_POLICY="ACTIVE"))
    assert ev["result"] == "differs" and ev["step"] == KILLED_AFTER + 1, ev
    assert "DIFFERS" in ev["message"]
    m = read_manifest(paths)
    assert m["resumes"][-1]["forced"] is True and m["determinism_resumed"]["intra_op_threads"] == 2
    d = first_difference(records(reference_run()), records(paths))
    assert d is not None and d.step == KILLED_AFTER + 1
