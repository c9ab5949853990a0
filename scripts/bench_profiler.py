"""Benchmark of the M2 profiler (run by `make bench`).

On the real trainer's PPO step (smoke config, untrained models: the cost of a step does
not depend on what the weights have learned), in one process, against baselines measured
in the same run:

1. Always-on stage timers (`trainerd.stages.StageTimer`), target < 0.5% of a step:
   Step times are process CPU time (one intra-op thread), not wall time: this box is
   shared and wall time mostly measured the neighbours.
   a. direct: the timer's own cost per step (begin_step, as many stage entries as a real
      step makes, end_step; empty bodies), over thousands of repetitions, divided by the
      median real step time. Precise, and what the target is judged on.
   b. A/B: each pair runs the same step four times from the same snapshot (models,
      optimizers, RNGs, data cursor), twice with the real StageTimer and twice with a null
      timer (ABBA, flipped between pairs to cancel drift; the faster run of each arm
      counts). The median pair ratio is printed with
      its spread: on a shared 2-core box the noise can exceed 0.5%, so this one is a
      sanity check, not the verdict.
2. A profiled step (ProfilerWindow, CPU activities, no shapes/memory/stacks) relative to
   the same steps unprofiled (replayed from one snapshot before and after the profiled
   pass), plus the one-off cost of exporting the trace and deriving the CSVs after the
   window (outside the measured steps).

Prints PASS/MISS for the timer target. Exits non-zero only if something crashed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from protocol.catalogue import STAGES  # noqa: E402
from trainerd import config as config_mod  # noqa: E402
from trainerd.run import trainer as ppo  # noqa: E402
from trainerd.run.determinism import apply_determinism  # noqa: E402
from trainerd.run.stages import MEASURED, StageTimer  # noqa: E402
from trainerd.tools.inject import Injection  # noqa: E402
from trainerd.tools.profiler import ProfilerWindow  # noqa: E402

TIMER_TARGET = 0.005  # 0.5% of a step


class NullTimer:
    """The StageTimer interface doing nothing but measuring the whole step (the baseline)."""

    def __init__(self):
        self.step_time_s = 0.0
        self._t0 = 0.0

    def begin_step(self) -> None:
        self._t0 = time.perf_counter()

    def stage(self, name: str):
        return nullcontext()

    def end_step(self) -> dict[str, float]:
        self.step_time_s = time.perf_counter() - self._t0
        return dict.fromkeys(STAGES, 0.0)


class CountingTimer(StageTimer):
    """A StageTimer that counts stage entries (a step enters update stages per minibatch)."""

    entries = 0

    def stage(self, name: str):
        CountingTimer.entries += 1
        return super().stage(name)


def build_trainer(steps: int):
    """The real Trainer on the smoke config, without warm start or reward-model training."""
    cfg = config_mod.TrainConfig(**{**config_mod.SMOKE, "steps": steps, "profile_steps": None})
    cfg.validate()
    rng, _ = apply_determinism(cfg.seed, cfg.threads, cfg.device)
    device = rng.device
    c = ppo.build_components(cfg, rng, device)
    c.scorer = c.rm
    run_dir = Path(tempfile.mkdtemp(prefix="bench-profiler-"))
    from protocol.rundir import RunPaths

    paths = RunPaths(run_dir)
    (run_dir / "profile").mkdir()
    trainer = ppo.Trainer(paths, cfg, rng, device, c, None, Injection.none(), lambda m: None, lambda: False)
    return trainer, paths


def timed_step(trainer, step: int) -> float:
    """Process CPU seconds of one step: on a shared box, wall time mostly measures the
    neighbours (one intra-op thread, so CPU time is the step's own work)."""
    t0 = time.process_time()
    trainer.ppo_step(step)
    return time.process_time() - t0


def timer_cost_per_step(entries_per_step: int, reps: int) -> float:
    """Seconds the StageTimer itself costs per step (empty stage bodies)."""
    timer = StageTimer(torch.device("cpu"))
    names = [MEASURED[i % len(MEASURED)] for i in range(entries_per_step)]
    samples = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(reps):
            timer.begin_step()
            for name in names:
                with timer.stage(name):
                    pass
            timer.end_step()
        samples.append((time.process_time() - t0) / reps)
    return min(samples)  # the least-disturbed repetition block


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10, help="A/B step pairs (timer vs null timer)")
    ap.add_argument("--profiled", type=int, default=4, help="steps inside the profiler window")
    args = ap.parse_args()
    torch.set_num_threads(1)

    total_steps = 2 + args.pairs + args.profiled + 2
    trainer, paths = build_trainer(total_steps)
    step = 0

    def next_step() -> int:
        nonlocal step
        step += 1
        return step

    print(
        f"bench_profiler: real PPO step, smoke config, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    # Warm-up (allocator, first-call paths), and count the stage entries of a real step.
    for _ in range(2):
        trainer.timer = CountingTimer(trainer.device)
        CountingTimer.entries = 0
        timed_step(trainer, next_step())
    entries = CountingTimer.entries

    # 1b. A/B: each pair runs the SAME step twice from the same state (models, optimizers,
    # RNGs, data cursor), once per timer, so both arms do identical work.
    real, null = StageTimer(trainer.device), NullTimer()
    with_t, without_t, ratios = [], [], []
    for i in range(args.pairs):
        s = next_step()
        snapshot = copy.deepcopy({**trainer.constant_state(), **trainer.mutable_state()})
        # A B B A (flipped every pair); each arm keeps the faster of its two runs, since
        # interference from other processes only ever adds time.
        arms = [real, null, null, real] if i % 2 == 0 else [null, real, real, null]
        best = {id(real): float("inf"), id(null): float("inf")}
        for k, timer in enumerate(arms):
            if k:
                trainer.load_state(copy.deepcopy(snapshot))
            trainer.timer = timer
            best[id(timer)] = min(best[id(timer)], timed_step(trainer, s))
        with_t.append(best[id(real)])
        without_t.append(best[id(null)])
        ratios.append(with_t[-1] / without_t[-1])
    step_s = statistics.median(with_t + without_t)

    # 1a. Direct cost of the timer per step.
    cost = timer_cost_per_step(entries, reps=2000)
    share = cost / step_s
    verdict = "PASS" if share < TIMER_TARGET else "MISS"
    print(f"\nalways-on stage timers ({entries} stage entries per step)")
    print(f"  median step time (CPU time)     {step_s * 1000:10.1f} ms")
    print(
        f"  timer cost per step (direct)    {cost * 1e6:10.1f} us = {share * 100:.4f}% of a step "
        f"[{verdict}: target < {TIMER_TARGET * 100:.1f}%]"
    )
    lo, med, hi = quantiles(ratios)
    print(
        f"  A/B with/without timer          {med:10.4f}x median of {len(ratios)} pairs "
        f"(IQR {lo:.4f}..{hi:.4f}; noise, not the verdict)"
    )

    # 2. Profiled vs unprofiled, on identical steps: the same P steps run three times from
    # the same snapshot (deterministic algorithms: identical work): unprofiled, inside a
    # ProfilerWindow, unprofiled again. The baseline per step is the mean of the two.
    trainer.timer = StageTimer(trainer.device)
    first = step + 1
    steps = list(range(first, first + args.profiled))
    snapshot = copy.deepcopy({**trainer.constant_state(), **trainer.mutable_state()})
    unprof_a = [timed_step(trainer, s) for s in steps]
    trainer.load_state(copy.deepcopy(snapshot))
    window = ProfilerWindow(paths.profile, steps[0], steps[-1])
    profiled = []
    for s in steps:
        t0 = time.process_time()
        window.step_begin(s)
        rec = trainer.ppo_step(s)
        if s < window.end:
            window.step_end(s, rec)
            profiled.append(time.process_time() - t0)
        else:  # the last step_end also exports the trace: time the step apart from it
            profiled.append(time.process_time() - t0)
            window.step_end(s, rec)
    trainer.load_state(copy.deepcopy(snapshot))
    unprof_b = [timed_step(trainer, s) for s in steps]
    if window.error:
        print(f"profiler window failed: {window.error}", file=sys.stderr)
        return 1
    base = [(a + b) / 2 for a, b in zip(unprof_a, unprof_b)]
    step_ratios = [p / b for p, b in zip(profiled, base)]
    print(f"\ntorch.profiler window (CPU activities; shapes, memory, stacks off), {len(steps)} identical steps")
    print(f"  unprofiled step (mean)          {statistics.mean(base) * 1000:10.1f} ms CPU")
    print(
        f"  profiled step (mean)            {statistics.mean(profiled) * 1000:10.1f} ms CPU = "
        f"{sum(profiled) / sum(base):.3f}x unprofiled"
    )
    print(
        "  per step                        "
        + " ".join(f"{r:.3f}x" for r in step_ratios)
        + f"  (unprofiled runs agree within {max(abs(a - b) / b for a, b in zip(unprof_a, unprof_b)) * 100:.1f}%)"
    )
    t = window.timings
    trace_mb = (paths.profile / "chrome_trace.json").stat().st_size / 2**20
    print(
        f"  after the window (wall): stop {t['stop_s']:.2f} s, export {t['export_s']:.2f} s "
        f"({trace_mb:.1f} MiB trace), CSVs from the trace {t['derive_s']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
