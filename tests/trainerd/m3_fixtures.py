"""Helpers shared by the M3 tests (report, verify m3, injection).

`make_synthetic_run` writes a run directory with `protocol` only (no trainer): full
catalogue records, the JSONL mirror, and the alert events the rule engine produces.
`live_runs()` makes the runs of `trainerd verify m3` (no RUN) once per test process and shares them.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from protocol import catalogue
from protocol.alerts import AlertEngine
from protocol.jsonl import JsonlWriter
from protocol.rundir import append_event, create_run, new_manifest, write_manifest
from protocol.steplog import StepLogWriter


def synthetic_record(step: int, **over) -> dict:
    """A complete, healthy-looking record for `step` (every catalogue field, right types)."""
    kl = 0.02 + 0.0005 * step
    rec = {
        "step": step,
        "time": 1_700_000_000.0 + step,
        "kl": kl,
        "kl_target": 0.05,
        "kl_target_error": kl - 0.05,
        "kl_coef": 0.1,
        "entropy": 1.5 - 0.002 * step,
        "clip_frac": 0.05,
        "approx_kl": 0.001,
        "policy_loss": -0.01 + 0.0001 * (step % 7),
        "grad_norm": 1.0 + 0.01 * (step % 5),
        "learning_rate": 1e-4,
        "value_loss": 0.5 / step,
        "explained_variance": 0.3 + 0.001 * step,
        "reward_mean": 0.1 + 0.01 * step,
        "reward_std": 0.5,
        "reward_var": 0.25,
        "gold_reward_mean": 0.05 + 0.008 * step,
        "advantage_mean": 0.0,
        "advantage_std": 1.0,
        "advantage_var": 1.0,
        "response_length_mean": 8.0 + 0.01 * step,
        "batch_size": 16,
        "tokens": 256,
        "tokens_per_second": 1000.0,
        "step_time_s": 0.256,
        "stage_s": {s: t for s, t in zip(catalogue.STAGES, (0.12, 0.02, 0.01, 0.01, 0.001, 0.07, 0.02, 0.006))},
        "rss_bytes": 300_000_000,
    }
    rec.update(over)
    return rec


def make_synthetic_run(
    runs_dir,
    run_id: str,
    records: list[dict],
    status: str = "finished",
    events: bool = True,
    jsonl: bool = True,
    config: dict | None = None,
    tb: bool = False,
) -> Path:
    paths = create_run(runs_dir, run_id)
    m = new_manifest(paths, config or {"steps": len(records)}, 0, {}, {"python": "3"})
    m["status"] = status
    m["last_step"] = records[-1]["step"] if records else 0
    write_manifest(paths, m)
    eng = AlertEngine()
    sw = StepLogWriter(paths.steps)
    jw = JsonlWriter(paths.steps_jsonl) if jsonl else None
    if events:
        append_event(paths, "started", step=0)
    for r in records:
        sw.write(r)
        if jw:
            jw.write(r)
        for ev, a in eng.update(r):
            if events:
                append_event(paths, ev, **a.to_event(ev))
    sw.close()
    if jw:
        jw.close()
    if tb:
        write_tensorboard(paths.tb, records)
    return paths.root


def write_tensorboard(tb_dir, records: list[dict]) -> None:
    """Every numeric field as a scalar tagged by its name (maps as `field/key`)."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb_dir))
    for r in records:
        for k, v in r.items():
            if k == "step":
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    w.add_scalar(f"{k}/{kk}", vv, r["step"])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                w.add_scalar(k, v, r["step"])
    w.close()


def unstable_records(n: int = 40, nan_at: int = 30) -> list[dict]:
    """Entropy collapses from step 20, a NaN loss at `nan_at`, an Inf grad norm after it."""
    recs = []
    for s in range(1, n + 1):
        over = {}
        if s >= 20:
            over["entropy"] = 0.05
        if s == nan_at:
            over["policy_loss"] = math.nan
        if s == nan_at + 1:
            over["grad_norm"] = math.inf
            over["value_loss"] = -math.inf
        recs.append(synthetic_record(s, **over))
    return recs


# -- real trainer runs, made once per test process ------------------------------------

_CACHE: dict = {}
_LOCK = threading.Lock()
_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        d = Path(tempfile.mkdtemp(prefix="m3-runs-"))
        if not os.environ.get("M3_KEEP_RUNS"):
            atexit.register(shutil.rmtree, d, True)
        _ROOT.append(d)
    return _ROOT[0]


class LiveRuns:
    """`trainerd verify m3` with no RUN, made once: its exit code, its JSON, and its runs."""

    def __init__(self, rc: int, result: dict, root: Path, seconds: float):
        self.rc, self.result, self.root, self.seconds = rc, result, root, seconds

    def path(self, spec: str | None) -> Path:
        from trainerd.verify.m3 import run_id_for

        return self.root / run_id_for(spec)

    def records(self, spec: str | None) -> list[dict]:
        from protocol.steplog import read_steplog

        return read_steplog(self.path(spec) / "steps.msgpack")[0]

    def events(self, spec: str | None) -> list[dict]:
        from protocol.jsonl import read_jsonl

        return read_jsonl(self.path(spec) / "events.jsonl")


def live_runs() -> LiveRuns:
    """The clean and injected runs of `verify m3` (about 40 s on an idle 2-core box), shared."""
    import contextlib
    import io
    import json

    from trainerd.verify import m3 as verify_m3

    with _LOCK:
        if "live" not in _CACHE:
            root = _root() / "live"
            buf = io.StringIO()
            t0 = time.monotonic()
            with contextlib.redirect_stdout(buf):
                rc = verify_m3.run(None, True, runs_dir=root)
            _CACHE["live"] = LiveRuns(rc, json.loads(buf.getvalue()), root, time.monotonic() - t0)
        return _CACHE["live"]
