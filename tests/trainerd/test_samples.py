"""samples.jsonl: the responses behind the numbers, written without touching training."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_hardening import TINY, bits, cli, write_toml  # noqa: E402

from protocol.jsonl import read_jsonl  # noqa: E402
from protocol.rundir import RunPaths, read_events  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402


def run(tmp_path: Path, run_id: str, **over) -> RunPaths:
    cfg = write_toml(tmp_path / f"{run_id}.toml", {**TINY, **over})
    r = cli("start", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--run-id", run_id, "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    return RunPaths(tmp_path / "runs" / run_id)


def test_samples_every_n_steps_and_at_every_alert_without_changing_the_step_log(tmp_path):
    on = run(tmp_path, "on", samples_every=1, inject="kl_blowup@2")
    off = run(tmp_path, "off", samples_every=0, inject="kl_blowup@2")
    # the step log is bitwise the same with samples on and off: sampling draws from no training RNG
    assert bits(read_steplog(on.steps)[0]) == bits(read_steplog(off.steps)[0])

    samples = read_jsonl(on.samples)
    assert sorted({s["step"] for s in samples}) == list(range(1, 13))  # every step
    for s in samples:
        assert s["pick"] in ("best", "worst", "random") and s["response"].isalpha() or s["response"] == ""
        assert set(s) >= {"step", "reason", "prompt", "response", "reward", "gold", "kl", "length"}
    by_step = {}
    for s in samples:
        by_step.setdefault(s["step"], {})[s["pick"]] = s
    for picks in by_step.values():
        assert picks["best"]["reward"] >= picks["random"]["reward"] >= picks["worst"]["reward"]

    # with samples_every = 0, samples are written exactly at the steps where an alert fired
    alert_steps = {e["step"] for e in read_events(off) if e["event"] in ("alert", "alert_escalated")}
    assert alert_steps, "the injected fault fired no alert"
    off_samples = read_jsonl(off.samples)
    assert {s["step"] for s in off_samples} == alert_steps
    fired = {(e["step"], e["rule"]) for e in read_events(off) if e["event"] in ("alert", "alert_escalated")}
    for s in off_samples:
        assert s["reason"] == "alert" and all((s["step"], rule) in fired for rule in s["alerts"])
