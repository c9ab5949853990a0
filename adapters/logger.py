"""`RunLogger`: write a complete kit run dir from someone else's training loop.

    from adapters import RunLogger
    with RunLogger("runs", framework="verl", config=cfg) as log:
        for step in ...:
            log.log(step, metrics, stage_s={"rollout": t_gen})   # the framework's own names

Names go through the framework's alias table (`adapters.aliases`); the record is written to
steps.msgpack and steps.jsonl, run through the alert engine (alerts to events.jsonl), and
samples.jsonl gets responses when given. run.json holds the framework's config and versions,
and the writer lock is held from `start()` to `close()`, so the monitor shows the run as
running and `trainerd report` / `trainerd verify m3 RUN` read it as a kit run.

A logger never raises into training: the first failure is logged once (logging module,
"adapters") and the logger turns itself off. It writes on rank zero only (`rank`, default
from $RANK).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from protocol import alerts as alerts_mod
from protocol.jsonl import JsonlWriter
from protocol.rundir import (
    RunLock,
    RunPaths,
    append_event,
    create_run,
    new_manifest,
    switch_latest,
    update_manifest,
    write_manifest,
)
from protocol.steplog import StepLogWriter

from .aliases import TABLES, Table, complete_stages, map_metrics, missing_fields

log = logging.getLogger("adapters")
MANIFEST_EVERY_S = 5.0


def _rank_zero() -> bool:
    for var in ("RANK", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v not in (None, "") and v != "0":
            return False
    return True


def _jsonable(v: Any, depth: int = 0) -> Any:
    """A config value run.json can hold (anything else as its str)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v
    if depth < 4 and isinstance(v, Mapping):
        return {str(k): _jsonable(x, depth + 1) for k, x in v.items()}
    if depth < 4 and isinstance(v, (list, tuple)):
        return [_jsonable(x, depth + 1) for x in v]
    return str(v)


class RunLogger:
    def __init__(
        self,
        runs_dir: str | os.PathLike[str] = "runs",
        framework: str = "kit",
        *,
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        samples_every: int = 10,
        rules: Sequence[alerts_mod.Rule] = alerts_mod.DEFAULT_RULES,
        rank_zero: bool | None = None,
    ):
        self.runs_dir, self.run_id = runs_dir, run_id
        self.table: Table = TABLES.get(framework) or Table(framework, framework, {})
        self.config = dict(_jsonable(dict(config or {})))
        if total_steps is not None:
            self.config["steps"] = int(total_steps)
        self.versions = {str(k): str(v) for k, v in (versions or {}).items()}
        self.seed = int(seed)
        self.samples_every = max(0, int(samples_every))
        self.rules = tuple(rules)
        self.enabled = _rank_zero() if rank_zero is None else bool(rank_zero)
        self.paths: RunPaths | None = None
        self.overhead_s = 0.0  # time spent in this logger (what it costs the training loop)
        self.last_step = 0
        self.fired_at: dict[int, list[str]] = {}
        self._present: set[str] = set()
        self._lock: RunLock | None = None
        self._steplog: StepLogWriter | None = None
        self._jsonl: JsonlWriter | None = None
        self._samples: JsonlWriter | None = None
        self._engine = alerts_mod.AlertEngine(self.rules)
        self._last_manifest = 0.0
        self._closed = False
        self._prev_time: float | None = None

    # -- the guard: nothing here may raise into training --------------------------------------

    def _fail(self, what: str, e: BaseException) -> None:
        log.warning("rlhf-kit logging turned off: %s failed: %s: %s", what, type(e).__name__, e)
        self.enabled = False
        self._close_files()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> RunLogger:
        if not self.enabled or self.paths is not None:
            return self
        t0 = time.perf_counter()
        try:
            paths = create_run(self.runs_dir, self.run_id, prefix=self.table.framework)
            for d in (paths.tb, paths.profile, paths.checkpoints):  # the framework keeps its own
                try:
                    d.rmdir()
                except OSError:
                    pass
            self._lock = RunLock(paths).acquire()
            self.paths = paths
            versions = {"python": platform.python_version(), **self.versions}
            m = new_manifest(paths, self.config, self.seed, {}, versions)
            m["adapter"] = {
                "format": "kit",
                "framework": self.table.framework,
                "label": self.label,
                "writer": "RunLogger",
            }
            write_manifest(paths, m)
            alerts_mod.save_run_rules(self.rules, paths.root)
            switch_latest(paths.root.parent, paths.run_id)
            self._steplog = StepLogWriter(paths.steps)
            self._jsonl = JsonlWriter(paths.steps_jsonl)
            append_event(paths, "started", pid=os.getpid(), seed=self.seed, steps=self.config.get("steps"), device="?")
            self._last_manifest = time.monotonic()  # run.json was just written: not again at step 1
            self._prev_time = time.time()
        except Exception as e:
            self._fail("starting the run dir", e)
        self.overhead_s += time.perf_counter() - t0
        return self

    @property
    def label(self) -> str:
        v = self.versions.get(self.table.framework)
        return f"{self.table.label} {v}" if v else self.table.label

    def log(
        self,
        step: int,
        metrics: Mapping[str, Any],
        stage_s: Mapping[str, float] | None = None,
        wall_time: float | None = None,
        samples: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> list[tuple[str, alerts_mod.Alert]]:
        """Log one step (the framework's metric names); returns the alert events it caused."""
        if not self.enabled:
            return []
        if self.paths is None:
            self.start()
            if not self.enabled:
                return []
        t0 = time.perf_counter()
        fired: list[tuple[str, alerts_mod.Alert]] = []
        try:
            now = time.time() if wall_time is None else float(wall_time)
            rec: dict[str, Any] = {"step": int(step), "time": now}
            rec.update(map_metrics(self.table, metrics, stage_s))
            if "step_time_s" not in rec and self._prev_time is not None:  # since the last step (or the start)
                rec["step_time_s"] = max(0.0, now - self._prev_time)
            self._prev_time = now
            if "stage_s" not in rec:  # no stage timed: the whole step is `other`
                rec["stage_s"] = complete_stages({}, rec.get("step_time_s"))
            self._derive(rec)
            assert self._steplog is not None and self._jsonl is not None and self.paths is not None
            self._steplog.write(rec)
            self._jsonl.write(rec)
            self._present.update(rec)
            fired = self._engine.update(rec)
            for event, alert in fired:
                append_event(self.paths, event, **alert.to_event(event))
            self.last_step = rec["step"]
            if samples is not None:  # a list, or a function giving one (called only when written)
                reasons = [a.rule for ev, a in fired if ev in ("alert", "alert_escalated")]
                if reasons or (self.samples_every and rec["step"] % self.samples_every == 0):
                    got = samples() if callable(samples) else samples
                    if got:
                        self._write_samples(rec["step"], got, reasons)
            if time.monotonic() - self._last_manifest > MANIFEST_EVERY_S:
                self._last_manifest = time.monotonic()
                update_manifest(self.paths, last_step=self.last_step, adapter=self._adapter_info())
        except Exception as e:
            self._fail(f"logging step {step}", e)
        self.overhead_s += time.perf_counter() - t0
        return fired

    def _derive(self, rec: dict[str, Any]) -> None:
        """Catalogue fields that follow from others the framework logged."""
        sd = rec.get("reward_std")
        if isinstance(sd, float) and "reward_var" not in rec:
            rec["reward_var"] = sd * sd
        sd = rec.get("advantage_std")
        if isinstance(sd, float) and "advantage_var" not in rec:
            rec["advantage_var"] = sd * sd
        tok, st = rec.get("tokens"), rec.get("step_time_s")
        if isinstance(tok, int) and isinstance(st, float) and st > 0 and "tokens_per_second" not in rec:
            rec["tokens_per_second"] = tok / st

    def _adapter_info(self) -> dict[str, Any]:
        return {
            "format": "kit",
            "framework": self.table.framework,
            "label": self.label,
            "writer": "RunLogger",
            "missing": missing_fields(self._present),
        }

    def _write_samples(self, step: int, samples: Sequence[Mapping[str, Any]], reasons: list[str]) -> None:
        assert self.paths is not None
        scored = [(i, s) for i, s in enumerate(samples) if isinstance(s.get("reward"), (int, float))]
        if not scored:
            return
        scored.sort(key=lambda x: float(x[1]["reward"]) if math.isfinite(float(x[1]["reward"])) else -math.inf)
        rnd = random.Random(f"{self.seed}-{step}")
        picks = [("best", scored[-1]), ("worst", scored[0]), ("random", scored[rnd.randrange(len(scored))])]
        if self._samples is None:
            self._samples = JsonlWriter(self.paths.samples)
        for pick, (i, s) in picks:
            length = s.get("length")
            self._samples.write(
                {
                    "step": step,
                    "reason": "alert" if reasons else "periodic",
                    "alerts": reasons,
                    "pick": pick,
                    "index": i,
                    "prompt": str(s.get("prompt", "")),
                    "response": str(s.get("response", "")),
                    "reward": float(s["reward"]),
                    "gold": s.get("gold"),
                    "kl": s.get("kl"),
                    "length": int(length) if isinstance(length, int) else None,
                }
            )

    def close(self, status: str = "finished", reason: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.paths is None:
            return
        t0 = time.perf_counter()
        try:
            if self.enabled:
                append_event(self.paths, status, step=self.last_step, status=status, reason=reason or status)
                update_manifest(
                    self.paths,
                    status=status,
                    ended_at=time.time(),
                    last_step=self.last_step,
                    adapter=self._adapter_info(),
                )
        except Exception as e:
            self._fail("closing the run", e)
        self._close_files()
        self.overhead_s += time.perf_counter() - t0

    def _close_files(self) -> None:
        for w in (self._steplog, self._jsonl, self._samples):
            try:
                if w is not None:
                    w.close()
            except Exception:
                pass
        self._steplog = self._jsonl = self._samples = None
        if self._lock is not None:
            try:
                self._lock.release()
            except Exception:
                pass
            self._lock = None

    def __enter__(self) -> RunLogger:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("crashed" if exc_type is not None else "finished", None if exc is None else str(exc)[:200])
