"""Lineage in the monitor (issue 22): forks under their parent in the run picker, the fork a
critical alert's advice implies in the banner (text to copy, never run), and the terminal bell
on each new critical alert of a live run (not for what the run held when it opened; `--no-bell`)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol import rundir
from protocol.alerts import DEFAULT_RULES, save_run_rules
from tui.app import MonitorApp
from tui.screens import HELP, RunPickerScreen, list_runs
from tui.widgets.panels import AlertBanner

SIZE = (160, 50)


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _set_parent(paths: rundir.RunPaths, parent) -> None:
    m = rundir.read_manifest(paths)
    m["parent"] = parent
    rundir.write_manifest(paths, m)


def _lineage_runs(runs_dir):
    base = make_run(runs_dir, "base", 20)
    make_run(runs_dir, "other", 20)
    fork = make_run(runs_dir, "base-fork", 20)
    _set_parent(fork, {"run_id": "base", "run_dir": str(base.root), "step": 10, "changed": {"kl_coef": [0.2, 0.4]}})
    orphan = make_run(runs_dir, "orphan", 20)
    _set_parent(orphan, {"run_id": "gone", "run_dir": "/nonexistent/gone", "step": 5, "changed": {"lr": [1, 2]}})
    hostile = make_run(runs_dir, "hostile", 20)
    bad = {"run_id": "[red]x[/red]\x1b[2J", "step": "ten", "changed": {"k": "notapair", "[b]": [None, {}]}}
    _set_parent(hostile, bad)
    cyc = make_run(runs_dir, "cycle", 20)
    _set_parent(cyc, {"run_id": "cycle", "step": 1})
    make_run(runs_dir, "garbage", 20)
    _set_parent(rundir.RunPaths(runs_dir / "garbage"), "not an object")
    return base, fork


def test_list_runs_puts_a_fork_right_under_its_parent(runs_dir):
    base, fork = _lineage_runs(runs_dir)
    rows = list_runs(runs_dir, None)
    ids = [r.run_id for r in rows]
    assert sorted(ids) == sorted(["base", "other", "base-fork", "orphan", "hostile", "cycle", "garbage"])
    i = ids.index("base")
    assert ids[i + 1] == "base-fork" and rows[i + 1].depth == 1 and rows[i].depth == 0
    assert rows[i + 1].lineage == "fork@10 kl_coef 0.2→0.4"
    orphan = rows[ids.index("orphan")]
    assert orphan.depth == 0 and orphan.lineage == "fork of gone@5 lr 1→2"
    hostile = rows[ids.index("hostile")]
    assert hostile.depth == 0 and "\x1b" not in hostile.lineage and "k ?" in hostile.lineage
    assert rows[ids.index("cycle")].depth == 0  # its own parent: listed on its own
    assert rows[ids.index("garbage")].lineage == ""


@pytest.mark.asyncio
async def test_the_picker_lists_the_fork_under_its_parent_with_the_change(runs_dir):
    base, fork = _lineage_runs(runs_dir)
    app = MonitorApp(base.root, live=False, clock=lambda: T0 + 10_000)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model.paths is not None)
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and app.screen.rows, what="the list")
        await pilot.pause(0.1)
        table = app.screen.query_one("#run-table")
        cells = [table.get_row_at(k)[1].plain for k in range(table.row_count)]
        i = next(k for k, c in enumerate(cells) if c.strip(" ▶") == "base")
        assert cells[i + 1].strip() == "└ base-fork  fork@10 kl_coef 0.2→0.4", cells
        assert any(c.strip() == "orphan  fork of gone@5 lr 1→2" for c in cells), cells
        hostile = next(c for c in cells if "hostile" in c)
        assert "[red]" in hostile and "\x1b" not in hostile  # shown as text, never markup


# -- the fork a critical alert implies, and the bell ---------------------------------------------


def _rules_without_warmup():
    changes = {"kl_runaway": {"warmup_steps": 0, "consecutive": 1}}
    return [dataclasses.replace(r, **changes.get(r.name, {})) for r in DEFAULT_RULES]


def _kl_runaway_run(runs_dir, status="running"):
    paths = make_run(runs_dir, "runaway", 30, status=status)
    save_run_rules(_rules_without_warmup(), paths.root)
    w = LiveWriter(paths)
    for step in range(31, 61):
        w.write(step, kl=0.1 if step < 41 else 0.9, kl_target_error=0.0, kl_coef=0.15)
    w.close()
    for step in (20, 40, 50):
        (paths.checkpoints / f"step_{step:06d}").mkdir(parents=True)
    (paths.checkpoints / "step_000041.tmp").mkdir()  # not complete: not a checkpoint
    return paths


@pytest.mark.asyncio
async def test_a_critical_kl_runaway_suggests_the_fork_from_the_last_checkpoint_before_it(runs_dir):
    paths = _kl_runaway_run(runs_dir)
    app = MonitorApp(paths.root, live=False, clock=lambda: T0 + 40)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.settled, timeout=15, what="the run drawn")
        alert = app.model.open_alert("kl_runaway")
        assert alert is not None and alert.severity == "critical" and alert.first_step == 41
        await wait_for(pilot, lambda: "try:" in rendered(app.query_one(AlertBanner)), what="the suggestion")
        text = rendered(app.query_one(AlertBanner))
        assert f"try: trainerd fork {paths.root} --from-step 40 --set kl_coef=0.3" in text, text
        assert app.query_one(AlertBanner).has_class("-critical")


def _write_nan_steps(paths, start, n):
    w = LiveWriter(paths)
    for step in range(start, start + n):
        w.write(step, kl=math.nan)
    w.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("bell", [True, False])
async def test_the_bell_rings_once_on_a_new_critical_alert_of_a_live_run(runs_dir, bell):
    """The KL runaway was in the run when the monitor opened: no ring. NaNs arrive live: one
    ring for that new critical alert, however many steps it stays open; `--no-bell`: none."""
    paths = _kl_runaway_run(runs_dir)
    app = MonitorApp(paths.root, live=True, bell=bell, clock=lambda: T0 + 40)
    rings: list[int] = []
    app.bell = lambda: rings.append(1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.settled and app._caught_up, timeout=15, what="the run read")
        assert app.model.open_alert("kl_runaway") is not None and rings == []
        _write_nan_steps(paths, 61, 3)
        await wait_for(pilot, lambda: app.model.open_alert("non_finite") is not None, timeout=10, what="non_finite")
        await pilot.pause(0.3)
        _write_nan_steps(paths, 64, 3)  # still open: no second ring
        await wait_for(pilot, lambda: app.model.alerts_step == 66, timeout=10, what="the later steps evaluated")
        await pilot.pause(0.3)
        assert rings == ([1] if bell else [])


def test_bell_and_fork_hint_are_documented_and_the_cli_has_no_bell():
    from tui.cli import cli

    out = CliRunner().invoke(cli, ["--help"]).output
    assert "--no-bell" in out
    assert "--no-bell" in HELP and "trainerd fork" in HELP
    readme = (rundir.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "--no-bell" in readme and "trainerd fork" in readme
