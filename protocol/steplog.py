"""The framed step log (`steps.msgpack`): writer, reader and tailer.

Each record is one frame, in the style of TFRecord (see FORMAT.md):

    u64 LE payload length | u32 LE masked crc32 of those 8 bytes | payload | u32 LE masked crc32 of payload

The payload is one msgpack map. Readers treat an incomplete last frame as "not yet"
(they wait at the same offset), resynchronise after a bad length, skip a bad payload
by its trusted length, count corruption instead of raising it, and start again from
the beginning when the file shrank (a resume truncated it). The file is opened only as a
regular file inside the run dir (`protocol.safeio`): a symlink or FIFO is refused.
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack

from .columns import ColumnWriter, columns_path
from .safeio import RunDirError, StrPath, open_run_fd, open_run_file

MAX_PAYLOAD = 1 << 20  # a frame over 1 MiB is corrupt
HEADER = 12  # length (8) + length crc (4)
TRAILER = 4  # payload crc
READ_CHUNK = 4 << 20  # bytes read per poll at most, so memory stays bounded
_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HDR = struct.Struct("<QI")
_NONZERO = re.compile(rb"[^\x00]")


def masked_crc(data: bytes | bytearray | memoryview) -> int:
    crc = zlib.crc32(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_frame(record: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(record, use_bin_type=True, use_single_float=False)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record encodes to {len(payload)} bytes, over the 1 MiB frame limit")
    header = _U64.pack(len(payload))
    return b"".join((header, _U32.pack(masked_crc(header)), payload, _U32.pack(masked_crc(payload))))


class StepLogWriter:
    """Appends records, one `write` per frame, flushed to the OS at once (survives SIGKILL).

    `fdatasync` runs on a timer (`sync_interval_s`) and whenever `sync()` is called
    (the trainer calls it at every checkpoint). With `columns` (the default) it also keeps the
    columnar side file `steps.cols` (protocol/columns.py): a row per frame, for readers that
    load whole histories; a failure there never affects the log.
    """

    def __init__(self, path: StrPath, sync_interval_s: float = 5.0, root: StrPath | None = None, columns: bool = True):
        self.path = Path(path)
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.sync_interval_s = sync_interval_s
        self._fd = open_run_fd(self.root, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()
        size = os.fstat(self._fd).st_size
        self.columns = ColumnWriter(columns_path(path), self.root, path, size) if columns else None

    def write(self, record: dict[str, Any]) -> None:
        frame = encode_frame(record)
        n = os.write(self._fd, frame)
        while n < len(frame):  # a short write is rare (signals, full pipes) but possible
            n += os.write(self._fd, frame[n:])
        if self.columns is not None:
            self.columns.append(record, frame)
        if time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        os.fdatasync(self._fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
                if self.columns is not None:
                    self.columns.close()

    def __enter__(self) -> StepLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TailStats:
    records: int = 0  # good records returned so far
    corrupt_frames: int = 0  # frames lost to corruption (bad length, bad payload, bad map)
    skipped_bytes: int = 0  # bytes passed over while resynchronising
    resets: int = 0  # times the file shrank or was replaced and was read again


class StepLogTailer:
    """Reads new frames from a step log as it grows. Never raises on bad bytes.

    `poll()` returns the complete records that arrived since the last call. An incomplete
    last frame stays unread until it is complete. Corruption is counted in `stats`.
    A file that shrank, was replaced, or whose already-read bytes changed (a resume
    truncated and rewrote it) is read again from the start (`stats.resets`).
    With `start_offset`, reading starts there and aligns to the next valid frame
    without counting the bytes before it as corruption (used to show a run's tail first);
    with `at_frame` too, the offset is known to start a frame and bad bytes there count.
    If the file is refused (a symlink, a FIFO, outside the run dir `root`, default the
    file's directory), `poll` returns [] and `error` holds the one-line reason (None
    again once it opens); a missing file is just "nothing yet".
    """

    def __init__(
        self,
        path: StrPath,
        start_offset: int = 0,
        with_offsets: bool = False,
        root: StrPath | None = None,
        at_frame: bool = False,
    ):
        self.path = Path(path)
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.error: str | None = None
        self.stats = TailStats()
        self.with_offsets = with_offsets
        self._buf: bytes | bytearray = b""
        self._buf_start = start_offset  # file offset of _buf[0]
        self._ident: tuple[int, int] | None = None
        # skipping to the first frame is not corruption, unless start_offset is known to be a frame's start
        self._aligning = start_offset > 0 and not at_frame
        self._in_resync = False  # the bad bytes being scanned were already counted
        self._seen_tail = b""  # last bytes consumed, to notice a rewrite of what was read

    @property
    def offset(self) -> int:
        """File offset of the first byte not yet consumed (the start of any pending frame)."""
        return self._buf_start

    def poll(self, max_records: int | None = None) -> list[Any]:
        """New complete records (or `(start, end, record)` tuples with `with_offsets`)."""
        out: list[Any] = []
        try:
            f = open_run_file(self.root, self.path, "rb", buffering=0)
        except RunDirError as e:
            self.error = str(e)
            return out
        except OSError:
            return out
        self.error = None
        with f:
            try:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino)
                if self._ident is not None and (
                    ident != self._ident or st.st_size < self._buf_start + len(self._buf) or not self._tail_unchanged(f)
                ):
                    self._reset()
                self._ident = ident
                size = st.st_size
                while max_records is None or len(out) < max_records:
                    got = self._fill(f, size)
                    before = len(out)
                    self._parse(out, max_records)
                    if not got and len(out) == before:
                        break
            except OSError:
                pass
        self.stats.records += len(out)
        return out

    def _fill(self, f: IO[bytes], size: int) -> int:
        """Append up to READ_CHUNK - len(buffer) new bytes; return how many were read.

        The pending bytes and the new ones go into one buffer allocated once, so a poll
        holds at most about READ_CHUNK bytes whatever the file holds.
        """
        old = self._buf
        k = len(old)
        read_from = self._buf_start + k
        want = min(READ_CHUNK - k, size - read_from)
        if want <= 0:
            return 0
        nb = bytearray(k + want)
        nb[:k] = old
        f.seek(read_from)
        with memoryview(nb) as view:
            got = f.readinto(view[k:]) or 0  # type: ignore[attr-defined]
        if got < want:  # the file shrank under us; the next poll notices
            del nb[k + got :]
        self._buf = nb
        return got

    def _tail_unchanged(self, f: IO[bytes]) -> bool:
        k = len(self._seen_tail)
        if not k:
            return True
        f.seek(self._buf_start - k)
        return f.read(k) == self._seen_tail

    def _reset(self) -> None:
        self._buf = b""
        self._buf_start = 0
        self._aligning = False
        self._in_resync = False
        self._seen_tail = b""
        self.stats.resets += 1

    def _parse(self, out: list[Any], max_records: int | None) -> None:
        # The hot loop of every reader: locals bound once, crc masking inlined, the payload
        # crc-checked and decoded straight from a memoryview (no copies).
        buf = self._buf
        n = len(buf)
        pos = 0
        unpack_hdr = _HDR.unpack_from
        unpack_u32 = _U32.unpack_from
        crc32 = zlib.crc32
        unpackb = msgpack.unpackb
        delta = _MASK_DELTA
        limit = MAX_PAYLOAD
        append = out.append
        with_offsets = self.with_offsets
        base = self._buf_start
        stats = self.stats
        room = -1 if max_records is None else max_records - len(out)
        mv = memoryview(buf)
        try:
            while n - pos >= HEADER and room:
                length, hcrc = unpack_hdr(buf, pos)
                c = crc32(mv[pos : pos + 8])
                if not 0 < length <= limit or (((c >> 15) | (c << 17)) + delta) & 0xFFFFFFFF != hcrc:
                    pos = self._resync(buf, mv, pos)
                    continue
                start = pos + HEADER
                stop = start + length
                end = stop + TRAILER
                if end > n:
                    break  # incomplete frame: wait at this offset
                self._in_resync = False
                self._aligning = False
                payload = mv[start:stop]
                c = crc32(payload)
                if (((c >> 15) | (c << 17)) + delta) & 0xFFFFFFFF != unpack_u32(buf, stop)[0]:
                    stats.corrupt_frames += 1  # skip it by its trusted length
                else:
                    try:
                        rec = unpackb(payload, raw=False, strict_map_key=False)
                    except Exception:
                        rec = None
                    if type(rec) is not dict:
                        stats.corrupt_frames += 1  # crc fine but not one msgpack map
                    else:
                        append((base + pos, base + end, rec) if with_offsets else rec)
                        room -= 1
                pos = end
        finally:
            mv.release()
        if pos:
            self._seen_tail = (self._seen_tail + bytes(buf[max(0, pos - 16) : pos]))[-16:]
            self._buf = buf[pos:]
            self._buf_start += pos

    def _resync(self, buf: bytes | bytearray, mv: memoryview, pos: int) -> int:
        """Scan forward from a bad header to the next valid header.

        A valid length is 1..2^20, so bytes 3..7 of the u64 are zero and byte 2 is at
        most 0x10: only positions followed by such bytes are candidates (found with
        `bytes.find`, in C), and only candidates get a crc check. A run of zeros (a
        zero-filled tail) is stepped over in one regex search, without copying.
        Returns where parsing resumes; bytes that may still begin a header stay for later.
        Linear in the bytes scanned whatever they are.
        """
        if not self._in_resync and not self._aligning:
            self.stats.corrupt_frames += 1  # the frame whose header is bad is lost
        self._in_resync = True
        n = len(buf)
        p = pos + 1
        found = -1
        find = buf.find
        crc32 = zlib.crc32
        unpack_hdr = _HDR.unpack_from
        while n - p >= HEADER:
            z = find(b"\x00\x00\x00\x00\x00", p + 3)
            if z < 0:
                break
            cand = z - 3  # the first position >= p whose bytes 3..7 are zero
            if n - cand < HEADER:
                break
            if buf[cand + 2] > 0x10:
                p = cand + 1
                continue
            if not (buf[cand] or buf[cand + 1] or buf[cand + 2]):
                # a zero length: skip the whole run of zeros; a header may start at its
                # last two bytes (a length whose low bytes are 0 but byte 2 is not)
                m = _NONZERO.search(buf, cand)
                nz = m.start() if m else n
                p = max(cand + 1, nz - 2)
                continue
            length, hcrc = unpack_hdr(buf, cand)
            c = crc32(mv[cand : cand + 8])
            if 0 < length <= MAX_PAYLOAD and (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF == hcrc:
                found = cand
                break
            p = cand + 1
        new_pos = found if found >= 0 else max(pos + 1, n - HEADER + 1)
        if not self._aligning:
            self.stats.skipped_bytes += new_pos - pos
        return new_pos


def read_steplog(path: StrPath, root: StrPath | None = None) -> tuple[list[dict[str, Any]], TailStats]:
    """Every complete record of a step log, and what was lost to corruption. ([], stats) if
    the file is missing; `RunDirError` (one line) if it is refused (a symlink, a FIFO...)."""
    t = StepLogTailer(path, root=root)
    records: list[dict[str, Any]] = []
    while True:
        batch = t.poll()
        if not batch:
            break
        records.extend(batch)
    if t.error is not None:
        raise RunDirError(t.error)
    return records, t.stats


def iter_frames(path: StrPath, root: StrPath | None = None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """`(start_offset, end_offset, record)` for every complete record, in file order.
    Raises `RunDirError` if the file is refused (see `read_steplog`)."""
    t = StepLogTailer(path, with_offsets=True, root=root)
    while True:
        batch = t.poll()
        if t.error is not None:
            raise RunDirError(t.error)
        if not batch:
            return
        yield from batch


def truncate_after_step(path: StrPath, step: int, root: StrPath | None = None) -> list[dict[str, Any]]:
    """Cut the log after the last record with `record["step"] <= step`; return what was cut.

    Used by resume: the records of steps after the checkpoint are computed again, so
    the old ones are handed back to be kept aside and compared, and the log is truncated
    in place (tailers see it shrink and read it again from the start).
    """
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    try:
        f = open_run_file(root, path, "r+b", buffering=0)  # refused before anything is read
    except FileNotFoundError:
        return []
    with f:
        keep_end = 0
        removed: list[dict[str, Any]] = []
        for _start, end, rec in iter_frames(path, root=root):
            s = rec.get("step")
            if isinstance(s, int) and not isinstance(s, bool) and s <= step and not removed:
                keep_end = end
            else:
                removed.append(rec)
        if keep_end < os.fstat(f.fileno()).st_size:
            f.truncate(keep_end)
            os.fsync(f.fileno())
    return removed
