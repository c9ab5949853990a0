"""Helpers for the protocol tests: realistic records and exact (bitwise) comparisons."""

from __future__ import annotations

import math
import random
import struct

from protocol.catalogue import METRICS, STAGES


def make_record(step: int, rng: random.Random | None = None) -> dict:
    """A record with every catalogue field (optional ones too), as the trainer writes it."""
    rng = rng or random.Random(step)
    rec: dict = {}
    for m in METRICS.values():
        if m.kind == "int":
            rec[m.name] = step if m.name == "step" else rng.randrange(0, 1 << 40)
        elif m.kind == "float":
            rec[m.name] = rng.uniform(-5, 5) * 10 ** rng.randint(-6, 4)
        else:
            rec[m.name] = {s: rng.random() for s in STAGES}
    rec["time"] = 1.75e9 + step * 0.731
    return rec


def bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def exactly_equal(a, b, nan_payload: bool = True) -> bool:
    """Deep equality where floats compare by their 64 bits (so NaN == NaN, -0.0 != 0.0).

    With nan_payload=False any NaN equals any NaN (JSONL keeps NaN, not its payload bits).
    """
    if isinstance(a, float) or isinstance(b, float):
        if type(a) is not float or type(b) is not float:
            return False
        if not nan_payload and math.isnan(a) and math.isnan(b):
            return True
        return bits(a) == bits(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(exactly_equal(a[k], b[k], nan_payload) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(exactly_equal(x, y, nan_payload) for x, y in zip(a, b))
    return a == b
