"""`trainerd verify m3 RUN`: the schema / mirror / TensorBoard / alert-event checks, on
synthetic runs (each a way a run can break the contract). The live part (`verify m3`
with no RUN: injected runs) is in test_inject.py, on the shared real runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from m3_fixtures import make_synthetic_run, synthetic_record, unstable_records  # noqa: E402

from protocol.jsonl import dumps, read_jsonl  # noqa: E402
from protocol.steplog import StepLogWriter  # noqa: E402
from trainerd.verify import m3 as verify_m3  # noqa: E402


def _verify(capsys, run, as_json=True):
    rc = verify_m3.run(str(run), as_json)
    out, err = capsys.readouterr()
    return rc, out, err


def _checks(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object on stdout"
    d = json.loads(lines[0])
    assert d["check"] == "m3" and set(d) == {"check", "status", "passed", "checks", "reason", "run", "duration_s"}
    for c in d["checks"]:
        assert set(c) == {"name", "passed", "detail"}
    return d


@pytest.fixture(scope="module")
def unstable_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    return make_synthetic_run(d, "unstable", unstable_records(40, nan_at=30), tb=True)


def test_unstable_but_well_formed_run_passes(unstable_run, capsys):
    rc, out, err = _verify(capsys, unstable_run)
    d = _checks(out)
    assert rc == 0 and d["passed"], d
    names = {c["name"]: c for c in d["checks"]}
    assert {"step log", "schema", "jsonl mirror", "tensorboard", "alert events"} <= set(names)
    assert "3 non-finite value(s) kept in both" in names["jsonl mirror"]["detail"]
    assert "3 non-finite kept" in names["tensorboard"]["detail"]
    assert "non_finite" in names["alert events"]["detail"]
    assert "ok   schema" in err  # progress on stderr under --json


def test_human_output(unstable_run, capsys):
    rc, out, err = _verify(capsys, unstable_run, as_json=False)
    assert rc == 0
    assert "ok   schema" in out and out.strip().splitlines()[-1].startswith("verify m3: PASSED")


def _rewrite(run: Path, records: list[dict], jsonl_records: list[dict] | None = None) -> None:
    (run / "steps.msgpack").unlink()
    w = StepLogWriter(run / "steps.msgpack")
    for r in records:
        w.write(r)
    w.close()
    with open(run / "steps.jsonl", "w") as f:
        for r in records if jsonl_records is None else jsonl_records:
            f.write(dumps(r) + "\n")


def _failed(d) -> dict:
    return {c["name"]: c["detail"] for c in d["checks"] if not c["passed"]}


def test_missing_field_and_wrong_type_fail_the_schema(tmp_path, capsys):
    recs = [synthetic_record(s) for s in range(1, 6)]
    run = make_synthetic_run(tmp_path, "r", recs)
    del recs[2]["entropy"]
    recs[3]["batch_size"] = 16.0  # an int field written as float
    _rewrite(run, recs)
    rc, out, _ = _verify(capsys, run)
    d = _checks(out)
    assert rc == 1 and not d["passed"]
    failed = _failed(d)
    assert "step 3: missing field 'entropy'" in failed["schema"]
    assert "step 4: field 'batch_size' should be int" in failed["schema"]


def test_nan_as_null_in_the_mirror_fails(tmp_path, capsys):
    recs = unstable_records(35, nan_at=30)
    run = make_synthetic_run(tmp_path, "r", recs)
    text = (run / "steps.jsonl").read_text().replace('"NaN"', "null")
    (run / "steps.jsonl").write_text(text)
    rc, out, _ = _verify(capsys, run)
    failed = _failed(_checks(out))
    assert rc == 1 and "step 30: policy_loss NaN vs None" in failed["jsonl mirror"]


def test_inf_sign_and_float_bits_must_match_in_the_mirror(tmp_path, capsys):
    recs = unstable_records(35, nan_at=30)
    run = make_synthetic_run(tmp_path, "r", recs)
    mirror = read_jsonl(run / "steps.jsonl")
    mirror[30]["grad_norm"] = -math.inf  # step 31: +Inf in the framed log
    mirror[0]["kl"] = math.nextafter(mirror[0]["kl"], 1.0)  # one ulp off
    _rewrite(run, recs, mirror)
    rc, out, _ = _verify(capsys, run)
    detail = _failed(_checks(out))["jsonl mirror"]
    assert "2 difference(s)" in detail and "step 31: grad_norm Inf vs -Inf" in detail and "step 1: kl" in detail


def test_mirror_missing_records_fails(tmp_path, capsys):
    recs = [synthetic_record(s) for s in range(1, 6)]
    run = make_synthetic_run(tmp_path, "r", recs)
    _rewrite(run, recs, recs[:3])
    rc, out, _ = _verify(capsys, run)
    assert "3 JSONL records vs 5 framed" in _failed(_checks(out))["jsonl mirror"]


def test_gap_in_the_step_log_fails(tmp_path, capsys):
    recs = [synthetic_record(s) for s in (1, 2, 3, 5, 6)]
    run = make_synthetic_run(tmp_path, "r", recs)
    rc, out, _ = _verify(capsys, run)
    assert "gap: expected step 4, found step 5" in _failed(_checks(out))["step log"]


def test_tensorboard_losing_a_nan_fails(tmp_path, capsys):
    recs = unstable_records(35, nan_at=30)
    tb_recs = [dict(r) for r in recs]
    tb_recs[29]["policy_loss"] = 0.0  # TensorBoard got 0 where the log has NaN
    run = make_synthetic_run(tmp_path, "r", recs)
    from m3_fixtures import write_tensorboard

    write_tensorboard(run / "tb", tb_recs)
    rc, out, _ = _verify(capsys, run)
    assert "step 30 policy_loss: NaN in the log, 0.0 in TensorBoard" in _failed(_checks(out))["tensorboard"]


def test_alert_event_without_explanation_fails(tmp_path, capsys):
    run = make_synthetic_run(tmp_path, "r", unstable_records(25))
    lines = (run / "events.jsonl").read_text().splitlines()
    evs = [json.loads(x) for x in lines]
    for e in evs:
        if e["event"] == "alert":
            del e["explanation"]
            e["first_step"] = "20"
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    rc, out, _ = _verify(capsys, run)
    assert "alert entropy_collapse: missing explanation" in _failed(_checks(out))["alert events"]


def test_bad_run_exit_2_with_one_json_object(tmp_path, capsys):
    rc, out, err = _verify(capsys, tmp_path / "nope")
    d = _checks(out)
    assert rc == 2 and d["passed"] is False and d["status"] == "could_not_run" and "no such run" in d["reason"]
    rc, out, err = _verify(capsys, tmp_path / "nope", as_json=False)
    assert rc == 2 and out == "" and err.strip().count("\n") == 0 and err.startswith("trainerd verify m3: ")


def test_a_running_run_may_lag_in_tensorboard_and_the_mirror(tmp_path, capsys):
    """While a run is running, TensorBoard is flushed every few steps and the JSONL line of the
    newest record may not be written yet: neither is a failure then (it is once the run ended)."""
    import os

    from m3_fixtures import write_tensorboard

    from protocol.rundir import RunLock, RunPaths, update_manifest

    recs = [synthetic_record(s) for s in range(1, 11)]
    run = make_synthetic_run(tmp_path, "r", recs, status="running")
    update_manifest(RunPaths(run), pid=os.getpid())  # alive: this process ...
    lock = RunLock(RunPaths(run)).acquire()  # ... holding the writer's lock
    write_tensorboard(run / "tb", recs[:6])
    lines = (run / "steps.jsonl").read_text().splitlines(keepends=True)
    (run / "steps.jsonl").write_text("".join(lines[:-1]))
    rc, out, _ = _verify(capsys, run)
    d = _checks(out)
    assert rc == 0, d
    tb = next(c for c in d["checks"] if c["name"] == "tensorboard")
    assert "4 newest step(s) not flushed yet" in tb["detail"]
    lock.release()
    update_manifest(RunPaths(run), status="finished")
    rc, out, _ = _verify(capsys, run)
    failed = _failed(_checks(out))
    assert rc == 1 and "tensorboard" in failed and "9 JSONL records vs 10 framed" in failed["jsonl mirror"]


def test_live_checks_fail_when_an_alert_fires_late_or_a_clean_run_goes_critical(tmp_path):
    """The checks `verify m3` (no RUN) applies to its runs, on runs with known alerts: entropy
    collapses at step 20 and a NaN arrives at 30 in `unstable_records`."""
    from protocol.rundir import RunPaths

    run = RunPaths(make_synthetic_run(tmp_path, "u", unstable_records(40, nan_at=30)))
    checks = verify_m3.Checks(as_json=True)
    ok = verify_m3.check_injected(run, "entropy_collapse@19", 0, 2, checks)
    assert ok["within"] and ok["fired_step"] == 20 and checks.passed
    late = verify_m3.check_injected(run, "entropy_collapse@8", 0, 2, checks)
    assert not late["within"] and late["fired_step"] == 20 and not checks.items[-1]["passed"]
    assert "fired at step 20 (injected at 8, allowed up to 10)" in checks.items[-1]["detail"]
    never = verify_m3.check_injected(run, "grad_explode@5", 0, 1, checks)
    assert never["fired_step"] is None and "never fired" in checks.items[-1]["detail"]
    checks = verify_m3.Checks(as_json=True)
    verify_m3.check_clean(run, 0, checks)
    assert not checks.passed and "entropy_collapse at step 20" in checks.items[-1]["detail"]
    # a NaN at 30 that did not stop the run: status finished, the log goes on
    checks = verify_m3.Checks(as_json=True)
    verify_m3.check_injected(run, "nan@30", 0, 0, checks)
    stop = checks.items[-1]
    assert stop["name"] == "nan@30: stops cleanly" and not stop["passed"]
    assert "status 'finished', expected 'failed'" in stop["detail"] and "goes on to step 40" in stop["detail"]
