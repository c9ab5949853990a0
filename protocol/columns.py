"""The step log's columnar side file (`steps.cols`): every record's numbers as fixed-width rows.

Decoding a msgpack map of ~30 keys costs ~4 us a record in Python, so a monitor that opens a
1M-step run by decoding it needs seconds. Whoever writes the step log (`StepLogWriter`) also
appends one row per frame here: the record's numbers as float64 in a fixed column order, so
a reader loads a whole history with a few array operations. The step log stays the source
of truth:

- a row names the frame it was made from (its end offset and payload length) and carries the
  crc32 of every log byte up to that frame's end, so a reader checks the rows against the
  log's own bytes (one running crc32 over the log, at C speed) and stops trusting the file
  at the first row that does not match (a damaged side file or log, a truncated log, a resume);
- every row carries a checksum of its own words (any single flipped bit is caught);
- the file is rebuildable from the log (`ColumnWriter` does it when it finds the file
  missing, stale or damaged) and a reader never needs it: it reads the log from where the
  trusted rows end.

Layout (little-endian; protocol/FORMAT.md):

    segment := MAGIC(8) | u64 header length | header JSON, zero-padded to 8 | u64 crc32 of the JSON
               | row*
    row     := u64 frame end offset | u64 (log crc << 32 | payload length) | u64 checksum
               | f64 value per field of the header

`log crc` is zlib's crc32 of the log's bytes from offset 0 to the frame's end. A segment's
header lists its fields as `[name, sub]` pairs: `[key, null]` for a top-level number,
`[key, subkey]` for a number one map down (`stage_s`'s stages). A new key in a record starts
a new segment whose fields are the old ones plus the new. A field a record lacks holds the
MISSING NaN; a key present with a value that is not a number (a string, a bool, null, a
list) holds the NONNUM NaN. Ints are stored as float64 (as every reader of the kit converts
them); a step no float64 holds exactly stops the side file there.
"""

from __future__ import annotations

import json
import operator
import os
import struct
import zlib
from collections.abc import Iterable
from typing import Any

from .catalogue import as_number
from .safeio import StrPath, open_run_fd, open_run_file

MAGIC = b"RKCOLS1\n"
MAGIC_U64 = int.from_bytes(MAGIC, "little")  # ~7e17: never a frame end offset
ROW_HEAD_WORDS = 3  # end offset, log crc | payload length, checksum
MAX_FIELDS = 1024  # a record with more numbers than this stops the side file
MAX_HEADER_BYTES = 16 + 64 * MAX_FIELDS + 1032  # a segment header is never longer (magic, lengths, JSON, crc)
EXACT_INT = 1 << 53  # a step beyond this is not exact in float64
MISSING_BITS = 0x7FF8_DEAD_0000_0000  # the field is absent from the record
NONNUM_BITS = 0x7FF8_DEAD_0000_0001  # the field is present but is not a number
MISSING = struct.unpack("<d", struct.pack("<Q", MISSING_BITS))[0]
NONNUM = struct.unpack("<d", struct.pack("<Q", NONNUM_BITS))[0]
M64 = (1 << 64) - 1
# one odd multiplier per word: sum(word * K) mod 2^64 changes with any single flipped bit
# (multiplying by an odd number is a bijection mod 2^64); a reader computes it with numpy
_GOLDEN = 0x9E3779B97F4A7C15
K = tuple((((2 * i + 1) * _GOLDEN) & M64) | 1 for i in range(ROW_HEAD_WORDS + MAX_FIELDS))
_K_SUMMED = K[:2] + K[3:]  # the checksum word itself is not summed

Field = tuple[str, "str | None"]


def columns_path(log_path: StrPath) -> str:
    """`steps.cols` beside `steps.msgpack`."""
    head, name = os.path.split(os.fspath(log_path))
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return os.path.join(head, stem + ".cols")


def row_checksum(words: Iterable[int]) -> int:
    """The checksum of a row's words without its checksum word (end, log crc|length, values...)."""
    total: int = sum(map(operator.mul, words, _K_SUMMED))
    return total & M64


def encode_header(fields: list[Field]) -> bytes:
    body = json.dumps([list(f) for f in fields], separators=(",", ":")).encode()
    body += b"\x00" * (-len(body) % 8)
    return MAGIC + struct.pack("<Q", len(body)) + body + struct.pack("<Q", zlib.crc32(body))


def decode_header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[list[Field], int] | None:
    """(fields, offset of the first row) of the segment header at `pos`, or None if it is not one."""
    if bytes(buf[pos : pos + 8]) != MAGIC or len(buf) - pos < 24:
        return None
    (n,) = struct.unpack_from("<Q", buf, pos + 8)
    end = pos + 16 + n + 8
    if n % 8 or 16 + n + 8 > MAX_HEADER_BYTES or end > len(buf):
        return None
    body = bytes(buf[pos + 16 : pos + 16 + n])
    if struct.unpack_from("<Q", buf, pos + 16 + n)[0] != zlib.crc32(body):
        return None
    try:
        raw = json.loads(body.rstrip(b"\x00"))
        fields = [(str(a), None if b is None else str(b)) for a, b in raw]
    except (ValueError, TypeError):
        return None
    return fields, end


def flatten(record: dict[Any, Any]) -> dict[Field, float] | None:
    """A record's fields and values, or None when the side file cannot hold it exactly."""
    out: dict[Field, float] = {}
    for k, v in record.items():
        if type(v) is float and type(k) is str and k != "step":  # most values: as_number(v) is v
            out[(k, None)] = v
            continue
        if not isinstance(k, str):
            continue
        if isinstance(v, dict):
            for sk, sv in v.items():
                if isinstance(sk, str):
                    x = sv if type(sv) is float else as_number(sv)
                    out[(k, sk)] = NONNUM if x is None else x
            continue
        if k == "step":  # placed on charts only when it is an int: a float step is not a number here
            if type(v) is not int:
                out[(k, None)] = NONNUM
                continue
            if not -EXACT_INT <= v <= EXACT_INT:
                return None
        x = as_number(v)
        out[(k, None)] = NONNUM if x is None else x
    return out


class ColumnWriter:
    """Appends one row per step-log frame. Never raises: any failure stops the side file at its
    last good row (readers then read the rest from the log)."""

    def __init__(self, path: StrPath, root: StrPath, log_path: StrPath, log_size: int):
        self.path = os.fspath(path)
        self.root = root
        self.fields: list[Field] = []
        self._index: dict[Field, int] = {}
        self._row = struct.Struct("<0d")
        self.end = 0  # the log offset the rows cover up to
        self.log_crc = 0  # crc32 of the log's bytes [0, end)
        self.broken = False
        self._fd = -1
        try:
            self._fd = open_run_fd(root, path, os.O_RDWR | os.O_CREAT, 0o644)
            self._open(log_path, log_size)
        except Exception:
            self._stop()

    # -- opening: continue a file that matches the log, else rebuild it ------------------

    def _open(self, log_path: StrPath, log_size: int) -> None:
        size = os.fstat(self._fd).st_size
        if log_size and size:
            kept = self._continue_at(size, log_size)
            if kept is not None:
                os.ftruncate(self._fd, kept)
                os.lseek(self._fd, kept, os.SEEK_SET)
                if self.end < log_size:
                    self._catch_up(log_path, log_size)
                return
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.fields, self._index, self.end, self.log_crc = [], {}, 0, 0
        if log_size:
            self._catch_up(log_path, log_size)

    def _continue_at(self, size: int, log_size: int) -> int | None:
        """Where to append, if the file's last segment ends in a row this log still holds."""
        found = _last_segment(self._fd, size)
        if found is None:
            return None
        fields, rows_at = found
        width = 8 * (ROW_HEAD_WORDS + len(fields))
        n = (size - rows_at) // width
        lo, hi, best = 0, n - 1, None  # the last row whose frame ends at or before log_size
        while lo <= hi:
            mid = (lo + hi) // 2
            end = struct.unpack("<Q", os.pread(self._fd, 8, rows_at + mid * width))[0]
            if end <= log_size:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is None:
            return None
        row = os.pread(self._fd, width, rows_at + best * width)
        words = struct.unpack(f"<{width // 8}Q", row)
        if row_checksum(words[:2] + words[3:]) != words[2]:
            return None
        self._set_fields(fields)
        self.end, self.log_crc = words[0], words[1] >> 32
        return rows_at + (best + 1) * width

    def catch_up(self, log_path: StrPath) -> None:
        """Rows for the whole frames the log holds now after `end`, for a log someone else
        appends to (the monitor's mirror of a remote run): a frame still being written is
        taken by a later call. Never raises; a damaged frame stops the side file there."""
        if self.broken or self._fd < 0:
            return
        try:
            self._catch_up(log_path, None)
        except Exception:
            self._stop()

    def _catch_up(self, log_path: StrPath, log_size: int | None) -> None:
        """Rows for the log's frames after `self.end` (a side file older than its log, or none),
        up to `log_size` (None: wherever the log ends now)."""
        from .steplog import StepLogTailer  # steplog imports this module

        tailer = StepLogTailer(log_path, start_offset=self.end, with_offsets=True, root=self.root, at_frame=True)
        with open_run_file(self.root, log_path, "rb") as f:
            while not self.broken:
                batch = tailer.poll(5000)
                if not batch:
                    break
                for start, end, rec in batch:
                    if start != self.end:
                        self._stop()  # a damaged frame: rows must cover the log without gaps
                        return
                    if log_size is not None and end > log_size:
                        return  # the log grew while it was read: the rest is for a later call
                    f.seek(start)
                    frame = f.read(end - start)
                    if len(frame) != end - start:
                        self._stop()  # the log shrank under us
                        return
                    self.append(rec, frame)

    # -- appending ------------------------------------------------------------------------

    def _set_fields(self, fields: list[Field]) -> None:
        self.fields = list(fields)
        self._index = {f: i for i, f in enumerate(self.fields)}
        self._row = struct.Struct(f"<{len(self.fields)}d")

    def append(self, record: dict[Any, Any], frame: bytes) -> None:
        """One row for `record`, whose frame (`frame`, its bytes) was just appended to the log."""
        if self.broken:
            return
        try:
            flat = flatten(record)
            if flat is None:
                self._stop()
                return
            frame_end = self.end + len(frame)
            log_crc = zlib.crc32(frame, self.log_crc)
            new = [f for f in flat if f not in self._index]
            out = b""
            if new:
                if len(self.fields) + len(new) > MAX_FIELDS:
                    self._stop()
                    return
                self._set_fields(self.fields + new)
                out = encode_header(self.fields)
            values = [MISSING] * len(self.fields)
            index = self._index
            for f, v in flat.items():
                values[index[f]] = v
            packed = self._row.pack(*values)
            head = (frame_end, (log_crc << 32) | (len(frame) - 16))
            words = struct.unpack(f"<{len(values)}Q", packed)
            checksum = row_checksum(head + words)
            out += struct.pack("<3Q", *head, checksum) + packed
            n = os.write(self._fd, out)
            while n < len(out):
                n += os.write(self._fd, out[n:])
            self.end, self.log_crc = frame_end, log_crc
        except Exception:
            self._stop()

    def _stop(self) -> None:
        """No more rows: the file keeps the rows it has (each one checked by readers)."""
        self.broken = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _last_segment(fd: int, size: int) -> tuple[list[Field], int] | None:
    """The last valid segment header of the file: (fields, offset of its first row)."""
    chunk = 1 << 20
    hi = size
    while hi > 0:
        lo = max(0, hi - chunk)
        buf = os.pread(fd, hi - lo + (len(MAGIC) - 1 if hi < size else 0), lo)
        p = len(buf)
        while True:
            p = buf.rfind(MAGIC, 0, p)
            if p < 0:
                break
            head = os.pread(fd, MAX_HEADER_BYTES, lo + p)
            got = decode_header(head, 0)
            if got is not None:
                return got[0], lo + p + got[1]
        hi = lo
    return None
