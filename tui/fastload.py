"""A run's whole history from the step log's columnar side file (`steps.cols`), with numpy.

`load_columns` turns the side file's rows into a `RunStore` in array operations, checking
every row against the step log first: the frames must follow each other from offset 0 as
the rows say, the crc32 of the log's bytes up to each frame's end must be the one recorded
(one running crc32 over the log, at C speed, in a thread of its own while the rows are
copied: a pass of rows whose crc does not hold is taken back), and the row's own checksum
must hold. The first row that fails ends what is trusted; the caller reads the log from there
as before.
So the monitor never shows a value the log does not hold, and a run without a side file (an
older run, another framework's) is read exactly as before. Both files are read with pread,
never mapped: a resume may truncate them while they are read. numpy is imported here only,
lazily: the monitor's start-up does not pay for it.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import zlib
from array import array
from contextlib import contextmanager
from dataclasses import dataclass

from protocol.catalogue import RANK_FIELDS, STAGES
from protocol.columns import (
    MAGIC_U64,
    MAX_HEADER_BYTES,
    MISSING_BITS,
    NONNUM_BITS,
    ROW_HEAD_WORDS,
    K,
    columns_path,
    decode_header,
)
from protocol.rundir import RunPaths
from protocol.safeio import open_run_file

from .store import (
    _NOT_EXTRA,
    BLOCK,
    FLAG_NAN,
    FLAG_NEG_INF,
    FLAG_POS_INF,
    INT64,
    MAX_EXTRA_COLUMNS,
    SCALAR_FIELDS,
    Column,
    RunStore,
    numpy_loaded,
)

_RANK_SET = frozenset(RANK_FIELDS)
CHUNK_BYTES = 4 << 20  # side-file bytes checked and copied per pass: memory stays bounded


@dataclass
class Loaded:
    store: RunStore  # the rows before `end` (placeable ones; see `skipped`)
    end: int  # the log offset the trusted rows cover: read the log from here
    rows: int  # trusted rows used
    skipped: int  # rows without a step a chart can place


def load_columns(paths: RunPaths, upto: int, should_stop=lambda: False) -> Loaded | None:
    """The history before log offset `upto` from the side file, or None when there is none
    (or numpy is missing, or its first row is not trusted)."""
    try:
        import numpy as np
    except ImportError:
        return None
    numpy_loaded(np)
    _big_blocks_mapped()
    try:
        cols = open_run_file(paths.root, columns_path(paths.steps), "rb")
        log = open_run_file(paths.root, paths.steps, "rb")
    except OSError:
        return None
    with cols, log:
        log_size = os.fstat(log.fileno()).st_size
        if log_size == 0 or os.fstat(cols.fileno()).st_size == 0:
            return None
        # read with pread, never mapped: a resume may truncate either file while we read it
        # (a mapped page past the new end would kill the process with SIGBUS)
        return _load(np, cols.fileno(), log.fileno(), min(upto, log_size), should_stop)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _big_blocks_mapped() -> None:
    """Have glibc map every block over 256 KiB, and unmap it when freed.

    By default glibc raises that bar each time a big block is freed (up to 32 MiB), so the
    columns that grow while a history loads land in the heap, their old copies stay there,
    and a 1M-step load peaked ~75 MB higher. Elsewhere (musl, macOS) nothing is done.
    """
    libc = _libc()
    if libc is not None:
        with _heap_lock:
            if not _heap_users[0]:
                libc.mallopt(_M_MMAP_THRESHOLD, MAPPED_BAR)


MAPPED_BAR = 256 << 10  # blocks over this are mapped (the columns that grow)
HEAP_BAR = 32 << 20  # glibc's highest bar: blocks up to this come from the heap
_heap_lock = threading.Lock()
_heap_users = [0]


def _libc():
    """glibc's malloc tuning (mallopt, malloc_trim), or None (musl, macOS: nothing is done)."""
    global _LIBC
    if _LIBC is False:
        try:
            import ctypes

            lib = ctypes.CDLL(None)
            _LIBC = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


_LIBC: object = False


@contextmanager
def heap_temporaries():
    """Array work whose big temporaries come and go (block summaries, alert screens): while it
    runs, blocks up to HEAP_BAR come from the heap, so each temporary reuses the memory the one
    before it freed. With every block over 256 KiB mapped (`_big_blocks_mapped`), each was a
    fresh mapping whose pages the kernel faulted in and zeroed, then unmapped: about half the
    time of an alert evaluation over 1M steps. Afterwards the bar is put back and the heap's
    free pages are given back (malloc_trim), so the memory held is what it was. Nests, and
    threads may overlap: the bar is raised by the first user and put back by the last."""
    libc = _libc()
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users[0] += 1
        if _heap_users[0] == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BAR)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users[0] -= 1
            if not _heap_users[0]:
                libc.mallopt(_M_MMAP_THRESHOLD, MAPPED_BAR)
                libc.malloc_trim(0)


def _load(np, cols_fd: int, log_fd: int, upto: int, should_stop) -> Loaded | None:
    out: dict[tuple[str, str | None], array] = {}  # field -> float64 values of the rows taken
    peaks: dict[str, float] = {}  # the last row's per-stage peak memory
    n = 0  # rows taken so far
    prev_end, log_crc = 0, 0  # the last row taken: its frame end and the log crc it records
    pos = 0
    size = os.fstat(cols_fd).st_size
    k_all = np.array(K, dtype=np.uint64)
    buf = bytearray(CHUNK_BYTES)  # one buffer for every pass: no fresh pages to fault in each time
    check = _LogCheck(log_fd)  # the log's crc32, in a thread beside the work on the rows
    marks: list[_Mark] = []  # where each pass began: what to go back to if its crc does not hold
    done = False
    gather = None
    try:
        while not done and pos < size:
            got = decode_header(os.pread(cols_fd, MAX_HEADER_BYTES, pos), 0)
            if got is None:
                break
            fields, head_len = got
            seg = _Segment(np, fields, k_all)
            per_chunk = max(1, CHUNK_BYTES // seg.width)
            gather = np.empty(len(seg.kept) * per_chunk, dtype="<u8")  # the kept values of a pass, reused
            if len(buf) < seg.width:
                buf = bytearray(seg.width)
            p = pos + head_len
            while p + seg.width <= size:
                if should_stop():
                    return None
                if check.failed():
                    done = True  # the crc of an earlier pass did not hold: nothing after it is taken
                    break
                rows = _read_rows(np, cols_fd, buf, min(per_chunk, (size - p) // seg.width), p, seg)
                if rows is None:
                    done = True
                    break
                seg_end = np.flatnonzero(rows[:, 0] == MAGIC_U64)
                if len(seg_end):  # the next segment starts here
                    rows = rows[: seg_end[0]]
                ok = _own_checks(np, rows, seg.kk, prev_end, upto)
                if ok:
                    good = rows[:ok]
                    marks.append(_Mark(n, prev_end, log_crc, p, ok, seg, set(out), dict(peaks)))
                    end, crc = int(good[-1, 0]), int(good[-1, 1]) >> 32
                    check.want(prev_end, end, crc)  # the log's crc32 up to these rows' last frame end
                    n = _take_rows(np, good, seg, out, peaks, n, gather)
                    prev_end, log_crc = end, crc
                if ok < len(rows) or prev_end >= upto:
                    done = True
                    break
                p += len(rows) * seg.width
                if len(seg_end):
                    pos = p
                    break
            else:
                break
        if should_stop():
            return None
        bad = check.finish(should_stop)
        if bad is None and should_stop():
            return None
    finally:
        check.stop()
    buf = gather = rows = good = None  # let the read buffers go before the columns are summarised (the peak)
    if bad is not None:  # the log is not what pass `bad` says: its rows up to the last crc that holds
        n, prev_end = _redo(np, cols_fd, log_fd, marks[bad], out, peaks, upto)
    if not n:
        return None
    with heap_temporaries():  # the block summaries' temporaries
        store, skipped = _store_of(np, out, n)
    store.stage_peaks = peaks
    return Loaded(store, prev_end, n, skipped)


class _Segment:
    """A side-file segment's layout: its fields, row width, checksum multipliers, and which
    fields the store keeps (and how)."""

    def __init__(self, np, fields: list, k_all):
        self.fields = fields
        self.w = ROW_HEAD_WORDS + len(fields)
        self.width = 8 * self.w
        self.kk = k_all[: self.w].copy()
        self.kk[2] = 0  # the checksum word is not summed
        self.names = set(fields)
        self.peak_fields = [(j, f[1]) for j, f in enumerate(fields) if f[0] == "stage_peak_bytes" and f[1] in STAGES]
        self.kept: list[tuple[int, tuple, bool]] = []  # (field index, field, a stage time)
        for j, f in enumerate(fields):
            stage = f[0] == "stage_s" and f[1] in STAGES
            if f[1] is not None and not stage and f[0] not in _RANK_SET:
                continue  # no chart shows it (per-stage memory...)
            self.kept.append((j, f, stage))
        self.kept_words = np.array([ROW_HEAD_WORDS + j for j, _f, _s in self.kept], dtype=np.intp)


@dataclass
class _Mark:
    """The state before a pass took its rows."""

    n: int
    prev_end: int
    log_crc: int
    p: int  # the side-file offset of the pass's first row
    rows: int  # rows the pass took
    seg: _Segment
    keys: set  # the columns there were
    peaks: dict


def _read_rows(np, cols_fd: int, buf: bytearray, m: int, p: int, seg: _Segment):
    """Up to m whole rows of the side file at offset p, as an (m, words) uint64 view of `buf`
    (valid until the next read), or None when there are none."""
    want = m * seg.width
    view = memoryview(buf)[:want]
    got = _pread_into(cols_fd, view, p)
    m = got // seg.width
    if not m:
        return None
    return np.frombuffer(buf, dtype="<u8", count=m * seg.w).reshape(m, seg.w)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` until it is full or the file ends: the bytes read."""
    got = 0
    while got < len(view):
        k = _preadv(fd, view[got:], offset + got)
        if k <= 0:
            break
        got += k
    return got


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    if _HAS_PREADV:
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


_HAS_PREADV = hasattr(os, "preadv")


def _take_rows(np, good, seg: _Segment, out: dict, peaks: dict, n: int, gather=None) -> int:
    """Append trusted rows' values to the columns `out` (a column new here is MISSING before
    them, one this segment lacks is MISSING along them); returns the rows taken in all."""
    for j, f in seg.peak_fields:  # the profiler panel: the last step's
        last = float(good[-1:, ROW_HEAD_WORDS + j].view("<f8")[0])
        if math.isfinite(last):
            peaks[f] = last
        else:
            peaks.pop(f, None)
    ok = len(good)
    # the kept fields' values, one contiguous row each: one gather, into a buffer used again (a
    # fresh one each pass is fresh pages to fault in: big blocks are mapped, see _big_blocks_mapped)
    vals = None if gather is None else gather[: len(seg.kept) * ok].reshape(len(seg.kept), ok)
    vals = np.take(good.T, seg.kept_words, axis=0, out=vals, mode="clip")
    for i, (_j, f, stage) in enumerate(seg.kept):
        col = out.get(f)
        if col is None:
            col = out[f] = array("f" if stage else "d")
            if n:
                col.frombytes(_raw(_absent(np, n, stage)))
        v = vals[i]
        if stage:  # drawn only: float32 as the store keeps them, not-a-number as NaN
            v[(v == MISSING_BITS) | (v == NONNUM_BITS)] = _NAN_BITS
            v = v.view("<f8").astype(np.float32)
        col.frombytes(_raw(v))
    del vals
    for f, col in out.items():
        if f not in seg.names:
            col.frombytes(_raw(_absent(np, ok, col.typecode == "f")))
    return n + ok


def _redo(np, cols_fd: int, log_fd: int, mark: _Mark, out: dict, peaks: dict, upto: int) -> tuple[int, int]:
    """Back to the state before the pass whose crc did not hold, then its rows up to the last one
    whose crc holds (the log changed or was damaged there). Returns (rows, log offset they cover)."""
    for f in list(out):
        if f not in mark.keys:
            del out[f]
        else:
            del out[f][mark.n :]
    peaks.clear()
    peaks.update(mark.peaks)
    buf = bytearray(mark.rows * mark.seg.width)
    rows = _read_rows(np, cols_fd, buf, mark.rows, mark.p, mark.seg)
    if rows is None:  # the side file was cut meanwhile (a resume)
        return mark.n, mark.prev_end
    ok, _crc = _trusted(np, rows, mark.seg.kk, log_fd, mark.prev_end, mark.log_crc, upto)
    if not ok:
        return mark.n, mark.prev_end
    return _take_rows(np, rows[:ok], mark.seg, out, peaks, mark.n), int(rows[ok - 1, 0])


class _LogCheck:
    """The log's running crc32, checked against what the rows record, in a thread of its own: it
    reads the log (pread into one buffer) and crc32s it while the rows are copied (both release
    the GIL). `want(start, end, crc)` asks for log[start:end] next; `finish` says which ask was
    not confirmed first (its crc does not hold, the log ends before it, the thread failed), or
    None when every one was."""

    def __init__(self, log_fd: int):
        import queue
        import threading

        self.fd = log_fd
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.checked = 0  # asks confirmed, in order
        self.bad = False  # an ask failed: nothing from it on is confirmed
        self._stopped = False
        self._asked = 0
        self._thread = threading.Thread(target=self._run, name="rlhf-tui-logcrc", daemon=True)
        self._thread.start()

    def want(self, start: int, end: int, crc: int) -> None:
        self.q.put((self._asked, start, end, crc))
        self._asked += 1

    def finish(self, should_stop) -> int | None:
        self.q.put(None)
        while self._thread.is_alive():
            self._thread.join(0.05)
            if should_stop():
                self.stop()
                return None
        return None if self.checked == self._asked else self.checked

    def failed(self) -> bool:
        return self.bad or not self._thread.is_alive()

    def stop(self) -> None:
        self._stopped = True
        self.q.put(None)

    def _run(self) -> None:
        buf = bytearray(CHUNK_BYTES)
        mv = memoryview(buf)
        crc, pos = 0, 0
        while True:
            item = self.q.get()
            if item is None or self._stopped:
                return
            i, start, end, want = item
            try:
                if start != pos:  # never: the rows are contiguous from offset 0
                    raise OSError
                while pos < end and not self._stopped:
                    k = _pread_into(self.fd, mv[: min(len(buf), end - pos)], pos)
                    if k <= 0:
                        break
                    crc = zlib.crc32(mv[:k], crc)
                    pos += k
            except (OSError, ValueError):
                pos = -1
            if self._stopped:
                return
            if pos != end or crc != want or i != self.checked:
                self.bad = True
                return
            self.checked += 1


def _own_checks(np, rows, kk, prev_end: int, upto: int) -> int:
    """How many leading rows hold on their own: contiguous frames from `prev_end`, within `upto`,
    and their own checksums."""
    if not len(rows):
        return 0
    ends = rows[:, 0]
    lens = rows[:, 1] & np.uint64(0xFFFFFFFF)
    expect = np.empty_like(ends)
    expect[0] = prev_end
    expect[1:] = ends[:-1]
    with np.errstate(over="ignore"):
        checks = rows @ kk  # uint64 arithmetic wraps: the checksum mod 2^64 (kk is 0 at the checksum word)
    bad = (ends - lens - np.uint64(16) != expect) | (ends > np.uint64(upto))
    bad |= (lens == 0) | (ends < lens + np.uint64(16)) | (checks != rows[:, 2])
    first_bad = np.flatnonzero(bad)
    return int(first_bad[0]) if len(first_bad) else len(rows)


def _trusted(np, rows, kk, log_fd: int, prev_end: int, log_crc: int, upto: int) -> tuple[int, int]:
    """How many leading rows hold: contiguous frames within the log, their own checksums, and the
    log's crc32 up to each frame's end as recorded. Returns (rows, log crc after them). (What
    `_load` does in one pass, its crc32 in a thread; used here where a pass's crc did not hold.)"""
    m = _own_checks(np, rows, kk, prev_end, upto)
    if not m:
        return 0, log_crc
    ends = rows[:, 0]
    crcs = (rows[:m, 1] >> np.uint64(32)).tolist()
    end_list = ends[:m].tolist()
    data = os.pread(log_fd, end_list[-1] - prev_end, prev_end)  # the log bytes these rows cover

    def crc_to(i: int) -> int:  # the log's crc32 up to row i's frame end
        return zlib.crc32(memoryview(data)[: end_list[i] - prev_end], log_crc)

    if len(data) == end_list[-1] - prev_end and crc_to(m - 1) == crcs[m - 1]:
        return m, crcs[m - 1]
    lo, hi = 0, m - 1  # the log changed somewhere: the last row whose crc still holds
    best = -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if end_list[mid] - prev_end <= len(data) and crc_to(mid) == crcs[mid]:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best + 1, (crcs[best] if best >= 0 else log_crc)


def _store_of(np, out: dict, n: int) -> tuple[RunStore, int]:
    """A RunStore from the side file's columns, as `RunStore.columnize` + `extend` would build it.
    Consumes `out`: each column is converted in place and handed over, so a 1M-step history
    is held once, not twice."""
    step_col = out.pop(("step", None), None)
    if step_col is None:
        return RunStore(), n
    step_bits = np.frombuffer(step_col, dtype="<u8")
    step_f = step_bits.view("<f8")
    placeable = np.isfinite(step_f) & (step_f >= INT64[0]) & (step_f <= INT64[1])
    keep = None if placeable.all() else np.flatnonzero(placeable)
    skipped = n - (n if keep is None else len(keep))

    def take(f, absent_as_nan: bool = False) -> array:
        """A field's values as the store keeps them: not-a-number as missing (or NaN)."""
        col = out.pop(f, None)
        if col is None:
            fill = _NAN_BITS if absent_as_nan else MISSING_BITS
            col = _array("d", np.full(n, fill, dtype="<u8"))
        b = np.frombuffer(col, dtype="<u8")
        b[b == NONNUM_BITS] = MISSING_BITS  # present but not a number: shown as missing
        if absent_as_nan:
            b[b == MISSING_BITS] = _NAN_BITS
        if keep is not None:
            col = _array("d", b[keep])
        del b
        return col

    s = RunStore()
    s.steps = _array("q", (step_f if keep is None else step_f[keep]).astype(np.int64))
    del step_bits, step_f, step_col
    s.times = take(("time", None), absent_as_nan=True)
    for k in SCALAR_FIELDS:
        s.columns[k] = _column(np, take((k, None)), "d")
    for st in STAGES:
        col = out.pop(("stage_s", st), None)
        if col is None:
            col = _array("f", _absent(np, n, True))
        if keep is not None:
            col = _array("f", np.frombuffer(col, dtype="<f4")[keep])
        s.stages[st] = _column(np, col, "f", True)
    for f in list(out):
        name, sub = f
        if sub is not None and name in _RANK_SET:
            name = f"{name}.{sub}"  # a data-parallel run's per-rank map, as the store names it
        elif sub is not None or name in _NOT_EXTRA:
            out.pop(f)
            continue
        if len(s.extra) >= MAX_EXTRA_COLUMNS:
            out.pop(f)
            continue
        c = _column(np, take(f), "d")
        if c.present:
            s.columns[name] = c
            s.extra.append(name)
    return s, skipped


_NAN_BITS = struct.unpack("<Q", struct.pack("<d", math.nan))[0]


def _absent(np, n: int, stage: bool) -> bytes:
    """n values of a field the rows lack: MISSING (a stage time: NaN, float32)."""
    return np.full(n, math.nan, dtype=np.float32) if stage else np.full(n, MISSING_BITS, "<u8")


def _array(typecode: str, values) -> array:
    """An array.array holding a contiguous numpy array's values (one copy, no bytes in between)."""
    a = array(typecode)
    a.frombytes(_raw(values))
    return a


def _raw(values) -> memoryview:
    """A contiguous numpy array's bytes, without copying them."""
    return memoryview(values).cast("B")


def _column(np, values: array, typecode: str, sums: bool = False) -> Column:
    """A store Column over `values` with its block summaries computed in bulk (as `Column.extend`
    would). No numpy view of `values` outlives this call: the live feed appends to it later."""
    c = Column(typecode, sums)
    c.values = values
    v64 = np.frombuffer(values, dtype="<f8") if typecode == "d" else np.frombuffer(values, "<f4").astype(np.float64)
    if typecode == "d":
        missing = v64.view("<u8") == MISSING_BITS
        c.present = int(len(v64) - missing.sum())
    else:
        missing = np.zeros(len(v64), dtype=bool)
        c.present = 0
    nb = len(v64) // BLOCK
    nan = np.isnan(v64)
    any_nan, any_inf = bool(nan.any()), bool(np.isinf(v64).any())
    nan &= ~missing  # a NaN the record holds (a missing field is not marked)
    step = 1024  # blocks summarised per pass: a few MB of temporaries, whatever the run's length
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        blk = v64[b0 * BLOCK : b1 * BLOCK].reshape(b1 - b0, BLOCK)
        flags = np.zeros(b1 - b0, dtype=np.int8)
        if any_inf:  # the finite min/max: Inf masked out
            fin = np.isfinite(blk)
            lo = np.where(fin, blk, math.inf).min(axis=1)
            hi = np.where(fin, blk, -math.inf).max(axis=1)
            flags |= (blk == math.inf).any(axis=1) * np.int8(FLAG_POS_INF)
            flags |= (blk == -math.inf).any(axis=1) * np.int8(FLAG_NEG_INF)
        else:  # fmin/fmax skip NaN; a block of NaN only gives NaN: nothing finite (min > max)
            lo, hi = np.fmin.reduce(blk, axis=1), np.fmax.reduce(blk, axis=1)
            if any_nan:
                lo[np.isnan(lo)], hi[np.isnan(hi)] = math.inf, -math.inf
        if any_nan:
            flags |= nan[b0 * BLOCK : b1 * BLOCK].reshape(b1 - b0, BLOCK).any(axis=1) * np.int8(FLAG_NAN)
        c.bmin.frombytes(_raw(lo))
        c.bmax.frombytes(_raw(hi))
        c.bflags.frombytes(_raw(flags))
        if sums and c.bsum is not None:
            finite_sums = np.where(np.isfinite(blk), blk, 0.0).sum(axis=1) if any_nan or any_inf else blk.sum(axis=1)
            c.bsum.frombytes(_raw(finite_sums))
    return c
