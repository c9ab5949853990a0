"""Hostile and damaged run dirs against every command that reads a run, and the monitor.

One real run is made by the real trainer; each case (tests/hostile_runs.py) damages a copy
of it (random bytes, FIFOs, links to victims outside the run, escape sequences, huge lines,
impossible values, a reused pid, a lock held by someone else ...). Every `trainerd`
subcommand that reads a run is pointed at it, in a process of its own (forked from a server
that imported the CLI once, tests/cli_zygote.py: ~0.2 s saved a command, 346 commands) with
its address space limited to 1.5 GB, its own session, cwd and TMPDIR, and a timeout, and must:

- exit 2 (or 0/1 where it legitimately answers, e.g. `status` of a crashed run);
- say what is wrong in ONE line on stderr: no traceback, no "internal error" (`verify`
  also prints timestamped progress lines there; one line besides those);
- write no raw control character (ESC, C1, bidi) to stdout or stderr: run text is escaped;
- finish within a few seconds (a hang is a failure);
- write nothing outside the run dir (every other file under the case dir keeps its bytes
  and mtime; TMPDIR and the working directory are in it) and never show a victim's content.

The monitor (`tui.app.MonitorApp`, headless, while the CLI cases run in the background) opens
the same dirs: no exception escapes, no raw control character or victim content on its
screen, and `q` quits at once (or it exits by itself, code 2, for a target it cannot read).

Root ignores mode bits: as root, the mode-000 case is an ordinary run (run-json-is-a-dir is
the unreadable case that fails for root too).

At the end a table (cases, commands run, crashes, hangs, tracebacks, bytes written outside)
is printed (see it with `-s`, or in the terminal summary) and written to
$RLHF_ROBUSTNESS_SUMMARY (default /tmp/rlhf-robustness-summary.txt).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hostile_runs import CMDS, VICTIM_MARK, VICTIM_STEP, Case, Ctx, build, bytes_changed, cases, cleanup, snapshot

ROOT = Path(__file__).resolve().parents[1]
MEM_LIMIT = 1536 << 20  # RLIMIT_AS of every command
SLOW = {"resume": 25.0, "verify_m1": 25.0}  # these import torch before they can refuse
FAST = 10.0  # seconds any other command may take, on a loaded 2-core box (wait/stop wait 2 of them)
KILL_AFTER = 40.0  # a command still going then is killed and counted as a hang
CASES = {c.name: c for c in cases()}
SUMMARY = Path(os.environ.get("RLHF_ROBUSTNESS_SUMMARY", "/tmp/rlhf-robustness-summary.txt"))
TINY = {"preset": "smoke", "checkpoint_every": 4, "sft_steps": 20, "rm_steps": 20, "profile_steps": "2:3"}


# -- one command ------------------------------------------------------------------------------------


@dataclass
class Result:
    cmd: str
    argv: list[str]
    rc: int | None  # None: killed after KILL_AFTER s
    stdout: str
    stderr: str
    seconds: float
    raw_out: bytes = b""
    raw_err: bytes = b""
    maxrss_kb: int = 0

    @property
    def hung(self) -> bool:
        return self.rc is None

    def __repr__(self) -> str:
        return (
            f"<{self.cmd} rc={self.rc} {self.seconds:.1f}s\n  argv={self.argv!r}\n"
            f"  stdout={self.stdout[-1500:]!r}\n  stderr={self.stderr[-1500:]!r}>"
        )


class Zygote:
    """Runs `trainerd` commands as forked children of tests/cli_zygote.py (see there): real
    processes, without paying Python's start-up and the CLI's imports each time."""

    def __init__(self, scratch: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.scratch = scratch
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py")), str(MEM_LIMIT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.lock = threading.Lock()
        self.next_id = 0
        self.started: dict[int, concurrent.futures.Future] = {}
        self.ended: dict[int, concurrent.futures.Future] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                which = self.ended if "rc" in msg else self.started
                fut = which.pop(msg["id"])
            fut.set_result(msg)

    def run(self, cmd: str, run_arg: Path, cwd: Path, tmpdir: Path) -> Result:
        argv = [*CMDS[cmd], str(run_arg)]
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            started, ended = concurrent.futures.Future(), concurrent.futures.Future()
            self.started[rid], self.ended[rid] = started, ended
            out, err = self.scratch / f"{rid}.out", self.scratch / f"{rid}.err"
            req = {"id": rid, "argv": argv, "cwd": str(cwd), "env": {"TMPDIR": str(tmpdir)}}
            req |= {"unset": ["SEED", "TRAINERD_VERIFY_KEEP"], "out": str(out), "err": str(err)}
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        t = time.monotonic()
        pid = started.result(timeout=30)["pid"]
        try:
            done = ended.result(timeout=KILL_AFTER)
            rc: int | None = done["rc"]
            rss = done["maxrss_kb"]
        except concurrent.futures.TimeoutError:
            os.killpg(pid, signal.SIGKILL)  # its own session: everything it started
            rss = ended.result(timeout=30)["maxrss_kb"]
            rc = None
        took = time.monotonic() - t
        raw_out, raw_err = out.read_bytes(), err.read_bytes()
        out.unlink()
        err.unlink()
        text_out, text_err = raw_out.decode("utf-8", "replace"), raw_err.decode("utf-8", "replace")
        return Result(cmd, argv, rc, text_out, text_err, took, raw_out, raw_err, rss)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def control_chars(raw: bytes) -> list[str]:
    """Characters a terminal would obey in `raw` (which may be anything): C0 but newline, DEL,
    C1, bidi controls, line/paragraph separators."""
    text = raw.decode("utf-8", "replace")
    bad = []
    for ch in text:
        cp = ord(ch)
        if ch == "\n":
            continue
        if cp < 0x20 or 0x7F <= cp <= 0x9F or unicodedata.category(ch) in ("Cf", "Zl", "Zp") and cp != 0xFEFF:
            if ch in ("\u200b", "\u200c", "\u200d"):  # zero-width (non-)joiners: harmless
                continue
            bad.append(f"U+{cp:04X}")
    return bad


def problems(case: Case, r: Result) -> list[str]:
    """What is wrong with one command's answer (empty: all well)."""
    out: list[str] = []
    if r.hung:
        return [f"hung (killed after {KILL_AFTER:.0f} s)"]
    limit = SLOW.get(r.cmd, FAST)
    if r.maxrss_kb > MEM_LIMIT >> 10:
        out.append(f"peak RSS {r.maxrss_kb >> 10} MiB")
    if r.seconds > limit:
        out.append(f"took {r.seconds:.1f} s (limit {limit:.0f} s)")
    if r.rc not in case.codes(r.cmd):
        out.append(f"exit code {r.rc}, expected {sorted(case.codes(r.cmd))}")
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        out.append("traceback")
    if "internal error" in r.stderr:
        out.append("internal error")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.cmd.startswith("verify"):  # timestamped progress lines are part of verify's stderr
        lines = [ln for ln in lines if not ln.startswith("[verify ")]
    if len(lines) > 1:
        out.append(f"{len(lines)} lines on stderr")
    if r.rc == 2 and not lines:
        out.append("exit 2 without a word on stderr")
    for where, raw in (("stdout", r.raw_out), ("stderr", r.raw_err)):
        bad = control_chars(raw)
        if bad:
            out.append(f"control characters in {where}: {sorted(set(bad))}")
        if VICTIM_MARK in raw.decode("utf-8", "replace") or str(VICTIM_STEP) in raw.decode("utf-8", "replace"):
            out.append(f"a victim's content in {where}")
    if r.rc == 0 and r.cmd in ("status_json", "report_json"):
        try:
            json.loads(r.stdout)
        except ValueError as e:
            out.append(f"stdout is not JSON: {e}")
    return out


# -- the base run and the cases ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A finished run made by the real trainer (8 steps, a profiled window, checkpoints)."""
    d = tmp_path_factory.mktemp("robust-base")
    cfg = d / "tiny.toml"
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    argv = ["start", "--smoke", "--config", str(cfg), "--steps", "8", "--runs-dir", str(d / "runs")]
    argv += ["--run-id", "base", "--foreground"]
    r = subprocess.run(
        [sys.executable, "-c", "from trainerd.cli import main; main()", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    base = d / "runs" / "base"
    assert (base / "profile" / "summary.csv").is_file() and (base / "checkpoints").is_dir()
    return base


@dataclass
class CaseOutcome:
    case: Case
    ctx: Ctx | None = None
    results: dict[str, Result] = field(default_factory=dict)
    written_outside: int = 0
    changed: list[str] = field(default_factory=list)
    check_error: str | None = None
    build_error: str | None = None


def run_case(zygote: Zygote | None, case: Case, base: Path, where: Path) -> CaseOutcome:
    oc = CaseOutcome(case)
    try:
        ctx = build(case, base, where)
    except Exception as e:  # noqa: BLE001 - reported by the case's test
        oc.build_error = f"{type(e).__name__}: {e}"
        return oc
    oc.ctx = ctx
    try:
        before = snapshot(where, ctx.run)
        run_arg = ctx.run_arg or ctx.run
        assert zygote is not None
        for cmd in case.commands():
            oc.results[cmd] = zygote.run(cmd, run_arg, where / "cwd", where / "tmp")
        if case.check is not None:
            try:
                case.check(ctx, oc.results)
            except AssertionError as e:
                oc.check_error = str(e) or "check failed"
        oc.written_outside, oc.changed = bytes_changed(before, snapshot(where, ctx.run))
    finally:
        cleanup(ctx)
    return oc


def _selected(session, test_name: str) -> list[str]:
    names = []
    for item in session.items:
        if getattr(item, "originalname", None) == test_name and hasattr(item, "callspec"):
            names.append(item.callspec.params["name"])
    return names


TALLY: dict[str, dict] = {"cli": {}, "monitor": {}, "detail": {}}


class CliRun:
    """The selected CLI cases, run in the background in a pool of 2 (one case per worker at a
    time): started before the monitor's cases, which run meanwhile on the main thread."""

    def __init__(self, names: list[str], base: Path, root: Path):
        self.base = base
        self.scratch = root / "_outputs"  # the commands' stdout/stderr, outside every case dir
        self.scratch.mkdir()
        self.base_before = snapshot(base.parents[1], self.scratch)  # the base run: copied, never written
        self.t0 = time.monotonic()
        self.zygote = Zygote(self.scratch) if names else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.futures = {n: self.pool.submit(run_case, self.zygote, CASES[n], base, root / n) for n in names}
        self._results: dict[str, CaseOutcome] | None = None

    def results(self) -> dict[str, CaseOutcome]:
        if self._results is None:
            try:
                self._results = {n: f.result() for n, f in self.futures.items()}
            finally:
                self.pool.shutdown(wait=True)
                if self.zygote is not None:
                    self.zygote.close()
            TALLY["cli_seconds"] = time.monotonic() - self.t0
            TALLY["base_changed"] = bytes_changed(self.base_before, snapshot(self.base.parents[1], self.scratch))[1]
        return self._results


@pytest.fixture(scope="module")
def cli_run(request, base_run, tmp_path_factory):
    run = CliRun(_selected(request.session, "test_cli_case"), base_run, tmp_path_factory.mktemp("robust-cli"))
    yield run
    run.results()  # never leave the pool or the fork server behind


@pytest.fixture(scope="module")
def outcomes(cli_run) -> dict[str, CaseOutcome]:
    return cli_run.results()


# -- the monitor ----------------------------------------------------------------------------------------

MONITOR_SIZE = (120, 40)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.monitor])
async def test_monitor_case(cli_run, base_run, tmp_path, name):
    # cli_run: the CLI cases run in the background meanwhile
    from tui.app import MonitorApp

    case = CASES[name]
    ctx = build(case, base_run, tmp_path)
    rec = TALLY["monitor"][name] = {"hangs": 0, "exceptions": 0, "written_outside": 0, "ok": False}
    try:
        before = snapshot(tmp_path, ctx.run)
        app = MonitorApp(ctx.run_arg or ctx.run)
        t = time.monotonic()
        async with app.run_test(size=MONITOR_SIZE) as pilot:
            await pilot.pause(0.3)  # the first reads land
            if app.is_running:
                screen = app.export_screenshot()  # what the terminal would show, as text
                assert VICTIM_MARK not in screen and str(VICTIM_STEP) not in screen, "a victim's content is shown"
                assert "\x1b" not in screen and "\x07" not in screen, "raw control characters reached the screen"
                t_q = time.monotonic()
                await pilot.press("q")
                while app.is_running:
                    if time.monotonic() - t_q > 2.0:
                        rec["hangs"] += 1
                        raise AssertionError("q did not quit within 2 s")
                    await pilot.pause(0.02)
        if app._exception is not None:
            rec["exceptions"] += 1
        assert app._exception is None, repr(app._exception)
        assert app.return_code in (0, 2), app.return_code
        assert time.monotonic() - t < 10
        rec["written_outside"], changed = bytes_changed(before, snapshot(tmp_path, ctx.run))
        assert not changed, changed
        rec["ok"] = True
    finally:
        cleanup(ctx)


# -- the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case(outcomes, name):
    oc = outcomes[name]
    assert oc.build_error is None, oc.build_error
    bad = {cmd: p for cmd, r in oc.results.items() if (p := problems(oc.case, r))}
    TALLY["detail"][name] = " ".join(f"{c}={r.rc}/{r.seconds:.1f}s" for c, r in oc.results.items())
    TALLY["cli"][name] = {
        "commands": len(oc.results),
        "hangs": sum(r.hung for r in oc.results.values()),
        "tracebacks": sum("Traceback" in r.stderr or "internal error" in r.stderr for r in oc.results.values()),
        "crashes": sum(
            (not r.hung) and (r.rc not in oc.case.codes(r.cmd) or (r.rc or 0) < 0) for r in oc.results.values()
        ),
        "failures": len(bad) + (oc.check_error is not None) + (oc.written_outside > 0),
        "written_outside": oc.written_outside,
        "max_rss_kb": max((r.maxrss_kb for r in oc.results.values()), default=0),
    }
    msgs = [f"{cmd}: {'; '.join(p)}\n    {oc.results[cmd]!r}" for cmd, p in bad.items()]
    if oc.check_error:
        msgs.append(f"case check: {oc.check_error}")
    if oc.written_outside:
        msgs.append(f"{oc.written_outside} bytes written outside the run dir: {oc.changed}")
    assert not msgs, f"{name}:\n" + "\n".join(msgs)


def test_base_run_untouched(outcomes):
    """Nothing any command did reached the run the cases were copied from."""
    assert TALLY["base_changed"] == []


# -- the table ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    """The closing table, after the module's tests: printed and written to SUMMARY."""
    t = time.monotonic()
    yield
    cli, mon = TALLY["cli"], TALLY["monitor"]
    if not cli and not mon:
        return
    max_rss = max((v["max_rss_kb"] for v in cli.values()), default=0)
    rows = [
        ("cases tried (CLI)", len(cli)),
        ("CLI commands run", sum(v["commands"] for v in cli.values())),
        ("crashes (unexpected exit code)", sum(v["crashes"] for v in cli.values())),
        ("hangs", sum(v["hangs"] for v in cli.values()) + sum(v["hangs"] for v in mon.values())),
        ("tracebacks / internal errors", sum(v["tracebacks"] for v in cli.values())),
        (
            "bytes written outside the run dir",
            sum(v["written_outside"] for v in cli.values()) + sum(v["written_outside"] for v in mon.values()),
        ),
        ("CLI cases failing any check", sum(v["failures"] > 0 for v in cli.values())),
        ("cases opened in the monitor", len(mon)),
        ("monitor exceptions", sum(v["exceptions"] for v in mon.values())),
        ("monitor cases failing any check", sum(not v["ok"] for v in mon.values())),
        ("max RSS of a command", f"{max_rss // 1024} MiB (address space limit {MEM_LIMIT >> 20} MiB)"),
        ("wall time: CLI pool / module", f"{TALLY.get('cli_seconds', 0):.1f} s / {time.monotonic() - t:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(["robustness suite: hostile run dirs", *(f"  {k:<{width}}  {v}" for k, v in rows)])
    detail = "\n".join(f"  {n}: {d}" for n, d in TALLY["detail"].items())
    try:
        SUMMARY.write_text(text + "\n\nper case, command=exit code/seconds:\n" + detail + "\n")
    except OSError:
        pass
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:  # in the terminal too, captured output or not
        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)
