"""The framed step log: exact round trips, truncation, bit flips, hostile bytes (SPEC section 4)."""

from __future__ import annotations

import math
import os
import random
import struct
import time
import tracemalloc

import msgpack
import pytest
from protocol_helpers import exactly_equal, make_record

from protocol import jsonl
from protocol.catalogue import METRICS, check_record
from protocol.steplog import (
    MAX_PAYLOAD,
    READ_CHUNK,
    StepLogTailer,
    StepLogWriter,
    encode_frame,
    iter_frames,
    masked_crc,
    read_steplog,
    truncate_after_step,
)

MIB = 1 << 20
HEADROOM = 3 * MIB  # allowed beyond the one file chunk a poll holds

SPECIAL = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    2.2250738585072009e-308,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e-300,
    0.1,
    1 / 3,
]


def random_floats(n: int, seed: int = 7) -> list[float]:
    """Floats from random 64-bit patterns (NaNs with payloads, subnormals, all exponents)."""
    rng = random.Random(seed)
    out = [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(n)]
    # subnormals and NaN payloads on purpose, not only by luck
    out += [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(52)))[0] for _ in range(50)]
    out += [struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000000 | rng.getrandbits(51) | 1))[0] for _ in range(20)]
    out += [struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000000 | rng.getrandbits(51)))[0] for _ in range(20)]
    return out


def test_masked_crc_matches_spec_formula():
    for data in (b"", b"a", b"\x00" * 8, os.urandom(1000)):
        crc = zlib_crc(data)
        assert masked_crc(data) == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def zlib_crc(data):
    import zlib

    return zlib.crc32(data) & 0xFFFFFFFF


def test_frame_layout_is_the_documented_one():
    rec = {"step": 1, "kl": 0.5}
    frame = encode_frame(rec)
    payload = msgpack.packb(rec, use_bin_type=True)
    assert frame[:8] == struct.pack("<Q", len(payload))
    assert frame[8:12] == struct.pack("<I", masked_crc(frame[:8]))
    assert frame[12:-4] == payload
    assert frame[-4:] == struct.pack("<I", masked_crc(payload))


def test_every_catalogue_field_round_trips_both_formats(tmp_path, records):
    assert all(check_record(r) == [] for r in records)
    assert set(records[0]) == set(METRICS)  # optional fields present too
    with StepLogWriter(tmp_path / "steps.msgpack") as w, jsonl.JsonlWriter(tmp_path / "steps.jsonl") as j:
        for r in records:
            w.write(r)
            j.write(r)
    got, stats = read_steplog(tmp_path / "steps.msgpack")
    assert stats.corrupt_frames == 0 and stats.records == len(records)
    assert len(got) == len(records)
    for a, b in zip(records, got):
        assert exactly_equal(a, b), (a, b)
        assert check_record(b) == []
    got_j = jsonl.read_jsonl(tmp_path / "steps.jsonl")
    assert len(got_j) == len(records)
    for a, b in zip(records, got_j):
        assert exactly_equal(a, b), (a, b)


def test_special_and_random_float64_values_are_bit_exact(tmp_path):
    values = SPECIAL + random_floats(2000)
    recs = []
    for i in range(0, len(values), 23):  # spread over scalar fields and the stage map
        chunk = values[i : i + 23]
        rec = {
            "step": i + 1,
            "kl": chunk[0],
            "policy_loss": chunk[-1],
            "stage_s": {f"s{k}": v for k, v in enumerate(chunk)},
        }
        recs.append(rec)
    with StepLogWriter(tmp_path / "s.msgpack") as w, jsonl.JsonlWriter(tmp_path / "s.jsonl") as j:
        for r in recs:
            w.write(r)
            j.write(r)
    got, _ = read_steplog(tmp_path / "s.msgpack")
    assert len(got) == len(recs)
    for a, b in zip(recs, got):
        assert exactly_equal(a, b)  # NaN payload bits, -0.0 and subnormals included
    got_j = jsonl.read_jsonl(tmp_path / "s.jsonl")
    assert len(got_j) == len(recs)
    for a, b in zip(recs, got_j):
        assert exactly_equal(a, b, nan_payload=False)  # JSONL: a NaN stays a NaN
    text = (tmp_path / "s.jsonl").read_text()
    assert "null" not in text and '"NaN"' in text and '"Infinity"' in text and '"-Infinity"' in text


def test_writer_refuses_a_record_over_one_mib():
    with pytest.raises(ValueError, match="1 MiB"):
        encode_frame({"blob": b"x" * (MAX_PAYLOAD + 1)})


def _frame_with_payload(payload: bytes) -> bytes:
    h = struct.pack("<Q", len(payload))
    return h + struct.pack("<I", masked_crc(h)) + payload + struct.pack("<I", masked_crc(payload))


def test_frame_of_exactly_one_mib_is_read_and_one_byte_more_is_corrupt(tmp_path):
    # a msgpack map {"pad": bin32} whose encoding is exactly MAX_PAYLOAD bytes
    rec = {"pad": b"\x01" * (MAX_PAYLOAD - 10)}
    ok = encode_frame(rec)
    assert len(ok) == MAX_PAYLOAD + 16
    big_payload = msgpack.packb({"pad": b"\x01" * (MAX_PAYLOAD - 9)}, use_bin_type=True)
    assert len(big_payload) == MAX_PAYLOAD + 1
    p = tmp_path / "s.msgpack"
    p.write_bytes(encode_frame({"step": 1}) + ok + _frame_with_payload(big_payload) + encode_frame({"step": 2}))
    got, stats = read_steplog(p)
    assert [r.get("step") for r in got] == [1, None, 2]
    assert got[1] == rec
    assert stats.corrupt_frames == 1


def small_log(n: int = 100) -> tuple[bytes, list[dict], list[int]]:
    recs = [{"step": i + 1, "kl": i * 0.01} for i in range(n)]
    frames = [encode_frame(r) for r in recs]
    ends = []
    pos = 0
    for f in frames:
        pos += len(f)
        ends.append(pos)
    return b"".join(frames), recs, ends


def test_truncation_at_every_byte_offset_yields_exactly_the_complete_records(tmp_path):
    data, recs, ends = small_log(100)
    p = tmp_path / "steps.msgpack"
    for cut in range(len(data) + 1):
        p.write_bytes(data[:cut])
        got, stats = read_steplog(p)
        complete = sum(1 for e in ends if e <= cut)
        assert got == recs[:complete], cut
        assert stats.corrupt_frames == 0, cut  # a torn tail is "not yet", never corruption


def test_full_records_torn_at_every_offset_a_live_tailer_waits(tmp_path, records):
    """The file grows one byte at a time; at every size the tailer has exactly the complete frames."""
    frames = [encode_frame(r) for r in records[:20]]
    data = b"".join(frames)
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    p = tmp_path / "steps.msgpack"
    p.write_bytes(b"")
    t = StepLogTailer(p)
    seen = []
    with open(p, "ab", buffering=0) as f:
        for i in range(len(data)):
            f.write(data[i : i + 1])
            seen += t.poll()
            assert len(seen) == sum(1 for e in ends if e <= i + 1)
            assert t.offset == max([0] + [e for e in ends if e <= i + 1])
    assert all(exactly_equal(a, b) for a, b in zip(records[:20], seen)) and len(seen) == 20
    assert t.stats.corrupt_frames == 0 and t.stats.resets == 0


def _flip_trials(data: bytes, ends: list[int], recs: list[dict], trials: int, rng: random.Random, path):
    by_step = {r["step"]: r for r in recs}
    starts = [0] + ends[:-1]
    for _ in range(trials):
        bit = rng.randrange(len(data) * 8)
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(b)
        got, stats = read_steplog(path)
        hit = next(i for i, (s, e) in enumerate(zip(starts, ends)) if s <= bit // 8 < e)
        # never silently wrong: every record is the original of its step, bit for bit
        for r in got:
            assert exactly_equal(r, by_step[r["step"]]), (bit, r)
        # exactly the one record it hit is lost, and the loss is counted
        assert [r["step"] for r in got] == [r["step"] for i, r in enumerate(recs) if i != hit], bit
        assert stats.corrupt_frames == 1, (bit, stats)


def test_random_single_bit_flips_cost_exactly_the_record_they_hit(tmp_path):
    rng = random.Random(99)
    recs = [make_record(i + 1, rng) for i in range(12)]
    for r in recs[::3]:
        r["kl"] = math.nan  # NaN-aware comparison matters
    frames = [encode_frame(r) for r in recs]
    ends, pos = [], 0
    for f in frames:
        pos += len(f)
        ends.append(pos)
    _flip_trials(b"".join(frames), ends, recs, 1200, rng, tmp_path / "steps.msgpack")


def test_bit_flips_seen_by_a_live_tailer_as_the_file_grows(tmp_path):
    """Flip a bit in a frame already on disk-to-be, then append frames in pieces through a tailer."""
    rng = random.Random(5)
    recs = [make_record(i + 1, rng) for i in range(8)]
    frames = [encode_frame(r) for r in recs]
    data = b"".join(frames)
    starts, pos = [], 0
    for f in frames:
        starts.append(pos)
        pos += len(f)
    for trial in range(40):
        bit = rng.randrange(len(data) * 8)
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        hit = max(i for i, s in enumerate(starts) if s <= bit // 8)
        p = tmp_path / f"t{trial}.msgpack"
        p.write_bytes(b"")
        t = StepLogTailer(p)
        got = []
        with open(p, "ab", buffering=0) as f:
            cuts = sorted(rng.sample(range(1, len(b)), 6)) + [len(b)]
            prev = 0
            for c in cuts:
                f.write(bytes(b[prev:c]))
                prev = c
                got += t.poll()
        assert [r["step"] for r in got] == [r["step"] for i, r in enumerate(recs) if i != hit]
        assert all(exactly_equal(r, recs[r["step"] - 1]) for r in got)
        assert t.stats.corrupt_frames == 1


def _measure(path) -> tuple[list, object, int, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        got, stats = read_steplog(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return got, stats, peak, time.perf_counter() - t0


def test_random_garbage_is_read_in_bounded_memory_without_raising(tmp_path):
    p = tmp_path / "garbage.msgpack"
    p.write_bytes(random.Random(1).randbytes(12 * MIB))
    got, stats, peak, _ = _measure(p)
    assert got == []
    assert stats.corrupt_frames >= 1 and stats.skipped_bytes > 11 * MIB
    assert peak < READ_CHUNK + HEADROOM, peak


def test_length_header_claiming_2_60_bytes(tmp_path):
    h = struct.pack("<Q", 1 << 60)
    liar = h + struct.pack("<I", masked_crc(h))  # a valid crc on an absurd length
    good = [encode_frame({"step": i}) for i in range(1, 4)]
    p = tmp_path / "s.msgpack"
    p.write_bytes(good[0] + liar + b"\xff" * 100 + good[1] + good[2])
    got, stats, peak, _ = _measure(p)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert stats.corrupt_frames == 1
    # alone at the end of a big file: not waited for as an "incomplete frame", no allocation
    p.write_bytes(good[0] + liar + random.Random(3).randbytes(8 * MIB))
    got, stats, peak, _ = _measure(p)
    assert [r["step"] for r in got] == [1]
    assert peak < READ_CHUNK + HEADROOM, peak


def test_zero_filled_tail_is_cheap_and_later_frames_are_found(tmp_path):
    recs = [{"step": i} for i in range(1, 6)]
    p = tmp_path / "s.msgpack"
    p.write_bytes(b"".join(encode_frame(r) for r in recs) + bytes(16 * MIB))
    got, stats, peak, _ = _measure(p)
    assert got == recs and stats.corrupt_frames == 1
    assert peak < READ_CHUNK + HEADROOM, peak
    # a writer that carries on after the zeros (e.g. after a crash that left a hole)
    with open(p, "ab") as f:
        f.write(encode_frame({"step": 6}))
    got, stats = read_steplog(p)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "pattern, size",
    [
        (b"\x01\x00\x00\x00\x00\x00\x00\x00", 128 * 1024),  # int64 array of small values: dense candidates
        (b"\x00" * 9 + b"\x01", MIB),
    ],  # zero runs with a byte between (was quadratic: a copy per run)
)
def test_adversarial_candidate_dense_bytes_are_linear_and_bounded(tmp_path, pattern, size):
    p = tmp_path / "ints.bin"
    p.write_bytes(pattern * (size // len(pattern)) + encode_frame({"step": 1}))
    t0 = time.process_time()
    got, stats = read_steplog(p)
    assert time.process_time() - t0 < 3.0  # ~0.3 s here; quadratic behaviour took minutes
    assert got == [{"step": 1}] and stats.corrupt_frames == 1
    p.write_bytes(pattern * ((32 * 1024) // len(pattern)))
    _, _, peak, _ = _measure(p)
    assert peak < HEADROOM


def test_valid_crc_but_not_a_map_is_corrupt_not_raised(tmp_path):
    p = tmp_path / "s.msgpack"
    bad = [
        _frame_with_payload(msgpack.packb([1, 2, 3])),
        _frame_with_payload(b"\xc1"),
        _frame_with_payload(msgpack.packb({"a": 1}) + b"\x00"),
    ]
    p.write_bytes(encode_frame({"step": 1}) + b"".join(bad) + encode_frame({"step": 2}))
    got, stats = read_steplog(p)
    assert got == [{"step": 1}, {"step": 2}] and stats.corrupt_frames == 3


def test_missing_file_reads_as_empty(tmp_path):
    got, stats = read_steplog(tmp_path / "nope.msgpack")
    assert got == [] and stats.corrupt_frames == 0
    assert StepLogTailer(tmp_path / "nope.msgpack").poll() == []


def test_iter_frames_offsets_and_truncate_after_step(tmp_path, records):
    p = tmp_path / "steps.msgpack"
    with StepLogWriter(p) as w:
        for r in records[:10]:
            w.write(r)
        f = open(p, "ab")
        f.write(encode_frame(records[10])[:30])  # a torn tail from a crash
        f.close()
    frames = list(iter_frames(p))
    assert [f[2]["step"] for f in frames] == list(range(1, 11))
    assert frames[0][0] == 0 and all(a[1] == b[0] for a, b in zip(frames, frames[1:]))
    removed = truncate_after_step(p, 6)
    assert [r["step"] for r in removed] == [7, 8, 9, 10]
    assert all(exactly_equal(a, b) for a, b in zip(removed, records[6:10]))
    assert p.stat().st_size == frames[5][1]  # torn tail gone too
    got, _ = read_steplog(p)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert truncate_after_step(p, 100) == [] and p.stat().st_size == frames[5][1]


def test_start_offset_aligns_to_next_frame_without_counting_corruption(tmp_path):
    data, recs, ends = small_log(20)
    p = tmp_path / "s.msgpack"
    p.write_bytes(data)
    t = StepLogTailer(p, start_offset=ends[9] - 5)
    got = t.poll()
    assert got == recs[10:]
    assert t.stats.corrupt_frames == 0


def test_poll_max_records(tmp_path):
    data, recs, _ = small_log(50)
    p = tmp_path / "s.msgpack"
    p.write_bytes(data)
    t = StepLogTailer(p)
    got = []
    while batch := t.poll(max_records=7):
        assert len(batch) <= 7
        got += batch
    assert got == recs
