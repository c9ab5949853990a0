"""End to end: the real `rlhf-tui` in tmux, against a run being written live.

The writer is one command: today scripts/gen_run.py; switch WRITER to the real trainer
(`trainerd start --smoke --foreground --runs-dir {runs}`) once it is ready.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WRITER = [sys.executable, str(ROOT / "scripts" / "gen_run.py"), "--steps", "600", "--rate", "15", "--runs-dir", "{runs}"]
TMUX = shutil.which("tmux") or "/usr/bin/tmux"

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path(TMUX).exists(), reason="tmux not installed")]


def _tui_command() -> list[str]:
    exe = BIN / "rlhf-tui"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tui.cli"]


class Pane:
    def __init__(self, session: str):
        self.session = session

    def capture(self) -> str:
        out = subprocess.run([TMUX, "capture-pane", "-p", "-t", self.session], capture_output=True, text=True)
        return out.stdout

    def send(self, *keys: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.session, *keys], check=True)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")


@pytest.mark.timeout(90)
def test_live_run_in_tmux(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([a.format(runs=runs) for a in WRITER], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    session = f"tui-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 30
        while not (runs / "latest" / "steps.msgpack").exists():  # the writer made its run
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "the writer never started a run"
            time.sleep(0.1)
        cmd = " ".join(_tui_command() + [str(runs)]) + "; echo TUI-EXITED rc=$?; sleep 30"
        subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "160", "-y", "50",
                        f"cd {ROOT} && {cmd}"], check=True, env=env)
        pane = Pane(session)
        first = int(pane.wait_for(r"step ([\d,]+)/600").group(1).replace(",", ""))
        pane.wait_for(r"kl_target")  # a chart tile with its value line
        pane.wait_for(r"where the time goes")
        # values update while the run is written
        deadline = time.monotonic() + 15
        later = first
        while later <= first + 5 and time.monotonic() < deadline:
            time.sleep(0.5)
            later = int(pane.wait_for(r"step ([\d,]+)/600").group(1).replace(",", ""))
        assert later > first + 5, f"step did not move on screen: {first} -> {later}"
        pane.send("?")
        pane.wait_for(r"Keys")
        pane.send("Escape")
        time.sleep(0.3)
        pane.send("q")
        pane.wait_for(r"TUI-EXITED rc=0", timeout=10)
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)
        writer.terminate()
        writer.wait(timeout=10)


def test_bad_path_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(_tui_command() + [str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no such run" in out.stderr
    assert "Traceback" not in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(_tui_command() + [str(empty)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2 and "holds no runs" in out.stderr


@pytest.mark.timeout(60)
def test_exits_when_its_terminal_goes_away(tmp_path):
    """Killing the tmux session hangs up the terminal: the monitor must exit, not spin."""
    runs = tmp_path / "runs-hup"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(WRITER[:2] + ["--steps", "50", "--runs-dir", str(runs)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    session = f"hup-{uuid.uuid4().hex[:8]}"
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    " ".join(_tui_command() + [str(runs)])], check=True, env=env, cwd=ROOT)
    pane = Pane(session)
    pane.wait_for(r"step 50/50")
    pid = int(subprocess.run([TMUX, "display", "-p", "-t", session, "#{pane_pid}"],
                             capture_output=True, text=True).stdout.strip())
    subprocess.run([TMUX, "kill-session", "-t", session], check=True)
    deadline = time.monotonic() + 8
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "rlhf-tui kept running after its terminal went away"
