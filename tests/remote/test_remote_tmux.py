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


def _need_tmux() -> None:
    if not Path(TMUX).exists():
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed, and CI must run the tmux end-to-end tests")
        pytest.skip("tmux not installed")


class Tmux:
    """A tmux server of the test's own (its own socket, never the default server), one session."""

    def __init__(self):
        self.base = [TMUX, "-L", f"rlhf-ssh-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]

    def start(self, cmd: str, env: dict) -> None:
        full = f"cd {ROOT} && {cmd}; echo TUI-EXITED rc=$?; sleep 30"
        subprocess.run(self.base + ["new-session", "-d", "-s", "m", "-x", "160", "-y", "50", full], check=True, env=env)

    def capture(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p", "-t", "m"], capture_output=True, text=True).stdout

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")

    def kill_ssh(self) -> None:
        """Cut the links: the ssh clients under the monitor die."""
        pane = subprocess.run(self.base + ["display", "-p", "-t", "m", "#{pane_pid}"], capture_output=True, text=True)
        shell = int(pane.stdout)
        ssh = [p for t in _children(shell) for p in _children(t)]
        assert ssh, "no ssh client under the monitor"
        for pid in ssh:
            os.kill(pid, 9)

    def quit(self) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "m", "q"], check=True)
        self.wait_for(r"TUI-EXITED rc=0", timeout=10)

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)  # our own socket only


def _wait_for_run(runs: Path, writer: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not (runs / "latest" / "run.json").exists():
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never made its run"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_remote_run_in_tmux_survives_a_killed_ssh(sshd, tmp_path):
    _need_tmux()
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
    tmux = Tmux()
    try:
        _wait_for_run(runs, writer)
        tmux.start(f"{_tui()} ssh://rlhf-test{runs}", env)
        tmux.wait_for(r"RUNNING", timeout=20)  # alive by its heartbeat, judged by the remote clock
        m = tmux.wait_for(STEP_RE, timeout=10)
        assert int(m.group(2)) == steps
        tmux.kill_ssh()
        tmux.wait_for(r"down since \d\d:\d\d:\d\d", timeout=10)
        tmux.wait_for(rf"step {steps}/{steps}", timeout=40)
        tmux.wait_for(r"FINISHED", timeout=15)
        assert "down since" not in tmux.capture()  # reconnected
        assert writer.wait(10) == 0
        mirrored = next(cache.glob("rlhf-kit/remote/*/*/remote-live/steps.msgpack"))
        assert mirrored.read_bytes() == (runs / "remote-live" / "steps.msgpack").read_bytes()
        tmux.quit()
    finally:
        tmux.close()
        if writer.poll() is None:
            writer.kill()


@pytest.mark.timeout(90)
def test_compare_two_local_runs_and_a_live_remote_one_in_tmux(sshd, tmp_path):
    """`rlhf-tui A B ssh://host/runs`: two local runs and a remote one being written, compared.
    C's step climbs in the legend; its ssh client is killed mid-run and the legend says the link
    is down, then C reaches its last step, FINISHED, with exactly the remote log's bytes."""
    _need_tmux()
    local = tmp_path / "local"
    runs = tmp_path / "remote-runs"
    cache = tmp_path / "cache"
    steps = 120
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cache), **sshd.ssh_env)
    gen = [sys.executable, str(ROOT / "scripts" / "gen_run.py"), "--no-jsonl"]
    for run_id, seed in (("local-a", "1"), ("local-b", "2")):
        subprocess.run(
            gen + ["--steps", "100", "--seed", seed, "--runs-dir", str(local), "--run-id", run_id],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    writer = subprocess.Popen(
        gen + ["--steps", str(steps), "--rate", "15", "--runs-dir", str(runs), "--run-id", "remote-c"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    tmux = Tmux()
    try:
        _wait_for_run(runs, writer)
        tmux.start(f"{_tui()} {local / 'local-a'} {local / 'local-b'} ssh://rlhf-test{runs}", env)
        tmux.wait_for(r"A ━━ local-a\s+FINISHED\s+step 100/100", timeout=20)
        tmux.wait_for(r"B ━━ local-b\s+FINISHED\s+step 100/100", timeout=10)
        m = tmux.wait_for(r"C ━━ remote-c\s+RUNNING\s+step (\d+)/120", timeout=20)  # alive by its heartbeat
        assert int(m.group(1)) < steps
        tmux.kill_ssh()  # C's link
        tmux.wait_for(r"C ━━ remote-c .*down since \d\d:\d\d:\d\d", timeout=10)
        tmux.wait_for(rf"C ━━ remote-c\s+FINISHED\s+step {steps}/{steps}", timeout=40)
        screen = tmux.capture()
        assert "down since" not in screen  # reconnected
        assert re.search(r"│A -?\d[\d,.e+-]* B -?\d[\d,.e+-]* C -?\d", screen), screen  # every run's value
        assert "━ C remote-c" in screen, screen
        assert writer.wait(10) == 0
        mirrored = next(cache.glob("rlhf-kit/remote/*/*/remote-c/steps.msgpack"))
        assert mirrored.read_bytes() == (runs / "remote-c" / "steps.msgpack").read_bytes()
        tmux.quit()
    finally:
        tmux.close()
        if writer.poll() is None:
            writer.kill()
