"""Bad input a user can cause is a one-line notice in the monitor: never a traceback, never a
hang. Each test opens a hostile run dir, checks the one line, and that `q` quits at once."""

from __future__ import annotations

import json
import os
import time

import pytest
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol import jsonl
from tui.app import MonitorApp
from tui.screens import RunPickerScreen
from tui.widgets.panels import AlertBanner, EventsPanel, RunHeader

SIZE = (160, 50)
pytestmark = pytest.mark.asyncio


def app_for(path, **kw) -> MonitorApp:
    return MonitorApp(path, clock=lambda: T0 + 10_000, **kw)


async def quit_fast(app, pilot, limit: float = 0.5) -> float:
    """Press q; the app must be gone within `limit` seconds, with exit code 0 and no error."""
    t = time.monotonic()
    await pilot.press("q")
    while app.is_running:
        assert time.monotonic() - t < limit, "q did not quit in time"
        await pilot.pause(0.01)
    took = time.monotonic() - t
    assert app.return_code == 0 and app._exception is None
    return took


def banner_line(app) -> str:
    text = rendered(app.query_one(AlertBanner))
    assert "Traceback" not in text
    return text


def write_manifest_raw(paths, **fields) -> None:
    m = json.loads(paths.manifest.read_text())
    m.update(fields)
    paths.manifest.write_text(json.dumps(m))


async def test_started_at_that_is_not_a_time(runs_dir):
    paths = make_run(runs_dir, "yesterday", 20)
    write_manifest_raw(paths, started_at="yesterday", ended_at=[1], config={"steps": "many"})
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20, what="the records")
        await pilot.pause(0.2)
        header = rendered(app.query_one(RunHeader))
        assert "step 20" in header and "elapsed" not in header
        assert "finished" in rendered(app.query_one(EventsPanel))  # event times without a start: "—"
        assert "started_at" in banner_line(app)  # protocol dropped the field and said why
        await quit_fast(app, pilot)


async def test_step_no_int64_holds(runs_dir):
    paths = make_run(runs_dir, "huge-step", 20, status="running")
    w = LiveWriter(paths)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20)
        w.w.write(w.record(21) | {"step": 2**64 - 1})  # msgpack holds it, an int64 column does not
        w.w.write(w.record(22) | {"step": "22"})
        w.write(23)
        await wait_for(pilot, lambda: app.drawn_step == 23, what="the record after the bad ones")
        await wait_for(pilot, lambda: app.model.skipped == 2)
        await pilot.pause(0.2)
        line = banner_line(app)
        # one line for the notice (the run also shows as stalled: the test's clock is hours on)
        assert "✖ 2 records without a usable step skipped" in line.splitlines()[-1]
        assert len(line.splitlines()) == 2 and "STALLED" in line.splitlines()[0]
        assert list(app.model.store.steps)[-2:] == [20, 23]
        await quit_fast(app, pilot)
    w.close()


async def test_random_bytes_as_run_json(runs_dir):
    paths = make_run(runs_dir, "garbage", 20)
    paths.manifest.write_bytes(os.urandom(64) + b"\xff\xfe\x00\x1b[2J")
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20, what="the records, run.json or not")
        await wait_for(pilot, lambda: "corrupt" in banner_line(app), what="the notice")
        line = banner_line(app)
        assert "run.json is corrupt" in line and "\n" not in line.strip()
        await quit_fast(app, pilot)


@pytest.mark.parametrize("name", ["steps.msgpack", "events.jsonl", "run.json"])
async def test_fifo_in_place_of_a_run_file(runs_dir, name):
    paths = make_run(runs_dir, "fifo", 20)
    (paths.root / name).unlink()
    os.mkfifo(paths.root / name)
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "not a regular file" in banner_line(app), what="the notice")
        assert f"{name} is not a regular file" in banner_line(app)
        if name != "steps.msgpack":
            await wait_for(pilot, lambda: app.drawn_step == 20, what="the records beside it")
        await quit_fast(app, pilot)


async def test_unreadable_target_exits_with_one_line(runs_dir, monkeypatch):
    """A run dir that cannot be read (mode 000 for another user; root reads anything, so the
    error is injected here; tests/e2e runs the real CLI without the capability)."""
    paths = make_run(runs_dir, "locked-out", 5)

    def denied(target):
        raise PermissionError(13, "Permission denied", str(paths.manifest))

    monkeypatch.setattr("tui.follow.resolve_run", denied)
    app = app_for(paths.root)
    messages = []
    exit_ = app.exit
    app.exit = lambda *a, **kw: (messages.append(kw.get("message")), exit_(*a, **kw))
    async with app.run_test(size=SIZE) as pilot:
        while app.is_running:
            await pilot.pause(0.02)
    assert app.return_code == 2 and app._exception is None
    assert len(messages) == 1 and "\n" not in str(messages[0])
    assert str(messages[0]) == f"rlhf-tui: cannot read {paths.manifest}: Permission denied"


async def test_run_text_is_escaped_and_never_markup(runs_dir):
    made = make_run(runs_dir, "plain", 20)
    evil = made.root.with_name("ev\x1b]2;owned\x07il[bold]")  # a run dir from someone's tarball
    made.root.rename(evil)
    (runs_dir / "latest").unlink()
    paths = type(made)(evil)
    with open(paths.events, "a") as f:
        f.write(jsonl.dumps({"event": "crashed", "time": T0 + 1, "message": "\x1b[2J[bold]boom[/] \u202eevil"}) + "\n")
        f.write(
            jsonl.dumps({"event": "alert", "time": T0 + 2, "rule": "[red]\x1b[5mr", "step": 3, "metric": "kl"}) + "\n"
        )
    app = app_for(paths.root)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 20)
        await pilot.pause(0.2)
        header = rendered(app.query_one(RunHeader))
        events = rendered(app.query_one(EventsPanel))
        assert "\x1b" not in header + events and "\u202e" not in events
        assert "ev\\x1b]2;owned\\x07il[bold]" in header
        assert "[bold]boom[/]" in events and "\\u202eevil" in events and "[red]\\x1b[5mr" in events
        await pilot.press("r")  # the picker: the run's name and its open alert's rule, escaped
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and app.screen.rows, what="the list")
        row = app.screen.rows[0]
        assert row.run_id == "ev\\x1b]2;owned\\x07il[bold]" and row.open_alerts == ["[red]\\x1b[5mr"]
        await pilot.press("escape")
        await quit_fast(app, pilot)


async def test_latest_moving_to_a_run_named_like_markup(runs_dir):
    make_run(runs_dir, "old", 10, status="running")
    app = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 10)
        make_run(runs_dir, "[bold]new[dim]", 12, status="running")
        await wait_for(pilot, lambda: app.drawn_step == 12, timeout=6, what="the switch")
        assert "[bold]new[dim]" in rendered(app.query_one(RunHeader))
        note = list(app._notifications)[-1]
        assert "[bold]new[dim]" in note.message and not note.markup
        await quit_fast(app, pilot)


@pytest.mark.timeout(60)
async def test_quit_while_a_long_history_loads(tmp_path):
    """The history is read in chunks that check a stop flag, by a thread nobody waits for. A run
    without its side file (an older run, another writer): the slow path, decoding the log."""
    paths = make_run(tmp_path / "runs", "long", 30_000)
    (paths.root / "steps.cols").unlink()
    app = app_for(paths.root, tail_bytes=64 << 10)  # ~100 records on the first screen, the rest later
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model.loading, timeout=20, what="the history load")
        assert not app.model.history_done
        took = await quit_fast(app, pilot)
    print(f"quit while the history loaded: {took * 1000:.0f} ms")


async def test_picker_lists_runs_off_the_ui_thread(runs_dir, monkeypatch):
    """A slow listing (a big events.jsonl, a slow disk) leaves the picker usable: Esc closes it."""
    make_run(runs_dir, "a", 5)
    import tui.screens

    def slow(*args, **kw):
        time.sleep(5)
        return []

    monkeypatch.setattr(tui.screens, "list_runs", slow)
    app = app_for(runs_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.drawn_step == 5)
        t = time.monotonic()
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, RunPickerScreen))
        assert time.monotonic() - t < 3.0  # the listing takes 5 s; the screen did not wait for it
        await quit_fast(app, pilot)
