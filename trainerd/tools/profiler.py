"""M2 profiler: torch.profiler over a short window of steps, and its artifacts.

`ProfilerWindow(profile_dir, start, end)` is the hook the PPO loop calls around every
step (`step_begin(step)`, `step_end(step, record)`, `close()`). It is inert outside
steps `start..end` (inclusive). Inside, torch.profiler records CPU activity (and CUDA
on a GPU) with shapes, memory and stacks OFF by default: measured on a 2-core box,
CPU-only profiling costs about +19% step time, with shapes/memory/stacks about +108%.
Each profiled step is wrapped in a `ProfilerStep#N` range, the name torch's own
schedule uses, so Perfetto, HTA and the TensorBoard plugin see step boundaries; the
trainer's StageTimer adds one `record_function` range per stage inside it.

When the window ends (in `step_end(end)`, or in `close()` if the run stops early) the
window writes, into `profile_dir`:

- `chrome_trace.json`: torch's own export (kineto), opens in Perfetto / chrome://tracing;
- `op_stats.csv`: per operator: calls, self and total CPU time (and CUDA time on a GPU),
  sorted by self CPU time;
- `summary.csv`: per stage of `protocol.catalogue.STAGES`: mean seconds per profiled step
  (from the records' always-on `stage_s`), share of the step, ms per token, peak memory,
  and the mean duration of the stage's ranges in the trace.

Both CSVs are derived from the trace JSON with the json module, never from
`prof.key_averages()`: that builds torch's event tree in Python (~45 us per event; 24 s
for 30 steps measured here) while parsing the exported JSON ourselves was ~13x faster.

This module imports torch only inside `ProfilerWindow`, so `trainerd profile` and
`trainerd verify m2` (which parse artifacts) start without loading a training stack.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.catalogue import STAGES, stage_shares

TRACE_FILE = "chrome_trace.json"
OP_STATS_FILE = "op_stats.csv"
SUMMARY_FILE = "summary.csv"

# Name of the range around each profiled step (torch's schedule uses the same prefix).
STEP_RANGE_PREFIX = "ProfilerStep#"
# op_stats.csv folds every per-step range into one row, as key_averages() does.
STEP_RANGE_ROW = "ProfilerStep*"

# Complete ("X") trace events that run on a device rather than on a host thread.
DEVICE_CATEGORIES = frozenset(
    {"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "Memcpy", "Memset", "Kernel"}
)
# Host "X" events that are not operators: the whole-trace span kineto adds.
IGNORED_CATEGORIES = frozenset({"Trace"})

OP_STATS_COLUMNS = ["name", "category", "calls", "self_cpu_us", "total_cpu_us", "self_cpu_share"]
OP_STATS_CUDA_COLUMNS = ["self_cuda_us", "total_cuda_us"]
SUMMARY_COLUMNS = [
    "stage",
    "seconds",  # mean per profiled step, from the always-on stage timers (record["stage_s"])
    "share",  # of the step: seconds / sum over all stages (so the shares sum to 1)
    "ms_per_token",  # stage time over the window's tokens (record["tokens"])
    "peak_memory_bytes",  # the stage's peak over the window (record["stage_peak_bytes"]; see _peak_memory)
    "memory_kind",  # rss | cuda_max_allocated | "" when the records carry none
    "trace_seconds",  # mean per profiled step of the stage's record_function ranges; "" if none
    "profiled_steps",
]

# Nesting tolerance: kineto timestamps are microseconds with ns decimals; a child that
# ends a rounding error after its parent is still its child.
_EPS_US = 1e-3


class ProfileError(Exception):
    """An artifact is missing or cannot be parsed; the message is one line."""


# --------------------------------------------------------------------------- the window


class ProfilerWindow:
    """torch.profiler over steps `start..end` inclusive; inactive outside them.

    The loop calls `step_begin(step)` before a step's first stage, `step_end(step,
    record)` after the step's record is complete, and `close()` when training ends
    (also on errors: it writes what the window saw). Failures while writing the
    artifacts are reported on stderr and kept in `.error`; they never stop training.
    """

    def __init__(
        self,
        profile_dir,
        start: int,
        end: int,
        device: str = "cpu",
        *,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        log=None,
    ):
        if start < 1 or end < start:
            raise ValueError(f"profile window {start}:{end}: need 1 <= start <= end")
        self.profile_dir = Path(profile_dir)
        self.start = int(start)
        self.end = int(end)
        self.device = str(device)
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self.log = log  # optional one-line logger (the trainer's), told what the window cost
        self.records: list[dict] = []  # the window's step records (for summary.csv)
        self.finished = False
        self.error: str | None = None
        self.timings: dict[str, float] = {}  # seconds spent stopping, exporting, deriving
        self._prof = None
        self._step_range = None

    @property
    def active(self) -> bool:
        return self._prof is not None and not self.finished

    def in_window(self, step: int) -> bool:
        return self.start <= step <= self.end

    def step_begin(self, step: int) -> None:
        if self.finished or not self.in_window(step):
            return
        import torch
        import torch.profiler as tp

        if self._prof is None:
            # Started lazily at the first step inside the window, so a resume that
            # begins mid-window still profiles the steps it runs.
            activities = [tp.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                if torch.cuda.is_available():
                    activities.append(tp.ProfilerActivity.CUDA)
            prof = tp.profile(
                activities=activities,
                record_shapes=self.record_shapes,
                profile_memory=self.profile_memory,
                with_stack=self.with_stack,
            )
            try:
                # Kineto has one session per process: starting a second one would silently
                # end the first (someone profiling the trainer from outside), so refuse.
                if torch.autograd.profiler._is_profiler_enabled:
                    raise RuntimeError("another torch.profiler session is already running")
                prof.start()
            except Exception as e:
                self.finished = True
                self._report_error(e)
                return
            self._prof = prof
        self._step_range = tp.record_function(f"{STEP_RANGE_PREFIX}{step}")
        self._step_range.__enter__()

    def step_end(self, step: int, record: dict | None) -> None:
        if not self.active or not self.in_window(step):
            return
        self._exit_step_range()
        if record is not None:
            self.records.append(_window_fields(record))
        if step >= self.end:
            self._finish()

    def close(self) -> None:
        """End the window early (run stopped or crashed inside it) and write what it saw."""
        if self.active:
            self._finish()
        self.finished = True

    def _exit_step_range(self) -> None:
        if self._step_range is not None:
            try:
                self._step_range.__exit__(None, None, None)
            finally:
                self._step_range = None

    def _finish(self) -> None:
        self.finished = True
        prof, self._prof = self._prof, None
        try:
            self._exit_step_range()
            t0 = time.perf_counter()
            prof.stop()
            t1 = time.perf_counter()
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            trace_path = self.profile_dir / TRACE_FILE
            # Export into a private subdirectory under the final name (kineto writes the
            # path into the trace as its traceName), then rename: readers never see half a trace.
            tmp_dir = self.profile_dir / f".export-{os.getpid()}"
            tmp_dir.mkdir(exist_ok=True)
            prof.export_chrome_trace(str(tmp_dir / TRACE_FILE))
            os.replace(tmp_dir / TRACE_FILE, trace_path)
            tmp_dir.rmdir()
            t2 = time.perf_counter()
            write_artifacts(self.profile_dir, self.records, device=self.device)
            t3 = time.perf_counter()
            self.timings = {"stop_s": t1 - t0, "export_s": t2 - t1, "derive_s": t3 - t2}
            if self.log:
                self.log(
                    f"profiler window {self.start}:{self.end}: {len(self.records)} steps -> "
                    f"{self.profile_dir} (stop {t1 - t0:.2f}s, export {t2 - t1:.2f}s, "
                    f"csv {t3 - t2:.2f}s)"
                )
        except Exception as e:  # profiling must never take a training run down (a full disk included)
            shutil.rmtree(self.profile_dir / f".export-{os.getpid()}", ignore_errors=True)
            self._report_error(e)

    def _report_error(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {e}"
        msg = f"profiler window {self.start}:{self.end} failed: {self.error}"
        if self.log:
            self.log(msg)
        else:
            print(f"trainerd: {msg}", file=sys.stderr)


def _window_fields(record: dict) -> dict:
    """The record fields summary.csv needs (a copy: the loop may reuse its dicts)."""
    keep = ("step", "tokens", "step_time_s", "rss_bytes", "cuda_max_allocated_bytes")
    out = {k: record[k] for k in keep if k in record}
    for k in ("stage_s", "stage_peak_bytes"):
        v = record.get(k)
        if isinstance(v, dict):
            out[k] = dict(v)
    return out


# --------------------------------------------------------------------------- the trace


@dataclass
class OpStat:
    name: str
    category: str
    calls: int = 0
    self_cpu_us: float = 0.0
    total_cpu_us: float = 0.0
    self_cuda_us: float = 0.0
    total_cuda_us: float = 0.0


@dataclass
class StageRange:
    stage: str
    ts: float
    dur: float
    step: int | None  # the enclosing ProfilerStep#N, if any


@dataclass
class TraceAnalysis:
    ops: dict[tuple[str, str], OpStat] = field(default_factory=dict)
    stage_ranges: list[StageRange] = field(default_factory=list)
    steps: dict[int, float] = field(default_factory=dict)  # step -> duration (us) of its range
    has_device: bool = False
    host_events: int = 0

    def stages_in_trace(self) -> set[str]:
        return {r.stage for r in self.stage_ranges}

    def stages_by_step(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {s: set() for s in self.steps}
        for r in self.stage_ranges:
            if r.step is not None:
                out.setdefault(r.step, set()).add(r.stage)
        return out


def _reject_constant(name: str):
    # Python's json accepts NaN/Infinity, Perfetto and chrome://tracing do not.
    raise ValueError(f"non-standard JSON constant {name}")


def _read_artifact(p: Path) -> str:
    """A profile artifact's text; ProfileError with a one-line reason if it can't be read."""
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ProfileError(f"{p}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{p}: unreadable ({e})") from None


def load_trace(path, root=None) -> dict:
    """Read and sanity-check a Chrome trace; raise ProfileError with a one-line reason. With
    `root` (the run dir), the file is opened as a regular file inside it only (never through a
    link, never blocking on a FIFO), and refused over MAX_TRACE_BYTES."""
    p = Path(path)
    text = _read_artifact(p) if root is None else _read_run_artifact(root, p, MAX_TRACE_BYTES)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise ProfileError(f"{p}: not valid JSON ({e})") from None
    if isinstance(data, list):  # the JSON Array Format is valid Chrome trace too
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ProfileError(f"{p}: not a Chrome trace (no traceEvents list)")
    for i, ev in enumerate(data["traceEvents"]):
        if not isinstance(ev, dict) or not isinstance(ev.get("ph"), str):
            raise ProfileError(f"{p}: traceEvents[{i}] is not an event (no 'ph')")
        if ev["ph"] == "X" and not (_is_num(ev.get("ts")) and _is_num(ev.get("dur"))):
            raise ProfileError(f"{p}: traceEvents[{i}] ({ev.get('name')!r}) lacks a numeric ts/dur")
    return data


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def analyze_trace(trace: dict) -> TraceAnalysis:
    """Per-operator self/total times and the stage ranges of a Chrome trace.

    Self time needs the call tree: per (pid, tid), events sorted by start (longer first
    on ties) nest by containment; an event's self time is its duration minus its direct
    children's. Device events (kernels, memcpy) are not on host threads: their time is
    credited, through the `External id` kineto gives both sides, to the CPU op that
    launched them (self CUDA time) and to its ancestors (total CUDA time).
    """
    out = TraceAnalysis()
    host: dict[tuple, list[dict]] = {}
    device_us_by_external_id: dict = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat") or ""
        if cat in DEVICE_CATEGORIES:
            out.has_device = True
            ext = (ev.get("args") or {}).get("External id")
            if ext is not None:
                device_us_by_external_id[ext] = device_us_by_external_id.get(ext, 0.0) + float(ev["dur"])
            continue
        if cat in IGNORED_CATEGORIES:
            continue
        host.setdefault((ev.get("pid"), ev.get("tid")), []).append(ev)

    stage_names = set(STAGES)
    for events in host.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        n = len(events)
        out.host_events += n
        parent = [-1] * n
        child_us = [0.0] * n
        stack: list[tuple[float, int]] = []  # (end, index) of open ancestors
        for i, ev in enumerate(events):
            ts, dur = float(ev["ts"]), float(ev["dur"])
            while stack and ts >= stack[-1][0] - _EPS_US:
                stack.pop()
            if stack:
                p_end, p = stack[-1]
                parent[i] = p
                child_us[p] += min(dur, p_end - ts)  # clip a rounding overhang
            stack.append((ts + dur, i))

        # Device time bottom-up: children come after their parents in this order.
        cuda_self = [0.0] * n
        cuda_total = [0.0] * n
        if device_us_by_external_id:
            for i, ev in enumerate(events):
                ext = (ev.get("args") or {}).get("External id")
                if ext is not None and (ev.get("cat") or "") == "cpu_op":
                    cuda_self[i] = device_us_by_external_id.get(ext, 0.0)
            for i in range(n - 1, -1, -1):
                cuda_total[i] += cuda_self[i]
                if parent[i] >= 0:
                    cuda_total[parent[i]] += cuda_total[i]

        for i, ev in enumerate(events):
            name = str(ev.get("name", ""))
            cat = str(ev.get("cat") or "")
            dur = float(ev["dur"])
            if name.startswith(STEP_RANGE_PREFIX):
                try:
                    out.steps[int(name[len(STEP_RANGE_PREFIX) :])] = dur
                except ValueError:
                    pass
                key_name = STEP_RANGE_ROW
            else:
                key_name = name
            if name in stage_names and cat == "user_annotation":
                out.stage_ranges.append(StageRange(name, float(ev["ts"]), dur, _enclosing_step(events, parent, i)))
            key = (key_name, cat)
            st = out.ops.get(key)
            if st is None:
                st = out.ops[key] = OpStat(key_name, cat)
            st.calls += 1
            st.self_cpu_us += max(0.0, dur - child_us[i])
            st.total_cpu_us += dur
            st.self_cuda_us += cuda_self[i]
            st.total_cuda_us += cuda_total[i]
    return out


def _enclosing_step(events: list[dict], parent: list[int], i: int) -> int | None:
    p = parent[i]
    while p >= 0:
        name = str(events[p].get("name", ""))
        if name.startswith(STEP_RANGE_PREFIX):
            try:
                return int(name[len(STEP_RANGE_PREFIX) :])
            except ValueError:
                return None
        p = parent[p]
    return None


# --------------------------------------------------------------------------- the CSVs


def op_stats_rows(analysis: TraceAnalysis) -> tuple[list[str], list[list]]:
    columns = list(OP_STATS_COLUMNS) + (OP_STATS_CUDA_COLUMNS if analysis.has_device else [])
    total_self = sum(s.self_cpu_us for s in analysis.ops.values()) or 1.0
    rows = []
    for s in sorted(analysis.ops.values(), key=lambda s: (-s.self_cpu_us, s.name)):
        row = [
            s.name,
            s.category,
            s.calls,
            _r(s.self_cpu_us, 3),
            _r(s.total_cpu_us, 3),
            _r(s.self_cpu_us / total_self, 6),
        ]
        if analysis.has_device:
            row += [_r(s.self_cuda_us, 3), _r(s.total_cuda_us, 3)]
        rows.append(row)
    return columns, rows


def _stage_peaks(records: list[dict]) -> dict[str, int]:
    """Each stage's peak over the window, from the records' per-stage peaks (`stage_peak_bytes`:
    the RSS high-water mark of the stage on CPU, CUDA max allocated on a GPU)."""
    out: dict[str, int] = {}
    for r in records:
        sp = r.get("stage_peak_bytes")
        if isinstance(sp, dict):
            for s, v in sp.items():
                if _is_num(v) and math.isfinite(float(v)):
                    out[s] = max(out.get(s, 0), int(v))
    return out


def _peak_memory(records: list[dict]) -> tuple[int | None, str]:
    """The window's peak memory: CUDA max allocated on a GPU, else resident set size. A stage
    row shows its own peak (`_stage_peaks`) where the records carry one, else this one (the
    stage `other` and records from before per-stage peaks).
    """
    for key, kind in (("cuda_max_allocated_bytes", "cuda_max_allocated"), ("rss_bytes", "rss")):
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if vals:
            return int(max(vals)), kind
    return None, ""


def summary_rows(records: list[dict], analysis: TraceAnalysis | None) -> list[list]:
    """One row per stage (SUMMARY_COLUMNS) from the window's records and the trace."""
    stage_records = [r for r in records if isinstance(r.get("stage_s"), dict)]
    n = len(stage_records)
    sums = {s: 0.0 for s in STAGES}
    for r in stage_records:
        for s in STAGES:
            v = r["stage_s"].get(s, 0.0)
            if _is_num(v):
                sums[s] += float(v)
    tokens = sum(int(r["tokens"]) for r in stage_records if _is_num(r.get("tokens")))
    peak, kind = _peak_memory(records)
    stage_peaks = _stage_peaks(records)
    trace_sums: dict[str, float] = {}
    trace_steps = max(1, len(analysis.steps)) if analysis is not None else 1
    if analysis is not None:
        for rng in analysis.stage_ranges:
            trace_sums[rng.stage] = trace_sums.get(rng.stage, 0.0) + rng.dur / 1e6
    shares = stage_shares(sums)
    rows = []
    for s in STAGES:
        seconds = sums[s] / n if n else 0.0
        share = shares[s]
        ms_per_token = sums[s] * 1000.0 / tokens if tokens > 0 else 0.0
        trace_s = _r(trace_sums[s] / trace_steps, 6) if s in trace_sums else ""
        rows.append(
            [s, _r(seconds, 6), _r(share, 6), _r(ms_per_token, 6), stage_peaks.get(s, "" if peak is None else peak)]
            + [kind, trace_s, n]
        )
    return rows


def write_artifacts(profile_dir, records: list[dict], device: str = "cpu") -> TraceAnalysis:
    """Derive op_stats.csv and summary.csv from `profile_dir/chrome_trace.json`."""
    d = Path(profile_dir)
    analysis = analyze_trace(load_trace(d / TRACE_FILE))
    columns, rows = op_stats_rows(analysis)
    _write_csv_atomic(d / OP_STATS_FILE, columns, rows)
    _write_csv_atomic(d / SUMMARY_FILE, SUMMARY_COLUMNS, summary_rows(records, analysis))
    return analysis


def _r(x: float, nd: int) -> float:
    return round(float(x), nd)


def _write_csv_atomic(path: Path, columns: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


MAX_CSV_BYTES = 64 << 20  # a summary or op table over 64 MiB is not one of ours
MAX_TRACE_BYTES = 512 << 20  # a Chrome trace read back (verify m2): larger is refused, not loaded


def _read_run_artifact(root, p: Path, limit: int = MAX_CSV_BYTES) -> str:
    """A profile artifact inside the run dir `root`, opened by protocol's rules (a regular file
    in the run dir, never through a link, never blocking on a FIFO, bounded)."""
    from protocol.safeio import RunDirError, read_run_file

    try:
        return read_run_file(root, p, limit).decode("utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{p}: missing") from None
    except RunDirError as e:
        raise ProfileError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{p}: unreadable ({e})") from None


def read_csv(path, root=None) -> list[dict]:
    """Rows of a CSV as dicts; ProfileError if missing, empty or ragged. With `root` (the run
    dir), the file is opened as a regular file inside it only."""
    p = Path(path)
    text = _read_artifact(p) if root is None else _read_run_artifact(root, p)
    try:
        reader = csv.reader(io.StringIO(text))
        lines = [row for row in reader if row]
    except csv.Error as e:
        raise ProfileError(f"{p}: not valid CSV ({e})") from None
    if not lines:
        raise ProfileError(f"{p}: empty (no header)")
    header = lines[0]
    rows = []
    for lineno, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            raise ProfileError(f"{p}: line {lineno} has {len(row)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, row)))
    return rows


# --------------------------------------------------------------------------- `trainerd profile`


def profile_report(run, out=None, err=None, width: int = 80) -> int:
    """`trainerd profile RUN`: where a finished run's step time went, in the terminal.

    Reads the run directory only: every step's always-on `stage_s` from steps.msgpack,
    and, when the run was profiled, profile/summary.csv and profile/op_stats.csv.
    A bad or missing run is one line on stderr and exit 2.
    """
    from protocol.rundir import RunDirError, effective_status, read_manifest, resolve_run
    from protocol.steplog import read_steplog
    from protocol.text import safe_text

    out = out or sys.stdout
    err = err or sys.stderr

    def fail(msg: object) -> int:  # run text in `msg` shows escaped, never acts on the terminal
        print(f"trainerd profile: {safe_text(msg, 4000)}", file=err)
        return 2

    try:
        paths = resolve_run(run if run is not None else "runs")
        manifest = read_manifest(paths)
        records, stats = read_steplog(paths.steps, root=paths.root)
    except RunDirError as e:  # a refused file (a FIFO, a link out of the run) included
        return fail(e)
    except OSError as e:
        return fail(f"{e.strerror or type(e).__name__}: {e.filename}")
    timed = [r for r in records if isinstance(r.get("stage_s"), dict) and r["stage_s"]]
    if not timed:
        return fail(f"{paths.steps} holds no steps with stage timings")

    def emit(line: str = "") -> None:  # every line may hold run text (a path, a status, an op name)
        print(safe_text(line)[:width], file=out)

    steps = [r.get("step") for r in timed]
    status = effective_status(manifest, paths)
    emit(f"profile of {paths.root} ({status}, steps {steps[0]}..{steps[-1]}, {len(timed)} timed)")
    if stats.corrupt_frames:
        emit(f"note: {stats.corrupt_frames} corrupt frame(s) in steps.msgpack were skipped")
    emit()

    overall = _stage_totals(timed)
    tokens = sum(int(r["tokens"]) for r in timed if _is_num(r.get("tokens")))
    total_s = sum(overall.values())
    thirds = _thirds(timed)
    third_shares = [stage_shares(_stage_totals(part)) for part in thirds]
    emit(
        f"{'stage':<14}{'mean s':>9}{'share':>8}{'ms/tok':>9}"
        + ("".join(f"{h:>9}" for h in ("1st 3rd", "2nd 3rd", "last 3rd")) + f"{'moved':>9}" if thirds else "")
    )
    shares = stage_shares(overall)
    for s in STAGES:
        line = f"{s:<14}{overall[s] / len(timed):>9.4f}{_pct(shares[s]):>8}{_ms_per_token(overall[s], tokens):>9}"
        if thirds:
            line += "".join(f"{_pct(sh[s]):>9}" for sh in third_shares)
            line += f"{(third_shares[-1][s] - third_shares[0][s]) * 100:>+7.1f}pp"
        emit(line)
    step_times = [float(r["step_time_s"]) for r in timed if _is_num(r.get("step_time_s"))]
    mean_step = sum(step_times) / len(step_times) if step_times else total_s / len(timed)
    emit(f"{'step':<14}{mean_step:>9.4f}{'100.0%':>8}{_ms_per_token(mean_step * len(timed), tokens):>9}")
    emit()
    slowest = max(STAGES, key=lambda s: overall[s])
    emit(
        f"slowest stage: {slowest}, {_pct(shares[slowest])} of a step "
        f"({overall[slowest] / len(timed):.4f} s mean, {_ms_per_token(overall[slowest], tokens).strip()} ms/token)"
    )
    if thirds:
        moved = max(STAGES, key=lambda s: abs(third_shares[-1][s] - third_shares[0][s]))
        delta = (third_shares[-1][moved] - third_shares[0][moved]) * 100
        emit(f"largest shift: {moved} {delta:+.1f} pp of the step from the first to the last third")
    else:
        emit("(fewer than 3 timed steps: no first/middle/last comparison)")

    _report_profile_dir(paths.root, paths.profile, emit)
    return 0


def _stage_totals(records: list[dict]) -> dict[str, float]:
    totals = {s: 0.0 for s in STAGES}
    for r in records:
        for s in STAGES:
            v = r["stage_s"].get(s)
            if _is_num(v):
                totals[s] += float(v)
    return totals


def _thirds(records: list[dict]) -> list[list[dict]]:
    n = len(records)
    if n < 3:
        return []
    a, b = n // 3, (2 * n) // 3
    return [records[:a], records[a:b], records[b:]]


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _ms_per_token(seconds: float, tokens: int) -> str:
    return f"{seconds * 1000 / tokens:.4f}" if tokens > 0 else "-"


def _report_profile_dir(root: Path, profile_dir: Path, emit) -> None:
    emit()
    try:
        summary = read_csv(profile_dir / SUMMARY_FILE, root=root)
    except ProfileError as e:
        if not str(e).endswith(": missing"):  # there, but refused or unreadable: say why
            emit(f"no profiled window: {e}")
            return
        emit(f"no profiled window ({profile_dir / SUMMARY_FILE} missing); run with --profile-steps A:B to get one")
        return
    n = summary[0].get("profiled_steps", "?") if summary else "?"
    kind = (summary[0].get("memory_kind") or "memory") if summary else "memory"
    emit(f"profiled window: {n} steps under torch.profiler (times include its overhead)")
    emit(f"{'stage':<14}{'mean s':>9}{'share':>8}{'ms/tok':>9}{'trace s':>10}{'peak ' + kind:>24}")
    for row in summary:
        try:
            trace_s = f"{float(row['trace_seconds']):.4f}" if row.get("trace_seconds") else "-"
            line = (
                f"{row['stage']:<14}{float(row['seconds']):>9.4f}{_pct(float(row['share'])):>8}"
                f"{float(row['ms_per_token']):>9.4f}{trace_s:>10}"
                f"{_mib(row.get('peak_memory_bytes')):>24}"
            )
        except (KeyError, ValueError):
            emit(f"{profile_dir / SUMMARY_FILE}: malformed row {row}")
            return
        emit(line)

    try:
        ops = read_csv(profile_dir / OP_STATS_FILE, root=root)
    except ProfileError as e:
        emit()
        emit(f"no operator table: {e}")
        return
    # Operators only: the stage and step ranges are already in the table above.
    ops = [o for o in ops if o.get("category") == "cpu_op"] or ops
    cuda = bool(ops) and "total_cuda_us" in ops[0]
    emit()
    emit(f"top ops by self CPU time (of all profiled CPU time), from {OP_STATS_FILE}")
    name_w = 42 if not cuda else 32
    emit(
        f"{'op':<{name_w}}{'calls':>7}{'self ms':>10}{'total ms':>10}{'self %':>8}"
        + (f"{'cuda ms':>10}" if cuda else "")
    )
    for o in ops[:10]:
        try:
            name = _middle_truncate(o["name"], name_w - 1)
            line = (
                f"{name:<{name_w}}{int(o['calls']):>7}{float(o['self_cpu_us']) / 1000:>10.2f}"
                f"{float(o['total_cpu_us']) / 1000:>10.2f}{_pct(float(o['self_cpu_share'])):>8}"
            )
            if cuda:
                line += f"{float(o['total_cuda_us']) / 1000:>10.2f}"
        except (KeyError, ValueError):
            emit(f"{profile_dir / OP_STATS_FILE}: malformed row for {o.get('name')!r}")
            return
        emit(line)


def _middle_truncate(name: str, width: int) -> str:
    """Keep both ends: op names differ at the end (..._backward) as often as at the start."""
    if len(name) <= width:
        return name
    head = (width - 2) * 2 // 3
    return name[:head] + ".." + name[len(name) - (width - 2 - head) :]


def _mib(v) -> str:
    try:
        return f"{int(v) / 2**20:.1f} MiB"
    except (TypeError, ValueError):
        return "-"
