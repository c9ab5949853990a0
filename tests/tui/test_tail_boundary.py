"""The monitor's alerts where the tail it reads first meets the history it loads beside it: the
same as one streaming `AlertEngine` pass over the whole log gives (what the trainer logged),
whichever way the history comes (decoded, from the side file, or whole before a live tail)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tui_helpers import T0, gen_run, make_run, wait_for

from protocol import rundir
from protocol.alerts import DEFAULT_RULES, AlertEngine, load_run_rules, save_run_rules
from protocol.columns import columns_path
from protocol.events import alert_timeline
from protocol.steplog import StepLogTailer, StepLogWriter
from tui import follow
from tui.app import MonitorApp
from tui.store import is_placeable

STEPS = 3000
BOUNDARY = 2001  # the tail read first begins with this step


def boundary_records(last: int = STEPS) -> list[dict]:
    """A clean generated run with three episodes at the BOUNDARY step, each a different way a
    fresh engine at the tail goes wrong:
    - reward_variance fires in the history (2 bad steps in a row) and stays bad into the tail:
      a fresh engine fires it again, a second episode with a later first step;
    - value_diverging (5 bad steps in a row) is bad for 3 steps before the boundary and 4 after:
      one pass fires it at step 2002; a fresh engine never sees 5 in a row;
    - exploding_gradients: a 20x spike 4 steps into the tail (over the 1.0 floor, under the
      1000 bar): one pass fires it on its rolling median; a fresh engine has no median yet."""
    model = gen_run.RunModel(STEPS, seed=7)
    records = []
    for step in range(1, last + 1):
        r = model.record(step, T0 + 0.5 * step)
        if 1990 <= step <= 2010:
            r["reward_std"] = 3.0
        if 1998 <= step <= 2004:
            r["explained_variance"] = -0.2
        if step == BOUNDARY + 4:
            r["grad_norm"] = 20 * r["grad_norm"]
        records.append(r)
    return records


def write_run(runs_dir: Path, run_id: str, records: list[dict]) -> rundir.RunPaths:
    paths = rundir.create_run(runs_dir, run_id)
    manifest = rundir.new_manifest(paths, {"steps": STEPS}, 7, {}, {})
    manifest.update(started_at=T0, status="finished", ended_at=T0 + STEPS * 0.5)
    rundir.write_manifest(paths, manifest)
    with StepLogWriter(paths.steps) as w:
        for r in records:
            w.write(r)
    return paths


def one_pass(records: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """(events, open alerts) of one streaming engine over every record from the first."""
    engine = AlertEngine(DEFAULT_RULES)
    events = [key(ev, a) for r in records if is_placeable(r) for ev, a in engine.update(r)]
    return events, sorted(open_key(a) for a in engine.open.values())


def key(event, a) -> tuple:
    return (event, a.rule, a.severity, a.first_step, a.cleared_step if event == "alert_cleared" else a.step)


def open_key(a) -> tuple:
    return (a.rule, a.severity, a.first_step)


def tail_bytes_from(paths: rundir.RunPaths, step: int) -> int:
    """The tail size that makes the monitor's tail begin at `step`'s frame."""
    frames = StepLogTailer(paths.steps, with_offsets=True).poll(1 << 30)
    start = next(first for first, _end, r in frames if r.get("step") == step)
    return paths.steps.stat().st_size - start


def shown(app: MonitorApp) -> tuple[list[tuple], list[tuple]]:
    m = app.model
    return [key(ev, a) for ev, a in m.alert_history], sorted(open_key(a) for a in m.open_alerts)


async def read_with_monitor(paths: rundir.RunPaths, tail_bytes: int, last_step: int = STEPS) -> MonitorApp:
    app = MonitorApp(paths.root, clock=lambda: T0 + 10_000, tail_bytes=tail_bytes, live=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.model.history_done, timeout=30, what="the history")
        await wait_for(pilot, lambda: app.model.alerts_step == last_step, timeout=30, what="the tail's alerts")
        assert len(app.model.store) == last_step
    return app


def finished_during_the_episodes() -> list[dict]:
    return boundary_records(last=BOUNDARY + 2)  # reward_variance and value_diverging open at the end


def logged_episodes(paths: rundir.RunPaths) -> list[tuple]:
    """The run's alert episodes as its writer's engine logged them in events.jsonl."""
    return [episode(ep) for ep in alert_timeline(rundir.read_events(paths))]


def episode(ep: dict) -> tuple:
    keys = ("rule", "severity", "first_step", "fired_step", "escalated_step", "cleared_step", "open")
    return tuple(ep[k] for k in keys)


def test_the_planted_episodes_straddle_the_boundary():
    """The run is what the tests below need: one pass and a pass from the boundary disagree."""
    records = boundary_records()
    events, _open = one_pass(records)
    from_boundary, _ = one_pass(records[BOUNDARY - 1 :])
    assert ("alert", "reward_variance", "warning", 1990, 1991) in events
    assert ("alert", "value_diverging", "warning", 1998, 2002) in events
    assert any(e[:2] == ("alert", "exploding_gradients") and e[3] == BOUNDARY + 4 for e in events)
    assert ("alert", "reward_variance", "warning", BOUNDARY, BOUNDARY + 1) in from_boundary  # a second episode
    assert not any(e[1] in ("value_diverging", "exploding_gradients") for e in from_boundary)


@pytest.mark.asyncio
@pytest.mark.parametrize("side_file", ["no side file", "side file"])
async def test_a_tail_first_open_gives_the_alerts_of_one_pass(runs_dir, monkeypatch, side_file):
    records = boundary_records()
    paths = write_run(runs_dir, "tail-first", records)
    if side_file == "no side file":
        Path(columns_path(paths.steps)).unlink()  # a run from before the side file: decoded
    else:
        monkeypatch.setattr(follow, "WHOLE_FIRST_BYTES", 0)  # too big to load first: beside the tail
    app = await read_with_monitor(paths, tail_bytes_from(paths, BOUNDARY))
    assert app.model.store.steps[0] == 1
    assert shown(app) == one_pass(records)


@pytest.mark.asyncio
async def test_a_run_that_ended_in_an_episode_keeps_it_open_whichever_way_it_is_read(runs_dir, monkeypatch):
    records = finished_during_the_episodes()
    expected = one_pass(records)
    assert [a[0] for a in expected[1]] == ["reward_variance", "value_diverging"]
    paths = write_run(runs_dir, "ended", records)
    rules = tuple(replace(r, enabled=r.name != "gpu_underused") for r in DEFAULT_RULES)
    save_run_rules(rules, paths.root)  # the run's own rules (none of these records has GPU fields)
    app = MonitorApp(paths.root, clock=lambda: T0 + 10_000, tail_bytes=tail_bytes_from(paths, BOUNDARY), live=False)
    async with app.run_test(size=(160, 50)) as pilot:  # the side file: the whole history first
        await wait_for(pilot, lambda: app.model.history_done, timeout=30, what="the history")
        await pilot.pause(0.2)
        assert len(app.model.store) == len(records)
        assert app.model.rules == load_run_rules(paths.root)[0]  # no record after the history: still its rules
    assert shown(app) == expected
    Path(columns_path(paths.steps)).unlink()
    app = await read_with_monitor(paths, tail_bytes_from(paths, BOUNDARY), last_step=len(records))
    assert shown(app) == expected


@pytest.mark.asyncio
async def test_a_live_run_goes_on_from_a_whole_history_loaded_first(runs_dir):
    """The side file gives the whole history before the first screen; the records the trainer
    writes after it are evaluated by an engine that goes on from where the history ended."""
    records = boundary_records()
    paths = write_run(runs_dir, "live", records[: BOUNDARY - 1])
    app = MonitorApp(paths.root, clock=lambda: T0 + 10_000, tail_bytes=64 << 10, live=True)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.model.history_done, timeout=30, what="the history")
        assert len(app.model.store) == BOUNDARY - 1  # it was loaded whole, not as a tail
        with StepLogWriter(paths.steps) as w:
            for r in records[BOUNDARY - 1 :]:
                w.write(r)
        await wait_for(pilot, lambda: app.model.alerts_step == STEPS, timeout=30, what="the new records' alerts")
    assert shown(app) == one_pass(records)


@pytest.mark.asyncio
@pytest.mark.parametrize("side_file", ["no side file", "side file"])
async def test_the_episodes_shown_are_the_ones_the_run_logged(runs_dir, monkeypatch, side_file):
    """A generated unstable run logs its engine's alerts as a trainer does: a gradient spike, a
    KL runaway that escalates and a NaN loss. The tail begins inside the runaway, after it
    fired and before it escalated: the monitor's episodes are the logged ones."""
    paths = make_run(runs_dir, "unstable", 3000, unstable=True)
    logged = logged_episodes(paths)
    runaway = next(ep for ep in logged if ep[0] == "kl_runaway")
    assert runaway[4] is not None and runaway[4] - runaway[3] > 2  # it escalated some steps after it fired
    if side_file == "no side file":
        Path(columns_path(paths.steps)).unlink()
    else:
        monkeypatch.setattr(follow, "WHOLE_FIRST_BYTES", 0)
    app = await read_with_monitor(paths, tail_bytes_from(paths, runaway[3] + 2))
    assert [episode(ep) for ep in app.model.episodes()] == logged
