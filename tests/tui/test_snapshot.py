"""Snapshot of the main screen at a fixed size, from fixed data and a fixed clock.

Update after an intended change with `pytest tests/tui/test_snapshot.py --snapshot-update`.
"""

from __future__ import annotations

import time

from tui_helpers import T0, make_run

from tui.app import MonitorApp

SIZE = (160, 50)


def _loaded(app: MonitorApp):
    async def wait(pilot):
        deadline = time.monotonic() + 10
        # records are shown first and their alerts evaluated after: wait for both, and for the
        # chart frame that draws the alert markers
        while not app.settled:
            if time.monotonic() > deadline:
                raise AssertionError("run never loaded")
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    return wait


def test_main_screen(snap_compare, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the banner's fork suggestion names the run dir from here: runs/snapshot-run
    paths = make_run(tmp_path / "runs", "snapshot-run", 400, unstable=True, seed=7)
    app = MonitorApp(paths.root, clock=lambda: T0 + 400 * 0.5 + 12, live=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded(app))


def test_detail_smoothed_time_axis(snap_compare, tmp_path):
    paths = make_run(tmp_path / "runs", "snapshot-run", 400, unstable=False, seed=7)
    app = MonitorApp(paths.root, clock=lambda: T0 + 400 * 0.5 + 12, live=False)

    async def before(pilot):
        await _loaded(app)(pilot)
        await pilot.press("right", "right", "s", "t")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
