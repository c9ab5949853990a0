"""`rlhf-tui RUN --diff OTHER` (tui/compare.py): the settings that differ between two runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tui_helpers import make_run

from protocol import rundir
from tui.compare import diff_runs, differences

ROOT = Path(__file__).resolve().parents[2]


def _change(paths: rundir.RunPaths, **sections) -> None:
    m = rundir.read_manifest(paths)
    for section, values in sections.items():
        if isinstance(values, dict):
            m.setdefault(section, {}).update(values)
        else:
            m[section] = values
    rundir.write_manifest(paths, m)


def test_differences_name_each_changed_setting(runs_dir):
    a = make_run(runs_dir, "a", 5)
    b = make_run(runs_dir, "b", 5)
    rc, text = diff_runs(str(a.root), str(b.root))
    assert rc == 0 and "the same" in text
    _change(b, config={"kl_coef": 0.4, "new_knob": 1}, determinism={"threads": 2}, seed=7)
    rows, same = differences(rundir.read_manifest(a), rundir.read_manifest(b))
    keys = {k for k, _a, _b in rows}
    assert keys == {"config.kl_coef", "config.new_knob", "determinism.threads", "seed"} and same > 0
    rc, text = diff_runs(str(a.root), str(b.root))
    assert rc == 1
    assert "config.kl_coef" in text and "0.4" in text and "—" in text  # new_knob: only in B
    assert "4 differ" in text


def test_cli_diff_exit_codes(runs_dir):
    a = make_run(runs_dir, "a", 5)
    b = make_run(runs_dir, "b", 5)
    _change(b, seed=3)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "tui.cli", str(a.root), "--diff", str(b.root)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1 and "seed" in out.stdout, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "tui.cli", str(a.root), "--diff", str(runs_dir / "nope")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no such run" in out.stderr


@pytest.mark.asyncio
async def test_picker_d_shows_the_settings_diff(runs_dir):
    from tui_helpers import T0, wait_for

    from tui.app import MonitorApp
    from tui.compare_screen import DiffScreen
    from tui.screens import RunPickerScreen

    make_run(runs_dir, "first", 5)
    second = make_run(runs_dir, "second", 8)  # latest: on screen
    _change(second, config={"kl_coef": 0.4})
    app = MonitorApp(runs_dir, clock=lambda: T0 + 10_000)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 8)
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and len(app.screen.rows) == 2)
        await pilot.press("down", "d")  # "first", against "second" on screen
        await wait_for(pilot, lambda: isinstance(app.screen, DiffScreen) and bool(app.screen.text))
        assert "config.kl_coef" in app.screen.text and "0.4" in app.screen.text
        await pilot.press("escape")
        assert isinstance(app.screen, RunPickerScreen)
