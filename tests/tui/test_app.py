"""Pilot tests of the monitor against runs written while it runs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol.steplog import truncate_after_step
from tui.app import MonitorApp
from tui.screens import AlertListScreen, HelpScreen, RunPickerScreen
from tui.widgets.charts import DetailChart, MetricTile
from tui.widgets.panels import AlertBanner, RunHeader
from tui.widgets.verify import VerifyPanel, find_trainerd

SIZE = (160, 50)
pytestmark = pytest.mark.asyncio


def app_for(path, **kw) -> MonitorApp:
    return MonitorApp(path, clock=lambda: T0 + 10_000, **kw)


async def test_records_written_while_running_appear(runs_dir):
    paths = make_run(runs_dir, "live", 20, status="running")
    w = LiveWriter(paths)
    app = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20, what="the first 20 steps")
        assert "RUNNING" in rendered(app.query_one(RunHeader)) or "STALLED" in rendered(app.query_one(RunHeader))
        rec = None
        for step in range(21, 31):
            rec = w.write(step, kl=0.123456)
        await wait_for(pilot, lambda: app.drawn_step == 30, what="steps 21..30 on screen")
        assert "0.1235" in rendered(app.query_one("#tile-kl", MetricTile))
        assert "step 30" in rendered(app.query_one(RunHeader))
        assert app.model.store.value("entropy") == rec["entropy"]
    w.close()


async def test_corrupt_record_raises_banner_and_counter(runs_dir):
    paths = make_run(runs_dir, "corrupt", 10, status="running")
    w = LiveWriter(paths)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 10)
        w.write_corrupt(11)
        w.write(12)
        await wait_for(pilot, lambda: app.drawn_step == 12 and app.model.corrupt == 1, what="corruption counted")
        await pilot.pause(0.3)
        assert "corrupt" in rendered(app.query_one(AlertBanner))
        assert "1 corrupt" in rendered(app.query_one(RunHeader))
    w.close()


async def test_nan_and_inf_show_markers_without_crash(runs_dir):
    paths = make_run(runs_dir, "nan", 30, status="running")
    w = LiveWriter(paths)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 30)
        w.write(31, grad_norm=math.nan, kl=math.inf, policy_loss=math.nan)
        w.write(32, entropy=-math.inf)
        await wait_for(pilot, lambda: app.drawn_step == 32 and app.chart_step == 32, what="values and charts")
        await pilot.pause(0.3)
        grad = rendered(app.query_one("#tile-grad_norm", MetricTile))
        assert "N" in grad.splitlines()[1]  # the NaN marker on the chart
        kl = rendered(app.query_one("#tile-kl", MetricTile))
        assert "▲" in kl and "⚠" not in grad  # +Inf marker; the current grad_norm is finite again
        assert "-Inf" in rendered(app.query_one("#tile-entropy", MetricTile))
        assert "non_finite" in [a.rule for (a,) in [(x,) for x in app.model.open_alerts]] or any(
            ev == "alert" and a.rule == "non_finite" for ev, a in app.model.alert_history
        )
        await pilot.press("s", "t", "z")  # smoothing, time axis, zoom all survive NaN/Inf
        await pilot.pause(0.2)
        rendered(app.query_one(DetailChart))
    w.close()


async def test_resume_that_shrinks_the_log_is_followed(runs_dir):
    paths = make_run(runs_dir, "resume", 40, status="running")
    w = LiveWriter(paths)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 40)
        truncate_after_step(paths.steps, 25)
        for step in range(26, 31):
            w.write(step, reward_mean=7.5)
        await wait_for(
            pilot, lambda: app.drawn_step == 30 and len(app.model.store) == 30, what="the shrunk log re-read"
        )
        assert list(app.model.store.steps) == list(range(1, 31))
        assert app.model.store.value("reward_mean") == 7.5
    w.close()


async def test_alert_list_opens_and_jumps_to_the_step(runs_dir):
    paths = make_run(runs_dir, "unstable", 300, unstable=True)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(
            pilot, lambda: app.drawn_step == 300 and app.model.open_alerts, what="the KL runaway, still open at the end"
        )
        await pilot.pause(0.3)
        assert "kl_runaway" in rendered(app.query_one(AlertBanner))
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, AlertListScreen))
        await pilot.press("enter")  # the newest alert
        await wait_for(pilot, lambda: not isinstance(app.screen, AlertListScreen))
        newest = app.model.alert_history[-1][1]
        assert app.around_step == newest.first_step
        assert f"around step {newest.first_step:,}" in str(app.query_one(DetailChart).border_title)
        await pilot.press("f")
        assert app.around_step is None


async def test_run_picker_opens_another_run(runs_dir):
    make_run(runs_dir, "first", 15)
    make_run(runs_dir, "second", 25)  # latest
    app = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 25)
        assert app.model.paths.run_id == "second"
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen))
        await pilot.press("down", "enter")  # newest first: the second row is "first"
        await wait_for(
            pilot, lambda: app.model.paths.run_id == "first" and app.drawn_step == 15, what="the other run opened"
        )


async def test_follows_latest_when_a_new_run_starts(runs_dir):
    make_run(runs_dir, "old", 10, status="running")
    app = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 10)
        make_run(runs_dir, "new", 12, status="running")
        await wait_for(
            pilot,
            lambda: app.model.paths.run_id == "new" and app.drawn_step == 12,
            timeout=6,
            what="switch to the new latest",
        )


async def test_help_and_keys(runs_dir):
    paths = make_run(runs_dir, "keys", 50)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 50)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("right", "down")
        assert app.query_one(DetailChart).metric == "grad_norm"
        assert app.query_one("#tile-grad_norm", MetricTile).has_class("-selected")


async def test_verify_says_when_trainerd_is_missing(runs_dir, monkeypatch):
    paths = make_run(runs_dir, "verify", 10)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert find_trainerd() is None
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 10)
        await pilot.press("1")
        await pilot.pause(0.1)
        panel = app.query_one(VerifyPanel)
        assert panel.last_result["missing"]
        assert "not installed" in str(panel.query_one("#verify-output").render())


def _trainerd_verify_available(run_dir) -> str | None:
    exe = find_trainerd()
    if exe is None:
        return "trainerd is not on PATH"
    try:
        out = subprocess.run([exe, "verify", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"trainerd verify unusable: {e}"
    text = (out.stdout + out.stderr).lower()
    if out.returncode != 0 or "not built" in text or "not implemented" in text:
        return "trainerd verify reports it is not built yet"
    return None


@pytest.mark.timeout(120)
async def test_verify_button_runs_real_trainerd_verify_m3(runs_dir):
    paths = make_run(runs_dir, "verify", 60, tb=True)
    why = _trainerd_verify_available(paths.root)
    if why:
        pytest.skip(why)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 60)
        panel = app.query_one(VerifyPanel)
        await pilot.press("3")
        await wait_for(pilot, lambda: panel.last_result is not None, timeout=100, what="trainerd verify m3")
        res = panel.last_result
        text = str(panel.query_one("#verify-output").render())
        if res["data"] is None and "not built" in text.lower():
            pytest.skip("trainerd verify m3 is not built yet")
        assert res["data"] is not None, text
        assert isinstance(res["data"]["passed"], bool)
        assert ("M3 PASS" in text) == res["data"]["passed"]
        assert "M3 FAIL" in text or "M3 PASS" in text


async def test_values_update_before_the_charts(runs_dir):
    """The value line follows each record at the frame rate; the charts redraw at their own,
    lower rate (and the value frames do not touch the charts)."""
    paths = make_run(runs_dir, "rates", 20, status="running")
    w = LiveWriter(paths)
    app = app_for(paths.root, chart_fps=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20 and app.chart_step == 20)
        tile = app.query_one("#tile-kl", MetricTile)
        version = tile.chart_version
        await pilot.pause(0.3)  # past the frame interval: the record below draws at once
        w.write(21, kl=0.0424242)
        await wait_for(pilot, lambda: app.drawn_step == 21, what="the value frame")
        assert app.chart_step == 20 and tile.chart_version == version, "a value frame redrew the charts"
        await pilot.pause(0.1)
        assert "0.04242" in rendered(tile).splitlines()[0]
        await wait_for(pilot, lambda: app.chart_step == 21, timeout=4, what="the chart frame")
        assert tile.chart_version == version + 1
    w.close()
