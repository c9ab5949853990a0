#!/usr/bin/env python3
"""Benchmark of comparing runs in the monitor (`rlhf-tui A B C`), against watching A alone.

    python scripts/bench_compare.py [--work DIR] [--steps N] [--secs S]

Runs of N steps (default 100k) are made with scripts/gen_run.py and cached in --work. Printed,
each as a ratio to the one-run baseline measured in the same process:
- open: the first full screen with every run's whole history loaded (headless, 160x50);
- chart frame: drawing the 9 tiles and the detail chart once (every run overlaid);
- link: bytes/s the real `rlhf-tui` writes to a 160x48 pty while A is written at 10 records/s
  (the compared runs finished), default settings.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_tui", ROOT / "scripts" / "bench_tui.py")
bench_tui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tui)


async def _open_and_draw(first: Path, others: list[Path], frames: int) -> tuple[float, float]:
    """(seconds to the first full screen with every run loaded, median seconds of a chart frame)."""
    from tui.app import MonitorApp

    t0 = time.monotonic()
    app = MonitorApp(first, live=False, compare=tuple((o, None) for o in others))
    async with app.run_test(size=(160, 50)) as pilot:
        while not (app.all_settled and all(r.model.history_done for r in app.comparison.runs)):
            await pilot.pause(0.01)
        opened = time.monotonic() - t0
        took = []
        for _ in range(frames):
            t = time.perf_counter()
            app._draw_charts()
            took.append(time.perf_counter() - t)
        return opened, statistics.median(took)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / ".bench"))
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--secs", type=float, default=20.0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [bench_tui.ensure_run(work, f"cmp-{args.steps}-{k}", args.steps, "--seed", str(k)) for k in (1, 2, 3)]
    print(f"comparing runs of {args.steps:,} steps (cached in {work})")

    open_1, frame_1 = asyncio.run(_open_and_draw(runs[0], [], 20))
    open_3, frame_3 = asyncio.run(_open_and_draw(runs[0], runs[1:], 20))
    print(f"  open, every history loaded: A alone {open_1:.2f} s, A B C {open_3:.2f} s  ({open_3 / open_1:.2f}x)")
    print(
        f"  chart frame (9 tiles + detail): A alone {frame_1 * 1000:.1f} ms, A B C {frame_3 * 1000:.1f} ms"
        f"  ({frame_3 / frame_1:.2f}x)"
    )
    one = bench_tui.link_bytes(work, (160, 48), args.secs)["bytes_per_s"]
    three = bench_tui.link_bytes(work, (160, 48), args.secs, tuple(str(r) for r in runs[1:]))["bytes_per_s"]
    print(
        f"  link at 160x48, A written at 10 records/s: A alone {one / 1000:.1f} kB/s, "
        f"A B C {three / 1000:.1f} kB/s  ({three / max(one, 1):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
