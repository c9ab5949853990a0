"""End to end: the real `rlhf-tui` in tmux, against a run the real trainer is writing.

The writer is the real trainer (`trainerd start --smoke --foreground`): a ~60-step PPO run. The
monitor is started on the runs dir as soon as the trainer has made its run, and the test reads
the screen with `tmux capture-pane`, as a user would see it: the step in the header climbing while
the trainer writes, metric values in the tiles, FINISHED at the end, `?` for the keys, `q` to quit.

Without tmux the tests skip locally, but fail under CI (the env var CI set; .ci/run installs tmux).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WRITER = ["trainerd", "start", "--smoke", "--foreground", "--runs-dir", "{runs}"]
GEN_RUN = [sys.executable, str(ROOT / "scripts" / "gen_run.py")]
TMUX_BIN = shutil.which("tmux") or "/usr/bin/tmux"
HAVE_TMUX = Path(TMUX_BIN).exists()
# a tmux server of our own: a server someone else started has its own environment (commands
# would not get ours), and killing sessions or the server must never touch anyone else's
SOCKET = f"rlhf-tui-test-{os.getpid()}"
TMUX = TMUX_BIN  # kept for the name; every call goes through _tmux() with the socket

STEP_RE = r"step (\d[\d,]*)/(\d[\d,]*)"
# a row of the samples view: step, reason, pick, reward, gold, KL, length, prompt, response
NUM = r"-?\d[\d.e+-]*"
SAMPLE_RE = rf"\b\d+\s+(periodic|alert)\s+(best|worst|random)\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+\s+\w+"

pytestmark = pytest.mark.e2e


@pytest.fixture
def need_tmux():
    if not HAVE_TMUX:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed, and CI must run the tmux end-to-end test (.ci/run installs it)")
        pytest.skip("tmux not installed")


def _tui_command() -> list[str]:
    exe = BIN / "rlhf-tui"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tui.cli"]


def _trainerd() -> list[str]:
    exe = BIN / "trainerd"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("trainerd")
    return [found] if found else [sys.executable, "-m", "trainerd.cli"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _tmux(*args: str) -> list[str]:
    return [TMUX_BIN, "-L", SOCKET, *args]


def _with_env(cmd: str, **extra: str) -> str:
    """`cmd` run with this test's environment spelled out: a tmux server does not pass the
    client's environment to the commands it runs."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8", "TERM": "xterm-256color", **extra}
    return (
        "env -u LC_ALL -u LC_CTYPE -u NO_COLOR " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + cmd
    )


@pytest.fixture(autouse=True, scope="module")
def _own_tmux_server():
    yield
    if HAVE_TMUX:
        subprocess.run(_tmux("kill-server"), capture_output=True)  # our socket only


class Pane:
    def __init__(self, session: str):
        self.session = session

    def capture(self) -> str:
        out = subprocess.run(_tmux("capture-pane", "-p", "-t", self.session), capture_output=True, text=True)
        return out.stdout

    def send(self, *keys: str) -> None:
        subprocess.run(_tmux("send-keys", "-t", self.session, *keys), check=True)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")


def _start_tui(session: str, target: Path, size=(160, 50), **env: str) -> Pane:
    # the shell stays after the monitor exits, so its exit code can be read off the screen
    cmd = _with_env(" ".join(_tui_command() + [str(target)]), **env) + "; echo TUI-EXITED rc=$?; sleep 30"
    subprocess.run(
        _tmux("new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]), f"cd {ROOT} && {cmd}"),
        check=True,
        env=_env(),
    )
    return Pane(session)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the trainer's graceful stop
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
def test_live_trainer_run_in_tmux(tmp_path, need_tmux):
    runs = tmp_path / "runs"
    runs.mkdir()
    log = open(tmp_path / "trainer.log", "w")
    cmd = _trainerd() + [a.format(runs=runs) for a in WRITER[1:]]  # WRITER with the venv's trainerd
    writer = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    session = f"tui-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 60
        while not (runs / "latest" / "run.json").exists():  # the trainer made its run
            if writer.poll() is not None:
                raise AssertionError(
                    "the trainer ended before making its run:\n" + (tmp_path / "trainer.log").read_text()[-3000:]
                )
            assert time.monotonic() < deadline, "the trainer never started a run"
            time.sleep(0.1)
        pane = _start_tui(session, runs)
        pane.wait_for(r"RLHF", timeout=20)

        # the header's step climbs while the trainer writes: sample it until the run ends; once
        # the run has passed its first sample step (10), `w` opens the samples view of the live run
        seen: list[int] = []
        total = None
        screen = ""
        sample_line = None
        deadline = time.monotonic() + 75
        while time.monotonic() < deadline:
            screen = pane.capture()
            m = re.search(STEP_RE, screen)
            if m:
                step, total = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
                if not seen or step != seen[-1]:
                    seen.append(step)
                if sample_line is None and step > 10 and step < total - 5:
                    t = time.monotonic()
                    pane.send("w")
                    sample_line = pane.wait_for(SAMPLE_RE, timeout=15).group(0)
                    print(f"a sample on screen {time.monotonic() - t:.2f} s after w: {sample_line!r}")
                    assert "latest samples of" in pane.capture()
                    pane.send("Escape")
                    time.sleep(0.3)
                    continue
            if "FINISHED" in screen:
                break
            time.sleep(0.15)
        assert sample_line is not None, f"the samples view was never opened on the live run: {seen}"
        print("steps seen on screen:", seen)
        assert "FINISHED" in screen, f"the run never showed FINISHED; trainer rc={writer.poll()}; screen:\n{screen}"
        assert seen == sorted(seen), f"the step went backwards on screen: {seen}"
        live = [s for s in seen if total is None or s < total]
        assert len(live) >= 2, f"the step did not climb on screen while the trainer wrote: {seen}\n{screen}"
        assert total and seen[-1] == total, f"last step shown {seen[-1:]} != {total}\n{screen}"
        assert writer.wait(timeout=30) == 0, (tmp_path / "trainer.log").read_text()[-3000:]

        # metric values: tiles with a number on their value line, the profiler panel with stages
        screen = pane.capture()
        for metric in ("kl", "entropy", "reward_mean", "grad_norm"):
            assert re.search(rf"─ {metric} ─", screen), f"no {metric} tile:\n{screen}"
        # (a value may be padded by a space: a one-character shorter value keeps its width)
        assert re.search(r"│-?\d[\d,.]*(e[+-]\d+)?\s+nats(/token)?\s+(kl_target|target|tgt) 0\.1", screen), screen
        assert re.search(r"│-?\d[\d,.]*(e[+-]\d+)?\s+tokens/s", screen), screen
        assert "where the time goes" in screen and re.search(r"policy_update\s+\d+\.\d", screen), screen
        assert re.search(r"slowest: \w+", screen), screen
        assert "finished" in screen  # the lifecycle event in the events panel

        pane.send("?")
        pane.wait_for(r"Keys")
        pane.send("Escape")
        time.sleep(0.3)
        pane.send("q")
        pane.wait_for(r"TUI-EXITED rc=0", timeout=10)
    finally:
        subprocess.run(_tmux("kill-session", "-t", session), capture_output=True)
        _stop(writer)
        log.close()


def test_bad_path_is_one_line_and_exit_2(tmp_path):
    env = _env()
    out = subprocess.run(_tui_command() + [str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no such run" in out.stderr
    assert "Traceback" not in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(_tui_command() + [str(empty)], capture_output=True, text=True, env=env, timeout=30)
    # an empty dir holds no kit run and nothing an adapter reads: one line naming what was looked for
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "nothing to read here" in out.stderr and "TensorBoard" in out.stderr and "veRL" in out.stderr


@pytest.mark.timeout(60)
def test_exits_when_its_terminal_goes_away(tmp_path, need_tmux):
    """Killing the tmux session hangs up the terminal: the monitor must exit, not spin.
    A generated run is enough here (and takes a second, where the trainer takes ~15)."""
    runs = tmp_path / "runs-hup"
    subprocess.run(
        GEN_RUN + ["--steps", "50", "--runs-dir", str(runs)], cwd=ROOT, env=_env(), check=True, capture_output=True
    )
    session = f"hup-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        _tmux(
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "120",
            "-y",
            "40",
            _with_env(" ".join(_tui_command() + [str(runs)])),
        ),
        check=True,
        env=_env(),
        cwd=ROOT,
    )
    pane = Pane(session)
    pane.wait_for(r"step 50/50")
    pid = int(
        subprocess.run(
            _tmux("display", "-p", "-t", session, "#{pane_pid}"), capture_output=True, text=True
        ).stdout.strip()
    )
    subprocess.run(_tmux("kill-session", "-t", session), check=True)
    deadline = time.monotonic() + 8
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "rlhf-tui kept running after its terminal went away"


def _as_unprivileged() -> list[str] | None:
    """A command prefix under which file permissions apply: none needed for a normal user;
    root without the capabilities that let it read anything (setpriv); None if neither."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"] if setpriv else None


def test_unreadable_run_dir_is_one_line_and_exit_2(tmp_path):
    prefix = _as_unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    runs = tmp_path / "runs"
    subprocess.run(
        GEN_RUN + ["--steps", "5", "--runs-dir", str(runs), "--run-id", "locked"],
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    (runs / "locked").chmod(0)
    try:
        for target in (runs / "locked", runs):  # the run itself, and a runs dir whose latest it is
            out = subprocess.run(
                prefix + _tui_command() + [str(target)], capture_output=True, text=True, env=_env(), timeout=30
            )
            assert out.returncode == 2, out.stderr
            assert out.stderr.strip().count("\n") == 0 and "Permission denied" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
    finally:
        (runs / "locked").chmod(0o755)


@pytest.mark.timeout(90)
def test_quit_is_immediate_while_the_history_loads(tmp_path, need_tmux):
    """q while the older records load in the background: the loader is a thread the app does
    not wait for, and it stops between chunks. A run without its side file (an older run,
    another writer): the history is decoded from the log, the slow path."""
    runs = tmp_path / "runs"
    subprocess.run(
        GEN_RUN + ["--steps", "60000", "--runs-dir", str(runs), "--no-jsonl"],
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    for cols in runs.glob("*/steps.cols"):
        cols.unlink()
    session = f"quit-{uuid.uuid4().hex[:8]}"
    pane = _start_tui(session, runs)
    try:
        pane.wait_for(r"loading history", timeout=30)
        t = time.monotonic()
        pane.send("q")
        while "TUI-EXITED" not in pane.capture():
            assert time.monotonic() - t < 5, "the monitor did not quit while its history loaded"
            time.sleep(0.02)
        took = time.monotonic() - t
        print(f"quit while the history loaded: {took * 1000:.0f} ms")
        assert "TUI-EXITED rc=0" in pane.capture()
        assert took < 1.0, f"quitting took {took:.2f} s"
    finally:
        subprocess.run(_tmux("kill-session", "-t", session), capture_output=True)


@pytest.mark.timeout(180)
def test_live_trl_tensorboard_run_in_tmux(tmp_path, need_tmux):
    """A user with a TRL run types `rlhf-tui path/to/output_dir` and watches it live: the real
    monitor in tmux on the TensorBoard dir of a real GRPO run that is still training."""
    pytest.importorskip("trl")
    log = open(tmp_path / "trl.log", "w")
    trl = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "e2e" / "trl_live_run.py"), str(tmp_path), "60"],
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    session = f"tui-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "grpo_out"
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("runs/*/events.out.tfevents.*")):  # TRL made its TensorBoard file
            if trl.poll() is not None:
                raise AssertionError("TRL ended before logging:\n" + (tmp_path / "trl.log").read_text()[-3000:])
            assert time.monotonic() < deadline, "TRL never wrote a TensorBoard file"
            time.sleep(0.2)
        pane = _start_tui(session, out)
        pane.wait_for(r"TRL", timeout=20)
        pane.wait_for(r"LIVE", timeout=20)
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and trl.poll() is None:
            m = re.search(r"step (\d+)", pane.capture())
            if m and (not seen or int(m.group(1)) != seen[-1]):
                seen.append(int(m.group(1)))
            time.sleep(0.3)
        assert len(seen) >= 3 and seen == sorted(seen), f"the step did not climb while TRL trained: {seen}"
        screen = pane.capture()
        assert "kl" in screen and "reward_mean" in screen  # TRL's names, mapped to the kit's
        pane.send("q")
        pane.wait_for(r"TUI-EXITED rc=0", timeout=10)
    finally:
        subprocess.run(_tmux("kill-session", "-t", session), capture_output=True)
        if trl.poll() is None:
            trl.kill()
            trl.wait()
        log.close()


@pytest.mark.timeout(90)
def test_small_plain_terminal_80x24_in_tmux(tmp_path, need_tmux):
    """A live run watched at 80x24 with LANG=C: every byte on the screen is ASCII (borders and
    charts too), three tiles with values, the banner, the keys; arrows page the tiles; the
    help is complete (it scrolls); q quits at once."""
    runs = tmp_path / "runs"
    writer = subprocess.Popen(
        GEN_RUN + ["--steps", "400", "--rate", "10", "--runs-dir", str(runs), "--no-jsonl"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
    )
    session = f"small-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 20
        while not (runs / "latest" / "run.json").exists():
            assert time.monotonic() < deadline, "the generator never made its run"
            time.sleep(0.1)
        pane = _start_tui(session, runs, size=(80, 24), LANG="C")
        first = int(pane.wait_for(STEP_RE, timeout=20).group(1).replace(",", ""))
        pane.wait_for(r"\+- kl -", timeout=10)
        deadline = time.monotonic() + 10
        while True:  # the step climbs while the run writes
            m = re.search(STEP_RE, pane.capture())
            if m and int(m.group(1).replace(",", "")) > first + 5:
                break
            assert time.monotonic() < deadline, pane.capture()
            time.sleep(0.2)
        screen = pane.capture()
        assert screen.isascii(), sorted({c for c in screen if not c.isascii()})
        assert "RUNNING" in screen and "+- entropy -" in screen and "+- reward_mean -" in screen, screen
        assert re.search(r"\|-?\d[\d,.]*(e[+-]\d+)?\s+nats", screen), screen  # a value on a tile (maybe padded)
        assert "tiles 1/3" in screen
        pane.send("j")
        pane.wait_for(r"\+- advantage_mean -", timeout=5)
        assert "tiles 2/3" in pane.capture()
        pane.send("?")
        pane.wait_for(r"Keys", timeout=5)
        pane.send("End")  # the help scrolls to its end on a small terminal
        pane.wait_for(r"Alerts are evaluated here", timeout=5)
        assert pane.capture().isascii()
        pane.send("Escape")
        time.sleep(0.3)
        t = time.monotonic()
        pane.send("q")
        pane.wait_for(r"TUI-EXITED rc=0", timeout=5)
        assert time.monotonic() - t < 2.0
    finally:
        subprocess.run(_tmux("kill-session", "-t", session), capture_output=True)
        writer.terminate()
        writer.wait()


@pytest.mark.timeout(120)
def test_compare_a_live_trainer_run_with_a_finished_one_in_tmux(tmp_path, need_tmux):
    """`rlhf-tui RUNS OTHER`: the run the real trainer is writing (A) against a finished run (B);
    the legend names both, A's step climbs in it while B's stays, the tiles show both values, t
    aligns them by time, then by tokens; q quits."""
    runs = tmp_path / "runs"
    runs.mkdir()
    other = tmp_path / "other"
    subprocess.run(
        GEN_RUN + ["--steps", "80", "--runs-dir", str(other), "--run-id", "baseline", "--no-jsonl"],
        check=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
    )
    log = open(tmp_path / "trainer.log", "w")
    cmd = _trainerd() + [a.format(runs=runs) for a in WRITER[1:]]
    writer = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    session = f"tui-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 60
        while not (runs / "latest" / "run.json").exists():
            assert writer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trainer never started a run"
            time.sleep(0.1)
        run_id = (runs / "latest").resolve().name
        pane = _start_tui(session, Path(f"{runs} {other / 'baseline'}"))
        pane.wait_for(r"B ━━ baseline\s+FINISHED\s+step 80/80", timeout=25)
        seen: list[int] = []
        screen = ""
        deadline = time.monotonic() + 75
        while time.monotonic() < deadline:
            screen = pane.capture()
            m = re.search(rf"A ━━ {re.escape(run_id)}\s+(\w+)\s+step (\d[\d,]*)/(\d[\d,]*)", screen)
            if m:
                step = int(m.group(2).replace(",", ""))
                if not seen or step != seen[-1]:
                    seen.append(step)
                if m.group(1) == "FINISHED":
                    break
            time.sleep(0.2)
        assert "FINISHED" in screen and len(seen) >= 2 and seen == sorted(seen), (seen, screen)
        assert re.search(r"B ━━ baseline\s+FINISHED\s+step 80/80", screen), screen  # B unchanged
        assert re.search(r"│A -?\d[\d,.e+-]* B -?\d[\d,.e+-]*", screen), screen  # a tile: both values
        assert re.search(r"ms, share\s+A\s+B", screen), screen  # the profiler compares them
        assert "aligned by step" in screen and f"━ A {run_id}" in screen and "━ B baseline" in screen, screen
        pane.send("t")
        pane.wait_for(r"aligned by time", timeout=10)
        pane.send("t")
        pane.wait_for(r"aligned by tokens", timeout=10)
        pane.wait_for(r"\d tok\s", timeout=10)
        assert writer.wait(timeout=30) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        pane.send("q")
        pane.wait_for(r"TUI-EXITED rc=0", timeout=10)
    finally:
        subprocess.run(_tmux("kill-session", "-t", session), capture_output=True)
        _stop(writer)
        log.close()
