"""--notify CMD: a user command told of critical alerts, crashes, stalls and the end of a run,
never slowing or breaking training."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_hardening import TINY, cli, write_toml  # noqa: E402

from protocol.alerts import Alert  # noqa: E402
from protocol.rundir import RunPaths, read_events  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402
from trainerd.run.notify import CLOSE_GRACE_S, Notifier, RateLimiter  # noqa: E402


def recorder(out: Path) -> str:
    """A command keeping each notification's stdin and environment in a file of its own."""
    out.mkdir(exist_ok=True)
    return (
        f'f="{out}/$RLHF_KIT_EVENT.$$"; cat > "$f.json"; '
        'printf "%s\\n%s\\n%s\\n" "$RLHF_KIT_EVENT" "$RLHF_KIT_RUN" "$RLHF_KIT_SUMMARY" > "$f.env"'
    )


def received(out: Path) -> list[tuple[dict, list[str]]]:
    got = []
    for j in sorted(out.glob("*.json")):
        env = j.with_suffix(".env")
        got.append((json.loads(j.read_text()), env.read_text().splitlines() if env.exists() else []))
    return got


def run(tmp_path: Path, run_id: str, *args: str, **over):
    cfg = write_toml(tmp_path / f"{run_id}.toml", {**TINY, **over})
    t0 = time.monotonic()
    r = cli(
        "start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--run-id", run_id, "--foreground", *args
    )
    return r, RunPaths(tmp_path / "runs" / run_id), time.monotonic() - t0


def test_each_critical_alert_kind_and_the_end_are_notified_with_the_event_as_json(tmp_path):
    out = tmp_path / "got"
    r, paths, _ = run(tmp_path, "nan", "--notify", recorder(out), inject="nan@3")
    assert r.returncode == 1, r.stderr[-2000:]  # the non-finite alert fails the run
    events = read_events(paths)
    critical = [e for e in events if e["event"] in ("alert", "alert_escalated") and e["severity"] == "critical"]
    assert critical
    got = received(out)
    alerts = [(p, env) for p, env in got if p["event"] in ("alert", "alert_escalated")]
    # once per critical alert kind (rule), with the alert event's fields on stdin
    assert sorted(p["rule"] for p, _ in alerts) == sorted({e["rule"] for e in critical})
    for p, env in alerts:
        ev = next(e for e in critical if e["rule"] == p["rule"])
        for k in ("severity", "metric", "step", "first_step", "message", "explanation"):
            assert p[k] == ev[k], k
        assert p["run"] == str(paths.root) and p["run_id"] == "nan"
        assert env[0] == p["event"] and env[1] == str(paths.root) and env[2] == p["summary"]
        assert "\n" not in p["summary"] and "critical" in p["summary"].lower()
    ends = [p for p, _ in got if p["event"] == "failed"]
    assert len(ends) == 1 and ends[0]["step"] == 3 and ends[0]["status"] == "failed"
    assert "non_finite" in ends[0]["reason"]
    assert not any(e["event"] == "notify_failed" for e in events)

    # a resume may change the command (it fails again at step 3: the injection is kept)
    out2 = tmp_path / "got2"
    r = cli("resume", str(paths.root), "--foreground", "--notify", recorder(out2))
    assert r.returncode == 1, r.stderr[-2000:]
    assert [p["event"] for p, _ in received(out2) if p["event"] == "failed"] == ["failed"]
    assert received(out) == got  # the old command is not run any more


def median_step_time(paths: RunPaths) -> float:
    return statistics.median(r["step_time_s"] for r in read_steplog(paths.steps)[0])


def test_a_failing_or_hanging_command_does_not_slow_the_run_and_is_reported_once(tmp_path):
    base_r, base, base_wall = run(tmp_path, "base", inject="kl_blowup@2")
    assert base_r.returncode == 0, base_r.stderr[-2000:]
    events = read_events(base)
    assert any(e["event"] in ("alert", "alert_escalated") and e["severity"] == "critical" for e in events)
    timings = {}
    for run_id, cmd, cause in (("fail", "cat >/dev/null; exit 3", "exit"), ("hang", "sleep 100", "timeout")):
        r, paths, wall = run(tmp_path, run_id, "--notify", cmd, inject="kl_blowup@2")
        assert r.returncode == 0, r.stderr[-2000:]
        assert read_steplog(paths.steps)[0][-1]["step"] == TINY["steps"]
        timings[run_id] = (median_step_time(paths), wall)
        failed = [e for e in read_events(paths) if e["event"] == "notify_failed"]
        assert [e["cause"] for e in failed] == [cause], failed  # once, not once per call
        assert r.stderr.count("notify command failed") == 1, r.stderr[-2000:]
    # the hanging command (an alert's and the end's) held the run up by the close grace at most
    assert timings["hang"][1] < base_wall + CLOSE_GRACE_S + 15, (timings, base_wall)
    # step times within noise: two cores are shared, so the reference is a baseline run on
    # each side of the runs with --notify
    after_r, after, _ = run(tmp_path, "base_after", inject="kl_blowup@2")
    assert after_r.returncode == 0
    ref = max(median_step_time(base), median_step_time(after))
    for run_id, (t, wall) in timings.items():
        print(f"{run_id}: median step {t * 1000:.1f} ms (baseline {ref * 1000:.1f} ms), run {wall:.1f}s")
        assert t < 1.5 * ref, (run_id, t, ref)


def critical(rule: str, step: int = 5) -> Alert:
    return Alert(rule, "kl", "critical", 9.0, 1.0, step, step, "why")


def test_rate_limiter_one_per_kind_per_interval_a_global_cap_and_always_the_end():
    now = [0.0]
    lim = RateLimiter(per_kind_s=60, cap=3, window_s=600, clock=lambda: now[0])
    assert lim.allow("alert:kl")
    assert not lim.allow("alert:kl")  # the same kind within 60 s
    assert lim.allow("alert:entropy")
    now[0] = 61
    assert lim.allow("alert:kl")  # 60 s later
    assert not lim.allow("stall")  # the global cap: 3 in 600 s
    assert lim.allow("finished", always=True) and lim.allow("crashed", always=True)
    assert lim.suppressed == 2
    now[0] = 601
    assert lim.allow("stall")  # the first one left the window


def test_stall_watchdog_fires_once_per_stall_after_the_threshold(tmp_path):
    out = tmp_path / "got"
    lim = RateLimiter(per_kind_s=0)  # (the default would hold back a second stall within 60 s)
    n = Notifier(recorder(out), RunPaths(tmp_path), lambda m: None, limiter=lim, stall_min_s=0.3, poll_s=0.02)
    try:
        n.step_done(1, 0.001)
        assert n.stall_threshold() == 0.3  # max(min, 20 x median)
        time.sleep(0.1)
        assert received(out) == []
        time.sleep(0.8)  # > threshold: one stall, not one per poll
        n.step_done(2, 0.05)  # a step re-arms it; now 20 x median (0.0255) = 0.51 s
        assert abs(n.stall_threshold() - 20 * statistics.median([0.001, 0.05])) < 1e-9
        time.sleep(1.2)
    finally:
        n.ended("finished", 2)
        n.close()
    got = [p for p, _ in received(out)]
    stalls = sorted((p for p in got if p["event"] == "stall"), key=lambda p: p["step"])
    assert [p["step"] for p in stalls] == [1, 2]
    assert stalls[0]["threshold_s"] == 0.3 and stalls[0]["idle_s"] >= 0.3
    assert [p["event"] for p in got if p["event"] != "stall"] == ["finished"]


def test_notifier_failures_once_per_cause_and_a_crash_always_goes_out(tmp_path):
    paths = RunPaths(tmp_path)
    logged = []
    n = Notifier("exit 3", paths, logged.append, stall_min_s=60)
    for rule in ("a", "b", "c"):
        n.alert("alert", critical(rule))
    n.alert("alert", Alert("w", "kl", "warning", 9.0, 1.0, 5, 5, "why"))  # not critical: no command
    n.crashed("RuntimeError: boom")
    n.close()
    assert [e["cause"] for e in read_events(paths) if e["event"] == "notify_failed"] == ["exit"]
    assert len(logged) == 1 and "exit status 3" in logged[0]

    paths2 = RunPaths(tmp_path / "b")
    paths2.root.mkdir()
    n = Notifier("definitely-not-a-command-xyz", paths2, logged.append, timeout_s=0.3, close_grace_s=0.2)
    n.alert("alert", critical("a"))
    n.close()
    n = Notifier("sleep 100", paths2, logged.append, timeout_s=0.3, close_grace_s=5)
    t0 = time.monotonic()
    n.crashed("boom")
    n.close()
    assert time.monotonic() - t0 < 3  # killed at its timeout
    assert [e["cause"] for e in read_events(paths2) if e["event"] == "notify_failed"] == ["not_found", "timeout"]
