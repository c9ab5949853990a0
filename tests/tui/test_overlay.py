"""Comparing runs in the monitor (`rlhf-tui A B C`): runs aligned by step, time or tokens
(tui/overlay.py), each drawn in its own colour in every chart, named in the legend, the banner
and the profiler's stage comparison; the run picker's space adds and removes runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from tui_helpers import T0, make_run, rendered, wait_for

from tui.app import MonitorApp
from tui.braille import fmt_value
from tui.model import RunModel
from tui.overlay import RUN_COLOURS, Comparison, column_of, overlay_buckets, shared_y, x_values, x_window
from tui.screens import AlertListScreen, RunPickerScreen
from tui.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
SIZE = (160, 50)


def _store(steps: range, seconds_per_step: float, tokens_per_step: float, value=lambda s: float(s)) -> RunStore:
    store = RunStore()
    records = [
        {"step": s, "time": T0 + seconds_per_step * i, "kl": value(s), "tokens": tokens_per_step}
        for i, s in enumerate(steps)
    ]
    store.extend(RunStore.columnize(records))
    return store


def test_runs_line_up_by_step_time_and_tokens():
    # A: 100 steps, 1 s and 100 tokens each; B: 50 steps, 4 s and 400 tokens each
    a = _store(range(1, 101), 1.0, 100)
    b = _store(range(1, 51), 4.0, 400)
    # by step: B ends half way across the window
    assert x_window([a, b], "step", None, None) == (1, 100)
    cols_b = overlay_buckets(b, "kl", "step", 1, 100, 100)
    assert cols_b[49] is not None and cols_b[49].last == 50 and all(c is None for c in cols_b[51:])
    # by time since each run's start: B's 50 steps took 196 s, A's 100 steps 99 s
    lo, hi = x_window([a, b], "time", None, None)
    assert (lo, hi) == (0.0, 196.0)
    cols_a = overlay_buckets(a, "kl", "time", lo, hi, 196)
    assert cols_a[98].last == 99 and cols_a[120] is None  # A has ended by then
    # by tokens trained on: A's step 40 (4,000 tokens) lines up with B's step 10
    assert x_values(a, "tokens")[39] == x_values(b, "tokens")[9] == 4000
    n = 200
    lo, hi = x_window([a, b], "tokens", None, None)
    assert column_of(a, "tokens", 40, lo, hi, n) == column_of(b, "tokens", 10, lo, hi, n)
    # the last N steps of the run that went furthest
    assert x_window([a, b], "step", 20, None) == (81, 100)


def test_a_run_sparser_than_the_columns_is_one_line_and_values_are_exact():
    store = _store(range(0, 100, 10), 1.0, 10, value=lambda s: s / 10)  # 10 records over steps 0..90
    cols = overlay_buckets(store, "kl", "step", 0, 90, 90)
    assert all(c is not None for c in cols[:90])  # held between records: joined, not dots
    assert cols[0].last == 0.0 and cols[-1].last == 9.0
    assert sorted({c.last for c in cols}) == [float(k) for k in range(10)]
    # a NaN is a marker, not a value carried over
    store = _store(range(5), 1.0, 1, value=lambda s: math.nan if s == 2 else float(s))
    cols = overlay_buckets(store, "kl", "step", 0, 4, 5)
    assert cols[2].flags and not (cols[2].lo <= cols[2].hi)


def test_a_run_that_diverged_is_drawn_off_the_scale_and_only_that():
    a, c = (0.05, 0.15), (0.06, 0.14)
    # B's KL ran away to 2,300: the others' range is kept, B is the one off the scale
    assert shared_y([a, (0.05, 2300.0), c]) == ((0.05, 0.15), 1)
    # runs at different levels but of like spans (two reward models' scales): all of them
    assert shared_y([(0.0, 1.0), (10.0, 11.0)]) == ((0.0, 11.0), None)
    assert shared_y([a, None, c]) == ((0.05, 0.15), None)
    assert shared_y([(1.0, 2.0)]) == ((1.0, 2.0), None) and shared_y([None]) == (None, None)
    # two runs that both diverged: nothing to keep readable, everything is shown
    assert shared_y([a, (0.0, 900.0), (0.0, 2300.0)]) == ((0.0, 2300.0), None)


def test_colours_are_stable_and_letters_reused():
    c = Comparison()
    first = c.add(RunModel(), "a")
    b = c.add(RunModel(), "b")
    cc = c.add(RunModel(), "c")
    assert [r.label for r in c.runs] == ["A", "B", "C"] and cc.colour == RUN_COLOURS[2]
    c.remove(b)
    d = c.add(RunModel(), "d")
    assert d.label == "B" and d.colour == RUN_COLOURS[1] and cc.colour == RUN_COLOURS[2]
    assert [r.label for r in c.runs] == ["A", "B", "C"] and c.runs[0] is first
    while c.add(RunModel(), "more") is not None:
        pass
    assert len(c.runs) == len(RUN_COLOURS)


def _three_runs(runs_dir: Path):
    a = make_run(runs_dir, "seed-1", 400, seed=1)
    b = make_run(runs_dir, "seed-2-unstable", 300, seed=2, unstable=True)
    c = make_run(runs_dir, "seed-3", 500, seed=3)
    return a, b, c


async def _settled(pilot, app: MonitorApp) -> None:
    await wait_for(pilot, lambda: app.all_settled, timeout=15, what="every compared run loaded")
    await pilot.pause(0.3)


def _chart_styles(widget) -> set[str]:
    return {str(span.style) for span in widget.render().spans}


@pytest.mark.asyncio
async def test_three_runs_overlaid_named_and_aligned(runs_dir):
    a, b, c = _three_runs(runs_dir)
    app = MonitorApp(a.root, clock=lambda: T0 + 10_000, live=False, compare=((b.root, None), (c.root, None)))
    async with app.run_test(size=SIZE) as pilot:
        await _settled(pilot, app)
        runs = app.comparison.runs
        assert [r.label for r in runs] == ["A", "B", "C"]
        assert [len(r.model.store) for r in runs] == [400, 300, 500]
        # the legend: a line per run, its name, status and last step
        legend = rendered(app.w_legend).splitlines()
        assert legend[0].split()[:3] == ["A", "━━", "seed-1"] and "step 400/400" in legend[0]
        assert "seed-2-unstable" in legend[1] and "step 300/300" in legend[1]
        assert "seed-3" in legend[2] and "step 500/500" in legend[2]
        # a tile: each run's latest value, by its letter
        kl = app.w_tiles[0]
        head = kl.head_text(80).plain
        for r in runs:
            assert f"{r.label} {fmt_value(r.model.store.value('kl'))}" in head, head
        # every run's line in its own colour, in the tile and in the detail chart
        for w in (kl, app.w_detail):
            styles = _chart_styles(w)
            for r in runs:
                assert any(r.colour in s for s in styles), (w, r.colour, styles)
        detail = rendered(app.w_detail)
        assert "━ A seed-1" in detail and "━ B seed-2-unstable" in detail and "━ C seed-3" in detail
        assert "B off the scale" in detail  # its runaway KL does not flatten A's and C's lines
        top = float(detail.splitlines()[0].split()[0].replace(",", ""))
        assert top < 1.0, detail
        assert "step 1" in detail and "step 500" in detail  # the window spans the longest run
        assert "aligned by step" in app.w_detail.border_title
        # the banner names the run an alert belongs to: B's runaway KL, A itself healthy
        banner = rendered(app.w_banner)
        assert banner.startswith("A ✔") and "B seed-2-unstable:" in banner and "since step" in banner
        assert any(a.rule for a in runs[1].model.open_alerts)
        assert app.w_banner.has_class("-critical") or app.w_banner.has_class("-warning")
        # the profiler compares the runs' stage times and shares
        prof = rendered(app.w_profiler)
        assert prof.splitlines()[0].split()[-3:] == ["A", "B", "C"] and "policy_update" in prof
        assert "mean of each run's last 100 steps" in prof
        # t: aligned by time since each run's start, then by tokens, then by step again
        await pilot.press("t")
        await pilot.pause(0.3)
        assert "aligned by time" in app.w_detail.border_title and "4:09" in rendered(app.w_detail)
        await pilot.press("t")
        await pilot.pause(0.3)
        assert "aligned by tokens" in app.w_detail.border_title and " tok" in rendered(app.w_detail)
        await pilot.press("t")
        await pilot.pause(0.3)
        assert "aligned by step" in app.w_detail.border_title
        # the alert list: every run's alerts by step, each named by its run; Enter on one of B's
        # jumps the charts to its step
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, AlertListScreen))
        table = app.screen.query_one("#alert-table")
        labels = [table.get_row_at(k)[0].plain for k in range(table.row_count)]
        assert "B" in labels and set(labels) <= {"A", "B", "C"}, labels
        row = labels.index("B")
        b_alert = app.screen.alerts[int(table.coordinate_to_cell_key((row, 0)).row_key.value)][1]
        assert (b_alert.rule, b_alert.first_step) in {(a.rule, a.first_step) for _e, a in runs[1].model.alert_history}
        table.move_cursor(row=row)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, AlertListScreen))
        await pilot.pause(0.3)
        assert app.around_step == b_alert.first_step
        assert f"around step {b_alert.first_step:,}" in app.w_detail.border_title
        await pilot.press("f")
        await pilot.pause(0.2)
        # the value cursor reads every run at one x
        await pilot.press("left_square_bracket")
        await pilot.pause(0.3)
        last = rendered(app.w_detail).splitlines()[-1]
        assert "A " in last and "B " in last and "C " in last and "@" in last, last


@pytest.mark.asyncio
async def test_picker_space_adds_and_removes_a_run(runs_dir):
    make_run(runs_dir, "older", 50, seed=4)
    make_run(runs_dir, "newest", 80, seed=5)  # latest: on screen as A
    app = MonitorApp(runs_dir, clock=lambda: T0 + 10_000, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.settled, what="the run")
        assert not app.comparison.active and not app.screen.has_class("-comparing")
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and len(app.screen.rows) == 2)
        picker = app.screen
        table = picker.query_one("#run-table")
        on_screen = next(i for i, r in enumerate(picker.rows) if r.current)
        table.move_cursor(row=on_screen)
        await pilot.press("space")  # the run on screen cannot be compared with itself
        await pilot.pause(0.1)
        assert not app.comparison.active
        table.move_cursor(row=1 - on_screen)
        await pilot.press("space")  # "older" as B
        await wait_for(pilot, lambda: len(app.comparison.runs) == 2)
        marks = [table.get_row_at(k)[0].plain.strip() for k in range(table.row_count)]
        assert marks[1 - on_screen] == "B" and marks[on_screen] == "A", marks
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.all_settled, what="B loaded")
        await pilot.pause(0.3)
        assert app.screen.has_class("-comparing") and "━ B older" in rendered(app.w_detail)
        assert len(app.comparison.runs[1].model.store) == 50
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and len(app.screen.rows) == 2)
        app.screen.query_one("#run-table").move_cursor(row=1 - on_screen)
        await pilot.press("space")  # again: no longer compared
        await wait_for(pilot, lambda: len(app.comparison.runs) == 1)
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert not app.screen.has_class("-comparing") and "older" not in rendered(app.w_detail)
        # compared again, then opened with Enter: it becomes the run on screen, compared no more
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunPickerScreen) and len(app.screen.rows) == 2)
        app.screen.query_one("#run-table").move_cursor(row=1 - on_screen)
        await pilot.press("space")
        await wait_for(pilot, lambda: len(app.comparison.runs) == 2)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.model.paths is not None and app.model.paths.run_id == "older")
        assert not app.comparison.active


@pytest.mark.asyncio
async def test_compare_with_another_frameworks_run(runs_dir):
    """A kit run against a TensorBoard log dir (an adapted run): both in the charts."""
    a = make_run(runs_dir, "kit", 120, seed=1)
    tb_run = make_run(runs_dir / "other", "tb-source", 90, seed=2, tb=True)
    app = MonitorApp(a.root, clock=lambda: T0 + 10_000, live=False, compare=((tb_run.root / "tb", None),))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.settled and len(app.comparison.runs[1].model.store) >= 80, timeout=20)
        await pilot.pause(0.5)
        b = app.comparison.runs[1]
        assert "B ━━ tb · metrics" in rendered(app.w_legend), rendered(app.w_legend)  # the adapter names its source
        # what the tile shows for B is what the source log holds at that step (float32 in TensorBoard)
        kit = RunStoreFromLog(tb_run)
        step = b.model.store.last_step
        at = list(kit.steps).index(step)
        assert b.model.store.value("kl") == pytest.approx(kit.value("kl", at), rel=1e-6)
        assert f"B {fmt_value(b.model.store.value('kl'))}" in app.w_tiles[0].head_text(80).plain
        assert any(b.colour in s for s in _chart_styles(app.w_tiles[0]))


def RunStoreFromLog(paths) -> RunStore:
    from protocol.steplog import StepLogTailer

    store = RunStore()
    store.extend(RunStore.columnize(StepLogTailer(paths.steps).poll(10**6)))
    return store


@pytest.mark.asyncio
async def test_a_compared_run_that_cannot_be_read_says_so_and_the_rest_goes_on(runs_dir, tmp_path):
    a = make_run(runs_dir, "a", 60)
    gone = tmp_path / "gone"
    gone.mkdir()
    app = MonitorApp(a.root, clock=lambda: T0 + 10_000, live=False, compare=((gone, None),))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.settled and app.comparison.runs[1].model.problem != "", what="the failure")
        await pilot.pause(0.3)
        assert "B gone:" in rendered(app.w_banner) and "✖" in rendered(app.w_banner)
        assert len(app.model.store) == 60


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )


def test_cli_bad_inputs_in_compare_mode_are_one_line(runs_dir):
    a = make_run(runs_dir, "a", 5)
    out = _cli(str(a.root), str(runs_dir / "nope"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope" in out.stderr, out.stderr
    out = _cli(*[str(a.root)] * 7)
    assert out.returncode == 2 and "at most 6 runs" in out.stderr and out.stderr.count("\n") == 1
    out = _cli(str(a.root), str(runs_dir / "a" / "."))
    assert out.returncode == 2 and "given twice" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = _cli(str(a.root), str(a.root), "--diff", str(a.root))
    assert out.returncode == 2 and "one PATH" in out.stderr


@pytest.mark.asyncio
async def test_a_long_compared_run_is_read_whole_tail_first(runs_dir):
    """A compared run longer than the tail read first: its history loads beside it (decoded,
    the side file gone), every record ends up in its chart, in order, once."""
    a = make_run(runs_dir, "a", 100)
    b = make_run(runs_dir, "b-long", 3000, seed=2, unstable=True)
    (b.root / "steps.cols").unlink()
    app = MonitorApp(a.root, clock=lambda: T0 + 10_000, live=False, tail_bytes=20_000, compare=((b.root, None),))
    async with app.run_test(size=SIZE) as pilot:
        run_b = app.comparison.runs[1]
        await wait_for(pilot, lambda: app.all_settled and run_b.model.history_done, timeout=30, what="B whole")
        store = run_b.model.store
        on_disk = RunStoreFromLog(b)
        assert list(store.steps) == list(on_disk.steps) and len(store) == 3000
        assert run_b.model.alert_history and run_b.model.open_alerts  # the unstable run's alerts, by B's rules


def test_x_values_of_a_whole_history_equal_the_ones_built_record_by_record():
    records = [
        {"step": s, "time": T0 + s * 0.5 - (3.0 if s == 700 else 0.0), "tokens": 10 + s % 7} for s in range(30_000)
    ]
    records[5]["time"] = math.nan
    records[9]["tokens"] = None
    whole = RunStore()
    whole.extend(RunStore.columnize(records))
    for axis in ("time", "tokens"):
        grown = RunStore()  # its x values extended batch by batch, each under numpy's size
        for k in range(0, len(records), 5000):
            grown.extend(RunStore.columnize(records[k : k + 5000]))
            x_values(grown, axis)
        assert list(x_values(whole, axis)) == list(x_values(grown, axis)), axis
    xs = x_values(whole, "time")
    assert all(b >= a for a, b in zip(xs, xs[1:])) and xs[5] == xs[4] and xs[700] == xs[699]
