"""The alert rule engine (SPEC section 8): every default rule fires and clears as specified."""

from __future__ import annotations

import math
import random

import pytest

from protocol.alerts import (
    DEFAULT_RULES,
    AlertConfigError,
    AlertEngine,
    rules_from_toml,
    thresholds_for,
)


def healthy(step: int, rng: random.Random | None = None, **over) -> dict:
    rng = rng or random.Random(step)
    rec = {
        "step": step,
        "kl": 0.05 + rng.uniform(-0.01, 0.01),
        "kl_target": 0.05,
        "kl_target_error": 0.0,
        "kl_coef": 0.1,
        "entropy": 1.0 + rng.uniform(-0.05, 0.05),
        "clip_frac": 0.1,
        "approx_kl": 0.01,
        "policy_loss": 0.1,
        "value_loss": 0.2,
        "grad_norm": 1.0 + rng.uniform(-0.2, 0.2),
        "explained_variance": 0.5,
        "reward_mean": rng.uniform(-0.1, 0.1),
        "reward_std": 0.5,
        "response_length_mean": 20 + rng.uniform(-1, 1),
    }
    rec["kl_target_error"] = rec["kl"] - rec["kl_target"]
    rec.update(over)
    return rec


def feed(engine, records):
    """[(step, event, rule, severity)] for everything that happened."""
    out = []
    for r in records:
        for ev, a in engine.update(r):
            out.append((r["step"], ev, a.rule, a.severity))
    return out


def only(events, rule):
    return [e for e in events if e[2] == rule]


def test_a_healthy_run_raises_nothing():
    rng = random.Random(0)
    eng = AlertEngine()
    assert feed(eng, [healthy(s, rng) for s in range(1, 301)]) == []
    assert eng.open == {} and eng.most_severe() is None


@pytest.mark.parametrize("metric", ["policy_loss", "value_loss", "kl", "entropy", "grad_norm", "reward_mean"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_fires_at_once_and_clears(metric, value):
    eng = AlertEngine()
    recs = [healthy(s) for s in range(1, 6)] + [healthy(6, **{metric: value})] + [healthy(7)]
    ev = only(feed(eng, recs), "non_finite")
    assert ev == [(6, "alert", "non_finite", "critical"), (7, "alert_cleared", "non_finite", "critical")]
    a = eng.history[0][1]
    assert a.metric == metric and a.first_step == 6
    assert (math.isnan(a.value) and math.isnan(value)) or a.value == value
    # no other rule mistakes a NaN for a crossing (no double alert)
    assert {e[2] for e in feed(AlertEngine(), recs)} == {"non_finite"}


KL_WARMUP = 100  # kl_runaway and kl_control: the adaptive controller's settling time


def kl_rec(step: int, kl: float, coef: float, target: float = 0.1) -> dict:
    return healthy(step, kl=kl, kl_target=target, kl_target_error=kl - target, kl_coef=coef)


def test_kl_runaway_fires_after_two_steps_with_hysteresis_and_escalates():
    eng = AlertEngine()
    feed(eng, [kl_rec(s, 0.1, 0.1) for s in range(1, KL_WARMUP)])  # past the warm-up
    s0 = KL_WARMUP
    kl = [0.05, 0.25, 0.05] + [0.25, 0.22] + [0.19] * 10 + [0.14] * 5
    # the controller pushes back (kl_coef rises every step): the rule waits for its streak
    ev = only(feed(eng, [kl_rec(s0 + i, v, 0.1 * 1.01**i) for i, v in enumerate(kl)]), "kl_runaway")
    # one step over 0.2 is noise; two in a row fire; 0.19 sits between clear (0.15) and the
    # threshold (0.2): stays open; five steps at 0.14 clear it
    assert ev == [(s0 + 4, "alert", "kl_runaway", "warning"), (s0 + 19, "alert_cleared", "kl_runaway", "warning")]
    a = eng.history[0][1]
    assert a.first_step == s0 + 3 and a.threshold == 0.2
    assert "0.2" in a.message() and "2 steps in a row" in a.message()
    # escalation: above 3x kl_target (0.05 -> 0.15) for 5 steps turns it critical, not before
    eng = AlertEngine()
    feed(eng, [kl_rec(s, 0.05, 0.1, 0.05) for s in range(1, KL_WARMUP)])
    ev = feed(eng, [kl_rec(s, 0.25, 0.1 * 1.01**s, 0.05) for s in range(s0, s0 + 4)])
    assert only(ev, "kl_runaway") == [(s0 + 1, "alert", "kl_runaway", "warning")]
    ev = feed(eng, [kl_rec(s0 + 4, 0.25, 0.1 * 1.01 ** (s0 + 4), 0.05)])
    assert only(ev, "kl_runaway") == [(s0 + 4, "alert_escalated", "kl_runaway", "critical")]
    a = eng.open["kl_runaway"]
    assert a.severity == "critical" and eng.most_severe().rule == "kl_runaway"
    assert "over 3x kl_target = 0.15 for 5 steps" in a.message() and a.compared["kl_target"] == 0.05
    recs = [kl_rec(s, 0.25, 0.1 * 1.01**s, 0.05) for s in range(s0 + 5, s0 + 20)]
    assert only(feed(eng, recs), "kl_runaway") == []
    # above 0.2 but below 3x target: never critical
    eng = AlertEngine()
    ev = feed(eng, [kl_rec(s, 0.25, 0.1 * 1.01**s) for s in range(s0, s0 + 30)])
    assert [e[1] for e in only(ev, "kl_runaway")] == ["alert"]


def test_kl_runaway_warm_up_lets_the_controller_overshoot_but_not_run_away():
    """Early on the adaptive controller legitimately overshoots (to ~4.4x its target in clean
    runs) while it raises kl_coef every step: no warning. KL over 0.2 while kl_coef stays put (a
    zeroed, fixed or clamped penalty: nothing pushes back) fires at once, warm-up or not, and
    so does KL past the hard threshold (1.0)."""
    overshoot = [0.0, 0.05, 0.12, 0.2, 0.24, 0.35, 0.44, 0.31, 0.26, 0.23, 0.21, 0.18, 0.12, 0.1]
    coef = [0.2 * 1.06**i for i in range(len(overshoot))]
    ev = feed(AlertEngine(), [kl_rec(i + 1, v, c) for i, (v, c) in enumerate(zip(overshoot, coef))])
    assert only(ev, "kl_runaway") == []
    eng = AlertEngine()
    recs = [kl_rec(s, 0.02, 0.3 * 0.97**s) for s in range(1, 5)] + [kl_rec(5, 0.02, 0.0), kl_rec(6, 0.38, 0.0)]
    ev = feed(eng, recs)
    assert only(ev, "kl_runaway") == [(6, "alert", "kl_runaway", "warning")]
    a = eng.open["kl_runaway"]
    assert a.first_step == 6 and a.value == 0.38 and a.threshold == 0.2
    assert a.compared["kl_coef_before"] == 0.0 and a.compared["kl_coef"] == 0.0
    assert "kl_coef is not rising: 0 -> 0, nothing pushes back" in a.message(), a.message()
    # a controller that keeps pushing but cannot hold KL: past 1.0 it fires anyway
    eng = AlertEngine()
    ev = feed(eng, [kl_rec(s, 0.3 * s, 0.2 * 1.06**s) for s in range(1, 6)])
    assert only(ev, "kl_runaway") == [(4, "alert", "kl_runaway", "warning")]
    assert "hard threshold 1" in eng.open["kl_runaway"].message()


def test_kl_control_fires_when_the_controller_stays_saturated():
    """kl / kl_target - 1 beyond the controller's +-0.2 clip for 30 steps in a row (after the
    warm-up), whatever the target: the error is relative to it."""
    eng = AlertEngine()
    feed(eng, [healthy(s, kl=0.3, kl_target=0.1, kl_target_error=0.2) for s in range(1, KL_WARMUP)])
    assert not eng.open.get("kl_control")  # warm-up: the controller is still settling
    s0 = KL_WARMUP

    def rec(s, kl, target=0.1):
        return healthy(s, kl=kl, kl_target=target, kl_target_error=kl - target)

    # 29 pinned steps, one back inside the band, then 30 pinned (low side): fires on the 30th
    recs = [rec(s0 + i, 0.125) for i in range(29)] + [rec(s0 + 29, 0.11)]
    recs += [rec(s0 + 30 + i, 0.07) for i in range(30)]
    recs += [rec(s0 + 60 + i, 0.1) for i in range(5)]
    ev = only(feed(eng, recs), "kl_control")
    assert ev == [(s0 + 59, "alert", "kl_control", "warning"), (s0 + 64, "alert_cleared", "kl_control", "warning")]
    a = next(x for e, x in eng.history if x.rule == "kl_control")
    assert a.first_step == s0 + 30 and a.value == pytest.approx(-0.3) and a.threshold == 0.2
    assert a.metric == "kl_target_error" and a.compared["kl_target"] == 0.1
    assert "kl_target_error / kl_target = -0.3" in a.message()
    # the same absolute error with a 10x larger target is inside the band: no alert
    eng = AlertEngine()
    recs = [rec(s, 1.03, target=1.0) for s in range(1, KL_WARMUP + 60)]
    assert only(feed(eng, recs), "kl_control") == []


def test_entropy_collapse():
    eng = AlertEngine()
    ent = [1.0, 0.05, 0.11, 0.11, 0.11, 0.11, 0.2, 0.2, 0.2]
    ev = only(feed(eng, [healthy(i + 1, entropy=v) for i, v in enumerate(ent)]), "entropy_collapse")
    assert ev == [(2, "alert", "entropy_collapse", "critical"), (9, "alert_cleared", "entropy_collapse", "critical")]


def test_entropy_collapse_from_a_high_level_short_of_the_absolute_bar():
    """A one-step fall from 2.4 to 0.22 nats/token (a sharpened policy late in a run) stops short
    of 0.1 but is a collapse: under a fifth of the rolling median and under 0.5."""
    eng = AlertEngine()
    recs = [healthy(s, entropy=2.4 + 0.01 * (s % 3)) for s in range(1, 51)]
    recs += [healthy(51, entropy=0.6)]  # a quarter of the median, but over 0.5: not yet
    recs += [healthy(52, entropy=0.22)]
    ev = only(feed(eng, recs), "entropy_collapse")
    assert ev == [(52, "alert", "entropy_collapse", "critical")]
    a = eng.open["entropy_collapse"]
    assert a.threshold == pytest.approx(2.41 / 5) and a.compared["median"] == pytest.approx(2.41)
    assert "is 0.09" in a.message() and "below the median / 5 and below 0.5" in a.message(), a.message()
    # a slow, healthy decline never trips the relative bar
    recs = [healthy(s, entropy=2.4 * 0.995**s) for s in range(1, 400)]
    assert only(feed(AlertEngine(), recs), "entropy_collapse") == []


def test_exploding_gradients_absolute_and_spike_over_rolling_median():
    eng = AlertEngine()
    ev = only(feed(eng, [healthy(1), healthy(2, grad_norm=1500.0)]), "exploding_gradients")
    assert ev == [(2, "alert", "exploding_gradients", "critical")]  # no warm-up on the absolute bar
    eng = AlertEngine()
    recs = [healthy(s, grad_norm=2.0) for s in range(1, 21)]
    recs += [healthy(21, grad_norm=19.0)]  # 9.5x the median: not a spike
    recs += [healthy(22, grad_norm=25.0)]  # 12.5x: a spike, far below 1000
    recs += [healthy(s, grad_norm=2.0) for s in range(23, 26)]
    ev = only(feed(eng, recs), "exploding_gradients")
    assert ev == [
        (22, "alert", "exploding_gradients", "critical"),
        (25, "alert_cleared", "exploding_gradients", "critical"),
    ]
    a = eng.history[0][1]
    assert a.value == 25.0 and a.threshold == pytest.approx(20.0)  # the bar it crossed: 10x median
    # the message says what was compared: value, median and the factor
    assert a.compared == {"median": 2.0, "factor": 12.5, "spike_factor": 10.0, "spike_floor": 1.0}
    msg = a.message()
    assert "grad_norm=25 is 12.5x its rolling median 2 " in msg and "10x the median" in msg, msg
    assert a.to_event("alert")["compared"]["median"] == 2.0


def test_a_spike_over_a_tiny_median_needs_the_absolute_floor():
    """The reported false alarm: after a KL blow-up grad norms sink to ~1e-3; 0.01 is '10x the
    median' but still a tiny gradient, below the clipping norm. It must not fire; a real spike
    over the floor still does."""
    eng = AlertEngine()
    recs = [healthy(s, grad_norm=0.0003 + 0.0001 * (s % 3)) for s in range(1, 51)]
    recs += [healthy(s, grad_norm=0.01) for s in range(51, 54)]
    assert only(feed(eng, recs), "exploding_gradients") == []
    ev = only(feed(eng, [healthy(54, grad_norm=1.5)]), "exploding_gradients")
    assert ev == [(54, "alert", "exploding_gradients", "critical")]
    a = eng.open["exploding_gradients"]
    assert a.threshold == 1.0 and a.compared["spike_floor"] == 1.0  # the bar crossed: the floor


def test_reward_variance_and_policy_moving_too_fast():
    for metric, rule, bad, band, good in (
        ("reward_std", "reward_variance", 2.5, 1.9, 1.5),
        ("clip_frac", "policy_moving_too_fast", 0.35, 0.28, 0.2),
    ):
        eng = AlertEngine()
        vals = [bad, good, bad, bad, band, band, band, good, good, good]
        ev = only(feed(eng, [healthy(i + 1, **{metric: v}) for i, v in enumerate(vals)]), rule)
        assert ev == [(4, "alert", rule, "warning"), (10, "alert_cleared", rule, "warning")], rule
        assert eng.history[0][1].first_step == 3  # the one-step blip at step 1 did not count


def test_value_diverging_respects_warm_up():
    eng = AlertEngine()
    recs = [healthy(s, explained_variance=-0.5) for s in range(1, 20)]
    assert only(feed(eng, recs), "value_diverging") == []  # warm-up: steps before 20 ignored
    recs = [healthy(s, explained_variance=-0.5) for s in range(20, 25)]
    recs += [healthy(s, explained_variance=0.02) for s in range(25, 30)]  # in the band
    recs += [healthy(s, explained_variance=0.3) for s in range(30, 33)]
    ev = only(feed(eng, recs), "value_diverging")
    assert ev == [(24, "alert", "value_diverging", "warning"), (32, "alert_cleared", "value_diverging", "warning")]
    assert eng.history[0][1].first_step == 20


def test_reward_hacking_when_reward_rises_and_gold_falls():
    eng = AlertEngine()
    rng = random.Random(3)
    recs = [
        healthy(
            s,
            rng,
            reward_mean=0.05 * s + rng.uniform(-0.02, 0.02),
            gold_reward_mean=1.0 - 0.03 * s + rng.uniform(-0.02, 0.02),
        )
        for s in range(1, 41)
    ]
    ev = feed(eng, recs)
    hack = only(ev, "reward_hacking")
    assert hack and hack[0][1:] == ("alert", "reward_hacking", "critical")
    assert hack[0][0] == 22  # window of 20 full at step 20, then 3 consecutive steps
    assert only(ev, "reward_hacking_proxy") == []  # gold is known: the proxy rule stays out
    a = eng.open["reward_hacking"]
    assert a.first_step == 20 and a.value > 0.5
    # it says what it compared: both trends (correlation with the step, and slope), named as such
    c = a.compared
    assert c["reward_mean_trend_r"] > 0.5 and c["gold_reward_mean_trend_r"] < -0.5
    assert a.value == pytest.approx(min(c["reward_mean_trend_r"], -c["gold_reward_mean_trend_r"]))
    assert c["reward_mean_slope_per_step"] == pytest.approx(0.05, abs=0.01)
    assert c["gold_reward_mean_slope_per_step"] == pytest.approx(-0.03, abs=0.01)
    msg = a.message()
    r, g = c["reward_mean_trend_r"], c["gold_reward_mean_trend_r"]
    assert f"reward_mean trend r={r:+.2f} (slope +0.0" in msg and f"gold_reward_mean trend r={g:+.2f}" in msg, msg
    assert "over the last 20 steps" in msg and "reward_mean=" not in msg
    # gold recovers (both rise): clears after 5 good steps
    recs = [healthy(s, reward_mean=0.05 * s, gold_reward_mean=0.05 * s) for s in range(41, 80)]
    ev = only(feed(eng, recs), "reward_hacking")
    assert [e[1] for e in ev] == ["alert_cleared"]
    # both rising from the start never fires
    eng = AlertEngine()
    recs = [healthy(s, reward_mean=0.05 * s, gold_reward_mean=0.04 * s) for s in range(1, 60)]
    assert only(feed(eng, recs), "reward_hacking") == []


def test_proxy_rule_only_without_gold():
    def recs(with_gold):
        out = []
        for s in range(1, 50):
            r = healthy(s, reward_mean=0.02 * s, kl=0.001 * s, response_length_mean=10 + 0.3 * s)
            if with_gold:
                r["gold_reward_mean"] = 0.02 * s
            out.append(r)
        return out

    ev = only(feed(AlertEngine(), recs(False)), "reward_hacking_proxy")
    assert ev and ev[0][1:] == ("alert", "reward_hacking_proxy", "warning")
    assert ev[0][0] == 34  # window 30, then 5 consecutive
    assert only(feed(AlertEngine(), recs(True)), "reward_hacking_proxy") == []


def test_every_default_rule_fires_and_alerts_carry_their_fields():
    """One scenario per rule; each alert has rule, metric, value, threshold, first_step, explanation."""
    fired = {}
    scenarios = {
        "non_finite": [healthy(1, policy_loss=math.nan)],
        "kl_runaway": [healthy(1, kl=0.5), healthy(2, kl=0.5)],  # kl_coef stays put: fires at once
        "kl_control": [healthy(s, kl_target_error=0.3) for s in range(1, 131)],
        "entropy_collapse": [healthy(1, entropy=0.01)],
        "exploding_gradients": [healthy(1, grad_norm=5000.0)],
        "reward_variance": [healthy(s, reward_std=3.0) for s in range(1, 3)],
        "policy_moving_too_fast": [healthy(s, clip_frac=0.5) for s in range(1, 3)],
        "value_diverging": [healthy(s, explained_variance=-1.0) for s in range(1, 30)],
        "reward_hacking": [healthy(s, reward_mean=0.1 * s, gold_reward_mean=-0.1 * s) for s in range(1, 30)],
        "reward_hacking_proxy": [
            healthy(s, reward_mean=0.1 * s, kl=0.001 * s, response_length_mean=s * 1.0) for s in range(1, 40)
        ],
        "memory_leak": [healthy(s, rss_bytes=(400 + 16 * s) << 20) for s in range(1, 30)],
        "memory_near_limit": [healthy(1, peak_rss_bytes=950 << 20, memory_limit_bytes=1000 << 20)],
        "straggler": [healthy(s, rank_compute_s={"0": 0.1, "1": 0.3}) for s in range(1, 6)],
        "gpu_memory_near_full": [healthy(1, gpu_mem_used_peak_bytes=79 << 30, gpu_mem_total_bytes=80 << 30)],
        "gpu_underused": [healthy(s, gpu_util_mean=12.0) for s in range(1, 30)],
        "gpu_thermal_slowdown": [healthy(s, gpu_temp_c=92.0, gpu_temp_margin_c=-1.0) for s in range(1, 3)],
    }
    assert set(scenarios) == {r.name for r in DEFAULT_RULES}
    for name, recs in scenarios.items():
        eng = AlertEngine()
        for r in recs:
            for ev, a in eng.update(r):
                if ev == "alert" and a.rule == name:
                    fired[name] = a
        assert name in fired, name
        a = fired[name]
        assert a.metric and isinstance(a.value, float) and isinstance(a.threshold, float)
        assert isinstance(a.first_step, int) and a.first_step >= 1
        assert a.explanation and "\n" not in a.explanation and "\n" not in a.message()
        assert a.explanation in a.message() and f"since step {a.first_step}" in a.message()
        e = a.to_event("alert")
        for k in ("rule", "metric", "value", "threshold", "first_step", "explanation", "severity", "message"):
            assert k in e, (name, k)


def test_thresholds_for_chart_colours():
    assert ("above", "warning", 0.2) in thresholds_for("kl")
    assert ("below", "critical", 0.1) in thresholds_for("entropy")
    assert thresholds_for("tokens") == []


# ---- TOML overrides ---------------------------------------------------------------------


def write(tmp_path, text, name="alerts.toml"):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


def test_toml_override_threshold_disable_and_new_rule(tmp_path):
    p = write(
        tmp_path,
        """
[rules.kl_runaway]
threshold = 0.3
clear_threshold = 0.28
consecutive = 1
clear_consecutive = 3
warmup_steps = 0
hard_threshold = 0.5

[rules.exploding_gradients]
spike_floor = 5.0

[rules.entropy_collapse]
enabled = false

[rules.short_answers]
metric = "response_length_mean"
kind = "below"
threshold = 4
severity = "warning"
consecutive = 2
explanation = "responses got very short: check for EOS exploitation"
""",
    )
    rules = rules_from_toml(p)
    eng = AlertEngine(rules)
    ev = feed(
        eng,
        [
            healthy(1, kl=0.25),
            healthy(2, kl=0.35),
            healthy(3, entropy=0.01),
            healthy(4, response_length_mean=2.0),
            healthy(5, response_length_mean=2.0),
        ],
    )
    assert [(e[0], e[1], e[2]) for e in ev] == [
        (2, "alert", "kl_runaway"),
        (5, "alert_cleared", "kl_runaway"),
        (5, "alert", "short_answers"),
    ]
    new = eng.open["short_answers"]
    assert new.threshold == 4.0 and new.first_step == 4 and "EOS" in new.explanation
    assert "entropy_collapse" not in [r.name for r in eng.rules]
    by_name = {r.name: r for r in rules}
    assert by_name["exploding_gradients"].spike_floor == 5.0 and by_name["kl_runaway"].hard_threshold == 0.5
    # untouched rules keep their defaults
    assert {r.name: r for r in rules}["kl_control"] == {r.name: r for r in DEFAULT_RULES}["kl_control"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[rules.kl_runaway\nthreshold = 1", "not valid TOML"),
        ("[rules.kl_runaway]\nthreshhold = 0.3", "unknown key 'threshhold'"),
        ('[rules.kl_runaway]\nthreshold = "high"', "must be a finite number"),
        ("[rules.kl_runaway]\nconsecutive = 1.5", "non-negative integer"),
        ('[rules.kl_runaway]\nenabled = "no"', "true or false"),
        ('[rules.kl_runaway]\nmetric = "kl_divergence"', "unknown metric 'kl_divergence'"),
        ('[rules.kl_runaway]\nkind = "sideways"', "kind must be one of"),
        ('[rules.kl_runaway]\nseverity = "doom"', "severity must be one of"),
        ('[rules.kl_runaway]\ncritical_factor_of = "kl_goal"', "unknown metric 'kl_goal'"),
        ('[rules.kl_control]\nrelative_to = "kl_goal"', "unknown metric 'kl_goal'"),
        ('[rules.kl_runaway]\npushback = "kl_coeff"', "unknown metric 'kl_coeff'"),
        ('[rules.exploding_gradients]\nspike_floor = "high"', "must be a finite number"),
        ("[rules.kl_runaway]\nhard_threshold = inf", "finite number"),
        ("[rules.kl_runaway]\nthreshold = nan", "finite number"),
        ('[rules.kl_runaway]\nexplanation = """two\nlines"""', "one line"),
        ('[rules.mine]\nmetric = "kl"', "needs kind, threshold, severity"),
        (
            '[rules.mine]\nmetric = "kl"\nkind = "above"\nthreshold = 1\nseverity = "warning"\nwindow = -1',
            "non-negative integer",
        ),
        ("[other]\nx = 1", "unknown top-level key"),
        ("rules = 3", "must be a table"),
        ("[rules]\nkl_runaway = 3", "must be a table"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_bad_alerts_files_raise_one_line_error_naming_the_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(AlertConfigError) as e:
        rules_from_toml(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg, msg


def test_missing_and_directory_alerts_file(tmp_path):
    for p, needle in ((tmp_path / "nope.toml", "does not exist"), (tmp_path, "cannot read")):
        with pytest.raises(AlertConfigError) as e:
            rules_from_toml(p)
        assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_banner_alert_is_the_most_severe_and_earliest():
    """Of several critical alerts the first to begin is shown (usually the cause)."""
    from protocol.alerts import Alert, most_severe

    def a(rule, sev, first):
        return Alert(rule, "kl", sev, 1.0, 0.5, first, first, "x")

    later = a("reward_hacking", "critical", 56)
    cause = a("kl_runaway", "critical", 21)
    warn = a("kl_control", "warning", 5)
    assert most_severe([later, warn, cause]) is cause
    assert most_severe([warn]) is warn and most_severe([]) is None


def _ranks(step: int, compute: dict, stages: dict | None = None) -> dict:
    r = healthy(step, rank_compute_s=compute)
    if stages is not None:
        r["rank_stage_s"] = stages
    return r


def test_straggler_compares_each_rank_with_the_median_of_the_others_and_names_rank_and_stage():
    eng = AlertEngine()
    # 4 ranks, rank 2 computes 0.5 s where the others take 0.2 s: 2.5x; it loses the time in rollout
    stages = {f"{r}.{s}": 0.05 for r in "0123" for s in ("rollout", "policy_update")}
    stages["2.rollout"] = 0.35
    slow = {"0": 0.2, "1": 0.21, "2": 0.5, "3": 0.19}
    ev = only(feed(eng, [_ranks(s, slow, stages) for s in range(1, 6)]), "straggler")
    assert [e[0] for e in ev] == [5]  # 5 steps in a row
    a = eng.open["straggler"]
    assert a.compared["rank"] == 2.0 and a.value == pytest.approx(0.5 / 0.2)
    assert a.compared["median_other_ranks_s"] == pytest.approx(0.2)
    assert "rank 2" in a.message() and "stage rollout" in a.message()
    # balanced again: clears after 5 steps under 1.15x
    even = {"0": 0.2, "1": 0.21, "2": 0.2, "3": 0.19}
    ev = only(feed(eng, [_ranks(s, even) for s in range(6, 12)]), "straggler")
    assert [e[1] for e in ev] == ["alert_cleared"]


def test_straggler_stays_quiet_on_jitter_a_single_process_and_records_without_ranks():
    eng = AlertEngine()
    # 1.5x, but only 3 ms slower: a tiny step's jitter, not a straggler (spike_floor 10 ms)
    recs = [_ranks(s, {"0": 0.006, "1": 0.009}) for s in range(1, 20)]
    recs += [_ranks(s, {"0": 0.2}) for s in range(20, 30)]  # one rank: nothing to compare
    recs += [healthy(s) for s in range(30, 40)]  # a single-process run's records
    recs += [_ranks(s, {"0": 0.2, "1": 0.24}) for s in range(40, 60)]  # 1.2x: under the threshold
    assert only(feed(eng, recs), "straggler") == []
