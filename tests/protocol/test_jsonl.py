"""The JSONL mirror: exact floats, visible NaN, complete lines only."""

from __future__ import annotations

import json
import math

from protocol_helpers import exactly_equal, make_record

from protocol import jsonl
from protocol.jsonl import JsonlTailer, JsonlWriter, read_jsonl, truncate_after_step


def test_non_finite_written_as_strings_never_null(tmp_path):
    p = tmp_path / "steps.jsonl"
    with JsonlWriter(p) as w:
        w.write(
            {
                "step": 1,
                "policy_loss": math.nan,
                "kl": math.inf,
                "entropy": -math.inf,
                "stage_s": {"rollout": math.nan},
                "xs": [math.inf, 1.5],
            }
        )
    line = p.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    raw = json.loads(line)  # plain JSON: jq and other tools can read it
    assert raw["policy_loss"] == "NaN" and raw["kl"] == "Infinity" and raw["entropy"] == "-Infinity"
    assert raw["stage_s"]["rollout"] == "NaN" and raw["xs"] == ["Infinity", 1.5]
    rec = read_jsonl(p)[0]
    assert math.isnan(rec["policy_loss"]) and rec["kl"] == math.inf and rec["entropy"] == -math.inf
    assert math.isnan(rec["stage_s"]["rollout"]) and rec["xs"] == [math.inf, 1.5]


def test_dumps_loads_round_trip_exact(records):
    for r in records:
        r = dict(r, kl=-0.0, entropy=5e-324)
        assert exactly_equal(jsonl.loads(jsonl.dumps(r)), r)


def test_torn_last_line_not_returned_until_complete(tmp_path, records):
    p = tmp_path / "steps.jsonl"
    lines = [(jsonl.dumps(r) + "\n").encode() for r in records[:3]]
    t = JsonlTailer(p)
    with open(p, "ab", buffering=0) as f:
        f.write(lines[0] + lines[1][:17])
        assert [r["step"] for r in t.poll()] == [1]
        assert [r["step"] for r in read_jsonl(p)] == [1]
        assert t.poll() == []
        f.write(lines[1][17:-1])  # all but the newline: still not a complete line
        assert t.poll() == [] and len(read_jsonl(p)) == 1
        f.write(b"\n" + lines[2])
        got = t.poll()
    assert [r["step"] for r in got] == [2, 3]
    assert exactly_equal(got[0], records[1]) and t.bad_lines == 0


def test_bad_lines_are_skipped_and_counted(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_bytes(b'{"step": 1}\n{garbage\n\xff\xfe\n[1,2]\n\n{"step": 2}\n')
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    t = JsonlTailer(p)
    assert [r["step"] for r in t.poll()] == [1, 2]
    assert t.bad_lines == 3 and t.long_lines == 0  # not JSON, not UTF-8, not an object (blank: not counted)


def test_shrunk_jsonl_is_read_again(tmp_path, records):
    p = tmp_path / "steps.jsonl"
    with JsonlWriter(p) as w:
        for r in records[:10]:
            w.write(r)
    t = JsonlTailer(p)
    assert len(t.poll()) == 10
    removed = truncate_after_step(p, 4)
    assert [r["step"] for r in removed] == list(range(5, 11))
    assert [r["step"] for r in t.poll()] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(p)] == [1, 2, 3, 4]


def test_truncate_after_step_drops_torn_tail(tmp_path, records):
    p = tmp_path / "steps.jsonl"
    with JsonlWriter(p) as w:
        for r in records[:5]:
            w.write(r)
    with open(p, "ab") as f:
        f.write(jsonl.dumps(records[5]).encode()[:20])
    assert [r["step"] for r in truncate_after_step(p, 5)] == []
    assert p.read_bytes().endswith(b"\n") and len(read_jsonl(p)) == 5


def test_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []
    assert JsonlTailer(tmp_path / "nope.jsonl").poll() == []


def test_full_record_through_jsonl_every_field(tmp_path):
    r = make_record(3)
    p = tmp_path / "s.jsonl"
    with JsonlWriter(p) as w:
        w.write(r)
    assert exactly_equal(read_jsonl(p)[0], r)
