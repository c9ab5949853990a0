"""The monitor's per-rank timing view (a data-parallel run): which rank is slow, in which stage,
next to the stage breakdown; and the straggler alert, evaluated live by the monitor's engine."""

from __future__ import annotations

import pytest
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol.catalogue import STAGES
from tui.app import MonitorApp
from tui.widgets.panels import ProfilerPanel

pytestmark = pytest.mark.asyncio
SIZE = (160, 50)


def app_for(path) -> MonitorApp:
    return MonitorApp(path, clock=lambda: T0 + 10_000)


def rank_fields(slow_rollout: float) -> dict:
    """Two ranks; rank 1 spends `slow_rollout` extra seconds in its rollout (a straggler)."""
    stages = {s: 0.01 for s in STAGES}
    per = {"0": dict(stages), "1": {**stages, "rollout": 0.01 + slow_rollout}}
    compute = {r: sum(v.values()) for r, v in per.items()}
    step = max(compute.values()) + 0.005
    return {
        "world_size": 2,
        "comm_s": step - compute["0"],
        "rank_step_time_s": {r: step for r in per},
        "rank_compute_s": compute,
        "rank_comm_s": {r: step - compute[r] for r in per},
        "rank_stage_s": {f"{r}.{s}": v for r, st in per.items() for s, v in st.items()},
    }


async def test_rank_view_names_the_slow_rank_and_stage_and_the_alert_fires(runs_dir):
    paths = make_run(runs_dir, "dp", 5, status="running")
    w = LiveWriter(paths)
    app: MonitorApp = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 5, what="the first steps")
        assert "rank" not in rendered(app.query_one(ProfilerPanel)).split("slowest:")[-1]  # single process: no view
        for step in range(6, 16):
            w.write(step, **rank_fields(0.3 if step >= 8 else 0.0))
        await wait_for(pilot, lambda: app.chart_step == 15, what="the ranks' steps on screen")
        panel = app.query_one(ProfilerPanel)
        # the profiler panel redraws every few seconds (light on an SSH link)
        await wait_for(pilot, lambda: "compute" in rendered(panel), timeout=20, what="the rank view")
        text = rendered(panel)
        await wait_for(pilot, lambda: panel.size.height >= len(text.splitlines()), what="room for every rank")
        assert "compute" in text and "rollout +300 ms" in text, text
        line = next(x for x in text.splitlines() if x.strip().startswith("1 "))
        assert "x" in line and "rollout" in line
        await wait_for(pilot, lambda: app.model.open_alert("straggler") is not None, what="the straggler alert")
        alert = app.model.open_alert("straggler")
        assert alert is not None and alert.compared["rank"] == 1.0 and alert.first_step == 8
    w.close()
