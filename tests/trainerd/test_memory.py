"""Memory (issue 19): per-stage peaks, `trainerd memory RUN`, the memory alerts and the leak
injection, on real runs (the session's smoke run, one short leak run) and real replays."""

from __future__ import annotations

import json
import math

import pytest

from protocol.alerts import DEFAULT_RULES, AlertEngine, rules_from_dict
from protocol.catalogue import STAGES, check_record
from protocol.steplog import read_steplog
from trainerd import config as config_mod
from trainerd.errors import ConfigError

MiB = 1 << 20


# -- the alert rules on made-up records (fast) ---------------------------------------------------


def _run(engine: AlertEngine, values, key="rss_bytes", extra=None):
    fired = []
    for i, v in enumerate(values, 1):
        rec = {"step": i, key: v, **(extra or {})}
        fired += [(e, a.rule, i) for e, a in engine.update(rec) if a.rule.startswith("memory")]
    return fired


def test_memory_leak_fires_on_steady_growth_and_says_how_much():
    base = 400 * MiB
    values = [base] * 10 + [base + k * 8 * MiB for k in range(1, 31)]
    fired = _run(AlertEngine(), values)
    assert fired and fired[0][:2] == ("alert", "memory_leak"), fired
    assert 20 <= fired[0][2] <= 30
    alert = AlertEngine()
    for i, v in enumerate(values, 1):
        for _e, a in alert.update({"step": i, "rss_bytes": v}):
            if a.rule == "memory_leak":
                assert "grew by" in a.message() and "MiB" in a.message()
                assert a.compared["rss_bytes_trend_r"] > 0.9 and a.value > 64 * MiB
                return
    pytest.fail("no memory_leak alert")


def test_memory_leak_quiet_on_noise_a_plateau_and_a_single_jump():
    import random

    r = random.Random(0)
    noise = [400 * MiB + r.randint(-20, 20) * MiB for _ in range(200)]
    assert _run(AlertEngine(), noise) == []
    warmup = [300 * MiB + min(k, 8) * 12 * MiB for k in range(100)]  # allocator warm-up, then flat
    assert _run(AlertEngine(), warmup) == []
    jump = [400 * MiB] * 50 + [600 * MiB] * 50  # one step up (a checkpoint, the profiler): not a leak
    assert _run(AlertEngine(), jump) == []
    slow = [400 * MiB + k * MiB // 2 for k in range(200)]  # 0.5 MiB/step: under 64 MiB per 20 steps
    assert _run(AlertEngine(), slow) == []


def test_memory_near_limit_relative_to_the_configured_limit():
    limit = 1000 * MiB
    values = [800 * MiB] * 5 + [950 * MiB] * 3 + [800 * MiB] * 5
    fired = _run(AlertEngine(), values, key="peak_rss_bytes", extra={"memory_limit_bytes": limit})
    assert ("alert", "memory_near_limit", 6) in fired and ("alert_cleared", "memory_near_limit", 11) in fired
    assert _run(AlertEngine(), [950 * MiB] * 5, key="peak_rss_bytes") == []  # no limit: nothing to compare


def test_growing_rules_from_toml_are_validated():
    rules = rules_from_dict({"rules": {"memory_leak": {"threshold": 1e6, "trend_r": 0.8, "window": 5}}})
    assert next(r for r in rules if r.name == "memory_leak").trend_r == 0.8
    with pytest.raises(Exception, match="window"):
        rules_from_dict({"rules": {"memory_leak": {"window": 2}}})
    assert {"memory_leak", "memory_near_limit"} <= {r.name for r in DEFAULT_RULES}


def test_parse_size_and_memory_limit():
    assert config_mod.parse_size("16GiB") == 16 << 30
    assert config_mod.parse_size("512 MiB") == 512 << 20
    assert config_mod.parse_size("2GB") == 2 * 10**9
    assert config_mod.parse_size("1000") == 1000
    for bad in ("", "abc", "-1GiB", "0", "12 parsecs", "1e400GiB"):
        with pytest.raises(ConfigError):
            config_mod.parse_size(bad)
    with pytest.raises(ConfigError, match="memory_limit"):
        config_mod.TrainConfig(memory_limit="lots").validate()


# -- the replay: measured stage transients on the default config ---------------------------------


@pytest.fixture(scope="module")
def default_probes():
    """The default config's step, replayed without and with micro-batching (fresh models)."""
    from trainerd.run.memory import probe

    # the default config (one PPO epoch instead of 4: the same peaks, a quarter of the time)
    base = config_mod.TrainConfig(device="cpu", n_prompts=256, ppo_epochs=1)
    micro = config_mod.TrainConfig(device="cpu", n_prompts=256, ppo_epochs=1, micro_batch_size=4)
    return probe(base, steps_timed=1), probe(micro, steps_timed=1)


def test_update_peak_exceeds_rollout_on_the_default_config(default_probes):
    base, _ = default_probes
    t = {s: v["transient_bytes"] for s, v in base["stage_transient"].items()}
    assert set(t) >= set(STAGES) - {"other"}
    assert t["policy_update"] > 1.5 * t["rollout"] > 0, t
    assert all(v >= 0 for v in t.values())
    # parameters, gradients and optimizer state are counted from the tensors themselves
    pol = base["models"]["policy"]["parameters_bytes"]
    assert base["gradients_bytes"]["policy"] == pol and base["optimizer_bytes"]["policy"] >= 2 * pol
    assert base["models"]["reference"]["parameters_bytes"] == pol  # a frozen copy of the LM
    assert base["stage_peak_bytes"] and all(v > 0 for v in base["stage_peak_bytes"].values())


def test_micro_batching_lowers_the_update_peak_by_a_measured_amount(default_probes):
    base, micro = default_probes
    b = base["stage_transient"]["policy_update"]["transient_bytes"]
    m = micro["stage_transient"]["policy_update"]["transient_bytes"]
    # minibatch 32 in micro-batches of 4: activations of 4 sequences at a time, not 32
    assert m < 0.5 * b, (b, m)
    # the stages before the update do not change
    assert micro["stage_transient"]["rollout"]["transient_bytes"] == pytest.approx(
        base["stage_transient"]["rollout"]["transient_bytes"], rel=0.05
    )


# -- real runs -----------------------------------------------------------------------------------


def test_smoke_run_records_plausible_per_stage_peaks(trainer_smoke_run):
    records, _ = read_steplog(trainer_smoke_run.paths.steps)
    assert records
    for r in records:
        assert check_record(r) == []
        sp = r["stage_peak_bytes"]
        assert set(sp) == set(STAGES) - {"other"}, sp
        for v in sp.values():
            # a resident-memory high-water mark: more than torch's own runtime, at most the process peak
            assert 100 * MiB < v <= r["peak_rss_bytes"]
        assert r["rss_bytes"] <= r["peak_rss_bytes"]


def test_summary_csv_has_each_stages_own_peak(trainer_smoke_run):
    import csv

    paths = trainer_smoke_run.paths
    records, _ = read_steplog(paths.steps)
    a, b = config_mod.parse_profile_steps(config_mod.SMOKE["profile_steps"])
    window = [r for r in records if a <= r["step"] <= b]
    with open(paths.profile / "summary.csv") as f:
        rows = {row["stage"]: row for row in csv.DictReader(f)}
    for s in set(STAGES) - {"other"}:
        assert int(rows[s]["peak_memory_bytes"]) == int(max(r["stage_peak_bytes"][s] for r in window))


@pytest.fixture(scope="module")
def smoke_memory_json(trainer_smoke_run, trainerd_cli):
    p = trainerd_cli("memory", str(trainer_smoke_run.paths.root), "--json", "--budget", "1MiB", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_trainerd_memory_parts_add_up_to_the_measured_peak(trainer_smoke_run, smoke_memory_json):
    m = smoke_memory_json
    records, _ = read_steplog(trainer_smoke_run.paths.steps)
    peak = max(max(r["stage_peak_bytes"].values()) for r in records)
    assert m["step_peak_bytes"] == peak
    parts = m["parts"]
    assert sum(p["bytes"] for p in parts if p["in_peak"]) == pytest.approx(peak, abs=len(parts))
    kinds = {(p["model"], p["kind"]) for p in parts}
    for want in [
        ("all", "runtime"),
        ("policy", "parameters"),
        ("value_head", "parameters"),
        ("reference", "parameters"),
        ("reward_model", "parameters"),
        ("policy", "gradients"),
        ("policy", "optimizer_state"),
        ("policy", "checkpoint_copy"),
        ("policy", "kv_cache"),
        ("all", "allocator_cache"),
        ("all", "unattributed"),
    ]:
        assert want in kinds, want
    assert {p["how"] for p in parts} == {"measured", "computed"}
    assert next(p for p in parts if p["kind"] == "kv_cache")["how"] == "computed"
    act = next(p for p in parts if p["kind"] == "activations")
    assert act["how"] == "measured" and act["bytes"] > 0 and m["largest_stage"] == "policy_update"
    assert all(math.isfinite(s["transient_bytes"]) for s in m["stages"])
    sug = m["suggest"]
    assert not sug["fits_now"] and sug["picked"], sug
    assert any(k["knob"].startswith("micro_batch_size") and k["saving_bytes"] > 0 for k in sug["knobs"])
    assert all(k.get("set") for k in sug["picked"])


def test_trainerd_memory_text_and_user_errors(trainer_smoke_run, smoke_memory_json, trainerd_cli, tmp_path):
    from trainerd.tools.memory import format_text

    m = smoke_memory_json
    text = "\n".join(format_text(m["run"], m, m["suggest"]))
    assert "unattributed" in text and "measured" in text and "computed" in text and "policy_update" in text
    assert "--set micro_batch_size=" in text and "does not apply" in text
    run = str(trainer_smoke_run.paths.root)
    bad = trainerd_cli("memory", run, "--budget", "lots", timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--budget" in bad.stderr
    missing = trainerd_cli("memory", str(tmp_path / "nope"), timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_leak_injection_fires_memory_leak_and_a_clean_run_does_not(trainer_smoke_run, trainerd_cli, tmp_path):
    clean = [json.loads(line) for line in trainer_smoke_run.paths.events.read_text().splitlines()]
    assert not [e for e in clean if e.get("rule") == "memory_leak"]
    args = ("--smoke", "--foreground", "--runs-dir", str(tmp_path), "--run-id", "leak", "--inject", "leak@3")
    p = trainerd_cli("start", *args, "--steps", "24")
    assert p.returncode == 0, p.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "leak" / "events.jsonl").read_text().splitlines()]
    fired = [e for e in events if e.get("event") == "alert" and e.get("rule") == "memory_leak"]
    assert fired, [e.get("rule") for e in events]
    first = fired[0]
    assert 20 <= first["step"] <= 24 and first["metric"] == "rss_bytes"  # window 20, 3 steps in a row
    assert first["value"] > 64 * MiB and "grew by" in first["message"] and first["explanation"]


def test_monitor_history_evaluator_agrees_on_memory_rules():
    """The monitor's whole-history evaluator (numpy marks, the engine decides) gives the same
    memory alerts, first and clear steps, as a streaming pass."""
    import random

    from tui.history_alerts import evaluate_history
    from tui.store import RunStore

    rng = random.Random(1)
    records, rss = [], 400.0 * MiB
    for s in range(1, 400):
        leaking = 50 <= s < 120 or 250 <= s < 300
        rss += (12 * MiB if leaking else 0) + rng.uniform(-3, 3) * MiB
        records.append({"step": s, "rss_bytes": rss, "peak_rss_bytes": rss * 1.05, "memory_limit_bytes": 2.0 * 2**30})
    engine = AlertEngine()
    full = [(ev, a.rule, a.first_step, a.step) for r in records for ev, a in engine.update(r)]
    assert {"memory_leak", "memory_near_limit"} <= {k[1] for k in full}
    store = RunStore()
    store.extend(RunStore.columnize(records))
    got, _open = evaluate_history(DEFAULT_RULES, store)
    assert [(ev, a.rule, a.first_step, a.step) for ev, a in got] == full


def test_monitor_keeps_the_last_steps_stage_peaks_from_the_side_file_and_the_log(tmp_path):
    from protocol.rundir import RunPaths
    from protocol.steplog import StepLogWriter
    from tui.fastload import load_columns
    from tui.store import RunStore

    paths = RunPaths(tmp_path)
    recs = [
        {"step": s, "kl": 0.1, "stage_peak_bytes": {st: float((100 + s + i) * MiB) for i, st in enumerate(STAGES[:7])}}
        for s in range(1, 40)
    ]
    with StepLogWriter(paths.steps) as w:
        for r in recs:
            w.write(r)
    loaded = load_columns(paths, 1 << 60)
    assert loaded is not None and loaded.store.stage_peaks == recs[-1]["stage_peak_bytes"]
    store = RunStore()
    store.extend(RunStore.columnize(recs))
    assert store.stage_peaks == recs[-1]["stage_peak_bytes"]
