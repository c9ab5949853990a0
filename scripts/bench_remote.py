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
    args = ap.parse_args()

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
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=args.interval)
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


if __name__ == "__main__":
    asyncio.run(main())
