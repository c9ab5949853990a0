"""What `rlhf-tui ssh://...` costs: bytes on the wire per record, and latency to the screen.

Starts a throwaway sshd on loopback (tests/remote/sshd.py), and points the monitor's ssh at it
through a ProxyCommand that relays and counts the bytes of the ssh connection itself (encrypted,
as they would cross the network). A writer appends records to a run at a steady rate while the
real monitor (MonitorApp, headless) follows it through RemoteSync:
  - bytes per record: the wire bytes received during the writing, divided by the records, next
    to the records' own size in the step log; plus the idle traffic (nothing written).
  - latency: records written one at a time, at random phases of the remote loop's poll; the time
    from the write (same machine, same clock) to the monitor's value frame showing that step.

    python scripts/bench_remote.py [--records 1000] [--rate 100] [--probes 20] [--interval 1]

With `--history N`: the whole history of a finished remote run of N records instead, with and
without the mirror's own side file (steps.cols, built locally from the mirrored log: tui/remote.py
MirrorColumns): the first open (a fresh mirror: copy, then the monitor's history load), a second
open (the mirror kept), the CPU time this process spends mirroring (the side file's thread
apart), and the side file's CPU per record while a live writer (another process) appends.

    python scripts/bench_remote.py --history 200000 [--live 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "remote"))
sys.path.insert(0, str(ROOT / "tests" / "tui"))

RELAY = r"""
import os, socket, sys, threading
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
counts = [0, 0]
def save():
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{counts[0]} {counts[1]}")
    os.replace(tmp, out)
def up():
    while True:
        b = os.read(0, 65536)
        if not b:
            s.shutdown(socket.SHUT_WR)
            return
        counts[1] += len(b); s.sendall(b)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    counts[0] += len(b); os.write(1, b); save()
save()
"""


def wire_down(count_file: Path) -> int:
    try:
        return int(count_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0, help="records a second while measuring bytes")
    ap.add_argument("--probes", type=int, default=20, help="single records timed to the screen")
    ap.add_argument("--interval", type=float, default=1.0, help="the remote loop's poll interval (s)")
    ap.add_argument("--no-box", action="store_true", help="as rlhf-tui --no-box: the remote box is not sampled")
    ap.add_argument("--history", type=int, default=0, help="time the whole history of a run of N records")
    ap.add_argument("--live", type=int, default=20000, help="with --history: records appended live")
    args = ap.parse_args()
    if args.history:
        history_bench(args.history, args.live)
        return

    from sshd import start_sshd, stop_sshd
    from tui_helpers import LiveWriter, make_run

    from tui.app import MonitorApp
    from tui.remote import RemoteSync, attach, parse_target

    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    relay = tmp / "relay.py"
    relay.write_text(RELAY)
    counts = tmp / "wire"
    (tmp / "sshd").mkdir()
    s = start_sshd(tmp / "sshd")
    cfg = s.config.read_text().replace(
        "  LogLevel ERROR\n", f"  LogLevel ERROR\n  ProxyCommand {sys.executable} {relay} %h %p {counts}\n"
    )
    s.config.write_text(cfg)
    os.environ.update(s.ssh_env)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    runs = tmp / "runs"
    paths = make_run(runs, "bench", 1, status="running")
    w = LiveWriter(paths, steps_total=10**6)
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=args.interval, box=not args.no_box)
    try:
        local = sync.start()
        app = MonitorApp(local, clock=sync.clock)
        attach(app, sync)
        async with app.run_test(headless=True, size=(160, 50)) as pilot:
            while app.drawn_step != 1:
                await pilot.pause(0.05)
            await pilot.pause(2 * args.interval + 0.5)
            idle0, t0 = wire_down(counts), time.monotonic()
            await pilot.pause(10)
            idle = (wire_down(counts) - idle0) / (time.monotonic() - t0)

            size0, down0 = paths.steps.stat().st_size, wire_down(counts)
            step = 1

            def write_many() -> None:
                nonlocal step
                for _ in range(args.records):
                    step += 1
                    w.write(step)
                    time.sleep(1 / args.rate)

            t = threading.Thread(target=write_many)
            t.start()
            while t.is_alive() or app.drawn_step != step:
                await pilot.pause(0.05)
            await pilot.pause(args.interval + 0.5)
            log_bytes = paths.steps.stat().st_size - size0
            down = wire_down(counts) - down0
            took = args.records / args.rate + args.interval + 0.5

            lat = []
            for _ in range(args.probes):
                await pilot.pause(random.uniform(0.2, 1.2) * args.interval)
                step += 1
                t_write = time.monotonic()
                w.write(step)
                while app.drawn_step != step:
                    await pilot.pause(0.005)
                lat.append(time.monotonic() - t_write)
    finally:
        sync.close()
        w.close()
        stop_sshd(s)

    rec = log_bytes / args.records
    print(f"remote loop interval {args.interval:g} s, {args.records} records at {args.rate:g}/s")
    print(f"step log: {rec:.1f} bytes/record on disk")
    print(
        f"wire (ssh, encrypted, received): {down / args.records:.1f} bytes/record "
        f"= {down / log_bytes:.3f} x the log's bytes (idle traffic over that time included: "
        f"{idle * took / args.records:.1f} bytes/record)"
    )
    print(f"idle: {idle:.0f} bytes/s received with nothing written")
    lat.sort()
    print(
        f"latency, remote write -> value on screen, {len(lat)} probes: median {statistics.median(lat) * 1000:.0f} ms, "
        f"p90 {lat[int(0.9 * (len(lat) - 1))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
    )


LIVE_WRITER = r"""
import sys, time
sys.path[:0] = sys.argv[1:3]
from tui_helpers import LiveWriter
from pathlib import Path
from protocol.rundir import RunPaths
w = LiveWriter(RunPaths(Path(sys.argv[3])), steps_total=10**7)
first, n, rate = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
t0 = time.monotonic()
for i in range(n):
    w.write(first + i)
    ahead = (i + 1) / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
w.close()
"""


def history_bench(n: int, live: int) -> None:
    import shutil
    import subprocess

    from sshd import start_sshd, stop_sshd
    from tui_helpers import make_run

    from protocol.rundir import RunPaths
    from tui.feed import load_history
    from tui.remote import RemoteSync, parse_target

    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-history-"))
    (tmp / "sshd").mkdir()
    s = start_sshd(tmp / "sshd")
    os.environ.update(s.ssh_env)
    runs = tmp / "runs"
    t = time.monotonic()
    paths = make_run(runs, "big", n, jsonl_mirror=False)
    size = paths.steps.stat().st_size
    print(f"a remote run of {n} records, {size / 1e6:.1f} MB of step log (made in {time.monotonic() - t:.0f} s)")
    url = f"ssh://rlhf-test{runs}"

    copied: list[float] = []

    def open_once(columns: bool, cache: str) -> tuple[float, float, float, float, RemoteSync]:
        os.environ["XDG_CACHE_HOME"] = str(tmp / cache)
        sync = RemoteSync(parse_target(url), interval=1.0, box=False, columns=columns)
        log = sync.mirror / "big" / "steps.msgpack"
        t0, c0 = time.monotonic(), time.process_time()
        done = threading.Event()

        def watch() -> None:  # when the log copy itself is complete
            while not done.is_set():
                try:
                    if log.stat().st_size >= size:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            copied.append(time.monotonic() - t0)

        watcher = threading.Thread(target=watch)
        watcher.start()
        local = sync.start(timeout=120) / "big"
        started, cpu = time.monotonic() - t0, time.process_time() - c0
        done.set()
        watcher.join()
        cols_cpu = sync.columns.cpu_s if sync.columns is not None else 0.0
        t1 = time.monotonic()
        mirrored = RunPaths(local)
        *_, last = load_history(mirrored, mirrored.steps.stat().st_size)
        loaded = time.monotonic() - t1
        assert len(last[0].steps) == n, len(last[0].steps)
        return started, loaded, cpu - cols_cpu, cols_cpu, sync

    try:
        rows = []
        for label, columns, cache in (
            ("no side file (before)", False, "c0"),
            ("side file built here", True, "c1"),
        ):
            first = open_once(columns, cache)
            first[4].close()
            print(f"{label}: the log copy itself took {copied[-1]:.2f} s")
            second = open_once(columns, cache)
            second[4].close()
            rows.append((label, first, second))
        # a mirror left by a monitor without the side file: the next start builds it
        shutil.rmtree(tmp / "c2", ignore_errors=True)
        shutil.copytree(tmp / "c0", tmp / "c2", symlinks=True)
        old = open_once(True, "c2")
        old[4].close()
        print("time to the whole history (s): open = RemoteSync.start() (copy; with the side file also")
        print("its last rows), load = the monitor's history load (tui/feed.py load_history) from the mirror")
        print(f"{'':24} {'1st open':>9} {'load':>6} {'total':>6} | {'2nd open':>9} {'load':>6} {'total':>6}")
        for label, a, b in rows:
            print(f"{label:24} {a[0]:9.2f} {a[1]:6.2f} {a[0] + a[1]:6.2f} | {b[0]:9.2f} {b[1]:6.2f} {b[0] + b[1]:6.2f}")
        total = old[0] + old[1]
        print(f"{'mirror without one':24} {old[0]:9.2f} {old[1]:6.2f} {total:6.2f}   (its next start builds it)")
        print("CPU s of this process during the first open's copy (ssh itself not included):")
        for label, a, _b in rows:
            print(f"  {label:24} mirroring {a[2]:.2f}, side file thread {a[3]:.2f} ({a[3] / n * 1e6:.1f} us/record)")

        if live:  # the side file's cost while following a live run
            for columns, cache in ((False, "c0"), (True, "c1")):
                os.environ["XDG_CACHE_HOME"] = str(tmp / cache)
                sync = RemoteSync(parse_target(url), interval=1.0, box=False, columns=columns)
                sync.start(timeout=120)
                c0 = time.process_time()
                cols0 = sync.columns.cpu_s if sync.columns is not None else 0.0
                first_step = n + 1 if not columns else n + live + 1
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        LIVE_WRITER,
                        str(ROOT),
                        str(ROOT / "tests" / "tui"),
                        str(paths.root),
                        str(first_step),
                        str(live),
                        "2000",
                    ],
                    check=True,
                )
                want = paths.steps.stat().st_size
                local = sync.mirror / "big" / "steps.msgpack"
                while local.stat().st_size < want:
                    time.sleep(0.05)
                if sync.columns is not None:
                    sync.columns.settled(60)
                cpu = time.process_time() - c0
                cols = (sync.columns.cpu_s if sync.columns is not None else 0.0) - cols0
                sync.close()
                print(
                    f"live, {live} records at 2000/s, side file {'on ' if columns else 'off'}: this process "
                    f"{cpu / live * 1e6:.1f} us CPU/record, of which the side file's thread {cols / live * 1e6:.1f}"
                )
    finally:
        stop_sshd(s)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
