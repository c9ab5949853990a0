"""Snapshots of the main screen at fixed sizes, from fixed data and a fixed clock: the size
a monitor is usually given (160x50), 120x40, 80x24, and plain terminals (LANG=C: ASCII only;
NO_COLOR: states as words).

Update after an intended change with `pytest tests/tui/test_snapshot.py --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest
from tui_helpers import T0, make_run

from tui.app import MonitorApp

SIZE = (160, 50)


def _loaded(app: MonitorApp, every_run: bool = False):
    async def wait(pilot):
        deadline = time.monotonic() + 15
        # records are shown first and their alerts evaluated after: wait for both (and, comparing,
        # for every run's), and for the chart frame that draws the alert markers
        while not (app.all_settled if every_run else app.settled):
            if time.monotonic() > deadline:
                raise AssertionError("run never loaded")
            await pilot.pause(0.05)
        await pilot.pause(0.3 if every_run else 0.2)

    return wait


@pytest.fixture
def plain_env(monkeypatch):
    """A UTF-8 locale with colour, whatever the test runner's environment says."""
    for k in ("LC_ALL", "LC_CTYPE", "NO_COLOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    return monkeypatch


def _unstable_app(tmp_path, monkeypatch) -> MonitorApp:
    monkeypatch.chdir(tmp_path)  # the banner's fork suggestion names the run dir from here: runs/snapshot-run
    paths = make_run(tmp_path / "runs", "snapshot-run", 400, unstable=True, seed=7)
    return MonitorApp(paths.root, clock=lambda: T0 + 400 * 0.5 + 12, live=False)


def test_main_screen(snap_compare, tmp_path, plain_env):
    app = _unstable_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded(app))


def test_detail_smoothed_time_axis(snap_compare, tmp_path, plain_env):
    paths = make_run(tmp_path / "runs", "snapshot-run", 400, unstable=False, seed=7)
    app = MonitorApp(paths.root, clock=lambda: T0 + 400 * 0.5 + 12, live=False)

    async def before(pilot):
        await _loaded(app)(pilot)
        await pilot.press("right", "right", "s", "t")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_120x40(snap_compare, tmp_path, plain_env):
    app = _unstable_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_loaded(app))


def test_80x24(snap_compare, tmp_path, plain_env):
    """One row of tiles, the detail chart, the banner's advice; no side panels."""
    app = _unstable_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_loaded(app))


def test_80x24_lang_c(snap_compare, tmp_path, plain_env):
    """LANG=C: ASCII only, borders and charts included."""
    plain_env.setenv("LANG", "C")
    app = _unstable_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_loaded(app))


def test_120x40_no_color(snap_compare, tmp_path, plain_env):
    """NO_COLOR: no colour, and every state still readable (WARN / CRIT, CRITICAL, the banner)."""
    plain_env.setenv("NO_COLOR", "1")
    app = _unstable_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_loaded(app))


def _compare_app(tmp_path, monkeypatch) -> MonitorApp:
    monkeypatch.chdir(tmp_path)
    a = make_run(tmp_path / "runs", "seed-1", 400, seed=1)
    b = make_run(tmp_path / "runs", "seed-2-unstable", 300, unstable=True, seed=2)
    c = make_run(tmp_path / "runs", "seed-3", 500, seed=3)
    return MonitorApp(a.root, clock=lambda: T0 + 400 * 0.5 + 12, live=False, compare=((b.root, None), (c.root, None)))


def test_compare_three_runs(snap_compare, tmp_path, plain_env):
    """Three runs overlaid: the legend under the header, a colour per run in every chart, B's
    alert named in the banner, the profiler's stage comparison."""
    app = _compare_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded(app, every_run=True))


def test_compare_80x24(snap_compare, tmp_path, plain_env):
    app = _compare_app(tmp_path, plain_env)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_loaded(app, every_run=True))
