"""Adapters: other frameworks' runs in the kit's monitor, alerts, report and checks (offline)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import TBWriter, openrlhf_metrics, write_tb, write_verl_jsonl

from adapters.aliases import TABLES, map_metrics
from adapters.logger import RunLogger
from adapters.sources import LOOKED_FOR, MappedSource, SourceError, TensorBoardSource, VerlFileSource, detect
from protocol.jsonl import read_jsonl
from protocol.steplog import read_steplog

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT)


# -- the real TRL runs -------------------------------------------------------------------------------


def test_trl_tensorboard_dirs_read_through_the_alias_table(trl_runs):
    g = detect(trl_runs["grpo"]["tb_parent"])  # output_dir: the event file is in runs/<date_host>/
    recs = g.read_all()
    assert isinstance(g, TensorBoardSource) and g.table.framework == "trl"  # told from the tags
    assert [r["step"] for r in recs] == list(range(1, 7))
    for k in ("kl", "entropy", "reward_mean", "reward_std", "clip_frac", "response_length_mean", "grad_norm"):
        assert all(math.isfinite(r[k]) for r in recs), k
    assert "completions/max_length" in recs[-1]  # no catalogue entry: kept under its own name
    assert "kl_coef" in g.manifest()["adapter"]["missing"]
    if "callback" not in trl_runs["ppo"]:
        pytest.skip(f"trl.experimental.ppo: {trl_runs['ppo']['error']}")
    p = detect(trl_runs["ppo"]["tb_parent"])
    recs = p.read_all()
    assert len(recs) == 6 and p.table.framework == "trl"
    last = recs[-1]
    # objective/kl and objective/entropy are per sequence: never the per-token kl / entropy
    assert "kl_seq" in last and "entropy_seq" in last and "kl" not in last
    assert last["entropy"] < last["entropy_seq"]  # per token (policy/entropy_avg) vs summed
    for k in ("approx_kl", "clip_frac", "policy_loss", "value_loss", "reward_mean", "learning_rate"):
        assert k in last, k


def test_callback_run_dir_is_a_kit_run(trl_runs):
    from trainerd.verify import m3

    for name in ("grpo", "ppo"):
        if "callback" not in trl_runs[name]:
            continue
        cb = trl_runs[name]["callback"]
        paths = cb.paths
        m = json.loads(paths.manifest.read_text())
        assert m["status"] == "finished" and m["versions"]["trl"] == "1.12.0"
        assert m["adapter"]["framework"] == "trl" and m["config"]["logging_steps"] == 1
        recs, stats = read_steplog(paths.steps)
        assert [r["step"] for r in recs] == list(range(1, 7)) and stats.corrupt_frames == 0
        assert m3.run(str(paths.root)) == 0, name
    grpo = trl_runs["grpo"]["callback"].paths
    rec = read_steplog(grpo.steps)[0][-1]
    assert rec["stage_s"]["rollout"] > 0 and rec["stage_s"]["policy_update"] > 0  # bound: stage timers
    samples = read_jsonl(grpo.samples)
    assert {s["step"] for s in samples} == {2, 4, 6} and {s["pick"] for s in samples} == {"best", "worst", "random"}
    assert all(isinstance(s["response"], str) and isinstance(s["length"], int) for s in samples)


def test_callback_costs_under_one_percent_of_a_step(trl_runs):
    cb = trl_runs["grpo"]["callback"]
    per_step = cb.step_overhead_s / cb.logged_steps
    step = trl_runs["grpo"]["train_s"] / cb.logged_steps
    print(f"\ncallback: {per_step * 1e3:.3f} ms per step of {step * 1e3:.0f} ms ({per_step / step:.3%})")
    assert per_step / step < 0.01


def test_report_and_status_on_a_tensorboard_dir(trl_runs):
    tb = str(trl_runs["grpo"]["tb_parent"])
    r = _cli("trainerd", "report", tb)
    assert r.returncode == 0, r.stderr
    assert "framework:     TRL (tensorboard)" in r.stdout and "steps:         6 (1..6)" in r.stdout
    assert "frac_reward_zero_std" in r.stdout and "train_runtime" not in r.stdout  # the summary is no step
    r = _cli("trainerd", "status", tb, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"] in ("live", "idle") and info["step"] == 6  # never "running": no lock


def test_monitor_shows_trl_runs(trl_runs):
    from tui.app import MonitorApp

    async def show(target) -> tuple:
        app = MonitorApp(target, live=False)
        async with app.run_test(size=(160, 50)) as pilot:
            for _ in range(200):
                await pilot.pause(0.05)
                if app.settled and app.model.store.last_step == 6:
                    break
            return app.model.store.last_step, app.model.run_id, app.model.status, list(app.model.store.extra)

    step, rid, status, extra = asyncio.run(show(trl_runs["grpo"]["tb_parent"]))
    assert step == 6 and "TRL" in rid and "lacks kl_target" in rid and status in ("live", "idle")
    assert "completions/max_length" in extra  # listed and chartable under its own name
    step, rid, status, _ = asyncio.run(show(trl_runs["grpo"]["callback"].paths.root))
    assert step == 6 and "TRL 1.12.0" in rid and status == "finished"


# -- veRL and OpenRLHF ------------------------------------------------------------------------------


def test_verl_file_logger_and_tensorboard(tmp_path):
    f = write_verl_jsonl(tmp_path / "verl_logs" / "proj" / "exp.jsonl", range(1, 6))
    for target in (f, tmp_path / "verl_logs"):  # $VERL_FILE_LOGGER_PATH or $VERL_FILE_LOGGER_ROOT
        src = detect(target)
        recs = src.read_all()
        assert isinstance(src, VerlFileSource) and src.label == "veRL"
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
        r = recs[0]
        assert r["kl"] == pytest.approx(0.021) and r["kl_coef"] == 0.001 and r["explained_variance"] == 0.3
        assert r["stage_s"]["rollout"] == 2.0 and r["stage_s"]["value_update"] == 0.8
        assert r["stage_s"]["other"] == pytest.approx(4.8 - 4.61)  # the rest of timing_s/step
        assert math.isnan(r["stage_s"]["reward"])  # not timed by this run
        assert r["perf/throughput"] == 853.3
    src = detect(write_tb(tmp_path / "verl_tb", "verl", range(1, 6)))
    assert src.read_all()[-1]["advantage_mean"] == 0.0 and src.table.framework == "verl"


def test_openrlhf_tensorboard(tmp_path):
    src = detect(write_tb(tmp_path / "orl", "openrlhf", range(1, 8)))
    r = src.read_all()[-1]
    assert src.label == "OpenRLHF"
    assert r["clip_frac"] == pytest.approx(0.03) and r["grad_norm"] == pytest.approx(0.7)
    assert r["entropy"] == pytest.approx(1.1) and r["value_loss"] == pytest.approx(0.3) and r["total_length"] == 400


def test_kl_blowup_fires_kl_runaway_live(tmp_path):
    """A TensorBoard dir read as it grows (one loader per file, kept across polls); the live alert
    engine raises the same kl_runaway as on a kit run."""
    from tui.adapted import AdaptedFeed, adapted_target

    d = tmp_path / "orl"
    d.mkdir()
    w = TBWriter(d)
    for s in range(1, 11):
        w.scalars(s, openrlhf_metrics(s), prefix="train/")
    w.flush()
    feed = AdaptedFeed(adapted_target(d))
    b = feed.poll()
    got = list(b.cols["step"]) if b.cols else []
    fired = feed.evaluate(b).alerts
    loaders = dict(feed.source.loaders)
    assert got == list(range(1, 10)) and not fired  # step 10 is held until it is complete (quiet)
    assert b.manifest["adapter"]["label"] == "OpenRLHF" and b.status == "live"
    for s in range(11, 16):
        w.scalars(s, openrlhf_metrics(s, kl_blowup_at=12), prefix="train/")
    w.flush()
    b = feed.poll()
    assert list(b.cols["step"]) == list(range(10, 15))
    assert feed.source.loaders == loaders  # the same loader read on from where it stopped
    alerts = feed.evaluate(b).alerts
    assert ("alert", "kl_runaway") in [(ev, a.rule) for ev, a in alerts]
    assert next(a for ev, a in alerts if a.rule == "kl_runaway").first_step == 12
    w.close()


def test_run_logger_with_a_kl_blowup_writes_alert_events(tmp_path):
    with RunLogger(tmp_path / "runs", "verl", config={"steps": 20}, versions={"verl": "0.5.0"}) as lg:
        from fixtures import verl_metrics

        for s in range(1, 21):
            lg.log(s, verl_metrics(s, kl_blowup_at=15))
    events = read_jsonl(lg.paths.events)
    alert = next(e for e in events if e["event"] == "alert" and e["rule"] == "kl_runaway")
    assert alert["first_step"] == 15 and alert["metric"] == "kl"
    from trainerd.verify import m3

    assert m3.run(str(lg.paths.root)) == 0


# -- a mapped JSONL / CSV, nothing recognisable, failures ---------------------------------------


def test_mapped_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text("iteration,wall,my_kl,gen_s,other_thing\n1,100.0,0.01,2.5,7\n2,101.0,0.02,2.4,8\n")
    (tmp_path / "rlhf-map.toml").write_text(
        'file = "m.csv"\nframework = "mine"\nstep = "iteration"\ntime = "wall"\n'
        '[metrics]\nkl = "my_kl"\n[stages]\nrollout = "gen_s"\n'
    )
    for target in (tmp_path, tmp_path / "m.csv", tmp_path / "rlhf-map.toml"):
        src = detect(target)
        assert isinstance(src, MappedSource) and src.label == "mine"
        recs = src.read_all()
        assert [(r["step"], r["time"], r["kl"], r["other_thing"]) for r in recs] == [
            (1, 100.0, 0.01, 7),
            (2, 101.0, 0.02, 8),
        ]
        assert recs[0]["stage_s"]["rollout"] == 2.5
    j = tmp_path / "j"
    j.mkdir()
    (j / "log.jsonl").write_text('{"it": 1, "train": {"kl": 0.5}}\n{"it": 2, "train": {"kl": 0.6}}\n')
    (j / "rlhf-map.toml").write_text('file = "log.jsonl"\nstep = "it"\n[metrics]\nkl = "train/kl"\n')
    assert [r["kl"] for r in detect(j).read_all()] == [0.5, 0.6]
    (j / "rlhf-map.toml").write_text('file = "log.jsonl"\n[metrics]\nnot_a_field = "x"\n')
    with pytest.raises(SourceError, match="not a catalogue field"):
        detect(j)


def test_nothing_recognisable_says_what_was_looked_for(tmp_path):
    from tui.cli import check_target

    (tmp_path / "notes.txt").write_text("hello\n")
    line = check_target(str(tmp_path))
    assert "looked for" in line and "TensorBoard" in line and "veRL" in line and "\n" not in line
    assert LOOKED_FOR in line
    for cmd in (("trainerd", "report", str(tmp_path)), ("trainerd", "status", str(tmp_path))):
        r = _cli(*cmd)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "looked for" in r.stderr


def test_a_logger_that_cannot_write_turns_off_without_raising(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    lg = RunLogger(blocker / "runs", "trl")  # a runs dir under a file: cannot be created
    assert lg.log(1, {"kl": 0.1}) == [] and not lg.enabled
    assert lg.log(2, {"kl": 0.1}) == []
    lg.close()
    assert sum("logging turned off" in r.message for r in caplog.records) == 1
    assert not RunLogger(tmp_path / "r2", "trl", rank_zero=False).start().enabled  # other ranks: nothing


def test_alias_tables_never_put_per_sequence_metrics_in_per_token_fields():
    trl = map_metrics(TABLES["trl"], {"train/objective/kl": 12.0, "train/objective/entropy": 30.0})
    assert trl == {"kl_seq": 12.0, "entropy_seq": 30.0}
    both = map_metrics(TABLES["verl"], {"actor/kl_loss": 0.3, "actor/reward_kl_penalty": 0.1})
    assert both["kl"] == 0.1 and both["actor/kl_loss"] == 0.3
    assert map_metrics(TABLES["openrlhf"], {"train/kl": 0.2})["kl"] == 0.2
    t0 = time.perf_counter()
    for _ in range(1000):
        map_metrics(TABLES["verl"], {"actor/pg_loss": 0.1, "timing_s/gen": 1.0})
    assert time.perf_counter() - t0 < 1.0
