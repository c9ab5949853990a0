"""Bitwise comparison of step records, and the `resume_check` after a resume.

Two uses:

* `first_difference(a, b)` compares two step logs field by field over the
  deterministic fields of the catalogue; `trainerd verify m1` uses it to prove that
  two runs with the same seed are the same run, bit for bit.
* `ResumeChecker`: after a crash at step m and a resume from the checkpoint at step
  k < m, the trainer truncates the step log after k and keeps the removed records
  (steps k+1..m) aside. The checker is fed every recomputed record; once the new
  records reach the old last step (or the run ends earlier) it writes ONE
  `resume_check` event to events.jsonl: identical, or the first step and field that
  differ with both values.

"Bitwise" means what it says: floats are compared by their IEEE-754 bit patterns
(struct "<d"), so a NaN equals a NaN with the same bits (a reproducible NaN is still
reproducible) and -0.0 differs from 0.0 (a sign flip is a real difference). Python's
`==` gets both of these wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from protocol import catalogue
from protocol.jsonl import read_jsonl
from protocol.rundir import RunPaths, append_event

_F64 = struct.Struct("<d")
MISSING = "<missing>"


def value_bits(v) -> tuple:
    """A key that is equal for two values exactly when they are bitwise the same.

    Types matter too: the int 1 and the float 1.0 are different records (msgpack keeps
    the type, and the catalogue fixes it per field).
    """
    if v is None:
        return ("none",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, float):
        return ("f64", _F64.pack(v))
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, dict):
        return ("map", tuple(sorted((str(k), value_bits(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return ("list", tuple(value_bits(x) for x in v))
    return (type(v).__name__, v)


def bitwise_equal(a, b) -> bool:
    return value_bits(a) == value_bits(b)


def float_hex_bits(v) -> str | None:
    """'0x3f847ae147ae147b' for a float (shows NaN payloads and the sign of zero); None otherwise."""
    if isinstance(v, float):
        return "0x" + _F64.pack(v)[::-1].hex()
    return None


def show_value(v) -> str:
    """A value for a one-line message: repr plus the bit pattern for floats (two NaNs
    or 0.0/-0.0 look alike in repr, never in bits)."""
    if v is MISSING:
        return MISSING
    if isinstance(v, float):
        return f"{v!r} ({float_hex_bits(v)})"
    return repr(v)


def _json_value(v):
    """A field value as events.jsonl can hold it (protocol.jsonl writes NaN/Inf as strings)."""
    if v is MISSING:
        return None
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return v


@dataclass(frozen=True)
class Difference:
    """The first place two step logs disagree."""

    step: int
    field: str
    a: object  # value in the first log (the old records, or run A), or MISSING
    b: object  # value in the second log, or MISSING
    a_name: str = "a"
    b_name: str = "b"

    def describe(self) -> str:
        return (
            f"step {self.step} field {self.field!r}: {self.a_name} {show_value(self.a)} "
            f"!= {self.b_name} {show_value(self.b)}"
        )

    def to_fields(self) -> dict:
        return {
            "step": self.step,
            "field": self.field,
            self.a_name: _json_value(self.a),
            self.b_name: _json_value(self.b),
            f"{self.a_name}_bits": float_hex_bits(self.a),
            f"{self.b_name}_bits": float_hex_bits(self.b),
        }


def _by_step(records: Iterable[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        s = r.get("step")
        if isinstance(s, int) and s not in out:  # duplicates are check_step_sequence's job
            out[s] = r
    return out


def compare_record(
    step: int, a: dict, b: dict, fields: list[str], a_name: str = "a", b_name: str = "b"
) -> Difference | None:
    """The first deterministic field (in catalogue order) where two records of one step differ."""
    for f in fields:
        va = a.get(f, MISSING)
        vb = b.get(f, MISSING)
        if va is MISSING and vb is MISSING:
            continue  # an optional field (gold_reward_mean) neither record has
        if va is MISSING or vb is MISSING or value_bits(va) != value_bits(vb):
            return Difference(step, f, va, vb, a_name, b_name)
    return None


def first_difference(
    a_records: Iterable[dict],
    b_records: Iterable[dict],
    fields: list[str] | None = None,
    steps: Iterable[int] | None = None,
    a_name: str = "a",
    b_name: str = "b",
) -> Difference | None:
    """The first (lowest step, then catalogue order) bitwise difference between two logs.

    Compares the steps in `steps` if given, else every step either log has; a step one
    log lacks is a difference in field 'step'. None if the logs are bitwise equal.
    """
    fields = list(fields) if fields is not None else catalogue.deterministic_fields()
    a = _by_step(a_records)
    b = _by_step(b_records)
    wanted = sorted(set(steps) if steps is not None else set(a) | set(b))
    for s in wanted:
        ra, rb = a.get(s), b.get(s)
        if ra is None or rb is None:
            return Difference(
                s, "step", s if ra is not None else MISSING, s if rb is not None else MISSING, a_name, b_name
            )
        d = compare_record(s, ra, rb, fields, a_name, b_name)
        if d is not None:
            return d
    return None


def check_step_sequence(records: Iterable[dict], first_step: int = 1) -> str | None:
    """None if the steps are first_step, first_step+1, ... with no gap and no duplicate;
    else a one-line description of the first problem."""
    expected = first_step
    seen: set[int] = set()
    for i, r in enumerate(records):
        s = r.get("step")
        if not isinstance(s, int):
            return f"record {i} has no integer step ({s!r})"
        if s in seen:
            return f"duplicate step {s} (record {i})"
        if s != expected:
            return f"gap: expected step {expected}, found step {s} (record {i})"
        seen.add(s)
        expected += 1
    return None


class ResumeChecker:
    """Compares recomputed records with the ones a resume removed, and reports once.

    The trainer creates it at resume with the removed records and the checkpoint step,
    calls `observe(record)` after writing each new record and `finish()` when the run
    ends (any way but a crash). The `resume_check` event is written when the new records
    reach the old last step, or at `finish()` if the run ends before that. The event:

        {"event": "resume_check", "result": "identical" | "differs" | "nothing_to_compare",
         "identical": bool, "resumed_from": k, "old_last_step": m,
         "steps_compared": n, "compared_from": k+1, "compared_to": j,
         "complete": j >= m, "step"/"field"/"old"/"new"/"old_bits"/"new_bits" (on a
         difference), "message": one line}
    """

    def __init__(
        self,
        paths: RunPaths | None,
        old_records: Iterable[dict],
        resumed_from: int,
        fields: list[str] | None = None,
        use_earlier_aside: bool = True,
    ):
        self.paths = paths
        self.resumed_from = resumed_from
        self.fields = list(fields) if fields is not None else catalogue.deterministic_fields()
        # Only the steps the resume recomputes: anything at or before the checkpoint
        # was not removed by a correct truncation, but be strict about what we compare.
        self.old = {s: r for s, r in _by_step(old_records).items() if s > resumed_from}
        # A run that crashed again during a resume, before it recomputed every removed step,
        # holds the only copy of the later original steps in an earlier aside file: compare
        # with those too, or they would never be checked.
        self.from_earlier_aside: list[int] = []
        if paths is not None and use_earlier_aside:
            for s, r in earlier_aside_records(paths).items():
                if s > resumed_from and s not in self.old:
                    self.old[s] = r
                    self.from_earlier_aside.append(s)
        self.old_last_step = max(self.old) if self.old else resumed_from
        self.compared: list[int] = []
        self.difference: Difference | None = None
        self.event: dict | None = None

    @property
    def done(self) -> bool:
        return self.event is not None

    def observe(self, record: dict) -> dict | None:
        """Compare one recomputed record; returns the event if this record completed the check."""
        if self.done:
            return None
        s = record.get("step")
        if isinstance(s, int) and s in self.old:
            self.compared.append(s)
            if self.difference is None:
                self.difference = compare_record(s, self.old[s], record, self.fields, "old", "new")
        if isinstance(s, int) and s >= self.old_last_step:
            return self._emit()
        return None

    def finish(self) -> dict | None:
        """At the end of the run: report what was compared if the event is still due."""
        if self.done:
            return None
        return self._emit()

    def _emit(self) -> dict:
        fields: dict = {
            "resumed_from": self.resumed_from,
            "from_earlier_resumes": sorted(self.from_earlier_aside),
            "old_last_step": self.old_last_step,
            "steps_compared": len(self.compared),
            "compared_from": min(self.compared) if self.compared else None,
            "compared_to": max(self.compared) if self.compared else None,
            "complete": set(self.compared) >= set(self.old),
        }
        if not self.old:
            fields.update(
                result="nothing_to_compare",
                identical=True,
                message=f"resume check: no steps after checkpoint {self.resumed_from} to compare",
            )
        elif self.difference is not None:
            fields.update(result="differs", identical=False, **self.difference.to_fields())
            fields["message"] = (
                f"resume check: recomputed run DIFFERS from the original at {self.difference.describe()}"
            )
        else:
            span = f"steps {fields['compared_from']}..{fields['compared_to']}" if self.compared else "no steps"
            partial = "" if fields["complete"] else (f" (run ended before old last step {self.old_last_step})")
            fields.update(
                result="identical",
                identical=bool(self.compared),
                message=f"resume check: {span} recomputed bitwise identical{partial}",
            )
            if not self.compared:
                fields["result"] = "not_compared"
                fields["message"] = (
                    f"resume check: run ended before recomputing any of steps {min(self.old)}..{self.old_last_step}"
                )
        self.event = (
            append_event(self.paths, "resume_check", **fields)
            if self.paths is not None
            else {"event": "resume_check", **fields}
        )
        return self.event


ASIDE_GLOB = "resume_from_*_old_steps*.jsonl"  # trainerd.run.lifecycle.old_records_path names them so


def earlier_aside_records(paths: RunPaths) -> dict[int, dict]:
    """Records kept aside by every resume of the run so far, by step; where several files
    hold a step, the one written first wins (the original run's record)."""
    files = sorted(paths.root.glob(ASIDE_GLOB), key=lambda p: (p.stat().st_mtime_ns, p.name))
    out: dict[int, dict] = {}
    for f in files:
        for r in read_jsonl(f):
            s = r.get("step")
            if isinstance(s, int) and s not in out:
                out[s] = r
    return out


def summarize_event(ev: dict) -> str:
    """One line for `trainerd status` from a resume_check event."""
    msg = ev.get("message")
    if isinstance(msg, str) and msg:
        return msg
    return f"resume check: {ev.get('result', 'unknown')}"
