"""The framed step log (`steps.msgpack`): writer, reader and tailer.

Each record is one frame, in the style of TFRecord (see FORMAT.md):

    u64 LE payload length | u32 LE masked crc32 of those 8 bytes | payload | u32 LE masked crc32 of payload

The payload is one msgpack map. Readers treat an incomplete last frame as "not yet"
(they wait at the same offset), resynchronise after a bad length, skip a bad payload
by its trusted length, count corruption instead of raising it, and start again from
the beginning when the file shrank (a resume truncated it).
"""
from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack

MAX_PAYLOAD = 1 << 20  # a frame over 1 MiB is corrupt
HEADER = 12  # length (8) + length crc (4)
TRAILER = 4  # payload crc
READ_CHUNK = 4 << 20  # bytes read per poll at most, so memory stays bounded
_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HDR = struct.Struct("<QI")


def masked_crc(data) -> int:
    crc = zlib.crc32(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


_packer_opts = dict(use_bin_type=True, use_single_float=False)


def encode_frame(record: dict) -> bytes:
    payload = msgpack.packb(record, **_packer_opts)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record encodes to {len(payload)} bytes, over the 1 MiB frame limit")
    header = _U64.pack(len(payload))
    return b"".join((header, _U32.pack(masked_crc(header)), payload, _U32.pack(masked_crc(payload))))


def _decode_payload(payload) -> dict | None:
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return None
    return rec if isinstance(rec, dict) else None


class StepLogWriter:
    """Appends records, one `write` per frame, flushed to the OS at once (survives SIGKILL).

    `fdatasync` runs on a timer (`sync_interval_s`) and whenever `sync()` is called
    (the trainer calls it at every checkpoint).
    """

    def __init__(self, path: str | os.PathLike, sync_interval_s: float = 5.0):
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        frame = encode_frame(record)
        n = os.write(self._fd, frame)
        while n < len(frame):  # a short write is rare (signals, full pipes) but possible
            n += os.write(self._fd, frame[n:])
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
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
    without counting the bytes before it as corruption (used to show a run's tail first).
    """

    def __init__(self, path: str | os.PathLike, start_offset: int = 0, with_offsets: bool = False):
        self.path = Path(path)
        self.stats = TailStats()
        self.with_offsets = with_offsets
        self._buf = b""
        self._buf_start = start_offset  # file offset of _buf[0]
        self._ident: tuple[int, int] | None = None
        self._aligning = start_offset > 0  # skipping to the first frame is not corruption
        self._in_resync = False  # the bad bytes being scanned were already counted
        self._seen_tail = b""  # last bytes consumed, to notice a rewrite of what was read

    @property
    def offset(self) -> int:
        """File offset of the first byte not yet consumed (the start of any pending frame)."""
        return self._buf_start

    def poll(self, max_records: int | None = None) -> list:
        """New complete records (or `(start, end, record)` tuples with `with_offsets`)."""
        out: list = []
        try:
            f = open(self.path, "rb")
        except OSError:
            return out
        with f:
            try:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino)
                if self._ident is not None and (
                    ident != self._ident
                    or st.st_size < self._buf_start + len(self._buf)
                    or not self._tail_unchanged(f)
                ):
                    self._reset()
                self._ident = ident
                size = st.st_size
                while max_records is None or len(out) < max_records:
                    read_from = self._buf_start + len(self._buf)
                    more = b""
                    if read_from < size and len(self._buf) < READ_CHUNK:
                        f.seek(read_from)
                        more = f.read(min(READ_CHUNK - len(self._buf), size - read_from))
                        self._buf += more
                    before = len(out)
                    self._parse(out, max_records)
                    if not more and len(out) == before:
                        break
            except OSError:
                pass
        self.stats.records += len(out)
        return out

    def _tail_unchanged(self, f) -> bool:
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

    def _parse(self, out: list, max_records: int | None) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        unpack_hdr = _HDR.unpack_from
        unpack_u32 = _U32.unpack_from
        mv = memoryview(buf)
        with_offsets = self.with_offsets
        base = self._buf_start
        stats = self.stats
        while n - pos >= HEADER:
            if max_records is not None and len(out) >= max_records:
                break
            length, hcrc = unpack_hdr(buf, pos)
            if length == 0 or length > MAX_PAYLOAD or masked_crc(mv[pos : pos + 8]) != hcrc:
                pos = self._resync(buf, mv, pos)
                continue
            end = pos + HEADER + length + TRAILER
            if end > n:
                break  # incomplete frame: wait at this offset
            self._in_resync = False
            self._aligning = False
            payload = mv[pos + HEADER : end - TRAILER]
            if masked_crc(payload) != unpack_u32(buf, end - TRAILER)[0]:
                stats.corrupt_frames += 1  # skip it by its trusted length
            else:
                rec = _decode_payload(payload)
                if rec is None:
                    stats.corrupt_frames += 1
                elif with_offsets:
                    out.append((base + pos, base + end, rec))
                else:
                    out.append(rec)
            pos = end
        mv.release()
        if pos:
            self._seen_tail = (self._seen_tail + buf[max(0, pos - 16) : pos])[-16:]
            self._buf = buf[pos:]
            self._buf_start += pos

    def _resync(self, buf: bytes, mv: memoryview, pos: int) -> int:
        """Scan forward from a bad header to the next plausible valid header.

        A valid length is 1..2^20, so the five high bytes of the u64 are zero: only
        positions followed by five zero bytes are candidates, and a candidate whose
        three low bytes are zero too is skipped (this keeps a zero-filled tail cheap).
        Returns where parsing resumes; bytes that may still begin a header stay for later.
        """
        if not self._in_resync and not self._aligning:
            self.stats.corrupt_frames += 1  # the frame whose header is bad is lost
        self._in_resync = True
        n = len(buf)
        p = pos + 1
        found = -1
        while n - p >= HEADER:
            z = buf.find(b"\x00\x00\x00\x00\x00", p + 3)
            if z < 0:
                break
            cand = max(z - 3, p)
            if n - cand < HEADER:
                break
            if buf[cand : cand + 3] == b"\x00\x00\x00":
                nz = len(buf) - len(buf[cand:].lstrip(b"\x00"))
                p = max(cand + 1, nz - 2)
                continue
            length, hcrc = _HDR.unpack_from(buf, cand)
            if 0 < length <= MAX_PAYLOAD and masked_crc(mv[cand : cand + 8]) == hcrc:
                found = cand
                break
            p = cand + 1
        new_pos = found if found >= 0 else max(pos + 1, n - HEADER + 1)
        if not self._aligning:
            self.stats.skipped_bytes += new_pos - pos
        return new_pos


def read_steplog(path: str | os.PathLike) -> tuple[list[dict], TailStats]:
    """Every complete record of a step log, and what was lost to corruption."""
    t = StepLogTailer(path)
    records: list[dict] = []
    while True:
        batch = t.poll()
        if not batch:
            break
        records.extend(batch)
    return records, t.stats


def iter_frames(path: str | os.PathLike) -> Iterator[tuple[int, int, dict]]:
    """`(start_offset, end_offset, record)` for every complete record, in file order."""
    t = StepLogTailer(path, with_offsets=True)
    while True:
        batch = t.poll()
        if not batch:
            return
        yield from batch


def truncate_after_step(path: str | os.PathLike, step: int) -> list[dict]:
    """Cut the log after the last record with `record["step"] <= step`; return what was cut.

    Used by resume: the records of steps after the checkpoint are computed again, so
    the old ones are handed back to be kept aside and compared, and the log is truncated
    in place (tailers see it shrink and read it again from the start).
    """
    p = Path(path)
    if not p.exists():
        return []
    keep_end = 0
    removed: list[dict] = []
    for start, end, rec in iter_frames(p):
        s = rec.get("step")
        if isinstance(s, int) and s <= step and not removed:
            keep_end = end
        else:
            removed.append(rec)
    if keep_end < p.stat().st_size:
        with open(p, "r+b") as f:
            f.truncate(keep_end)
            f.flush()
            os.fsync(f.fileno())
    return removed
