#!/usr/bin/env python3
"""Benchmark of the monitor (`make bench`): open time, memory, latency, CPU, vs TensorBoard.

    python scripts/bench_tui.py [--work DIR] [--quick]

Runs are made with scripts/gen_run.py at rate 0 and cached in --work. Each measurement of
open time, memory and CPU runs the app headless in its own process (peak RSS is per process).
Targets: 1M steps first screen < 3 s and < 400 MB; the whole history (every field, alerts
over all of it) of 100k steps < 0.5 s and of 1M < 3 s, against reading the log alone as the
baseline; alerts over 1M steps < 1 s; quitting while it loads < 0.5 s; p95 latency < 300 ms;
idle CPU < 2%, following 10 records/s < 3%; >= 30x TensorBoard's EventAccumulator.
Link: the bytes the real `rlhf-tui` writes to its terminal (a pty of 160x48, and 80x24) while
a run writes 10 records/s, default settings: at most 5 kB/s.
"""

from __future__ import annotations

import time

_T_START = time.monotonic()  # before the heavy imports: open time includes importing Textual

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GEN = [sys.executable, str(ROOT / "scripts" / "gen_run.py")]


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensure_run(work: Path, run_id: str, steps: int, *extra: str) -> Path:
    root = work / run_id
    if (root / "run.json").exists() and b'"status":"finished"' in (root / "run.json").read_bytes():
        return root
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    print(f"  generating {run_id} ({steps:,} steps)…", flush=True)
    subprocess.run(
        GEN + ["--steps", str(steps), "--runs-dir", str(work), "--run-id", run_id, "--no-jsonl", *extra],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return root


# -- child modes (one process each) -----------------------------------------------------


def child_open(path: str, idle_s: float, writer_rate: float) -> None:
    from tui.app import MonitorApp

    out: dict = {}

    async def main():
        # with a writer, open the runs dir: the app follows `latest` to the run being written
        t_open = time.monotonic()
        app = MonitorApp(Path(path).parent if writer_rate else path)
        async with app.run_test(size=(160, 50)) as pilot:
            while app.first_full_screen_at is None:
                await pilot.pause(0.01)
            out["first_screen_s"] = app.first_full_screen_at - _T_START
            out["first_screen_rows"] = len(app.model.store)
            out["rss_first_mb"] = rss_peak_mb()
            t = time.monotonic()
            while not app.model.history_done and time.monotonic() - t < 300:  # the background load
                await pilot.pause(0.01)
            out["full_history_s"] = time.monotonic() - _T_START
            out["history_from_open_s"] = time.monotonic() - t_open  # app start to whole history shown
            out["rows"] = len(app.model.store)
            await pilot.pause(0.5)
            if idle_s:
                writer = None
                if writer_rate:
                    writer = subprocess.Popen(
                        GEN
                        + [
                            "--steps",
                            "100000",
                            "--rate",
                            str(writer_rate),
                            "--runs-dir",
                            str(Path(path).parent),
                            "--run-id",
                            f"cpu-{os.getpid()}",
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                    await pilot.pause(1.0)  # it becomes `latest`; the app switches to it
                c0, w0 = time.process_time(), time.monotonic()
                await asyncio.sleep(idle_s)
                out["cpu_frac"] = (time.process_time() - c0) / (time.monotonic() - w0)
                if writer:
                    writer.terminate()
                    writer.wait()
                    out["live_run"] = app.model.paths.run_id
                    out["live_step"] = app.model.store.last_step
            out["rss_peak_mb"] = rss_peak_mb()

    asyncio.run(main())
    print(json.dumps(out))


def child_quit(path: str, delay: float) -> None:
    """Open a run, press q `delay` s after the first screen (the history still loading): time to gone."""
    from tui.app import MonitorApp

    out: dict = {}

    async def main():
        app = MonitorApp(path)
        async with app.run_test(size=(160, 50)) as pilot:
            while app.first_full_screen_at is None:
                await pilot.pause(0.01)
            await pilot.pause(delay)
            out["history_done"] = app.model.history_done
            out["t"] = time.monotonic()
            await pilot.press("q")
        out["quit_s"] = time.monotonic() - out.pop("t")

    asyncio.run(main())
    print(json.dumps(out))


def run_child(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- latency (in process, writer thread) -------------------------------------------------


def latency(work: Path, n: int = 60, rate: float = 10.0) -> list[float]:
    import importlib.util

    from protocol import rundir
    from protocol.steplog import StepLogWriter
    from tui.app import MonitorApp

    spec = importlib.util.spec_from_file_location("gen_run", ROOT / "scripts" / "gen_run.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    runs = work / "latency"
    subprocess.run(["rm", "-rf", str(runs)])
    root = gen.generate(str(runs), "lat", 100, 0, status="running", quiet=True)
    paths = rundir.RunPaths(Path(root))
    rundir.update_manifest(paths, status="running", pid=os.getpid(), ended_at=None)
    written: dict[int, float] = {}
    shown: dict[int, float] = {}

    def writer():
        model = gen.RunModel(1000)
        w = StepLogWriter(paths.steps)
        for step in range(101, 101 + n):
            time.sleep(1 / rate)
            rec = model.record(step, time.time())
            written[step] = time.monotonic()
            w.write(rec)
        w.close()

    async def main():
        app = MonitorApp(paths.root)
        async with app.run_test(size=(160, 50)) as pilot:
            while app.drawn_step != 100:
                await pilot.pause(0.01)
            th = threading.Thread(target=writer, daemon=True)
            th.start()
            while len(shown) < n and th.is_alive() or len(shown) < len(written):
                s = app.drawn_step
                if s is not None and s > 100 and s not in shown:
                    for k in range(101, s + 1):
                        shown.setdefault(k, app.drawn_at)
                await asyncio.sleep(0.002)
                if not th.is_alive() and time.monotonic() - max(written.values()) > 2:
                    break

    asyncio.run(main())
    return sorted((shown[s] - written[s]) * 1000 for s in written if s in shown)


# -- TensorBoard comparison --------------------------------------------------------------


def tb_compare(work: Path, steps: int) -> tuple[float, float, int]:
    root = ensure_run(work, f"tb{steps // 1000}k", steps, "--tb")
    from protocol.rundir import RunPaths
    from tui.feed import load_history

    t = time.perf_counter()
    paths = RunPaths(root)
    *_, (store, _alerts, _open, _corrupt, _end) = load_history(paths, paths.steps.stat().st_size)  # + alerts
    ours = time.perf_counter() - t
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = time.perf_counter()
    acc = EventAccumulator(str(root / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    n = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
    theirs = time.perf_counter() - t
    return ours, theirs, n


# -- bytes on the link: the real monitor under a pty ------------------------------------


def link_bytes(work: Path, size: tuple[int, int], secs: float, extra: tuple[str, ...] = ()) -> dict:
    """Bytes per second the monitor writes to its terminal while a run writes 10 records/s:
    what an SSH connection carries from the server. The monitor runs as a user starts it
    (`python -m tui.cli RUNS`) on a pty of `size`; after a warm-up (first screen, history),
    every byte read from the pty's master for `secs` seconds is counted."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    runs = work / f"link-{os.getpid()}"
    subprocess.run(["rm", "-rf", str(runs)])
    runs.mkdir(parents=True)
    writer = subprocess.Popen(
        GEN + ["--steps", "100000", "--rate", "10", "--runs-dir", str(runs), "--run-id", "live", "--no-jsonl"],
        stdout=subprocess.DEVNULL,
    )
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm-256color", LANG="C.UTF-8", COLUMNS="", LINES="")
    env.pop("COLUMNS")
    env.pop("LINES")
    env.pop("NO_COLOR", None)
    time.sleep(1.0)  # the run exists
    tui = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", str(runs), *extra],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    os.close(slave)
    counted = 0
    warm = 6.0
    t0 = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - t0 > warm + secs:
                break
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                if now - t0 >= warm:
                    counted += len(data)
    finally:
        writer.terminate()
        writer.wait()
        tui.terminate()
        try:
            tui.wait(timeout=5)
        except subprocess.TimeoutExpired:
            tui.kill()
            tui.wait()
        os.close(master)
        subprocess.run(["rm", "-rf", str(runs)])
    return {"bytes_per_s": counted / secs, "size": size}


def link_report(work: Path, secs: float) -> None:
    for size in ((160, 48), (80, 24)):
        r = link_bytes(work, size, secs)
        bps = r["bytes_per_s"]
        print(
            f"  link at {size[0]}x{size[1]}, a run writing 10 records/s, default settings: "
            f"{bps / 1000:.1f} kB/s to the terminal  {verdict(bps <= 5000) if size == (160, 48) else ''}"
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.environ.get("TUI_BENCH_DIR", "/tmp/rlhf-tui-bench"))
    ap.add_argument("--quick", action="store_true", help="100k run only, shorter CPU windows")
    ap.add_argument("--only", default="open,latency,cpu,link,tb", help="comma-separated parts to run")
    ap.add_argument("--_open", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_quit", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._open:
        child_open(args._open[0], float(args._open[1]), float(args._open[2]))
        return 0
    if args._quit:
        child_quit(args._quit[0], float(args._quit[1]))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("rlhf-tui benchmark")
    sizes = [(100_000, "open100k")] + ([] if args.quick else [(1_000_000, "open1m")])
    results = {}
    only = set(args.only.split(","))
    targets = {100_000: 0.5, 1_000_000: 3.0}  # whole history on screen, alerts over all of it (issue 18)
    for steps, rid in sizes if "open" in only else []:
        root = ensure_run(work, rid, steps)
        r = run_child("--_open", str(root), "0", "0")
        results[rid] = r
        base = run_child("--_open", str(log_only_copy(root)), "0", "0")  # baseline: decode the log
        print(
            f"  {steps:>9,} steps: first full screen {r['first_screen_s']:.2f} s "
            f"({r['first_screen_rows']:,} rows), whole history {r['history_from_open_s']:.2f} s after the "
            f"app starts ({r['full_history_s']:.2f} s after the process starts; {r['rows']:,} rows), "
            f"peak RSS {r['rss_peak_mb']:.0f} MB"
        )
        print(
            f"    from the log alone (no steps.cols, the baseline): {base['history_from_open_s']:.2f} s, "
            f"peak RSS {base['rss_peak_mb']:.0f} MB: side file "
            f"{base['history_from_open_s'] / r['history_from_open_s']:.1f}x faster; "
            f"target < {targets[steps]} s  {verdict(r['history_from_open_s'] < targets[steps])}"
        )
    big = results.get("open1m") or results.get("open100k")
    label = "1M" if "open1m" in results else "100k"
    if big:
        print(f"  {label} first screen < 3 s: {big['first_screen_s']:.2f} s  {verdict(big['first_screen_s'] < 3)}")
        print(f"  {label} memory < 400 MB: {big['rss_peak_mb']:.0f} MB  {verdict(big['rss_peak_mb'] < 400)}")
        root = work / ("open1m" if label == "1M" else "open100k")
        alerts_report(root, label)
        q = [run_child("--_quit", str(root), d) for d in ("0.05", "0.3")]
        worst = max(x["quit_s"] for x in q)
        shown = ", ".join(f"{x['quit_s'] * 1000:.0f} ms" for x in q)
        print(
            f"  quit while the {label} history loads: {shown} "
            f"(history loaded then: {[x['history_done'] for x in q]})  {verdict(worst < 0.5)}"
        )
    if "latency" in only:
        latency_report(work)
    if "cpu" in only:
        cpu_report(work, "5" if args.quick else "10")
    if "link" in only:
        link_report(work, 10 if args.quick else 20)
    if "tb" in only:
        tb_report(work)
    return 0


def log_only_copy(root: Path) -> Path:
    """The same run without its side file (hard links, no copy): what older runs and other
    writers give the monitor, and the baseline the side file is measured against."""
    copy = root.parent / (root.name + "-logonly")
    if not copy.exists():
        copy.mkdir()
        for f in root.iterdir():
            if f.is_file() and f.name != "steps.cols":
                os.link(f, copy / f.name)
    return copy


def alerts_report(root: Path, label: str) -> None:
    """Alert evaluation over the whole history vs the streaming engine's cost per record."""
    from protocol.alerts import DEFAULT_RULES, AlertEngine
    from protocol.rundir import RunPaths
    from protocol.steplog import StepLogTailer
    from tui.fastload import load_columns
    from tui.history_alerts import evaluate_history

    paths = RunPaths(root)
    store = load_columns(paths, 1 << 62).store
    t = time.perf_counter()
    alerts, _open = evaluate_history(DEFAULT_RULES, store)
    ours = time.perf_counter() - t
    recs = StepLogTailer(paths.steps).poll(20_000)
    engine = AlertEngine(DEFAULT_RULES)
    t = time.perf_counter()
    for r in recs:
        engine.update(r)
    per = (time.perf_counter() - t) / len(recs)
    print(
        f"  alerts over all {len(store):,} steps: {ours:.2f} s ({len(alerts)} events) vs the streaming engine "
        f"alone {per * 1e6:.0f} us/record = {per * len(store):.1f} s: {per * len(store) / ours:.0f}x; "
        f"target < 1 s  {verdict(ours < 1.0)}"
    )


def latency_report(work: Path) -> None:
    lat = latency(work)
    med, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    print(
        f"  latency record written -> drawn ({len(lat)} records at 10/s): median {med:.0f} ms, "
        f"p95 {p95:.0f} ms  {verdict(p95 < 300)}"
    )


def cpu_report(work: Path, secs: str) -> None:
    idle_runs = work / "idle"
    idle_runs.mkdir(exist_ok=True)
    idle_root = ensure_run(idle_runs, "idle10k", 10_000)
    r = run_child("--_open", str(idle_root), secs, "0")
    print(f"  CPU idle (finished run, {secs} s): {r['cpu_frac']:.1%} of a core  {verdict(r['cpu_frac'] < 0.02)}")
    r = run_child("--_open", str(idle_root), secs, "10")
    print(
        f"  CPU while a run writes 10 records/s: {r['cpu_frac']:.1%} of a core "
        f"(default --fps 5, charts 1/s, whole-run views 0.5/s; following {r.get('live_run')}, "
        f"at step {r.get('live_step')})  {verdict(r['cpu_frac'] < 0.03)} (target < 3%)"
    )
    subprocess.run(f"rm -rf {idle_runs}/cpu-*", shell=True)


def tb_report(work: Path) -> None:
    try:
        ours, theirs, n = tb_compare(work, 20_000)
        print(
            f"  load 20k steps: monitor {ours:.3f} s (every field, alerts evaluated) vs TensorBoard "
            f"EventAccumulator {theirs:.2f} s ({n:,} scalars): {theirs / ours:.1f}x faster  "
            f"{verdict(theirs / ours >= 30)} (target 30x)"
        )
    except ImportError as e:
        print(f"  TensorBoard comparison skipped: {e}")


if __name__ == "__main__":
    sys.exit(main())
