"""Crash-safe resume (SPEC section 7), with real `trainerd` processes killed with SIGKILL.

Every scenario kills a run of the verify config (16 steps, checkpoints at 0, 5, 10, 15, 16)
at a different point, resumes it with `trainerd resume RUN --foreground`, and checks:
the resume starts from the last COMPLETE checkpoint, the final step log (msgpack and
JSONL) has no gap and no duplicate, every deterministic field equals the uninterrupted
run bitwise, the removed records were kept aside, and the `resume_check` event says
identical. The negative control (a resume that does not restore the RNG states) must be
caught: it differs from the uninterrupted run, and its resume_check event says where.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from m1_fixtures import (  # noqa: E402
    EVERY,
    STEPS,
    records,
    reference_run,
    resume_checks,
    runs_root,
    scenario,
    start_args,
    trainerd,
)

from protocol import catalogue  # noqa: E402
from protocol.jsonl import read_jsonl  # noqa: E402
from protocol.rundir import create_run, read_events, read_manifest  # noqa: E402
from trainerd.run.resume_check import (  # noqa: E402
    ResumeChecker,
    bitwise_equal,
    check_step_sequence,
    first_difference,
)

GOOD_SCENARIOS = ["kill_during_step", "kill_mid_checkpoint_write", "kill_before_checkpoint_rename", "kill_from_outside"]
# (the checkpoint the resume must start from, the last step logged before the kill, at least)
EXPECTED = {
    "kill_during_step": (EVERY, 7),  # died inside step 8: 8 was never logged
    "kill_mid_checkpoint_write": (EVERY, 2 * EVERY),  # checkpoint 10 torn: back to 5
    "kill_before_checkpoint_rename": (EVERY, 2 * EVERY),  # checkpoint 10 never published: back to 5
    "kill_from_outside": (2 * EVERY, 2 * EVERY + 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", GOOD_SCENARIOS)
def test_killed_run_resumes_from_last_complete_checkpoint_and_ends_bitwise_equal(name):
    sc = scenario(name)
    ref = records(reference_run())
    assert len(ref) == STEPS
    assert sc.kill_rc == -9, f"{name}: the run was not SIGKILLed (exit {sc.kill_rc})"
    expected_ckpt, min_last = EXPECTED[name]
    assert sc.last_step_before_kill >= min_last
    assert sc.last_step_before_kill < STEPS  # killed before the end, so there was work to redo
    assert max(sc.checkpoints_before_kill) == expected_ckpt, sc.checkpoints_before_kill
    assert sc.resume.returncode == 0, sc.resume.stderr[-2000:]

    resumed = [e for e in read_events(sc.paths) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == expected_ckpt

    # the final logs: no gap, no duplicate, and bitwise the uninterrupted run
    final = sc.records
    assert check_step_sequence(final) is None
    assert check_step_sequence(read_jsonl(sc.paths.steps_jsonl)) is None
    d = first_difference(ref, final, a_name="uninterrupted", b_name="resumed")
    assert d is None, d.describe()
    assert read_manifest(sc.paths)["status"] == "finished"

    # the removed records were kept aside, and they are the ones that were logged
    removed_steps = list(range(expected_ckpt + 1, sc.last_step_before_kill + 1))
    if removed_steps:
        kept_aside = read_jsonl(sc.paths.root / resumed[0]["old_records"])
        assert [r["step"] for r in kept_aside] == removed_steps

    # ... and compared: one resume_check event, identical over exactly those steps
    (ev,) = resume_checks(sc.paths)
    assert ev["result"] == "identical" and ev["identical"] is True, ev
    if removed_steps:
        assert ev["complete"] and ev["steps_compared"] == len(removed_steps)
        assert (ev["compared_from"], ev["compared_to"]) == (removed_steps[0], removed_steps[-1])


@pytest.mark.slow
def test_torn_checkpoint_is_never_published_or_loaded():
    for name in ("kill_mid_checkpoint_write", "kill_before_checkpoint_rename"):
        sc = scenario(name)
        # the killed write left only a hidden temp dir; no step_000010 existed before the resume
        assert 2 * EVERY not in sc.checkpoints_before_kill
        # after the resume, checkpoint 10 exists again, written by the resumed process
        assert (sc.paths.checkpoint_dir(2 * EVERY) / "state.pt").exists()
        # and the torn write's temp dir (a whole model) was cleaned up by the resume
        assert not [d.name for d in sc.paths.checkpoints.iterdir() if d.name.startswith(".tmp-")]


@pytest.mark.slow
def test_resume_without_rng_restore_differs_and_resume_check_says_where():
    """The negative control: leaving the RNG states out of the restore must NOT pass
    (otherwise the resume checks would prove nothing)."""
    sc = scenario("resume_without_rng_restore")
    ref = records(reference_run())
    assert sc.resume.returncode == 0, sc.resume.stderr[-2000:]
    resumed_from = [e for e in read_events(sc.paths) if e["event"] == "resumed"][0]["step"]
    d = first_difference(ref, sc.records)
    assert d is not None, "a resume without the RNG states gave the same records: the check is blind"
    assert d.step == resumed_from + 1  # the first recomputed step already differs
    (ev,) = resume_checks(sc.paths)
    assert ev["result"] == "differs" and ev["identical"] is False
    assert ev["step"] == resumed_from + 1 and ev["field"] in ref[0]
    assert "DIFFERS" in ev["message"] and f"step {resumed_from + 1}" in ev["message"]
    assert ev["old"] != ev["new"] or ev["old_bits"] != ev["new_bits"]


@pytest.mark.slow
def test_crash_during_a_resume_then_resume_again_ends_bitwise_equal():
    sc = scenario("kill_during_resume")
    assert sc.resume.returncode == 0, sc.resume.stderr[-2000:]
    assert check_step_sequence(sc.records) is None
    d = first_difference(records(reference_run()), sc.records, a_name="uninterrupted", b_name="resumed")
    assert d is None, d.describe()
    resumed = [e for e in read_events(sc.paths) if e["event"] == "resumed"]
    assert [e["step"] for e in resumed] == [EVERY, EVERY]
    # the first resume died before its check was due: only the second one reports, and it
    # covers the original steps the first resume had put aside but never recomputed
    (ev,) = resume_checks(sc.paths)
    assert ev["result"] == "identical" and ev["complete"], ev
    assert (ev["compared_from"], ev["compared_to"]) == (EVERY + 1, sc.last_step_before_kill)
    assert ev["from_earlier_resumes"] == list(range(EVERY + 2, sc.last_step_before_kill + 1))


@pytest.mark.slow
def test_status_shows_the_resume_check():
    sc = scenario("kill_from_outside")
    r = trainerd("status", str(sc.paths.root))
    assert r.returncode == 0, r.stderr
    assert "resume check:" in r.stdout and "identical" in r.stdout, r.stdout
    r = trainerd("status", str(sc.paths.root), "--json")
    info = json.loads(r.stdout)
    assert "identical" in info["resume_check"]
    bad = scenario("resume_without_rng_restore")
    r = trainerd("status", str(bad.paths.root))
    assert "DIFFERS" in r.stdout and f"step {EVERY + 1}" in r.stdout, r.stdout


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_resumes_from_step_0_and_ends_bitwise_equal():
    """Killed during the warm start (under load that window is over 10 s): no checkpoint
    exists, so the resume starts the run again from step 0, warm start included, in the same
    run dir, and ends bitwise equal to the uninterrupted run."""
    die_in_warm_start = (
        "import os, signal\nimport trainerd.run.lifecycle as _ppo\n"
        "_ppo.warm_start = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = trainerd(*start_args("killed_in_warm_start"), bootstrap=die_in_warm_start)
    assert r.returncode == -9
    root = runs_root() / "killed_in_warm_start"
    assert not (root / "checkpoints").exists() or not any((root / "checkpoints").glob("step_*"))
    r = trainerd("resume", str(root), "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    paths = reference_run().__class__(root)
    final = records(paths)
    assert check_step_sequence(final) is None and len(final) == STEPS
    d = first_difference(records(reference_run()), final, a_name="uninterrupted", b_name="restarted")
    assert d is None, d.describe()
    resumed = [e for e in read_events(paths) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 0 and resumed[0]["checkpoint"] is None
    m = read_manifest(paths)
    assert m["status"] == "finished" and m["resumes"][-1]["restarted"] is True


# -- the comparison itself, on records built by hand (no trainer) --------------------------------


def rec(step: int, **over) -> dict:
    r = {f: 0.5 for f in catalogue.deterministic_fields()}
    r.update(
        step=step, batch_size=8, tokens=64, time=1.0e9 + step, step_time_s=0.1 * step, stage_s={"rollout": 0.01 * step}
    )
    r.update(over)
    return r


def test_bitwise_semantics_differ_from_python_equality():
    nan = float("nan")
    other_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert bitwise_equal(nan, nan)  # a reproducible NaN is reproducible
    assert not bitwise_equal(nan, other_nan)  # ... but not with another payload
    assert not bitwise_equal(0.0, -0.0)  # == says equal; the sign bit differs
    assert not bitwise_equal(1, 1.0)  # type is part of the record
    assert bitwise_equal(math.inf, math.inf)
    assert not bitwise_equal(0.1 + 0.2, 0.3)
    assert bitwise_equal({"a": 1.0, "b": [2, 3.0]}, {"b": [2, 3.0], "a": 1.0})


def test_first_difference_reports_step_field_and_both_values():
    a = [rec(1), rec(2), rec(3)]
    b = [rec(1), rec(2, kl=0.5000000000000001), rec(3, entropy=9.0)]
    d = first_difference(a, b, a_name="run_a", b_name="run_b")
    assert (d.step, d.field, d.a, d.b) == (2, "kl", 0.5, 0.5000000000000001)
    text = d.describe()
    assert "step 2" in text and "'kl'" in text and "0x3fe0000000000000" in text and "0x3fe0000000000001" in text


def test_non_deterministic_fields_are_ignored_and_missing_steps_count():
    a = [rec(1), rec(2)]
    b = [rec(1, time=5.0, step_time_s=9.0, stage_s={}), rec(2, rss_bytes=1)]
    assert first_difference(a, b) is None
    d = first_difference(a, b + [rec(3)])
    assert (d.step, d.field) == (3, "step")
    # negative zero is caught even where == would pass
    d = first_difference([rec(1, kl=0.0)], [rec(1, kl=-0.0)])
    assert (d.step, d.field) == (1, "kl")


def test_step_sequence_gap_and_duplicate():
    assert check_step_sequence([rec(1), rec(2), rec(3)]) is None
    assert "gap" in check_step_sequence([rec(1), rec(3)])
    assert "duplicate step 2" in check_step_sequence([rec(1), rec(2), rec(2), rec(3)])
    assert "expected step 1" in check_step_sequence([rec(2)])


def test_resume_checker_identical_event_written_when_old_last_step_reached(tmp_path):
    paths = create_run(tmp_path, "r")
    old = [rec(6), rec(7), rec(8)]
    chk = ResumeChecker(paths, old, resumed_from=5)
    for s in (6, 7):
        assert chk.observe(rec(s, time=123.0)) is None  # wall clock differs: not compared
    ev = chk.observe(rec(8))
    assert ev["result"] == "identical" and ev["identical"] and ev["steps_compared"] == 3
    assert chk.observe(rec(9)) is None and chk.finish() is None  # exactly one event
    events = [e for e in read_events(paths) if e["event"] == "resume_check"]
    assert len(events) == 1 and events[0]["compared_from"] == 6 and events[0]["compared_to"] == 8


def test_resume_checker_difference_and_nan_values(tmp_path):
    paths = create_run(tmp_path, "r")
    nan = float("nan")
    old = [rec(6, kl=nan), rec(7, grad_norm=1.0)]
    chk = ResumeChecker(paths, old, resumed_from=5)
    chk.observe(rec(6, kl=nan))  # the same NaN bits: identical
    ev = chk.observe(rec(7, grad_norm=1.0000000000000002))
    assert ev["result"] == "differs" and not ev["identical"]
    assert (ev["step"], ev["field"], ev["old"], ev["new"]) == (7, "grad_norm", 1.0, 1.0000000000000002)
    assert "DIFFERS" in ev["message"] and "step 7" in ev["message"]
    assert read_events(paths)[-1]["field"] == "grad_norm"


def test_resume_checker_run_ending_early_reports_partial(tmp_path):
    paths = create_run(tmp_path, "r")
    chk = ResumeChecker(paths, [rec(6), rec(7), rec(8)], resumed_from=5)
    chk.observe(rec(6))
    ev = chk.finish()
    assert ev["result"] == "identical" and not ev["complete"] and ev["compared_to"] == 6
    assert "ended before" in ev["message"]


def test_resume_checker_also_compares_steps_only_an_earlier_resume_kept_aside(tmp_path):
    """Crash at 8, resume from 5 (6..8 kept aside), crash again after recomputing 6, resume
    from 5 again: this resume removes only 6, but the original 7 and 8 must be checked too."""
    from protocol.jsonl import JsonlWriter

    paths = create_run(tmp_path, "r")
    with JsonlWriter(paths.root / "resume_from_000005_old_steps.jsonl") as w:
        for s in (6, 7, 8):
            w.write(rec(s, kl=0.25 if s == 8 else 0.5))
    chk = ResumeChecker(paths, [rec(6)], resumed_from=5)
    assert chk.old_last_step == 8 and chk.from_earlier_aside == [7, 8]
    for s in (6, 7):
        assert chk.observe(rec(s)) is None
    ev = chk.observe(rec(8))  # the recomputed 8 differs from the original one
    assert ev["result"] == "differs" and (ev["step"], ev["field"]) == (8, "kl")
    assert ev["from_earlier_resumes"] == [7, 8]
