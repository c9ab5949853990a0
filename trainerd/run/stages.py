"""Always-on wall-clock stage timers (SPEC section 6).

    timer = StageTimer(device)
    timer.start_clock()          # the first step boundary (the loop's start)
    timer.begin_step()
    with timer.stage("rollout"):
        ...
    stage_s = timer.end_step()   # {stage: seconds} with every STAGES entry, summing to step time

A stage may be entered several times per step (the policy and value updates alternate per
minibatch); its times add up. Each stage is also a `torch.profiler.record_function` range so
an on-demand profiler window shows the same names. On GPU the device is synchronised at
stage boundaries so kernel time lands in the stage that launched it. Overhead per stage
entry is two perf_counter calls and one record_function (a few microseconds).

A step's time runs from one step boundary to the next (`end_step` marks one), not from
`begin_step`: whatever the loop does between two steps (writing the logs, the healthy-state
copy, a checkpoint, the profiler's export) is wall time the run spent, so it lands in the
next step's `other` and `tokens_per_second` is what the run really achieves.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch.profiler import record_function

from protocol.catalogue import STAGES

MEASURED = tuple(s for s in STAGES if s != "other")


class StageTimer:
    def __init__(self, device: torch.device | None = None):
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
        self._totals = dict.fromkeys(MEASURED, 0.0)
        self._boundary: float | None = None
        self.step_time_s = 0.0

    def start_clock(self) -> None:
        """Mark the first step boundary (the loop's start)."""
        if self._sync:
            self._sync()
        self._boundary = time.perf_counter()

    def begin_step(self) -> None:
        self._totals = dict.fromkeys(MEASURED, 0.0)
        if self._boundary is None:
            self.start_clock()

    @contextmanager
    def stage(self, name: str):
        if name not in self._totals:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(MEASURED)}")
        with record_function(name):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if self._sync:
                    self._sync()
                self._totals[name] += time.perf_counter() - t0

    def end_step(self) -> dict[str, float]:
        """Stop the step clock; `other` is whatever the named stages did not cover."""
        if self._sync:
            self._sync()
        now = time.perf_counter()
        self.step_time_s = now - (self._boundary if self._boundary is not None else now)
        self._boundary = now
        out = {name: float(self._totals[name]) for name in MEASURED}
        out["other"] = max(0.0, self.step_time_s - sum(out.values()))
        return out
