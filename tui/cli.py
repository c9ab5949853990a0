"""`rlhf-tui [PATH]`: watch a run directory (or a runs dir's latest run) live."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from protocol.rundir import RunDirError, resolve_run
from protocol.text import safe_text

MAX_RUNS = 6  # tui.overlay.MAX_RUNS: one colour each (not imported: the app loads after the checks)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1)
@click.option(
    "--fps",
    type=click.FloatRange(0.2, 30),
    default=None,
    help="frames a second of the values (default 5); charts redraw at a fifth of it and the "
    "profiler every 5 s or slower: this one number sets how much goes over the link",
)
@click.option(
    "--slow-link",
    is_flag=True,
    help="for a slow SSH link: --fps 1 (values once a second, charts every 5 s)",
)
@click.option(
    "--chart-fps",
    type=click.FloatRange(0.2, 30),
    default=None,
    help="override: chart frames a second (default --fps / 5; never more than --fps)",
)
@click.option(
    "--ascii",
    "ascii_",
    is_flag=True,
    default=None,
    help="ASCII only, borders and charts included (automatic when the locale is not UTF-8)",
)
@click.option(
    "--smooth",
    type=click.FloatRange(0, 0.999),
    default=0.9,
    show_default=True,
    help="EMA factor of the smoothed detail line (s toggles it, S cycles it)",
)
@click.option(
    "--stall-after",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    help="seconds without a record before a running run shows as stalled",
)
@click.option(
    "--no-bell", is_flag=True, help="never ring the terminal bell (by default: once on each new critical alert)"
)
@click.option(
    "--remote-poll",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="ssh:// runs: seconds between the remote side's looks at the run's files",
)
@click.option(
    "--no-box",
    is_flag=True,
    help="no box panel: neither this box's nor (ssh://) the remote box's GPUs, CPU and RAM are read",
)
@click.option(
    "--diff",
    "diff_with",
    metavar="OTHER",
    help="print the settings (config, seed, determinism, versions, host) that differ between PATH "
    "and OTHER, then exit: 0 the same, 1 different",
)
def cli(
    paths: tuple[str, ...],
    fps: float | None,
    slow_link: bool,
    chart_fps: float | None,
    ascii_: bool | None,
    smooth: float,
    stall_after: float,
    no_bell: bool,
    remote_poll: float,
    no_box: bool,
    diff_with: str | None,
) -> None:
    """Watch an RLHF run live. PATH: a run dir or a runs dir (default runs/latest), or another
    framework's run: a TensorBoard log dir, veRL's file-logger JSONL, a metrics JSONL/CSV with
    an rlhf-map.toml mapping; or a remote one, ssh://[user@]host[:port]/path (/~/path: under
    the remote home), read through your own ssh (RLHF_SSH replaces the command).

    Several PATHs compare runs: the first is the run the monitor is about, the others are
    drawn over it in every chart, each in its own colour (t: aligned by step, time or tokens)."""
    target = paths[0] if paths else os.path.join("runs", "latest")
    if len(paths) > MAX_RUNS:
        click.echo(f"rlhf-tui: at most {MAX_RUNS} runs can be compared ({len(paths)} given)", err=True)
        sys.exit(2)
    if diff_with is not None and len(paths) > 1:
        click.echo("rlhf-tui: --diff compares one run with OTHER: give one PATH", err=True)
        sys.exit(2)
    if diff_with is not None:
        from .compare import diff_runs

        rc, text = diff_runs(target, diff_with)
        click.echo(f"rlhf-tui: {text}" if rc == 2 else text, err=rc == 2)
        sys.exit(rc)
    opened = []  # (local target, RemoteSync or None) of each run, the first one first
    for i, t in enumerate(paths or (target,)):
        remote = None
        if t.startswith("ssh://"):
            remote = _open_remote(t, remote_poll, box=not no_box and i == 0, opened=opened)
            t = str(remote.local_target())
        problem = check_target(t)
        if problem:
            _close(opened, remote)
            click.echo(f"rlhf-tui: {problem}", err=True)
            sys.exit(2)
        if any(os.path.realpath(t) == os.path.realpath(seen) for seen, _r in opened):
            _close(opened, remote)
            click.echo(f"rlhf-tui: {safe_text(paths[i], 200)} is given twice", err=True)
            sys.exit(2)
        opened.append((t, remote))
    target, remote = opened[0]
    from .app import MonitorApp  # after the path check: a bad path answers at once

    if fps is None:
        fps = 1.0 if slow_link else 5.0
    app = MonitorApp(
        target,
        fps=fps,
        chart_fps=chart_fps,
        stall_after=stall_after,
        bell=not no_bell,
        ascii=True if ascii_ else None,
        ema_weight=smooth,
        box=False if no_box else None,
        compare=tuple(opened[1:]),
        **({"clock": remote.clock} if remote is not None else {}),
    )
    if remote is not None:
        from .remote import attach

        attach(app, remote)
    _exit_when_terminal_goes(app)
    app.run()
    _close(opened)
    # The terminal is restored and nothing is left to write: leave without the interpreter's
    # teardown (~0.3 s of freeing modules), and without waiting for a reader thread.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(app.return_code or 0)


def _open_remote(url: str, poll: float, box: bool, opened: list):
    """A RemoteSync of an ssh:// run with its mirror caught up, or exit 2 with one line."""
    from .remote import RemoteError, open_remote

    try:
        remote = open_remote(url, interval=poll, progress=_mirroring, box=box)
    except RemoteError as e:
        _close(opened)
        click.echo(f"rlhf-tui: {safe_text(str(e), 300)}", err=True)
        sys.exit(2)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")  # the copying line, if there was one
    return remote


def _close(opened: list, extra=None) -> None:
    for _t, remote in opened:
        if remote is not None:
            remote.close()
    if extra is not None:
        extra.close()


def _mirroring(have: int, total: int, what: str = "copying the remote step log") -> None:
    if not sys.stderr.isatty():
        return
    sys.stderr.write(f"\r\033[Krlhf-tui: {what}: {have / 1e6:.1f} of {total / 1e6:.1f} MB")
    sys.stderr.flush()


def check_target(target: str) -> str:
    """Why `target` cannot be watched, in one line safe to print ("" if it can). Only
    stat() and directory listings here: nothing that could block on a FIFO."""
    try:
        paths = resolve_run(target)
        for p in (target, paths.root):
            if not os.access(p, os.R_OK | os.X_OK):
                return f"cannot read {safe_text(str(p))}: permission denied"
    except RunDirError as e:
        if not os.path.exists(target):
            return safe_text(str(e))
        return _check_adapted(target)
    except OSError as e:  # e.g. a run dir with mode 000 (run.json cannot even be looked for)
        return f"cannot read {safe_text(str(e.filename or target))}: {e.strerror or e}"
    except ValueError as e:  # a path with a NUL byte
        return f"bad path {safe_text(repr(target))}: {safe_text(str(e))}"
    return ""


def _check_adapted(target: str) -> str:
    """A path that is not a kit run: another framework's run (adapters.sources), or one line
    naming the formats looked for. Detection reads directory listings and first lines only."""
    from adapters.sources import SourceError, detect, not_recognised

    try:
        if detect(target) is None:
            return not_recognised(target)
    except SourceError as e:
        return safe_text(str(e))
    except OSError as e:
        return f"cannot read {safe_text(str(e.filename or target))}: {e.strerror or e}"
    return ""


def _exit_when_terminal_goes(app) -> None:
    """SIGHUP (ssh dropped, tmux pane killed) ends the app; if it cannot end cleanly in a few
    seconds the process leaves anyway, so it never spins on a dead terminal."""

    def hup(signum, frame):
        threading.Timer(3.0, lambda: os._exit(129)).start()
        try:
            app.call_later(app.exit)
        except Exception:
            os._exit(129)

    signal.signal(signal.SIGHUP, hup)
    signal.signal(signal.SIGTERM, hup)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
