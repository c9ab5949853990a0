"""A fork server for tests that run hundreds of `trainerd` commands (tests/test_robustness.py).

Starting a Python and importing trainerd.cli costs ~0.2 s a command; this process imports it
once and runs each command in a forked child: a process of its own (own session, so a hang
is killed with everything it started), its address space limited (RLIMIT_AS), its own
working directory and TMPDIR, stdin /dev/null, stdout and stderr to files, the real
`trainerd.cli.main` with the command's arguments, and a normal interpreter exit. Its exit
status and peak RSS (wait4) are reported back.

    python tests/cli_zygote.py LIMIT_BYTES
    stdin, one JSON a line:  {"id", "argv", "cwd", "env", "out", "err"}
    stdout, one JSON a line: {"ready": true} once; {"id", "pid"} when a command starts;
                             {"id", "pid", "rc", "maxrss_kb"} when it ends (rc < 0: killed by -rc)

Single-threaded (a select loop; SIGCHLD wakes it), so forking is safe. Exits at EOF on stdin.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys


def _reply(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def _child(req: dict, limit: int, keep_fds: set[int]) -> None:
    """In the forked child: become the command. Returns only by raising SystemExit."""
    import tempfile

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.chdir(req["cwd"])
    os.environ.update(req.get("env", {}))
    for k in req.get("unset", []):
        os.environ.pop(k, None)
    tempfile.tempdir = None  # TMPDIR is read again
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err, *keep_fds):
        os.close(fd)
    sys.argv = ["trainerd", *req["argv"]]
    from trainerd.cli import main

    main(list(req["argv"]))  # raises SystemExit with the exit code
    raise SystemExit(0)


def serve(limit: int) -> None:
    # what every command imports: paid once, here
    import trainerd.cli  # noqa: F401
    import trainerd.tools.profiler  # noqa: F401
    import trainerd.tools.report  # noqa: F401
    import trainerd.verify.m2  # noqa: F401
    import trainerd.verify.m3  # noqa: F401

    r_sig, w_sig = os.pipe()
    os.set_blocking(r_sig, False)
    os.set_blocking(w_sig, False)
    signal.set_wakeup_fd(w_sig)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    ids: dict[int, object] = {}
    buf = b""
    eof = False
    _reply({"ready": True})
    while not eof or ids:
        ready, _, _ = select.select([r_sig] if eof else [0, r_sig], [], [])
        if r_sig in ready:
            try:
                while os.read(r_sig, 512):
                    pass
            except BlockingIOError:
                pass
        while ids:  # reap whatever ended
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            rc = os.waitstatus_to_exitcode(status)
            _reply({"id": ids.pop(pid, None), "pid": pid, "rc": rc, "maxrss_kb": ru.ru_maxrss})
        if 0 in ready and not eof:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                eof = True
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req, limit, {r_sig, w_sig})
                ids[pid] = req["id"]
                _reply({"id": req["id"], "pid": pid})


if __name__ == "__main__":
    serve(int(sys.argv[1]))
