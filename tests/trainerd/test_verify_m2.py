"""`trainerd verify m2`: passes on a good profiled run, fails (and says where) on each defect."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")

from test_profiler import make_profiled_run  # noqa: E402  (tests/trainerd is on sys.path)

from protocol.steplog import StepLogWriter, read_steplog  # noqa: E402
from trainerd.tools import profiler
from trainerd.tools.profiler import OP_STATS_FILE, SUMMARY_FILE, TRACE_FILE  # noqa: E402
from trainerd.verify import m2 as verify_m2  # noqa: E402


@pytest.fixture(scope="module")
def good_run_template(tmp_path_factory):
    return make_profiled_run(tmp_path_factory.mktemp("template"), steps=5, window=(2, 4))


@pytest.fixture
def run_dir(good_run_template, tmp_path):
    """A fresh copy of the good run for each test to break."""
    dst = tmp_path / "run"
    shutil.copytree(good_run_template.root, dst)
    return dst


def verify_json(run_dir, capsys) -> tuple[int, dict]:
    code = verify_m2.run(str(run_dir), as_json=True)
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1, "stdout must be exactly one JSON object"
    return code, json.loads(out)


def failing(report: dict) -> dict[str, list[str]]:
    return {c["name"]: c["problems"] for c in report["checks"] if not c["passed"]}


def test_good_run_passes(run_dir, capsys):
    code, report = verify_json(run_dir, capsys)
    assert code == 0 and report["passed"] is True, failing(report)
    assert report["check"] == "m2" and report["run"] == str(run_dir)
    assert isinstance(report["duration_s"], float)
    assert [c["name"] for c in report["checks"]] == [
        "chrome_trace",
        "op_stats",
        "summary",
        "stage_ranges",
        "stage_sums",
        "summary_shares",
    ]
    assert all(set(c) >= {"name", "passed", "detail"} for c in report["checks"])


def test_human_output_lists_each_check(run_dir, capsys):
    assert verify_m2.run(str(run_dir), as_json=False) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == 6 and "verify m2: PASSED" in out


def test_trace_missing_a_stage_fails(run_dir, capsys):
    path = run_dir / "profile" / TRACE_FILE
    trace = json.loads(path.read_text())
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e.get("name") != "reward"]
    path.write_text(json.dumps(trace))
    code, report = verify_json(run_dir, capsys)
    assert code == 1 and not report["passed"]
    problems = failing(report)
    assert list(problems) == ["stage_ranges"]
    assert "chrome_trace.json" in problems["stage_ranges"][0] and "'reward'" in problems["stage_ranges"][0]


def test_one_profiled_step_missing_a_stage_fails(run_dir, capsys):
    path = run_dir / "profile" / TRACE_FILE
    trace = json.loads(path.read_text())
    step3 = next(e for e in trace["traceEvents"] if e.get("name") == "ProfilerStep#3")
    end = step3["ts"] + step3["dur"]
    trace["traceEvents"] = [
        e for e in trace["traceEvents"] if not (e.get("name") == "values" and step3["ts"] <= e["ts"] < end)
    ]
    path.write_text(json.dumps(trace))
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert failing(report)["stage_ranges"] == [
        f"{run_dir / 'profile' / TRACE_FILE}: profiled step 3 has no range for ['values']"
    ]


def test_other_range_is_required_in_every_step_once_traced(run_dir, capsys):
    """`other` is the untraced remainder, but a trainer that ranges it must do so every step."""
    path = run_dir / "profile" / TRACE_FILE
    trace = json.loads(path.read_text())
    step2 = next(e for e in trace["traceEvents"] if e.get("name") == "ProfilerStep#2")
    trace["traceEvents"].append(
        {
            "ph": "X",
            "cat": "user_annotation",
            "name": "other",
            "pid": step2["pid"],
            "tid": step2["tid"],
            "ts": step2["ts"] + step2["dur"] - 0.5,
            "dur": 0.2,
        }
    )
    path.write_text(json.dumps(trace))
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert any("profiled step 3" in p and "other" in p for p in failing(report)["stage_ranges"])


def test_step_whose_stages_do_not_add_up_fails(run_dir, capsys):
    steps = run_dir / "steps.msgpack"
    records, _ = read_steplog(steps)
    records[2]["stage_s"] = {k: v * 0.5 for k, v in records[2]["stage_s"].items()}  # step 3
    steps.unlink()
    with StepLogWriter(steps) as w:
        for r in records:
            w.write(r)
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    problems = failing(report)
    assert list(problems) == ["stage_sums"] and len(problems["stage_sums"]) == 1
    assert problems["stage_sums"][0].startswith("steps.msgpack step 3: stages sum to")
    assert "0.500 of step_time_s" in problems["stage_sums"][0]


def test_step_without_a_stage_fails(run_dir, capsys):
    steps = run_dir / "steps.msgpack"
    records, _ = read_steplog(steps)
    del records[0]["stage_s"]["advantages"]
    steps.unlink()
    with StepLogWriter(steps) as w:
        for r in records:
            w.write(r)
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert failing(report)["stage_sums"] == ["steps.msgpack step 1: stage_s lacks ['advantages']"]


@pytest.mark.parametrize("name", [TRACE_FILE, OP_STATS_FILE, SUMMARY_FILE])
def test_missing_artifact_fails(run_dir, capsys, name):
    (run_dir / "profile" / name).unlink()
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    flat = [p for ps in failing(report).values() for p in ps]
    assert any(name in p and "missing" in p for p in flat), flat


def test_corrupt_trace_fails(run_dir, capsys):
    path = run_dir / "profile" / TRACE_FILE
    path.write_bytes(path.read_bytes()[:-100])  # cut short, as a crash mid-write would
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    problems = failing(report)
    assert "chrome_trace" in problems and "not valid JSON" in problems["chrome_trace"][0]


def test_corrupt_op_stats_fails(run_dir, capsys):
    path = run_dir / "profile" / OP_STATS_FILE
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 2)[0]  # a ragged row
    path.write_text("\n".join(lines) + "\n")
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert "line 2 has" in failing(report)["op_stats"][0]


def test_summary_shares_not_summing_to_one_fail(run_dir, capsys):
    path = run_dir / "profile" / SUMMARY_FILE
    rows = profiler.read_csv(path)
    rows[0]["share"] = str(float(rows[0]["share"]) + 0.05)
    header = list(rows[0])
    path.write_text(",".join(header) + "\n" + "".join(",".join(r[h] for h in header) + "\n" for r in rows))
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert list(failing(report)) == ["summary_shares"]
    problem = failing(report)["summary_shares"][0]
    assert "summary.csv: shares sum to 1.0" in problem and "not 1" in problem


def test_summary_missing_a_stage_fails(run_dir, capsys):
    path = run_dir / "profile" / SUMMARY_FILE
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("reward,")))
    code, report = verify_json(run_dir, capsys)
    assert code == 1
    assert "no row for stages ['reward']" in failing(report)["summary"][0]


def test_bad_run_path_exits_2_with_json(tmp_path, capsys):
    code = verify_m2.run(str(tmp_path / "missing"), as_json=True)
    captured = capsys.readouterr()
    assert code == 2
    report = json.loads(captured.out)
    assert report["passed"] is False and report["status"] == "could_not_run"
    assert "no such run" in report["reason"] and report["checks"] == []
    assert captured.err.strip().splitlines()[-1].startswith("trainerd verify m2: no such run")


def test_cli_dispatch_json_and_profile(good_run_template):
    """`trainerd verify m2 RUN --json` prints one JSON object on stdout; `trainerd profile RUN` works."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainerd", "verify", "m2", str(good_run_template.root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True
    assert "ok   stage_sums" in proc.stderr  # progress goes to stderr in --json mode
    proc = subprocess.run(
        [sys.executable, "-m", "trainerd", "profile", str(good_run_template.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "slowest stage:" in proc.stdout


@pytest.mark.slow
def test_no_run_makes_a_real_profiled_smoke_run(capsys):
    """The only test that runs the real trainer: `verify m2` with no RUN."""
    code = verify_m2.run(None, as_json=True)
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 0 and report["passed"], (failing(report), captured.err[-2000:])
    ranges = next(c for c in report["checks"] if c["name"] == "stage_ranges")
    assert "3 profiled steps (steps 3..5)" in ranges["detail"]
    assert report["duration_s"] < 90
