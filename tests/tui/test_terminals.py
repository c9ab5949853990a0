"""The monitor on every terminal: sizes, plain terminals, and the interactions people expect
from a chart (value cursor, any metric, event filter, a click on a tile, hiding panels)."""

from __future__ import annotations

import pytest
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol import rundir
from tui.app import MonitorApp
from tui.glyphs import utf8_locale
from tui.screens import MetricPickerScreen
from tui.widgets.charts import DetailChart, MetricTile
from tui.widgets.panels import EventsPanel

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def utf8(monkeypatch):
    for k in ("LC_ALL", "LC_CTYPE", "NO_COLOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    return monkeypatch


def app_for(path, **kw) -> MonitorApp:
    return MonitorApp(path, clock=lambda: T0 + 10_000, live=False, **kw)


def screen_text(app: MonitorApp) -> str:
    """The whole screen as the terminal gets it (after Textual's line filters)."""
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


async def loaded(app, pilot):
    await wait_for(pilot, lambda: app.settled, timeout=10, what="the run on screen")
    await pilot.pause(0.2)


async def test_value_cursor_reads_step_time_and_value(runs_dir):
    paths = make_run(runs_dir, "cur", 100)
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        detail = app.query_one(DetailChart)
        assert "━ kl" in rendered(detail)  # the legend while the cursor is off
        await pilot.press("right_square_bracket")  # [ ] move it; it starts at the left edge
        await pilot.pause(0.3)
        last = rendered(detail).splitlines()[-1]
        assert "step 1 " in last and "0:00" in last and "kl " in last, last
        assert f"kl {app.model.store.value('kl', 0):.4g}"[:6] in last
        await pilot.press("left_square_bracket")  # from the left edge it stays there
        for _ in range(3):
            await pilot.press("right_curly_bracket")  # 10 cells at a time
        await pilot.pause(0.3)
        assert app.cursor == 30
        # a click on the chart puts the cursor under the mouse
        await pilot.click(DetailChart, offset=(1 + 1 + DetailChart.LABEL_W + 1 + 80, 3))
        await pilot.pause(0.3)
        assert app.cursor == 80
        last = rendered(detail).splitlines()[-1]
        step = int(last.split("step ")[1].split()[0].replace(",", ""))
        assert 50 < step <= 100, last
        await pilot.press("backslash")
        await pilot.pause(0.3)
        assert app.cursor is None and "━ kl" in rendered(detail)


async def test_any_metric_can_be_charted(runs_dir):
    """kl_coef, approx_kl, explained_variance, learning_rate have no tile: `m` charts them."""
    paths = make_run(runs_dir, "pick", 50)
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        await pilot.press("m")
        await pilot.pause(0.3)
        picker = app.screen
        assert isinstance(picker, MetricPickerScreen)
        for name in ("kl_coef", "approx_kl", "explained_variance", "learning_rate"):
            assert name in picker.names
        i = picker.names.index("explained_variance")
        picker.query_one("#metric-list").highlighted = i
        await pilot.press("enter")
        await pilot.pause(0.4)
        assert app.detail_metric == "explained_variance"
        tile = app.w_tiles[app.selected]
        assert tile.border_title == "explained_variance"
        assert app.query_one(DetailChart).border_title.startswith("explained_variance")
        want = app.model.store.value("explained_variance")
        assert f"{want:.3g}"[:4] in rendered(tile).splitlines()[0]


async def test_events_filter_and_checkpoints_collapsed(runs_dir):
    paths = make_run(runs_dir, "ev", 200, unstable=True)
    for step in range(20, 201, 20):
        rundir.append_event(paths, "checkpoint", step=step, path=f"checkpoints/step_{step}")
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        events = app.query_one(EventsPanel)
        text = rendered(events)
        assert "(x10, the last shown)" in text and text.count("checkpoint") == 1
        assert "alert" in text
        seen = {}
        for which in ("lifecycle", "alerts", "checkpoints", "all"):
            await pilot.press("e")
            await pilot.pause(0.2)
            assert app.event_filter == which
            seen[which] = rendered(events)
            assert events.border_title == ("events" if which == "all" else f"events: {which} only")
        assert "checkpoint" not in seen["lifecycle"] and "alert" not in seen["lifecycle"]
        assert "started" in seen["lifecycle"]
        assert "alert" in seen["alerts"] and "checkpoint" not in seen["alerts"] and "started" not in seen["alerts"]
        assert seen["checkpoints"].count("checkpoint") >= 10


async def test_click_selects_tile_and_panels_hide(runs_dir):
    paths = make_run(runs_dir, "click", 50)
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        await pilot.click("#tile-grad_norm")
        await pilot.pause(0.3)
        assert app.selected == app.tile_metrics.index("grad_norm") and app.detail_metric == "grad_norm"
        assert app.query_one("#right").display
        await pilot.press("p")
        await pilot.pause(0.3)
        assert not app.query_one("#right").display
        await pilot.press("d")
        await pilot.pause(0.3)
        assert not app.query_one(DetailChart).display
        await pilot.press("p", "d")
        await pilot.pause(0.3)
        assert app.query_one("#right").display and app.query_one(DetailChart).display


async def test_80x24_every_tile_readable_and_resize(runs_dir):
    paths = make_run(runs_dir, "small", 100)
    app = app_for(paths.root)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(app, pilot)
        assert app.layout_name == "narrow+short"
        shown = [t for t in app.w_tiles if t.display]
        assert len(shown) == 3
        for t in shown:  # the value and a chart with its scale
            assert t.content_size.width >= 20 and t.content_size.height >= 4
            assert any(c.isdigit() for c in rendered(t).splitlines()[0])
        screen = screen_text(app)
        for t in shown:
            assert f"─ {t.metric} ─" in screen
        await pilot.press("down")  # pages to the next row of tiles
        await pilot.pause(0.3)
        assert [t.metric for t in app.w_tiles if t.display] == list(app.tile_metrics[3:6])
        await pilot.press("p")  # the side panels, in place of the charts
        await pilot.pause(0.3)
        assert app.query_one("#right").display and not app.query_one("#left").display
        await pilot.press("p")
        await pilot.resize_terminal(50, 15)
        await pilot.pause(0.4)
        assert "at least 60x18" in screen_text(app)
        await pilot.resize_terminal(160, 50)
        await pilot.pause(0.4)
        assert app.layout_name == "full" and all(t.display for t in app.w_tiles)
        assert "at least" not in screen_text(app)
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        assert "e             events shown" in screen_text(app)


async def test_lang_c_is_pure_ascii(runs_dir, utf8):
    utf8.setenv("LANG", "C")
    paths = make_run(runs_dir, "ascii", 300, unstable=True)
    app = app_for(paths.root)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(app, pilot)
        text = screen_text(app)
        assert text.isascii(), sorted({c for c in text if not c.isascii()})
        assert "+- kl -" in text  # borders in ASCII
        for keys in (("question_mark",), ("escape", "a"), ("escape", "m")):
            await pilot.press(*keys)
            await pilot.pause(0.4)
            text = screen_text(app)
            assert text.isascii(), (keys, sorted({c for c in text if not c.isascii()}))


async def test_no_color_states_are_words(runs_dir, utf8):
    utf8.setenv("NO_COLOR", "1")
    paths = make_run(runs_dir, "nocolor", 300, unstable=True)
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        kl = rendered(app.query_one("#tile-kl", MetricTile)).splitlines()[0]
        assert kl.startswith("CRIT "), kl
        assert "CRITICAL" in screen_text(app)


async def test_locale_decides_ascii():
    assert utf8_locale({"LANG": "en_US.UTF-8"})
    assert not utf8_locale({"LANG": "C"})
    assert not utf8_locale({"LANG": "C", "LC_CTYPE": "C.UTF-8"})  # Python's coercion of LANG=C
    assert not utf8_locale({"LC_ALL": "POSIX", "LANG": "en_US.UTF-8"})
    assert utf8_locale({"LC_ALL": "de_DE.utf8"})
    assert utf8_locale({})


async def test_live_chart_grows_at_its_right_edge(runs_dir):
    """On a live run a new record changes the last columns only (what goes over SSH)."""
    paths = make_run(runs_dir, "grow", 30, status="running")
    w = LiveWriter(paths)
    app = MonitorApp(paths.root, clock=lambda: T0 + 30 * 0.5 + 1)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.chart_step == 30 and app.view.live, what="the live run")
        await pilot.pause(0.3)
        tile = app.query_one("#tile-entropy", MetricTile)
        before = rendered(tile).splitlines()[1:]
        w.write(31)
        await wait_for(pilot, lambda: app.chart_step == 31, what="the next chart frame")
        after = rendered(tile).splitlines()[1:]
        changed = [
            x for a, b in zip(before, after) for x, (ca, cb) in enumerate(zip(a.ljust(80), b.ljust(80))) if ca != cb
        ]
        assert changed and min(changed) >= 5 + 1 + 14, (before, after)  # label + the first 30 records' columns
    w.close()


async def test_elapsed_and_status_agree_with_trainerd_status(runs_dir):
    """One function decides (protocol.rundir.run_elapsed, effective_status): a run whose writer
    died while 'running' is crashed in both, and its elapsed time stops at its last record."""
    from trainerd.cli import run_status

    paths = make_run(runs_dir, "died", 40)
    m = rundir.read_manifest(paths)
    m.update(status="running", ended_at=None)  # its writer is gone: no lock held
    rundir.write_manifest(paths, m)
    info = run_status(paths)
    assert info["status"] == "crashed"
    assert info["elapsed_s"] == pytest.approx(40 * 0.5, abs=0.01)  # started at T0, last record at T0 + 20
    app = app_for(paths.root)
    async with app.run_test(size=(160, 50)) as pilot:
        await loaded(app, pilot)
        h = app.model.header_info(T0 + 10_000, 60.0)  # long after: the clock must not keep counting
        assert h.status == "crashed"
        assert h.elapsed_s == pytest.approx(info["elapsed_s"], abs=0.01)
    assert rundir.run_elapsed({"started_at": T0, "ended_at": T0 + 5}, "finished", None, T0 + 99) == 5
    assert rundir.run_elapsed({"started_at": T0}, "running", T0 + 3, T0 + 7) == 7
    assert rundir.run_elapsed({"started_at": "yesterday"}, "running", None, T0) is None
