"""Trainer benchmark (`make bench`): smoke wall time, steps/s, tokens/s, and the share of step
time spent logging (steps.msgpack + steps.jsonl + TensorBoard + alert engine).

1. Runs `trainerd start --smoke --foreground` in a fresh process (as a user would) and times it.
2. Replays that run's records through a fresh `RunWriter` in a temp run dir, timing each
   `write`, and compares the total with the run's total step time. Target: under 1%.
Exit 1 if the logging share is 1% or more.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

from protocol.rundir import RunPaths, create_run, read_manifest  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402
from trainerd.run.outputs import RunWriter  # noqa: E402

TARGET_SHARE = 0.01


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    runs = tmp / "runs"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainerd",
            "start",
            "--smoke",
            "--foreground",
            "--runs-dir",
            str(runs),
            "--run-id",
            "bench",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        print("bench_trainer: the smoke run failed", file=sys.stderr)
        return 1
    paths = RunPaths(runs / "bench")
    records, _ = read_steplog(paths.steps)
    manifest = read_manifest(paths)
    n = len(records)
    step_time = sum(r["step_time_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    loop_span = records[-1]["time"] - records[0]["time"]
    first10 = records[:10]
    last10 = records[-10:]

    def mean(key, rs):
        return statistics.mean(r[key] for r in rs)

    # Logging share: replay the records through a fresh writer, timing every write.
    replay = create_run(tmp / "replay_runs", "replay")
    writer = RunWriter(replay, tb_flush_every=manifest["config"]["tb_flush_every"])
    write_times = []
    for rec in records:
        t = time.perf_counter()
        writer.write(rec)
        write_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    writer.close()  # the final flush belongs to the logging cost too
    close_s = time.perf_counter() - t
    log_total = sum(write_times) + close_s
    share = log_total / step_time

    stage_totals = {s: sum(r["stage_s"][s] for r in records) for s in records[0]["stage_s"]}
    print("trainer smoke benchmark (1 intra-op thread)")
    print(
        f"  smoke wall time          {wall:7.2f} s  (process CPU {cpu:.2f} s; setup "
        f"{manifest.get('setup', {}).get('setup_s', float('nan')):.2f} s; {n} PPO steps)"
    )
    print(
        f"  steps/s                  {n / step_time:7.2f}  (step compute only; "
        f"{(n - 1) / loop_span:.2f} incl. logging and checkpoints)"
    )
    print(f"  tokens/s                 {tokens / step_time:7.0f}  ({tokens} tokens generated and trained on)")
    print(f"  mean step time           {1000 * step_time / n:7.1f} ms")
    print("  stage share              " + ", ".join(f"{s} {100 * v / step_time:.0f}%" for s, v in stage_totals.items()))
    print(
        f"  reward first10 -> last10 {mean('reward_mean', first10):+.3f} -> {mean('reward_mean', last10):+.3f}"
        f"  (first-10 reward std {mean('reward_std', first10):.3f})"
    )
    print(
        f"  gold   first10 -> last10 {mean('gold_reward_mean', first10):+.3f} -> "
        f"{mean('gold_reward_mean', last10):+.3f}"
    )
    print(
        f"  logging per step         {1e6 * statistics.median(write_times):7.0f} us median, "
        f"{1e6 * max(write_times):.0f} us max, close {1000 * close_s:.1f} ms"
    )
    print(
        f"  logging share            {100 * share:7.3f} %  of step time (target < {100 * TARGET_SHARE:.0f}%): "
        f"{'PASS' if share < TARGET_SHARE else 'FAIL'}"
    )
    return 0 if share < TARGET_SHARE else 1


if __name__ == "__main__":
    sys.exit(main())
