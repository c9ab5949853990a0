"""The harness under `trainerd verify`: one result type, one exit-code policy, and a cancel
(SIGTERM, as the monitor's cancel sends it) that leaves no process and no temp dir behind."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from trainerd.verify import harness
from trainerd.verify.harness import CouldNotRun, Trainer, run_check

REPO = Path(__file__).resolve().parents[2]


# -- /proc: the process tree of a verify process ------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie is dead, only not reaped yet


def _descendants(root: int) -> set[int]:
    out: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p in _all_pids() if (st := _stat(p)) and st[1] in frontier and p not in out}
        out |= frontier
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _env(tmpdir: Path) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["TMPDIR"] = str(tmpdir)  # tempfile.gettempdir() of the verify process: its temp dirs land here
    env.pop("TRAINERD_VERIFY_KEEP", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("check", ["m2", "m3"])
def test_sigterm_of_verify_kills_every_trainer_and_removes_its_temp_dirs(check, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    verify = subprocess.Popen(
        [sys.executable, "-c", harness.CLI_MAIN, "verify", check, "--json"],
        cwd=REPO,
        env=_env(tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as the monitor starts it
    )
    try:
        # wait until a trainer child runs (and, for m3, both of the first two if they come)
        trainers: dict[int, int] = {}  # pid -> pgid
        deadline = time.monotonic() + 90
        first_seen = None
        while time.monotonic() < deadline:
            for pid in _descendants(verify.pid):
                if b"--foreground" in _cmdline(pid) and (st := _stat(pid)):
                    trainers.setdefault(pid, st[2])
            if trainers and first_seen is None:
                first_seen = time.monotonic()
            if first_seen is not None and time.monotonic() - first_seen > 2.0:
                break
            assert verify.poll() is None, verify.stderr.read()[-2000:]
            time.sleep(0.05)
        assert trainers, "no trainer child started"
        assert any(_alive(p) for p in trainers), "the trainers ended before the cancel: nothing to test"
        for pid, pgid in trainers.items():
            assert pgid == pid, "a trainer runs in its own process group"
        made = sorted(tmpdir.glob(f"{harness.TEMP_PREFIX}{check}-*"))
        assert made, list(tmpdir.iterdir())
        tree = _descendants(verify.pid)  # the trainers and anything they started

        t0 = time.monotonic()
        os.kill(verify.pid, signal.SIGTERM)
        out, err = verify.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        if verify.poll() is None:
            os.killpg(verify.pid, signal.SIGKILL)
            verify.wait()
    assert verify.returncode == 130, err[-2000:]
    assert took < 5, f"verify took {took:.1f} s to end after SIGTERM"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["check"] == check and result["status"] == "cancelled" and result["passed"] is False
    assert err.strip().splitlines()[-1] == f"trainerd verify {check}: cancelled (SIGTERM)"

    groups = set(trainers.values())
    deadline = time.monotonic() + 3
    while True:
        survivors = [p for p in _all_pids() if _alive(p) and (p in tree or p in trainers or _stat(p)[2] in groups)]
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not survivors, [(p, _cmdline(p)[:200]) for p in survivors]
    assert not [d for d in made if d.exists()], "a temp dir of the check survived the cancel"
    assert not list(tmpdir.glob(f"{harness.TEMP_PREFIX}*"))


# -- in process: the cancel path, the result type, the exit codes -------------------------------------


def _silent_run_check(capsys, body, as_json=True):
    rc = run_check("mx", as_json, body)
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if as_json else out), err


def test_sigterm_in_process_kills_the_trainer_group_and_removes_temp_dirs(capsys, tmp_path):
    seen: dict = {}

    def body(h):
        work = h.tempdir()
        seen["work"] = work
        # a "trainer" that sleeps before the CLI would run (test bootstrap), and a grandchild of it
        t = Trainer(
            ["--help"],
            work / "t.out",
            bootstrap="import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)",
        ).start()
        seen["pid"] = t.proc.pid
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t.wait(60)
        raise AssertionError("not reached: the SIGTERM cancels the wait")

    previous = signal.getsignal(signal.SIGTERM)
    rc, result, err = _silent_run_check(capsys, body)
    assert rc == 130 and result["status"] == "cancelled" and result["passed"] is False
    assert result["reason"] == "cancelled (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert not seen["work"].exists()
    time.sleep(0.2)
    group = [p for p in _all_pids() if _alive(p) and (st := _stat(p)) and st[2] == seen["pid"]]
    assert not group, [_cmdline(p) for p in group]


def test_exit_codes_and_statuses(capsys):
    def passing(h):
        h.checks.add("a", True, "fine")

    def failing(h):
        h.checks.add("a", True, "fine")
        h.checks.add("b", False, "broken at step 3")
        h.checks.could_not_finish("c", "timeout")

    def unfinished(h):
        h.checks.add("a", True, "fine")
        h.checks.could_not_finish("rerun", "did not finish within 30 s")

    def bad_run(h):
        raise CouldNotRun("no such run or runs dir: /x")

    def bug(h):
        raise KeyError("oops")

    rc, r, err = _silent_run_check(capsys, passing)
    assert (rc, r["status"], r["passed"], r["reason"]) == (0, "passed", True, None)
    assert set(r) == {"check", "status", "passed", "checks", "reason", "run", "duration_s"}
    rc, r, err = _silent_run_check(capsys, failing)
    assert (rc, r["status"], r["passed"]) == (1, "failed", False) and "b" in r["reason"]
    assert [c["passed"] for c in r["checks"]] == [True, False, None]
    assert "FAIL b: broken at step 3" in err and "n/a  c: could not finish: timeout" in err
    rc, r, err = _silent_run_check(capsys, unfinished)
    assert (rc, r["status"], r["passed"]) == (2, "could_not_run", False)
    assert r["checks"][-1]["detail"] == "could not finish: did not finish within 30 s"
    assert "FAIL" not in err and err.strip().splitlines()[-1].startswith("trainerd verify mx: rerun: could not finish")
    rc, r, err = _silent_run_check(capsys, bad_run)
    assert (rc, r["status"], r["reason"], r["checks"]) == (2, "could_not_run", "no such run or runs dir: /x", [])
    assert err == "trainerd verify mx: no such run or runs dir: /x\n"
    rc, out, err = _silent_run_check(capsys, bad_run, as_json=False)
    assert rc == 2 and out == "" and err == "trainerd verify mx: no such run or runs dir: /x\n"
    rc, r, err = _silent_run_check(capsys, bug)
    assert rc == 2 and r["reason"] == "internal error: KeyError: 'oops'"
    rc, out, err = _silent_run_check(capsys, passing, as_json=False)
    assert out.startswith("ok   a: fine\nverify mx: PASSED in ")


def test_one_value_comparator():
    same = harness.same_value
    assert same(0.1, 0.1) and not same(0.0, -0.0) and not same(1, 1.0) and not same(True, 1)
    assert same({"a": [1.5, 2]}, {"a": [1.5, 2]}) and not same({"a": 1.5}, {"a": math.nextafter(1.5, 2)})
    import struct

    other_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert same(math.nan, math.nan) and not same(math.nan, other_nan)  # bitwise: the payload counts
    assert same(math.nan, other_nan, any_nan=True)  # ... except through JSON text / float32
    assert not same(math.nan, math.inf, any_nan=True) and not same(math.inf, -math.inf, any_nan=True)


def test_one_step_sequence_check():
    recs = [{"step": s} for s in (1, 2, 3)]
    assert harness.step_log_problem(recs) is None
    assert harness.step_log_problem([{"step": s} for s in (1, 2, 2, 3)]) == "duplicate step 2 (record 2)"
    assert harness.step_log_problem([{"step": s} for s in (1, 3)]) == "gap: expected step 2, found step 3 (record 1)"
    assert harness.step_log_problem([], 2) == "no records; 2 corrupt frame(s)"


def test_one_toml_writer(tmp_path):
    cfg = {"a": 1, "b": 0.1, "c": True, "d": 'x"y', "e": None, "f": math.inf, "g": 1e-5}
    p = harness.write_config_toml(tmp_path / "c.toml", cfg)
    back = tomllib.loads(p.read_text())
    assert back == {k: v for k, v in cfg.items() if v is not None}


def test_verify_all_exit_code_is_the_worst_and_the_json_says_why(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", harness.CLI_MAIN, "verify", "all", str(tmp_path / "nope"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    result = json.loads(r.stdout)
    assert result["status"] == "could_not_run" and [c["name"] for c in result["checks"]] == ["m1", "m2", "m3"]
    assert all(c["passed"] is None and "no such run" in c["detail"] for c in result["checks"])


def test_m1_rerun_of_a_run_of_any_length_is_bounded():
    from trainerd.verify import m1

    long_run = [{"step": s, "step_time_s": 0.5} for s in range(1, 100_001)]
    assert m1.rerun_steps(long_run, budget_s=120) == m1.RERUN_MAX_STEPS
    slow = [{"step": s, "step_time_s": 30.0} for s in range(1, 10)]
    assert m1.rerun_steps(slow, budget_s=120) == 3  # warm-up 15 s + 3 x 30 s fit in 120 s, a 4th does not
