"""M1/M2/M3 buttons that run `trainerd verify mX --json RUN` as a subprocess.

The monitor never imports the trainer (it must start fast and without torch): the check
runs in a thread worker, its stderr is streamed as progress, the JSON on its stdout
(an object with at least a boolean "passed", and a "status": passed / failed / could_not_run
/ cancelled) gives the result and the details. A check that could not run or finish is shown
as such, never as FAIL; the checks are listed failures first, in a scrollable area.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Static

CHECKS = {"m1": "determinism", "m2": "profiler", "m3": "stability"}
PROGRESS_LINES = 6


def find_trainerd() -> str | None:
    """`trainerd` on PATH, else next to this Python (a venv used without activating it)."""
    found = shutil.which("trainerd")
    if found:
        return found
    beside = Path(sys.executable).parent / "trainerd"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def parse_result(stdout: str) -> dict | None:
    """The JSON object on stdout (the whole text, else its last line that parses)."""
    text = stdout.strip()
    if not text:
        return None
    candidates = [text] + [ln for ln in reversed(text.splitlines()) if ln.strip().startswith("{")]
    for c in candidates:
        try:
            data = json.loads(c)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


STATUS_LABELS = {
    "passed": ("PASS", "bold black on green"),
    "failed": ("FAIL", "bold white on red"),
    "could_not_run": ("COULD NOT RUN", "bold black on yellow"),
    "cancelled": ("CANCELLED", "bold black on yellow"),
}


def result_status(data: dict) -> str:
    """passed / failed / could_not_run / cancelled (a result without "status" from its "passed")."""
    status = data.get("status")
    if status in STATUS_LABELS:
        return status
    return "passed" if data.get("passed") is True else "failed"


def _item_state(item) -> bool | None:
    """True passed, False failed, None could not finish (or not said)."""
    if not isinstance(item, dict):
        return None
    passed = item.get("passed", item.get("ok"))
    return passed if isinstance(passed, bool) else None


def describe_result(check: str, rc: int | None, data: dict | None, stderr_tail: list[str]) -> Text:
    """The result of a check: its status, its reason, then every check, failures first."""
    t = Text()
    if data is not None and isinstance(data.get("passed"), bool):
        status = result_status(data)
        label, style = STATUS_LABELS[status]
        t.append(f" {check.upper()} {label} ", style)
        for k in ("summary", "message", "reason"):
            if isinstance(data.get(k), str):
                t.append(f" {data[k]}")
                break
        checks = data.get("checks")
        if isinstance(checks, list):
            order = {False: 0, None: 1, True: 2}  # failures first, then could-not-finish, then passes
            for item in sorted(checks, key=lambda c: order[_item_state(c)]):
                t.append("\n")
                if isinstance(item, dict):
                    name = item.get("name") or item.get("check") or item.get("id") or "check"
                    state = _item_state(item)
                    mark, colour = {True: ("✔", "green"), False: ("✖", "red"), None: ("?", "yellow")}[state]
                    t.append(f" {mark} ", colour)
                    t.append(str(name))
                    detail = item.get("detail") or item.get("message") or item.get("details")
                    if detail is not None:
                        t.append(f": {detail}", "grey62")
                else:
                    t.append(f" · {item}")
        return t
    t.append(f" {check.upper()} ERROR ", "bold white on red")
    t.append(f" exit code {rc}, no JSON result on stdout")
    for ln in stderr_tail[-3:]:
        t.append(f"\n {ln}", "grey62")
    return t


class OutputScroll(VerticalScroll, can_focus=False):
    """The result area: scrolls (wheel, scrollbar) without taking the keyboard focus from the charts."""


CANCEL_GRACE_S = 5.0  # after SIGTERM, the check has this long to kill its trainers and clean up


class VerifyPanel(Vertical):
    """The buttons, and the output of the last check in a scrollable area (failures first).

    Cancel sends SIGTERM to the `trainerd verify` process only: its harness kills every
    trainer it started (each in its own process group) and removes its temp dirs, then exits
    130. Only if it is still there after CANCEL_GRACE_S is its process group SIGKILLed."""

    DEFAULT_CSS = """
    VerifyPanel > #verify-scroll { height: 1fr; }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.run_dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._cancel_requested = False
        self._lock = threading.Lock()
        self.last_result: dict | None = None  # for tests: {"check", "rc", "data", "cancelled"}

    def compose(self) -> ComposeResult:
        with Horizontal(id="verify-buttons"):
            for c in CHECKS:
                yield Button(c.upper(), id=f"verify-{c}", compact=True)
            yield Button("cancel", id="verify-cancel", compact=True, disabled=True)
        with OutputScroll(id="verify-scroll"):
            yield Static(Text("1/2/3: run trainerd verify m1/m2/m3 on this run", "grey50"), id="verify-output")

    def on_mount(self) -> None:
        # the text grows with its content inside the scroll area (the app's CSS gives it 1fr)
        out = self.query_one("#verify-output", Static)
        out.styles.height = "auto"
        out.styles.min_height = "100%"  # and fills the area when it is short

    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        if bid == "verify-cancel":
            self.cancel()
        elif bid.startswith("verify-"):
            self.start(bid.removeprefix("verify-"))
        event.stop()

    def _say(self, text: Text | str) -> None:
        self.query_one("#verify-output", Static).update(text)
        self.query_one("#verify-scroll", OutputScroll).scroll_home(animate=False)

    def start(self, check: str) -> None:
        if self._proc is not None:
            self._say(Text("a check is already running (x to cancel it)", "yellow"))
            return
        remote = getattr(self.app, "remote", None)  # an ssh:// run: the check runs there (tui/remote.py)
        if remote is not None:
            self._cancel_requested = False
            self.query_one("#verify-cancel", Button).disabled = False
            self._say(Text(f"{check.upper()} ({CHECKS.get(check, '')}) on {remote.target.host}…", "cyan"))
            self.run_check("ssh", check, "", remote)
            return
        exe = find_trainerd()
        if exe is None:
            self.last_result = {"check": check, "rc": None, "data": None, "missing": True}
            self._say(
                Text(
                    "trainerd is not installed (not on PATH): the checks need the trainer; "
                    "install the kit with `make install` and run the monitor from its venv",
                    "bold yellow",
                )
            )
            return
        if self.run_dir is None:
            self._say(Text("no run open", "yellow"))
            return
        self._cancel_requested = False
        self.query_one("#verify-cancel", Button).disabled = False
        self._say(Text(f"{check.upper()} ({CHECKS.get(check, '')}) running…", "cyan"))
        self.run_check(exe, check, str(self.run_dir))

    def cancel(self) -> None:
        """SIGTERM the running check (never blocks the UI); its result then shows "cancelled"."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            self._cancel_requested = True
        proc.terminate()
        self._say(Text("cancelling…", "yellow"))

        def last_resort() -> None:
            try:
                proc.wait(timeout=CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is its pid
                except OSError:
                    pass

        threading.Thread(target=last_resort, daemon=True).start()

    @work(thread=True, exclusive=True, group="verify")
    def run_check(self, exe: str, check: str, run_dir: str, remote=None) -> None:
        cmd = [exe, "verify", check, "--json", run_dir]
        if remote is not None:
            if not remote.has_trainerd():
                note = f"trainerd is not installed on {remote.target.host} (not on its PATH): the checks run there"
                self.app.call_from_thread(self._finish_note, check, Text(note, "bold yellow"))
                return
            cmd = remote.verify_command(check)
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            self.app.call_from_thread(self._finish, check, None, None, [f"cannot run {exe}: {e.strerror}"], False)
            return
        with self._lock:
            self._proc = proc
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()  # stdout read beside stderr so neither pipe can fill and block the child
        lines: list[str] = []
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                lines.append(line)
                del lines[:-50]
                self.app.call_from_thread(self._progress, check, lines[-PROGRESS_LINES:])
        rc = proc.wait()
        reader.join(timeout=5)
        data = parse_result("".join(out))
        cancelled = (
            self._cancel_requested
            or rc == 130
            or rc < 0
            or (isinstance(data, dict) and data.get("status") == "cancelled")
        )
        self.app.call_from_thread(self._finish, check, rc, data, lines, cancelled)

    def _finish_note(self, check: str, note: Text) -> None:
        self.query_one("#verify-cancel", Button).disabled = True
        self._say(note)
        self.last_result = {"check": check, "rc": None, "data": None, "missing": True}

    def _progress(self, check: str, lines: list[str]) -> None:
        head = "cancelling…" if self._cancel_requested else "running… (x cancels)"
        t = Text(f"{check.upper()} {head}\n", "yellow" if self._cancel_requested else "cyan")
        t.append("\n".join(lines), "grey62")
        self._say(t)

    def _finish(self, check: str, rc: int | None, data: dict | None, lines: list[str], cancelled: bool) -> None:
        with self._lock:
            self._proc = None
        self.query_one("#verify-cancel", Button).disabled = True
        self.last_result = {"check": check, "rc": rc, "data": data, "cancelled": cancelled}
        if cancelled:
            self._say(Text(f"{check.upper()} cancelled", "yellow"))
        else:
            self._say(describe_result(check, rc, data, lines))
