"""Data-parallel benchmark: step time and tokens/s of the same config (same global batch) on 1
and on N processes (`trainerd start --nproc-per-node N`, torchrun, gloo on CPU), with the time
spent in collectives per step (gradient all-reduce, all-gathers, waiting for the other rank)
separated from the compute.

    python scripts/bench_distributed.py [--nproc 2] [--steps 30] [--batch-size 64] [--d-model 64]

Reports medians over the steps after the first few (warm-up), from the runs' own step records:
step_time_s, tokens_per_second, and for N processes each rank's comm_s (time in collectives)
and compute_s (the rest: what the rank computes before it enters a collective). Each process
runs one intra-op thread, so on a 2-core box 2 processes use both cores where 1 uses one; the
collectives (one all-reduce of the flat gradients per minibatch for the policy and one for the
value head, a few all-gathers of the batch's statistics) and the wait for the slower rank are
the cost, reported on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

from protocol.rundir import RunPaths  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402

WARMUP_STEPS = 3


def run(runs: Path, run_id: str, cfg: Path, nproc: int, timeout: float) -> tuple[list[dict], float]:
    args = [sys.executable, "-m", "trainerd", "start", "--foreground", "--config", str(cfg)]
    args += ["--runs-dir", str(runs), "--run-id", run_id]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench_distributed: {run_id} failed: {p.stderr.strip().splitlines()[-1:]}")
    return read_steplog(RunPaths(runs / run_id).steps)[0], wall


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    cfg = {
        "preset": "smoke",
        "steps": a.steps,
        "checkpoint_every": a.steps,
        "sft_steps": 20,
        "rm_steps": 20,
        "profile_steps": "",
        "batch_size": a.batch_size,
        "minibatch_size": a.batch_size // 2,
        "d_model": a.d_model,
    }
    cfg_path = tmp / "bench.toml"
    cfg_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    print(f"config: {json.dumps(cfg)}; {os.cpu_count()} CPUs; medians over steps {WARMUP_STEPS + 1}..{a.steps}")
    print(
        f"{'procs':>5} {'step ms':>8} {'tokens/s':>9} {'comm ms':>8} {'compute ms':>11} "
        f"{'comm share':>10} {'wall s':>7}"
    )
    results = {}
    for n in (1, a.nproc):
        recs, wall = run(tmp / "runs", f"p{n}", cfg_path, n, a.timeout)
        recs = recs[WARMUP_STEPS:]
        step = med([r["step_time_s"] for r in recs])
        tps = med([r["tokens_per_second"] for r in recs])
        if n > 1:
            comm = med([statistics.mean(r["rank_comm_s"].values()) for r in recs])
            compute = med([statistics.mean(r["rank_compute_s"].values()) for r in recs])
        else:
            comm, compute = 0.0, step
        results[n] = {"step_s": step, "tokens_per_s": tps, "comm_s": comm, "compute_s": compute, "wall_s": wall}
        print(
            f"{n:>5} {step * 1e3:>8.1f} {tps:>9.0f} {comm * 1e3:>8.1f} {compute * 1e3:>11.1f} "
            f"{comm / step if step else 0:>10.0%} {wall:>7.1f}"
        )
    one, many = results[1], results[a.nproc]
    print(
        f"{a.nproc} processes: step time x{many['step_s'] / one['step_s']:.2f}, tokens/s "
        f"x{many['tokens_per_s'] / one['tokens_per_s']:.2f}; "
        f"compute per rank x{many['compute_s'] / one['compute_s']:.2f} "
        f"of one process's step; collectives {many['comm_s'] * 1e3:.1f} ms per step"
    )
    print(json.dumps({"bench_distributed": {str(k): v for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
