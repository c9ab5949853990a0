"""`trainerd report`: the offline stability report, on synthetic run dirs written with
`protocol` and (in test_inject.py's shared runs) on real trainer runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from m3_fixtures import make_synthetic_run, synthetic_record, unstable_records  # noqa: E402

from trainerd.tools import report  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report-runs")
    clean = make_synthetic_run(d, "clean", [synthetic_record(s) for s in range(1, 41)])
    bad = make_synthetic_run(d, "unstable", unstable_records(40, nan_at=30))
    return clean, bad


def _report(capsys, run, fmt="text"):
    rc = report.run(str(run), fmt)
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_report_of_a_clean_run_fits_80_columns(runs, capsys):
    clean, _ = runs
    rc, out, err = _report(capsys, clean)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "unstable from: never (stable)" in out
    assert "none fired" in out
    # every numeric catalogue field but the identity ones is in the metrics table, in order
    names = [ln.split()[0] for ln in lines if ln and ln.split()[0] in synthetic_record(1)]
    assert names[:4] == ["kl", "kl_target", "kl_target_error", "kl_coef"]
    assert "rss_bytes" in names and "time" not in names
    # trends: kl and reward rise, entropy falls
    row = {}
    for ln in lines:
        if ln and ln.split()[0] in synthetic_record(1):
            row.setdefault(ln.split()[0], ln)  # the metrics table comes before the correlations
    assert "↑" in row["kl"] and "↑" in row["reward_mean"] and "↓" in row["entropy"]
    # shares of the stages' sum (catalogue.stage_shares, the one definition): 0.12 s of 0.257 s
    assert "Stages" in out and "rollout" in out and "46.7%" in out


def test_json_report_of_an_unstable_run(runs, capsys):
    _, bad = runs
    rc, out, _ = _report(capsys, bad, "json")
    assert rc == 0
    d = json.loads(out)  # strict JSON: NaN values are written as strings
    assert d["steps"] == 40 and d["last_step"] == 40
    m = d["metrics"]
    assert m["policy_loss"]["nan"] == 1 and m["policy_loss"]["first_non_finite_step"] == 30
    assert m["grad_norm"]["inf"] == 1 and m["value_loss"]["neg_inf"] == 1
    assert m["entropy"]["min"] == 0.05 and m["entropy"]["last"] == 0.05
    assert m["kl"]["median"] == pytest.approx(0.02 + 0.0005 * 20.5)
    assert m["entropy"]["trend_r"] < -0.5 and m["entropy"]["trend"] == "↓"
    # the first critical alert (entropy collapse at 20) comes before the first NaN (30)
    assert d["first_unstable"]["step"] == 20 and "entropy_collapse" in d["first_unstable"]["reason"]
    alerts = {a["rule"]: a for a in d["alerts"]}
    assert alerts["entropy_collapse"]["open"] is True
    assert alerts["entropy_collapse"]["duration_steps"] == 21  # steps 20..40
    nf = alerts["non_finite"]
    assert nf["first_step"] == 30 and nf["open"] is False and nf["cleared_step"] == 32
    assert "restore the last checkpoint" in nf["explanation"]
    corr = d["correlations"]
    assert set(corr) == {"kl", "reward_mean", "gold_reward_mean", "entropy", "response_length_mean"}
    assert corr["kl"]["reward_mean"] == pytest.approx(1.0)
    assert corr["kl"]["entropy"] < 0
    stages = {s["stage"]: s for s in d["stages"]}
    assert list(stages)[:2] == ["rollout", "ref_logprobs"]
    assert stages["rollout"]["share"] == pytest.approx(0.12 / 0.257)


def test_first_unstable_is_the_first_non_finite_value_without_critical_alerts(tmp_path, capsys):
    recs = [synthetic_record(s) for s in range(1, 21)]
    recs[11]["kl"] = math.inf  # step 12
    run = make_synthetic_run(tmp_path, "r", recs, events=False)  # no events.jsonl: alerts replayed
    rc, out, _ = _report(capsys, run, "json")
    d = json.loads(out)
    assert d["first_unstable"]["step"] == 12
    assert "replayed" in d["alert_source"]
    assert [a["rule"] for a in d["alerts"]] == ["non_finite"]
    assert d["metrics"]["kl"]["last"] == recs[-1]["kl"]


def test_markdown_report(runs, capsys):
    _, bad = runs
    rc, out, _ = _report(capsys, bad, "md")
    assert rc == 0
    assert out.startswith("# Stability report: unstable")
    assert "| metric | min | median | max | last | trend | r | NaN | Inf |" in out
    assert "| critical | entropy_collapse | entropy |" in out
    assert "## Correlations" in out and "## Stages" in out


def test_jsonl_only_run_is_read_from_the_mirror(tmp_path, capsys):
    run = make_synthetic_run(tmp_path, "r", [synthetic_record(s) for s in range(1, 6)])
    os.unlink(run / "steps.msgpack")
    rc, out, _ = _report(capsys, run, "json")
    assert rc == 0 and json.loads(out)["step_log"]["source"] == "steps.jsonl"


@pytest.mark.parametrize("case", ["missing", "not_a_run", "no_steps", "bad_manifest", "bad_format"])
def test_bad_run_is_one_line_and_exit_2(tmp_path, capsys, case):
    fmt = "text"
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "not_a_run":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "no_steps":
        run = make_synthetic_run(tmp_path, "r", [synthetic_record(1)])
        os.unlink(run / "steps.msgpack")
        os.unlink(run / "steps.jsonl")
    elif case == "bad_manifest":
        run = make_synthetic_run(tmp_path, "r", [synthetic_record(1)])
        (run / "run.json").write_text("{not json")
    else:
        run = make_synthetic_run(tmp_path, "r", [synthetic_record(1)])
        fmt = "yaml"
    rc, out, err = _report(capsys, run, fmt)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("trainerd report: ")
    assert "Traceback" not in err


def test_report_module_never_imports_torch(runs):
    clean, _ = runs
    code = (
        "import sys, trainerd; before = 'torch' in sys.modules; from trainerd.tools import report; "
        "rc = report.run(sys.argv[1], 'json'); "
        "assert before or 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(clean)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


# -- on REAL runs (the shared runs of `verify m3`, m3_fixtures.live_runs) ----------------------


@pytest.fixture(scope="module")
def live():
    from m3_fixtures import live_runs

    return live_runs()


@pytest.mark.slow
def test_report_on_a_real_clean_run(live, capsys):
    rc, out, err = _report(capsys, live.path(None))
    assert rc == 0 and err == ""
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "unstable from: never (stable)" in out
    assert "injection" not in out.split("Metrics")[0]
    rc, out, _ = _report(capsys, live.path(None), "json")
    d = json.loads(out)
    assert d["status"] == "finished" and d["first_unstable"] is None
    assert all(a["severity"] != "critical" for a in d["alerts"])
    assert all(st["nan"] == 0 and st["inf"] == 0 for st in d["metrics"].values())
    # the smoke run's stage timers are in the step log: all eight stages, shares that add up
    stages = {s["stage"]: s for s in d["stages"]}
    assert list(stages)[:8] == [
        "rollout",
        "ref_logprobs",
        "reward",
        "values",
        "advantages",
        "policy_update",
        "value_update",
        "other",
    ]
    assert 0.85 <= sum(s["share"] for s in d["stages"]) <= 1.15
    assert set(d["correlations"]) == {"kl", "reward_mean", "gold_reward_mean", "entropy", "response_length_mean"}


@pytest.mark.slow
def test_report_on_a_real_unstable_run(live, capsys):
    run = live.path("nan@8")
    rc, out, _ = _report(capsys, run, "json")
    d = json.loads(out)
    assert d["status"] == "failed" and d["injection"] == "nan@8"
    assert d["first_unstable"]["step"] == 8 and "non_finite" in d["first_unstable"]["reason"]
    assert d["metrics"]["policy_loss"]["nan"] == 1 and d["metrics"]["policy_loss"]["first_non_finite_step"] == 8
    nf = [a for a in d["alerts"] if a["rule"] == "non_finite"]
    assert nf and nf[0]["first_step"] == 8 and nf[0]["open"] is True and nf[0]["severity"] == "critical"
    rc, out, _ = _report(capsys, run, "text")
    assert "unstable from: step 8: critical alert non_finite (policy_loss)" in out
    assert "CRITICAL non_finite" in out and all(len(line) <= 80 for line in out.splitlines())
    # reward hacking: the timeline says when it started and that it is still open
    rc, out, _ = _report(capsys, live.path("reward_hack@1"), "md")
    assert "| critical | reward_hacking | reward_mean |" in out


def test_cli_report_dispatches_and_fails_cleanly(tmp_path):
    run = make_synthetic_run(tmp_path, "r", [synthetic_record(s) for s in range(1, 4)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "trainerd", "report", str(run), "--format", "md"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 0 and p.stdout.startswith("# Stability report: r"), p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "trainerd", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_a_corrupt_frame_is_reported_not_raised(tmp_path, capsys):
    run = make_synthetic_run(tmp_path, "r", [synthetic_record(s) for s in range(1, 11)])
    data = bytearray((run / "steps.msgpack").read_bytes())
    frame = len(data) // 10
    data[frame * 4 + 40] ^= 0xFF  # a payload byte of the fifth record
    (run / "steps.msgpack").write_bytes(bytes(data))
    rc, out, err = _report(capsys, run, "json")
    d = json.loads(out)
    assert rc == 0 and d["steps"] == 9 and d["step_log"]["corrupt_frames"] == 1
    rc, out, err = _report(capsys, run)
    assert "1 corrupt frame(s) skipped" in out


def test_the_samples_around_each_alert_are_in_the_report(tmp_path, capsys):
    """'Read samples' is advice a user can follow: the report prints the responses saved at
    the alert's step (the nearest step with samples), escaped, in text and Markdown."""
    from protocol.jsonl import JsonlWriter
    from protocol.rundir import RunPaths

    run = make_synthetic_run(tmp_path, "hacked", unstable_records(40, nan_at=30))
    paths = RunPaths(Path(run))
    with JsonlWriter(paths.samples) as w:
        for step in (10, 30):
            for pick, text in (("best", "aaaa"), ("worst", "\x1b]2;pwned\x07zz"), ("random", "abab")):
                w.write(
                    {
                        "step": step,
                        "reason": "alert",
                        "alerts": [],
                        "pick": pick,
                        "index": 0,
                        "prompt": "dkag",
                        "response": text,
                        "reward": 1.0,
                        "gold": -0.5,
                        "kl": 0.3,
                        "length": len(text) + 1,
                    }
                )
    rc, out, _ = _report(capsys, run)
    assert rc == 0
    section = out.split("Alerts", 1)[1].split("Correlations", 1)[0]
    assert "step 30 best: 'dkag' -> 'aaaa'" in section and "step 30 random:" in section
    assert "\x1b" not in out and "pwned" in out  # model text is shown escaped, never interpreted
    rc, md, _ = _report(capsys, run, "md")
    assert "Samples at step 30" in md
