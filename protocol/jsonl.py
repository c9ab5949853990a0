"""The JSONL mirror (`steps.jsonl`, `events.jsonl`): one JSON object per line.

NaN and the infinities are written as the strings "NaN", "Infinity" and "-Infinity"
(never null: a NaN loss must stay visible) and read back as floats. Python's float
repr is the shortest string that round-trips, so every other float comes back exactly.
Readers take complete lines only: a torn last line is "not yet".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_FROM_STR = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(v):
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return _TO_STR.get(v, v)
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v):
    if isinstance(v, str):
        return _FROM_STR.get(v, v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def dumps(record: dict) -> str:
    """One line of JSON (no newline), non-finite floats as strings."""
    return json.dumps(_encode(record), allow_nan=False, separators=(",", ":"))


def loads(line: str) -> dict:
    return _decode(json.loads(line))


class JsonlWriter:
    """Appends one complete line per record with a single `write`, flushed at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict) -> None:
        data = (dumps(record) + "\n").encode()
        n = os.write(self._fd, data)
        while n < len(data):
            n += os.write(self._fd, data[n:])

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete, parseable line; a torn last line or a bad line is passed over."""
    out: list[dict] = []
    try:
        data = Path(path).read_bytes()
    except OSError:
        return out
    end = data.rfind(b"\n")
    for line in data[: end + 1].splitlines():
        if not line.strip():
            continue
        try:
            rec = loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class JsonlTailer:
    """Complete new lines of a growing JSONL file; re-reads from the start if it shrank."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self.bad_lines = 0

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._offset:
                    self._offset = 0
                f.seek(self._offset)
                data = f.read(min(size - self._offset, 8 << 20))
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        out = []
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                rec = loads(line.decode())
            except (ValueError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def truncate_after_step(path: str | os.PathLike, step: int) -> list[dict]:
    """Cut a steps.jsonl after the last line with step <= `step`; return the cut records."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    keep = 0
    pos = 0
    removed: list[dict] = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        try:
            rec = loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            rec = None
        if not removed and isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep = nl + 1
        elif isinstance(rec, dict):
            removed.append(rec)
        pos = nl + 1
    if keep < len(data):
        with open(p, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return removed
