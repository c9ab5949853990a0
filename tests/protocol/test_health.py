"""The run verdict remembers: cleared alerts stay until acknowledged, the root cause leads."""

from __future__ import annotations

from protocol.events import alert_timeline
from protocol.health import acknowledge, load_acks, root_cause_first, run_verdict


def ev(kind, rule, step, first, severity="warning", value=1.0):
    return {"event": kind, "rule": rule, "step": step, "first_step": first, "severity": severity, "value": value}


REWARD_HACK_CLEARED = [
    ev("alert", "reward_hacking", 22, 22, "critical", 0.93),
    ev("alert_cleared", "reward_hacking", 32, 22, "critical", 0.2),
]


def test_a_critical_alert_that_cleared_keeps_the_run_from_looking_healthy(tmp_path):
    v = run_verdict(alert_timeline(REWARD_HACK_CLEARED), "finished", "r1")
    assert v.level == "critical" and v.cause is None
    assert "reward_hacking was critical at steps 22-32" in v.headline and "not acknowledged" in v.headline
    acks = tmp_path / "acks.json"
    acknowledge(v.unacknowledged, acks)
    v2 = run_verdict(alert_timeline(REWARD_HACK_CLEARED), "finished", "r1", load_acks(acks))
    assert v2.level == "healthy" and v2.past == []
    # the same rule firing again later is a new episode: not acknowledged
    again = REWARD_HACK_CLEARED + [ev("alert", "reward_hacking", 50, 50, "critical")]
    v3 = run_verdict(alert_timeline(again), "running", "r1", load_acks(acks))
    assert v3.level == "critical" and v3.cause["first_step"] == 50


def test_root_cause_first_and_the_others_named_as_consequences():
    events = [
        ev("alert", "entropy_collapse", 9, 9, "critical"),
        ev("alert", "kl_runaway", 12, 11, "warning"),
        ev("alert_escalated", "kl_runaway", 16, 11, "critical"),
        ev("alert", "kl_control", 13, 13, "warning"),
    ]
    v = run_verdict(alert_timeline(events), "running", "r")
    assert v.cause["rule"] == "entropy_collapse"
    assert [e["rule"] for e in v.consequences] == ["kl_runaway", "kl_control"]
    assert v.headline == "entropy_collapse since step 9; likely consequences: kl_runaway, kl_control"
    same_step = root_cause_first(
        [{"rule": "w", "first_step": 5, "severity": "warning"}, {"rule": "c", "first_step": 5, "severity": "critical"}]
    )
    assert same_step[0]["rule"] == "c"


def test_a_crashed_or_stopped_run_says_what_to_do_next():
    assert run_verdict([], "crashed", "r", run_dir="runs/a b").next_step == (
        "the trainer died; resume with: trainerd resume 'runs/a b'"
    )
    assert "trainerd resume" in run_verdict([], "stopped", "r", run_dir="runs/x").next_step
    assert run_verdict([], "finished", "r").next_step is None
    assert run_verdict([], "finished", "r").level == "healthy"


def test_damaged_ack_files_count_as_no_acknowledgement(tmp_path):
    p = tmp_path / "acks.json"
    for junk in (b"\xff\xfe", b"[1,2]", b'{"acknowledged": 3}', b"{" * 10):
        p.write_bytes(junk)
        assert load_acks(p) == set()
    assert load_acks(tmp_path / "missing.json") == set()
    assert acknowledge(["k"], p) == {"k"} and load_acks(p) == {"k"}


def test_fork_suggestion_maps_each_rule_to_its_change():
    from protocol.health import fork_step, fork_suggestion

    rec, cfg = {"kl_coef": 0.2, "learning_rate": 1e-4}, {"kl_coef": 0.05, "learning_rate": 1e-3}
    assert fork_suggestion("kl_runaway", "runs/a b", 40, rec, cfg) == (
        "trainerd fork 'runs/a b' --from-step 40 --set kl_coef=0.4"
    )
    assert fork_suggestion("reward_hacking_proxy", "r", 3, {}, cfg) == "trainerd fork r --from-step 3 --set kl_coef=0.1"
    for rule in ("policy_moving_too_fast", "exploding_gradients", "entropy_collapse", "non_finite"):
        assert fork_suggestion(rule, "r", 7, rec, cfg) == "trainerd fork r --from-step 7 --set learning_rate=0.0005"
    assert fork_suggestion("non_finite", "r", 7, rec, None) == "trainerd fork r --from-step 7 --set learning_rate=5e-05"
    # nothing to suggest: an unknown rule, no usable value, a bad step, hostile types
    assert fork_suggestion("value_collapse", "r", 7, rec, cfg) is None
    assert fork_suggestion("kl_runaway", "r", 7, {"kl_coef": 0.0}, {"kl_coef": "x"}) is None
    assert fork_suggestion("kl_runaway", "r", 7, {"kl_coef": float("nan")}, {"kl_coef": True}) is None
    assert fork_suggestion("kl_runaway", "r", True, rec, cfg) is None
    assert fork_suggestion(["kl_runaway"], "r", 7, "rec", 5) is None  # type: ignore[arg-type]
    assert fork_suggestion("kl_runaway", "r", 7, {"kl_coef": 1e308}, cfg) is None  # x2 overflows
    # the step: the last checkpoint at or before the alert's first step, else the first step
    assert fork_step([10, 20, 40, 60], 45) == 40
    assert fork_step([10, 20, 40, 60], 40) == 40
    assert fork_step([60], 45) == 45
    assert fork_step(["x", True, -1], 45) == 45
    assert fork_step([10], None) is None
