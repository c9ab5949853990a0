"""The monitor's verify panel: cancel shows "cancelled", a check that could not run (or
finish) is never shown as FAIL, the checks list failures first and scroll.

A fake `trainerd` (a script) stands in for the real one: the panel only runs it as a
subprocess and reads its JSON, so the tests need neither torch nor trainerd.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from tui_helpers import wait_for

from tui.widgets import verify as verify_widget
from tui.widgets.verify import VerifyPanel, describe_result

FAKE_TRAINERD = textwrap.dedent("""
    import json, signal, sys, time
    check = sys.argv[2]
    def cancelled(signum, frame):
        print(f"trainerd verify {check}: cancelled (SIGTERM)", file=sys.stderr, flush=True)
        print(json.dumps({"check": check, "status": "cancelled", "passed": False, "checks": [],
                          "reason": "cancelled (SIGTERM)"}), flush=True)
        sys.exit(130)
    signal.signal(signal.SIGTERM, cancelled)
    print("[verify] started", file=sys.stderr, flush=True)
    with open(sys.argv[-1] + "/started", "w"):
        pass
    time.sleep(60)
""")


class PanelApp(App):
    def compose(self) -> ComposeResult:
        yield VerifyPanel(id="verify")


def _text(panel) -> str:
    return str(panel.query_one("#verify-output").render())


@pytest.mark.asyncio
async def test_cancel_sends_sigterm_and_shows_cancelled(tmp_path, monkeypatch):
    fake = tmp_path / "trainerd"
    fake.write_text(f"#!{sys.executable}\n{FAKE_TRAINERD}")
    fake.chmod(0o755)
    monkeypatch.setattr(verify_widget, "find_trainerd", lambda: str(fake))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    app = PanelApp()
    async with app.run_test(size=(100, 20)) as pilot:
        panel = app.query_one(VerifyPanel)
        panel.run_dir = run_dir
        panel.start("m2")
        await wait_for(pilot, lambda: (run_dir / "started").exists(), timeout=10, what="the fake check")
        proc = panel._proc
        panel.cancel()
        await wait_for(pilot, lambda: panel.last_result is not None, timeout=10, what="the result")
        assert proc.returncode == 130  # it got SIGTERM (not SIGKILL) and ended on its own
        assert panel.last_result["cancelled"] is True
        text = _text(panel)
        assert "cancelled" in text and "FAIL" not in text


def test_could_not_run_and_could_not_finish_are_not_fail():
    data = {
        "check": "m1",
        "status": "could_not_run",
        "passed": False,
        "checks": [
            {"name": "same_seed_bitwise", "passed": True, "detail": "ok"},
            {"name": "run: rerun_bitwise", "passed": None, "detail": "could not finish: did not finish within 60 s"},
        ],
        "reason": "run: rerun_bitwise: could not finish: did not finish within 60 s",
    }
    text = describe_result("m1", 2, data, []).plain
    assert "M1 COULD NOT RUN" in text and "FAIL" not in text
    assert "? run: rerun_bitwise: could not finish: did not finish within 60 s" in text
    bad_run = {"check": "m3", "status": "could_not_run", "passed": False, "checks": [], "reason": "no such run"}
    assert describe_result("m3", 2, bad_run, []).plain.startswith(" M3 COULD NOT RUN  no such run")


def test_failures_first():
    data = {
        "check": "m3",
        "status": "failed",
        "passed": False,
        "checks": [
            {"name": "a", "passed": True, "detail": ""},
            {"name": "b", "passed": None, "detail": "could not finish: x"},
            {"name": "c", "passed": False, "detail": "broken"},
        ],
        "reason": "1 of 3 checks failed: c",
    }
    lines = describe_result("m3", 1, data, []).plain.splitlines()
    assert lines[0].startswith(" M3 FAIL ") and [ln.split()[1].rstrip(":") for ln in lines[1:]] == ["c", "b", "a"]
    # an older result without "status" still reads from "passed"
    assert describe_result("m3", 0, {"passed": True, "checks": []}, []).plain.startswith(" M3 PASS")


@pytest.mark.asyncio
async def test_a_long_result_scrolls(tmp_path):
    app = PanelApp()
    data = {
        "check": "m3",
        "status": "failed",
        "passed": False,
        "checks": [{"name": f"check {i}", "passed": i != 39, "detail": "d"} for i in range(40)],
    }
    async with app.run_test(size=(100, 12)) as pilot:
        panel = app.query_one(VerifyPanel)
        panel._finish("m3", 1, data, [], False)
        await pilot.pause()
        scroll = panel.query_one("#verify-scroll", VerticalScroll)
        assert scroll.max_scroll_y > 0  # more lines than fit: it scrolls
        assert "✖ check 39" in _text(panel).splitlines()[1]  # the failure is on top
