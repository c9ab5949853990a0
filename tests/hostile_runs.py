"""Damaged and hostile run dirs, built from one real run, for tests/test_robustness.py.

Each `Case` damages a fresh copy of a finished run the real trainer made. A case lives in
its own directory:

    <case>/runs/<run id>/   the damaged run (what every command is pointed at)
    <case>/outside/         victims: files and folders the run links to; never to be written,
                            and their content (VICTIM_MARK, VICTIM_STEP) never to be shown
    <case>/cwd/             the working directory of every command
    <case>/tmp/             TMPDIR of every command

`snapshot(case_dir, run_dir)` fingerprints everything under the case dir outside the run dir
(every path, and each file's bytes, size and mtime), so a test can show that nothing was
written outside the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import jsonl
from protocol.steplog import encode_frame

VICTIM_MARK = "VICTIM-c0ffee"  # in every file outside a run dir; no output may ever show it
VICTIM_STEP = 7777777  # the step of the records in victim step logs; no output may show it
OSC_TITLE = "\x1b]2;pwned\x07"  # sets the terminal's title
CLEAR = "\x1b[2J"  # clears the screen

# The commands that read a run: name -> trainerd arguments before RUN.
CMDS: dict[str, list[str]] = {
    "status": ["status"],
    "status_json": ["status", "--json"],
    "wait": ["wait", "--timeout", "2"],
    "stop": ["stop", "--timeout", "2"],
    "report": ["report"],
    "report_md": ["report", "--format", "md"],
    "report_json": ["report", "--format", "json"],
    "profile": ["profile"],
    "verify_m2": ["verify", "m2"],
    "verify_m3": ["verify", "m3"],
    # only for the cases that set resume/m1: a run these accept would train for real
    "resume": ["resume", "--foreground"],
    "verify_m1": ["verify", "m1"],
}
# a run no command can read: exit 2 from each (but verify m2, which checks the profile
# artifacts only, and answers whether or not run.json is readable)
UNREADABLE = {name: {2} for name in CMDS} | {"verify_m2": {0, 1, 2}}
READABLE: dict[str, set[int]] = {  # a run whose run.json is fine
    "status": {0},
    "status_json": {0},
    "wait": {0, 1},  # finished: 0; crashed/stopped/failed: 1
    "stop": {2},  # not running
    "report": {0, 2},
    "report_md": {0, 2},
    "report_json": {0, 2},
    "profile": {0, 2},
    "verify_m2": {0, 1, 2},
    "verify_m3": {0, 1, 2},
    "resume": {2},
    "verify_m1": {2},
}


@dataclass
class Ctx:
    """What a case's damage function works on."""

    run: Path  # the run dir (a copy of the base run)
    outside: Path  # a folder outside the run, for victims
    base: Path  # the pristine base run (read only)
    procs: list[subprocess.Popen] = field(default_factory=list)  # helpers to kill afterwards
    run_arg: Path | None = None  # what to pass as RUN, when it is not `run`
    extra: dict[str, Any] = field(default_factory=dict)  # for the case's own check


@dataclass
class Case:
    name: str
    damage: Callable[[Ctx], None]
    readable: bool = True  # run.json readable: `status` answers
    expect: dict[str, set[int]] = field(default_factory=dict)  # exit codes, per command, over the defaults
    resume: bool = False  # resume must refuse this run: run it
    m1: bool = False  # verify m1 must refuse this run at once: run it
    monitor: bool = True  # open it in the monitor too
    check: Callable[[Ctx, dict[str, Any]], None] | None = None  # extra assertions on the results
    note: str = ""

    def codes(self, cmd: str) -> set[int]:
        return self.expect.get(cmd, (READABLE if self.readable else UNREADABLE)[cmd])

    def commands(self) -> list[str]:
        names = [c for c in CMDS if c not in ("resume", "verify_m1")]
        return names + (["resume"] if self.resume else []) + (["verify_m1"] if self.m1 else [])


# -- victims ---------------------------------------------------------------------------------------


def victim_record() -> dict:
    return {"step": VICTIM_STEP, "time": 1.0, "kl": 0.5, "reward_mean": 1.0, "note": VICTIM_MARK}


VICTIMS: dict[str, bytes] = {  # what a victim impersonating each run file holds: a follower would parse it
    "steps.msgpack": encode_frame(victim_record()),
    "steps.jsonl": (jsonl.dumps(victim_record()) + "\n").encode(),
    "events.jsonl": (
        jsonl.dumps({"event": "alert", "time": 2.0, "rule": VICTIM_MARK, "severity": "critical", "step": VICTIM_STEP})
        + "\n"
    ).encode(),
    "run.json": json.dumps({"run_id": VICTIM_MARK, "status": VICTIM_MARK, "config": {"steps": VICTIM_STEP}}).encode(),
    "trainerd.log": f"{VICTIM_MARK}\n".encode(),
}


def make_victim(ctx: Ctx, name: str) -> Path:
    v = ctx.outside / f"victim-{name}"
    v.write_bytes(VICTIMS.get(name, f"{VICTIM_MARK}\n".encode()))
    os.utime(v, (1_000_000_000, 1_000_000_000))  # an old mtime: a write would move it
    return v


def link_to_victim(name: str) -> Callable[[Ctx], None]:
    def damage(ctx: Ctx) -> None:
        v = make_victim(ctx, name)
        p = ctx.run / name
        if p.exists() or p.is_symlink():
            p.unlink()
        p.symlink_to(v)

    return damage


def link_dir_outside(name: str) -> Callable[[Ctx], None]:
    """`name` (checkpoints, tb) replaced by a link to a copy of it outside the run."""

    def damage(ctx: Ctx) -> None:
        target = ctx.outside / f"victim-{name}"
        shutil.copytree(ctx.run / name, target, symlinks=True)
        (target / f"{VICTIM_MARK}.txt").write_text(VICTIM_MARK)
        shutil.rmtree(ctx.run / name)
        (ctx.run / name).symlink_to(target, target_is_directory=True)

    return damage


def fifo(name: str) -> Callable[[Ctx], None]:
    def damage(ctx: Ctx) -> None:
        p = ctx.run / name
        if p.exists():
            p.unlink()
        os.mkfifo(p)

    return damage


# -- manifest and log edits ------------------------------------------------------------------------


def edit_manifest(**changes: Any) -> Callable[[Ctx], None]:
    def damage(ctx: Ctx) -> None:
        m = json.loads((ctx.run / "run.json").read_text())
        m.update(changes)
        (ctx.run / "run.json").write_text(json.dumps(m))  # Python's json writes NaN/Infinity as they are

    return damage


def read_steps(ctx: Ctx) -> list[dict]:
    return jsonl.read_jsonl(ctx.base / "steps.jsonl")


def write_steps(ctx: Ctx, records: list[dict]) -> None:
    """Both step logs (the framed one and the JSONL mirror) replaced by `records`."""
    (ctx.run / "steps.msgpack").write_bytes(b"".join(encode_frame(r) for r in records))
    (ctx.run / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def append_events(ctx: Ctx, *events: dict, raw: bytes = b"") -> None:
    with open(ctx.run / "events.jsonl", "ab") as f:
        f.write(raw)
        for ev in events:
            f.write((json.dumps(ev) + "\n").encode())


def _random_run_json(ctx: Ctx) -> None:
    rnd = __import__("random").Random(1234)
    (ctx.run / "run.json").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)) + b"\x1b[2J\x1b]2;pwned\x07")


def _huge_run_json(ctx: Ctx) -> None:
    m = json.loads((ctx.run / "run.json").read_text())
    m["padding"] = "x" * (10 << 20)
    (ctx.run / "run.json").write_text(json.dumps(m))


def _dev_zero_run_json(ctx: Ctx) -> None:
    (ctx.run / "run.json").unlink()
    (ctx.run / "run.json").symlink_to("/dev/zero")


def _run_json_is_dir(ctx: Ctx) -> None:
    (ctx.run / "run.json").unlink()
    (ctx.run / "run.json").mkdir()


def _mode_000(ctx: Ctx) -> None:
    ctx.run.chmod(0)


def _escaped_name(ctx: Ctx) -> None:
    evil = ctx.run.with_name(f"run{OSC_TITLE}{CLEAR}\u202e")
    ctx.run.rename(evil)
    ctx.run = evil
    m = json.loads((evil / "run.json").read_text())
    m["run_id"] = evil.name
    (evil / "run.json").write_text(json.dumps(m))


def _events_escapes(ctx: Ctx) -> None:
    bad = f"{OSC_TITLE}{CLEAR}[bold]boom[/bold] \u202eevil \x9b31m"
    append_events(
        ctx,
        {"event": "crashed", "time": 3.0, "message": bad},
        {
            "event": "alert",
            "time": 4.0,
            "rule": f"[red]{OSC_TITLE}r",
            "severity": "critical",
            "metric": f"kl{CLEAR}",
            "value": 9.0,
            "threshold": 1.0,
            "step": 5,
            "message": bad,
            "explanation": bad,
        },
        {"event": "resume_check", "time": 5.0, "message": bad},
    )


def _events_9mb_line(ctx: Ctx) -> None:
    big = json.dumps({"event": "alert", "message": "x" * (9 << 20)}).encode() + b"\n"
    append_events(
        ctx,
        {"event": "alert", "time": 6.0, "rule": "after_big_line", "severity": "warning", "metric": "kl", "step": 7},
        raw=big,
    )


def _step_2_64(ctx: Ctx) -> None:
    recs = read_steps(ctx)
    recs.append({**recs[-1], "step": 2**64 - 1})
    write_steps(ctx, recs)
    edit_manifest(last_step=2**64 - 1)(ctx)


def _negative_step(ctx: Ctx) -> None:
    recs = read_steps(ctx)
    recs.insert(0, {**recs[0], "step": -5})
    recs.append({**recs[-1], "step": -(2**63)})
    write_steps(ctx, recs)
    edit_manifest(last_step=-3)(ctx)


def _nan_everywhere(ctx: Ctx) -> None:
    recs = read_steps(ctx)
    out = []
    for i, r in enumerate(recs):
        bad = [math.nan, math.inf, -math.inf][i % 3]
        r = {k: (bad if isinstance(v, float) else v) for k, v in r.items()}
        if isinstance(r.get("stage_s"), dict):
            r["stage_s"] = {k: bad for k in r["stage_s"]}
        out.append(r)
    (ctx.run / "steps.msgpack").write_bytes(b"".join(encode_frame(r) for r in out))
    (ctx.run / "steps.jsonl").write_text("".join(jsonl.dumps(r) + "\n" for r in out))
    edit_manifest(started_at=math.nan, ended_at=math.inf, last_step=math.nan, seed=math.inf)(ctx)
    append_events(
        ctx,
        {"event": "alert", "time": math.nan, "rule": "kl_spike", "severity": "critical", "metric": "kl"}
        | {"value": math.nan, "threshold": math.inf, "step": 3, "message": "kl is NaN"},
    )
    with open(ctx.run / "profile" / "summary.csv", "a") as f:
        f.write("rollout,nan,inf,-inf,nan,nan\n")


def _fifo_profile(ctx: Ctx) -> None:
    """FIFOs in place of the profiler's artifacts (profile and verify m2 read them)."""
    for name in ("chrome_trace.json", "summary.csv", "op_stats.csv"):
        fifo(f"profile/{name}")(ctx)


def _truncated_steps(ctx: Ctx) -> None:
    data = (ctx.base / "steps.msgpack").read_bytes()
    (ctx.run / "steps.msgpack").write_bytes(data[: len(data) // 2 + 7])


def _garbage_steps(ctx: Ctx) -> None:
    rnd = __import__("random").Random(99)
    (ctx.run / "steps.msgpack").write_bytes(bytes(rnd.randrange(256) for _ in range(256 << 10)))
    (ctx.run / "steps.jsonl").unlink()


def _empty_run_dir(ctx: Ctx) -> None:
    for p in list(ctx.run.iterdir()):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _run_dir_is_file(ctx: Ctx) -> None:
    shutil.rmtree(ctx.run)
    ctx.run.write_bytes(VICTIMS["run.json"])


def _profile_escapes(ctx: Ctx) -> None:
    prof = ctx.run / "profile"
    lines = (prof / "op_stats.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("name")] = f'"aten::{OSC_TITLE}{CLEAR}mm"'
    (prof / "op_stats.csv").write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    lines = (prof / "summary.csv").read_text().splitlines()
    lines.append(f"{CLEAR}stage{OSC_TITLE},x,y")
    (prof / "summary.csv").write_text("\n".join(lines) + "\n")
    edit_manifest(last_checkpoint=f"checkpoints/{OSC_TITLE}{CLEAR}", status=f"finished{OSC_TITLE}")(ctx)


SLEEPER = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)\n"


def _reused_pid(ctx: Ctx) -> None:
    """run.json says running with the pid of a live process that is not its trainer; the lock is free."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ctx.procs.append(p)
    ctx.extra["pid"] = p.pid
    edit_manifest(status="running", pid=p.pid, ended_at=None)(ctx)
    (ctx.run / "trainerd.lock").write_text(f"{p.pid}\n")  # a stale pid in a free lock


LOCK_HOLDER = textwrap.dedent(
    """
    import fcntl, os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer busy elsewhere: `stop` must time out
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    print("locked", flush=True)
    time.sleep(120)
    """
)


def _locked(ctx: Ctx) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(ctx.run / "trainerd.lock")], stdout=subprocess.PIPE, text=True
    )
    ctx.procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    ctx.extra["pid"] = p.pid
    edit_manifest(status="running", pid=p.pid, ended_at=None)(ctx)


def _bad_types(ctx: Ctx) -> None:
    edit_manifest(started_at="yesterday", last_step="x", status=42, ended_at=[1], pid="me", config={"steps": "many"})(
        ctx
    )


def _status_escapes(ctx: Ctx) -> None:
    edit_manifest(status=f"finished{OSC_TITLE}{CLEAR}\u202e\x9b2J")(ctx)


def _steps_jsonl_bad_types(ctx: Ctx) -> None:
    """Tail records whose fields are the wrong types (status reads the JSONL tail)."""
    recs = read_steps(ctx)
    recs[-1] = {**recs[-1], "time": "later", "step_time_s": "slow"}
    recs[-2] = {**recs[-2], "time": [1], "stage_s": "x"}
    write_steps(ctx, recs)


def _status_notes(words: str) -> Callable[[Ctx, dict[str, Any]], None]:
    """`status` still answers from run.json, and says in one stderr line which file it left out."""

    def check(ctx: Ctx, res: dict[str, Any]) -> None:
        for cmd in ("status", "status_json"):
            assert res[cmd].rc == 0 and words in res[cmd].stderr, (cmd, res[cmd])
        assert "finished" in res["status"].stdout, res["status"].stdout

    return check


# -- the cases -------------------------------------------------------------------------------------


def cases() -> list[Case]:
    unreadable = {"readable": False, "resume": True, "m1": True}
    link_refused = {"resume": True}
    return [
        Case("random-bytes-run-json", _random_run_json, **unreadable),
        Case("run-json-10MB", _huge_run_json, **unreadable),
        Case("run-json-to-dev-zero", _dev_zero_run_json, **unreadable),
        Case("run-json-is-a-dir", _run_json_is_dir, **unreadable, note="fails for root too"),
        Case("fifo-run-json", fifo("run.json"), **unreadable),
        Case("fifo-steps-msgpack", fifo("steps.msgpack"), resume=True),
        Case("fifo-events-jsonl", fifo("events.jsonl"), resume=True, check=_status_notes("events.jsonl is a FIFO")),
        Case("fifo-steps-jsonl", fifo("steps.jsonl"), resume=True, check=_status_notes("steps.jsonl is a FIFO")),
        Case("link-steps-msgpack", link_to_victim("steps.msgpack"), **link_refused),
        Case(
            "link-steps-jsonl",
            link_to_victim("steps.jsonl"),
            **link_refused,
            check=_status_notes("steps.jsonl is a symlink"),
        ),
        Case(
            "link-events-jsonl",
            link_to_victim("events.jsonl"),
            **link_refused,
            check=_status_notes("events.jsonl is a symlink"),
        ),
        Case("link-run-json", link_to_victim("run.json"), **unreadable),
        Case("link-trainerd-log", link_to_victim("trainerd.log"), **link_refused),
        Case("link-checkpoints-dir", link_dir_outside("checkpoints"), **link_refused),
        Case("link-tb-dir", link_dir_outside("tb"), **link_refused),
        Case("link-profile-dir", link_dir_outside("profile"), **link_refused),
        Case("fifo-profile-artifacts", _fifo_profile),
        Case(
            "run-dir-mode-000",
            _mode_000,
            expect={c: {0, 1, 2} for c in CMDS},
            note="root ignores mode bits: as root this is an ordinary run (run-json-is-a-dir fails for root)",
        ),
        Case("bad-manifest-types", _bad_types),
        Case("status-with-escapes", _status_escapes, check=lambda ctx, res: _check_shown_escaped(res, "status")),
        Case("run-dir-name-with-escapes", _escaped_name, check=lambda ctx, res: _check_shown_escaped(res, "name")),
        Case(
            "events-with-escapes-and-markup",
            _events_escapes,
            check=lambda ctx, res: _check_shown_escaped(res, "events"),
        ),
        Case("events-9MB-line", _events_9mb_line),
        Case("step-2^64-1", _step_2_64),
        Case("negative-steps", _negative_step),
        Case("nan-inf-everywhere", _nan_everywhere),
        Case("truncated-steps-msgpack", _truncated_steps),
        Case("garbage-steps-msgpack", _garbage_steps),
        Case("steps-jsonl-bad-types", _steps_jsonl_bad_types),
        Case("profile-csv-with-escapes", _profile_escapes),
        Case("empty-run-dir", _empty_run_dir, **unreadable),
        Case("run-dir-is-a-file", _run_dir_is_file, **unreadable),
        Case(
            "reused-pid-lock-free",
            _reused_pid,
            expect={"wait": {1}, "stop": {2}},
            check=lambda ctx, res: _check_reused_pid(ctx, res),
        ),
        Case(
            "locked-by-another-process",
            _locked,
            expect={"wait": {2}, "stop": {2}, "resume": {2}},
            resume=True,
            check=lambda ctx, res: _check_locked(ctx, res),
        ),
    ]


SHOWN_TITLE = OSC_TITLE.replace("\x1b", "\\x1b").replace("\x07", "\\x07")  # how safe_text shows it


def _check_shown_escaped(res: dict[str, Any], what: str) -> None:
    """The hostile text is there, shown escaped (not dropped, not obeyed)."""
    if what == "status":
        for cmd in ("status", "wait", "report", "report_md"):
            assert f"finished{SHOWN_TITLE}\\x1b[2J\\u202e\\x9b2J" in res[cmd].stdout, (cmd, res[cmd].stdout)
        assert json.loads(res["status_json"].stdout)["status"] == f"finished{OSC_TITLE}{CLEAR}\u202e\x9b2J"
        assert "\\x1b]2;pwned" in res["stop"].stderr, res["stop"].stderr
    elif what == "name":
        shown = f"run{SHOWN_TITLE}\\x1b[2J\\u202e"
        for cmd in ("status", "wait", "report", "report_md", "verify_m3"):  # profile cuts lines at 80
            assert shown in res[cmd].stdout + res[cmd].stderr, (cmd, res[cmd].stdout, res[cmd].stderr)
        assert shown in res["stop"].stderr, res["stop"].stderr
    else:
        out = res["status"].stdout
        assert f"{SHOWN_TITLE}\\x1b[2J[bold]boom[/bold] \\u202eevil \\x9b31m" in out, out
        assert "[bold]boom[/bold]" in res["report"].stdout, res["report"].stdout


def _check_reused_pid(ctx: Ctx, res: dict[str, Any]) -> None:
    assert "crashed" in res["status"].stdout, res["status"].stdout
    assert json.loads(res["status_json"].stdout)["status"] == "crashed"
    assert "crashed" in res["wait"].stdout and res["wait"].seconds < 1.5, res["wait"]
    assert "not running" in res["stop"].stderr, res["stop"].stderr
    p = ctx.procs[0]
    assert p.poll() is None, "stop signalled the pid run.json names, which is not its trainer"


def _check_locked(ctx: Ctx, res: dict[str, Any]) -> None:
    assert "running" in res["status"].stdout, res["status"].stdout
    assert "still running" in res["wait"].stderr, res["wait"].stderr
    assert "did not stop" in res["stop"].stderr, res["stop"].stderr
    assert "locked" in res["resume"].stderr and str(ctx.extra["pid"]) in res["resume"].stderr, res["resume"].stderr
    assert res["resume"].seconds < 5, res["resume"]


def build(case: Case, base: Path, where: Path) -> Ctx:
    """A fresh copy of `base` under `where` (the case dir), damaged by `case`."""
    for d in ("runs", "outside", "cwd", "tmp"):
        (where / d).mkdir(parents=True, exist_ok=True)
    run = where / "runs" / base.name
    shutil.copytree(base, run, symlinks=True)
    ctx = Ctx(run=run, outside=where / "outside", base=base)
    case.damage(ctx)
    return ctx


def cleanup(ctx: Ctx) -> None:
    for p in ctx.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        if p.stdout is not None:
            p.stdout.close()
    try:
        if ctx.run.is_dir() and not ctx.run.is_symlink():
            ctx.run.chmod(0o755)
    except OSError:
        pass


# -- what "nothing written outside" means ------------------------------------------------------------


def snapshot(case_dir: Path, run_dir: Path) -> dict[str, tuple]:
    """Every path under `case_dir` but `run_dir`: a file's (size, mtime_ns, sha256), a link's
    target, a folder's listing. Not folder mtimes (TMPDIR's changes when a temp dir comes
    and goes)."""
    out: dict[str, tuple] = {}
    skip = os.path.abspath(run_dir)
    for dirpath, dirnames, filenames in os.walk(case_dir):
        if os.path.abspath(dirpath) == skip:
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if os.path.abspath(os.path.join(dirpath, d)) != skip]
        out[dirpath] = ("dir", tuple(sorted(dirnames + filenames)))
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.abspath(p) == skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[p] = ("file", st.st_size, st.st_mtime_ns, h.hexdigest())
            else:
                out[p] = ("other", stat.S_IFMT(st.st_mode))
    return out


def bytes_changed(before: dict[str, tuple], after: dict[str, tuple]) -> tuple[int, list[str]]:
    """Bytes written outside (a changed file counts its new size, a new one its size; a new
    folder or link 1) and the paths that changed."""
    changed = [p for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]
    n = 0
    for p in changed:
        a = after.get(p)
        if a is None:
            n += 1
        elif a[0] == "file":
            n += max(1, a[1])
        else:
            n += 1
    return n, changed
