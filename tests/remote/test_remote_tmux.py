"""End to end: the real `rlhf-tui ssh://...` in tmux, watching a live run through a real sshd.

The writer is scripts/gen_run.py at 15 records a second; the monitor reads it over ssh (the
test's sshd on loopback, RLHF_SSH pointing the user's ssh at a temporary config). The ssh
client is killed mid-run: the banner says the link is down, the monitor reconnects, the run
ends FINISHED on its last step, and the mirror holds exactly the bytes of the remote log.
tmux runs on its own socket (-L), never the default server.
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
TMUX = shutil.which("tmux") or "/usr/bin/tmux"
STEP_RE = r"step (\d[\d,]*)/(\d[\d,]*)"

pytestmark = pytest.mark.e2e


def _tui() -> str:
    exe = Path(sys.executable).parent / "rlhf-tui"
    return str(exe) if exe.exists() else f"{sys.executable} -m tui.cli"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(90)
def test_remote_run_in_tmux_survives_a_killed_ssh(sshd, tmp_path):
    if not Path(TMUX).exists():
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed, and CI must run the tmux end-to-end tests")
        pytest.skip("tmux not installed")
    runs = tmp_path / "runs"
    cache = tmp_path / "cache"
    steps = 120
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cache), **sshd.ssh_env)
    writer = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "gen_run.py"), "--steps", str(steps), "--rate", "15"]
        + ["--runs-dir", str(runs), "--run-id", "remote-live", "--no-jsonl"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    sock = f"rlhf-ssh-{uuid.uuid4().hex[:8]}"
    tmux = [TMUX, "-L", sock, "-f", "/dev/null"]

    def capture() -> str:
        return subprocess.run(tmux + ["capture-pane", "-p", "-t", "m"], capture_output=True, text=True).stdout

    def wait_for(pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = capture()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")

    try:
        deadline = time.monotonic() + 20
        while not (runs / "latest" / "run.json").exists():
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never made its run"
            time.sleep(0.05)
        cmd = f"cd {ROOT} && {_tui()} ssh://rlhf-test{runs}; echo TUI-EXITED rc=$?; sleep 30"
        subprocess.run(tmux + ["new-session", "-d", "-s", "m", "-x", "160", "-y", "50", cmd], check=True, env=env)
        wait_for(r"RUNNING", timeout=20)  # alive by its heartbeat, judged by the remote clock
        m = wait_for(STEP_RE, timeout=10)
        assert int(m.group(2)) == steps
        shell = int(
            subprocess.run(tmux + ["display", "-p", "-t", "m", "#{pane_pid}"], capture_output=True, text=True).stdout
        )
        tui = _children(shell)
        ssh = [p for t in tui for p in _children(t)]
        assert ssh, "no ssh client under the monitor"
        for pid in ssh:  # cut the link: the ssh client dies
            os.kill(pid, 9)
        wait_for(r"down since \d\d:\d\d:\d\d", timeout=10)
        wait_for(rf"step {steps}/{steps}", timeout=40)
        wait_for(r"FINISHED", timeout=15)
        assert "down since" not in capture()  # reconnected
        assert writer.wait(10) == 0
        mirrored = next(cache.glob("rlhf-kit/remote/*/*/remote-live/steps.msgpack"))
        assert mirrored.read_bytes() == (runs / "remote-live" / "steps.msgpack").read_bytes()
        subprocess.run(tmux + ["send-keys", "-t", "m", "q"], check=True)
        wait_for(r"TUI-EXITED rc=0", timeout=10)
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)  # our own socket only
        if writer.poll() is None:
            writer.kill()
