"""M1/M2/M3 buttons that run `trainerd verify mX --json RUN` as a subprocess.

The monitor never imports the trainer (it must start fast and without torch): the check
runs in a thread worker, its stderr is streamed as progress, the JSON on its stdout
(an object with at least a boolean "passed") gives pass/fail and the details.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
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


def describe_result(check: str, rc: int | None, data: dict | None, stderr_tail: list[str]) -> Text:
    t = Text()
    if data is not None and isinstance(data.get("passed"), bool):
        ok = data["passed"]
        t.append(f" {check.upper()} {'PASS' if ok else 'FAIL'} ", "bold black on green" if ok else "bold white on red")
        for k in ("summary", "message", "reason"):
            if isinstance(data.get(k), str):
                t.append(f" {data[k]}")
                break
        checks = data.get("checks")
        if isinstance(checks, list):
            for item in checks[:12]:
                t.append("\n")
                if isinstance(item, dict):
                    name = item.get("name") or item.get("check") or item.get("id") or "check"
                    passed = item.get("passed", item.get("ok"))
                    mark = "✔" if passed is True else ("✖" if passed is False else "·")
                    t.append(f" {mark} ", "green" if passed is True else ("red" if passed is False else "grey62"))
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


class VerifyPanel(Vertical):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.run_dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.last_result: dict | None = None  # for tests: {"check", "rc", "data"}

    def compose(self) -> ComposeResult:
        with Horizontal(id="verify-buttons"):
            for c in CHECKS:
                yield Button(c.upper(), id=f"verify-{c}", compact=True)
            yield Button("cancel", id="verify-cancel", compact=True, disabled=True)
        yield Static(Text("1/2/3: run trainerd verify m1/m2/m3 on this run", "grey50"), id="verify-output")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        if bid == "verify-cancel":
            self.cancel()
        elif bid.startswith("verify-"):
            self.start(bid.removeprefix("verify-"))
        event.stop()

    def _say(self, text: Text | str) -> None:
        self.query_one("#verify-output", Static).update(text)

    def start(self, check: str) -> None:
        if self._proc is not None:
            self._say(Text("a check is already running (x to cancel it)", "yellow"))
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
        self.query_one("#verify-cancel", Button).disabled = False
        self._say(Text(f"{check.upper()} ({CHECKS.get(check, '')}) running…", "cyan"))
        self.run_check(exe, check, str(self.run_dir))

    def cancel(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()

    @work(thread=True, exclusive=True, group="verify")
    def run_check(self, exe: str, check: str, run_dir: str) -> None:
        cmd = [exe, "verify", check, "--json", run_dir]
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
        cancelled = rc < 0
        self.app.call_from_thread(self._finish, check, rc, parse_result("".join(out)), lines, cancelled)

    def _progress(self, check: str, lines: list[str]) -> None:
        t = Text(f"{check.upper()} running… (x cancels)\n", "cyan")
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
