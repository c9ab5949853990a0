"""The monitor's memory of a run: one compact column per charted field.

A 1M-step run must fit in a few hundred MB, so records are not kept: each charted
field is an `array('d')` (stage times `array('f')`, they are only drawn), and every
column has per-block summaries (finite min/max and non-finite flags per BLOCK values)
so that decimating a whole run to a chart's width touches ~width x 2 blocks, not 1M values.
"""

from __future__ import annotations

import math
import struct
from array import array
from bisect import bisect_left
from dataclasses import dataclass

from protocol.catalogue import RANK_FIELDS, STAGES, as_number

BLOCK = 256
# Charted metrics, in grid order, with the companion line drawn in the same chart.
CHART_METRICS: tuple[str, ...] = (
    "kl",
    "entropy",
    "reward_mean",
    "advantage_mean",
    "grad_norm",
    "clip_frac",
    "value_loss",
    "tokens_per_second",
    "response_length_mean",
)
COMPANIONS: dict[str, str] = {"kl": "kl_target", "reward_mean": "gold_reward_mean"}
SCALAR_FIELDS: tuple[str, ...] = CHART_METRICS + tuple(COMPANIONS.values()) + ("step_time_s", "tokens")
# Keys that are never extra columns. Any other numeric top-level key of a record (a catalogue
# field not charted above, or another framework's metric with no catalogue entry) is kept as an
# extra column under its own name, so adapted runs can list and chart everything they log.
_NOT_EXTRA = frozenset(SCALAR_FIELDS) | {"step", "time", "stage_s", "stage_peak_bytes"}
_SCALAR_SET = frozenset(SCALAR_FIELDS)
MAX_EXTRA_COLUMNS = 256  # a run with more numeric keys than this keeps the first ones

# A field absent from a record is stored as a NaN with its own bit pattern, so that a
# missing gold reward is not drawn as a NaN marker.
MISSING = struct.unpack("<d", struct.pack("<Q", 0x7FF8_DEAD_0000_0000))[0]
_MISSING_BITS = 0x7FF8_DEAD_0000_0000
FLAG_NAN, FLAG_POS_INF, FLAG_NEG_INF = 1, 2, 4


INT64 = (-(1 << 63), (1 << 63) - 1)


def is_placeable(record) -> bool:
    """A record with an integer step the step column (int64) can hold."""
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and INT64[0] <= step <= INT64[1]


def number(v, default):
    """A record's value as a float (protocol.catalogue.as_number); `default` when it is not a number."""
    n = as_number(v)
    return default if n is None else n


def is_missing(v: float) -> bool:
    return v != v and struct.unpack("<Q", struct.pack("<d", v))[0] == _MISSING_BITS


def _flags_of(values) -> int:
    f = 0
    for v in values:
        if v != v:
            if not is_missing(v):
                f |= FLAG_NAN
        elif v == math.inf:
            f |= FLAG_POS_INF
        elif v == -math.inf:
            f |= FLAG_NEG_INF
    return f


def summarize(values) -> tuple[float, float, int]:
    """(finite min, finite max, non-finite flags) of a sequence; min > max when nothing is finite."""
    if not values:
        return math.inf, -math.inf, 0
    s = sum(values)  # C speed; NaN or Inf anywhere shows in the sum
    if s == s and s not in (math.inf, -math.inf):
        return min(values), max(values), 0
    finite = [v for v in values if v == v and v not in (math.inf, -math.inf)]
    if finite:
        return min(finite), max(finite), _flags_of(values)
    return math.inf, -math.inf, _flags_of(values)


def finite_sum(values, a: int, b: int) -> float:
    s = sum(values[a:b])  # C speed; NaN or Inf anywhere shows in the sum
    if s == s and s not in (math.inf, -math.inf):
        return s
    return sum(v for v in values[a:b] if v == v and v not in (math.inf, -math.inf))


ARRAY_BLOCKS = 8  # a batch bringing this many whole blocks is summarised with numpy (once it is loaded)
_NUMPY = None  # numpy, once a history load has imported it (never imported here: start-up does not pay)


def numpy_loaded(np) -> None:
    """numpy is imported (in full: a module still being imported by another thread is not
    usable): big batches' block summaries may use it from now on."""
    global _NUMPY
    _NUMPY = np


_ARRAY_PASS = 1024  # blocks summarised per numpy pass: a few MB of temporaries at most


def _summarize_blocks(np, col: Column, b0: int, b1: int) -> None:
    """The summaries of blocks b0..b1 of a column, appended, with numpy: bit for bit what
    `summarize` and `finite_sum` give block by block (tests/tui/test_store.py). Python's min/max
    keep the first of equal values, so a zero's sign is the first zero's; numpy's may not be."""
    dtype = np.float64 if col.values.typecode == "d" else np.float32
    values = np.frombuffer(col.values, dtype=dtype)  # a view: gone before this returns (the array grows later)
    try:
        for p0 in range(b0, b1, _ARRAY_PASS):
            p1 = min(b1, p0 + _ARRAY_PASS)
            blk = values[p0 * BLOCK : p1 * BLOCK].astype(np.float64).reshape(p1 - p0, BLOCK)
            fin = np.isfinite(blk)
            if fin.all():
                lo, hi = blk.min(axis=1), blk.max(axis=1)
                flags = np.zeros(p1 - p0, dtype=np.int8)
            else:
                lo = np.where(fin, blk, math.inf).min(axis=1)  # nothing finite: (inf, -inf)
                hi = np.where(fin, blk, -math.inf).max(axis=1)
                nan = np.isnan(blk) & (blk.view(np.uint64) != np.uint64(_MISSING_BITS))
                flags = nan.any(axis=1).astype(np.int8) * np.int8(FLAG_NAN)
                flags |= (blk == math.inf).any(axis=1).astype(np.int8) * np.int8(FLAG_POS_INF)
                flags |= (blk == -math.inf).any(axis=1).astype(np.int8) * np.int8(FLAG_NEG_INF)
            for ext in (lo, hi):  # a zero: the first zero of the block (0.0 or -0.0, as min/max give)
                rows = np.flatnonzero(ext == 0)
                if len(rows):
                    ext[rows] = blk[rows, np.argmax(blk[rows] == 0, axis=1)]
            col.bmin.frombytes(lo.tobytes())
            col.bmax.frombytes(hi.tobytes())
            col.bflags.frombytes(flags.tobytes())
            del blk, fin
    finally:
        del values
    if col.bsum is not None:  # Python's own sums (its float sum is not numpy's)
        v = col.values
        for b in range(b0, b1):
            col.bsum.append(finite_sum(v, b * BLOCK, (b + 1) * BLOCK))


class Column:
    """One field's values with block summaries for fast decimation."""

    __slots__ = ("values", "bmin", "bmax", "bflags", "bsum", "present")

    def __init__(self, typecode: str = "d", sums: bool = False):
        self.values = array(typecode)
        self.bmin = array("d")
        self.bmax = array("d")
        self.bflags = array("b")
        self.bsum = array("d") if sums else None  # per block: sum of the finite values
        self.present = 0  # records that carried this field

    def __len__(self) -> int:
        return len(self.values)

    def _summarize_new_blocks(self) -> None:
        v = self.values
        if len(v) // BLOCK - len(self.bmin) >= ARRAY_BLOCKS and _NUMPY is not None:
            _summarize_blocks(_NUMPY, self, len(self.bmin), len(v) // BLOCK)
            return
        for b in range(len(self.bmin), len(v) // BLOCK):
            lo, hi, fl = summarize(v[b * BLOCK : (b + 1) * BLOCK])
            self.bmin.append(lo)
            self.bmax.append(hi)
            self.bflags.append(fl)
            if self.bsum is not None:
                self.bsum.append(finite_sum(v, b * BLOCK, (b + 1) * BLOCK))

    def extend(self, values) -> None:
        self.values.extend(values)
        self._summarize_new_blocks()

    def truncate(self, n: int) -> None:
        del self.values[n:]
        nb = n // BLOCK
        del self.bmin[nb:], self.bmax[nb:], self.bflags[nb:]
        if self.bsum is not None:
            del self.bsum[nb:]

    def sum(self, a: int, b: int) -> float:
        """Sum of the finite values in values[a:b] (whole blocks from their sums)."""
        if self.bsum is None or b - a < 2 * BLOCK:
            return finite_sum(self.values, a, b)
        ba, bb = -(-a // BLOCK), b // BLOCK
        return finite_sum(self.values, a, ba * BLOCK) + sum(self.bsum[ba:bb]) + finite_sum(self.values, bb * BLOCK, b)

    def range_summary(self, a: int, b: int) -> tuple[float, float, int]:
        """Summary of values[a:b], using whole blocks where it can."""
        if b - a < 2 * BLOCK:
            return summarize(self.values[a:b])
        ba, bb = -(-a // BLOCK), b // BLOCK
        lo, hi, fl = summarize(self.values[a : ba * BLOCK])
        lo2, hi2, fl2 = summarize(self.values[bb * BLOCK : b])
        if bb > ba:
            lo = min(lo, lo2, min(self.bmin[ba:bb]))
            hi = max(hi, hi2, max(self.bmax[ba:bb]))
            f = 0
            for x in set(self.bflags[ba:bb]):
                f |= x
            return lo, hi, fl | fl2 | f
        return min(lo, lo2), max(hi, hi2), fl | fl2


@dataclass
class Bucket:
    """What one chart column shows: finite min/max/last and which non-finite values hit it."""

    lo: float
    hi: float
    last: float
    flags: int
    step: int


def _flat_items(r: dict):
    """(key, number or None) of a record's extra columns: numeric top-level keys, and the
    per-rank maps of a data-parallel run flattened to "rank_compute_s.1", "rank_stage_s.1.rollout"."""
    for k in r.keys() - _NOT_EXTRA:
        if not isinstance(k, str):
            continue
        v = r[k]
        if k in _RANK_SET and isinstance(v, dict):
            for sub, x in v.items():
                if isinstance(sub, str):
                    yield f"{k}.{sub}", number(x, None)
        else:
            yield k, number(v, None)


_RANK_SET = frozenset(RANK_FIELDS)


class RunStore:
    """Columns for steps, times, charted scalars and stage seconds."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.steps = array("q")
        self.times = array("d")
        self.columns: dict[str, Column] = {k: Column("d") for k in SCALAR_FIELDS}
        self.stages: dict[str, Column] = {s: Column("f", sums=True) for s in STAGES}
        self.stage_peaks: dict[str, float] = {}  # the last record's per-stage peak memory (bytes)
        self.extra: list[str] = []  # extra column names, in order of first appearance

    def _add_column(self, key: str) -> Column | None:
        """A new extra column, MISSING for the rows already stored."""
        if len(self.extra) >= MAX_EXTRA_COLUMNS:
            return None
        c = Column("d")
        c.extend(array("d", [MISSING]) * len(self.steps))
        self.columns[key] = c
        self.extra.append(key)
        return c

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    # -- building ---------------------------------------------------------------------

    @staticmethod
    def columnize(records: list[dict]) -> dict:
        """Records -> plain lists per field (done off the UI thread, then `extend`ed)."""
        out: dict = {"step": [], "time": []}
        for k in SCALAR_FIELDS:
            out[k] = []
        for s in STAGES:
            out["stage:" + s] = []
        present = dict.fromkeys(SCALAR_FIELDS, 0)
        skipped = 0
        extra: dict[str, list] = {}
        n = 0
        for r in records:
            if not is_placeable(r):
                skipped += 1  # a record without a step (or one no int64 holds) cannot be placed on a chart
                continue
            for k, v in _flat_items(r):
                if v is not None:
                    col = extra.get(k)
                    if col is None:
                        if len(extra) >= MAX_EXTRA_COLUMNS:
                            continue
                        col = extra[k] = [MISSING] * n
                    col.append(v)
            n += 1
            for col in extra.values():
                if len(col) < n:
                    col.append(MISSING)
            out["step"].append(r["step"])
            out["time"].append(number(r.get("time"), math.nan))
            for k in SCALAR_FIELDS:
                v = number(r.get(k), None)
                if v is None:
                    out[k].append(MISSING)
                else:
                    out[k].append(v)
                    present[k] += 1
            st = r.get("stage_s")
            st = st if isinstance(st, dict) else {}
            for s in STAGES:
                out["stage:" + s].append(number(st.get(s), math.nan))
            sp = r.get("stage_peak_bytes")
            if isinstance(sp, dict):  # the profiler panel shows the last step's per-stage peaks
                out["stage_peaks"] = {s: number(sp.get(s), math.nan) for s in STAGES if s in sp}
        out["present"] = present
        out["skipped"] = skipped
        out["extra"] = extra
        return out

    def extend(self, cols: dict) -> None:
        """Append a columnized batch; a step that goes back (a resume) cuts the later history."""
        steps = cols["step"]
        if not steps:
            return
        if self.steps and steps[0] <= self.steps[-1]:
            self.truncate(bisect_left(self.steps, steps[0]))
        extra = cols.get("extra") or {}
        for k in extra:
            if k not in self.columns:
                self._add_column(k)
        if cols.get("stage_peaks"):
            self.stage_peaks = cols["stage_peaks"]
        n = len(self.steps)
        self.steps.extend(steps)
        self.times.extend(cols["time"])
        for k, c in self.columns.items():
            if k in _SCALAR_SET:
                c.extend(cols[k])
                c.present += cols["present"][k]
            elif k in extra:
                c.extend(extra[k])
                c.present += sum(1 for v in extra[k] if not is_missing(v))
            else:
                c.extend(array("d", [MISSING]) * (len(self.steps) - n))
        for s, c in self.stages.items():
            c.extend(cols["stage:" + s])

    def prepend(self, older: RunStore) -> None:
        """Put an older history (loaded in the background) in front of what is here."""
        if not len(older):
            return
        n = len(self)
        if n and older.steps[-1] >= self.steps[0]:
            older.truncate(bisect_left(older.steps, self.steps[0]))
        n_old = len(older.steps)
        older.steps.extend(self.steps)
        older.times.extend(self.times)
        for k in self.extra:
            if k not in older.columns:
                older._add_column(k)
                older.columns[k].truncate(0)
                older.columns[k].extend(array("d", [MISSING]) * n_old)
        for k, c in older.columns.items():
            mine = self.columns.get(k)
            if mine is None:
                c.extend(array("d", [MISSING]) * len(self))
            else:
                c.extend(mine.values)
                c.present += mine.present
        for s, c in older.stages.items():
            c.extend(self.stages[s].values)
        self.steps, self.times = older.steps, older.times
        self.columns, self.stages, self.extra = older.columns, older.stages, older.extra

    def truncate(self, n: int) -> None:
        del self.steps[n:], self.times[n:]
        for c in (*self.columns.values(), *self.stages.values()):
            c.truncate(n)

    # -- reading ----------------------------------------------------------------------

    def value(self, key: str, i: int = -1) -> float | None:
        c = self.columns.get(key)
        if c is None or not len(c.values):
            return None
        v = c.values[i]
        return None if is_missing(v) else v

    def index_range(self, last_n: int | None = None, around_step: int | None = None) -> tuple[int, int]:
        """[start, end) of the rows shown: all, the last N, or N around a step."""
        n = len(self)
        if around_step is not None and last_n:
            i = bisect_left(self.steps, around_step)
            a = max(0, i - last_n // 2)
            return a, min(n, a + last_n)
        if last_n:
            return max(0, n - last_n), n
        return 0, n

    def decimate(self, key: str, a: int, b: int, width: int, stage: bool = False) -> list[Bucket]:
        """Rows [a, b) of a column in at most `width` buckets."""
        col = (self.stages if stage else self.columns)[key]
        n = b - a
        if n <= 0 or width <= 0:
            return []
        nb = min(width, n)
        vals = col.values
        steps = self.steps
        if nb == n:  # one row per bucket: no summaries needed
            out = []
            for i in range(a, b):
                v = vals[i]
                if v == v and v not in (math.inf, -math.inf):
                    out.append(Bucket(v, v, v, 0, steps[i]))
                else:
                    out.append(Bucket(math.inf, -math.inf, v, _flags_of((v,)), steps[i]))
            return out
        out: list[Bucket] = []
        for k in range(nb):
            s = a + n * k // nb
            e = a + n * (k + 1) // nb
            lo, hi, fl = col.range_summary(s, e)
            out.append(Bucket(lo, hi, vals[e - 1], fl, self.steps[e - 1]))
        return out

    def steps_per_second(self, window: int = 50) -> float | None:
        n = len(self)
        if n < 2:
            return None
        i = max(0, n - window)
        dt = self.times[-1] - self.times[i]
        ds = self.steps[-1] - self.steps[i]
        if not (dt > 0) or ds <= 0:
            return None
        return ds / dt
