"""Benchmark of the step-log protocol (run by `make bench`).

Measures, over the same realistic records in the same run:
  - write cost, microseconds per record: framed msgpack (StepLogWriter), JSONL (JsonlWriter),
    and plain `msgpack.packb` as the baseline;
  - read rate, records per second: the framed reader (crc checked) and the JSONL reader,
    each as a ratio to plain `msgpack.Unpacker` streaming the same records;
  - the wall time to read a 100k-step log.

Targets (issue #2): framed reader >= 0.5x plain Unpacker; 100k-step log read < 1 s.
Prints PASS/MISS per target. Exits non-zero only if something crashed, never on a noisy miss.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.catalogue import METRICS, STAGES  # noqa: E402
from protocol.jsonl import JsonlWriter, read_jsonl  # noqa: E402
from protocol.steplog import StepLogTailer, StepLogWriter, read_steplog  # noqa: E402


def make_record(step: int, rng: random.Random) -> dict:
    """A record shaped like the trainer's: every catalogue field, floats with full mantissas."""
    rec: dict = {}
    for m in METRICS.values():
        if m.kind == "int":
            rec[m.name] = step if m.name == "step" else rng.randrange(1, 1 << 31)
        elif m.kind == "float":
            rec[m.name] = rng.gauss(0.0, 1.0) * 10 ** rng.randint(-4, 3)
        else:
            rec[m.name] = {s: rng.random() * 0.5 for s in STAGES}
    rec["time"] = 1.7e9 + step * 0.37
    # pad to ~30 scalar floats like a real run with a few extra diagnostics
    for i in range(30 - sum(1 for m in METRICS.values() if m.kind == "float")):
        rec[f"extra_{i}"] = rng.random()
    return rec


def best_of(fn, repeat: int) -> float:
    """Best wall time of `repeat` runs (seconds); GC off during each run."""
    best = math.inf
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000, help="records for the write/read rate runs")
    ap.add_argument("--big", type=int, default=100_000, help="records in the 'read a big log' run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rng = random.Random(1234)
    n = args.records
    records = [make_record(i + 1, rng) for i in range(n)]
    float_fields = sum(isinstance(v, float) for v in records[0].values())

    with tempfile.TemporaryDirectory(prefix="bench_protocol_") as td:
        d = Path(td)
        results: dict[str, float] = {}

        # ---- write cost -----------------------------------------------------------
        packb = msgpack.packb

        def w_plain():
            for r in records:
                packb(r, use_bin_type=True, use_single_float=False)

        def w_framed():
            p = d / "w.msgpack"
            p.unlink(missing_ok=True)
            w = StepLogWriter(p, sync_interval_s=1e9)  # sync cost is a timer, not per record
            for r in records:
                w.write(r)
            os.close(w._fd)
            w._fd = -1

        def w_jsonl():
            p = d / "w.jsonl"
            p.unlink(missing_ok=True)
            w = JsonlWriter(p)
            for r in records:
                w.write(r)
            w.close()

        results["write_plain"] = best_of(w_plain, args.repeat) / n * 1e6
        results["write_framed"] = best_of(w_framed, args.repeat) / n * 1e6
        results["write_jsonl"] = best_of(w_jsonl, args.repeat) / n * 1e6

        # ---- read rate -------------------------------------------------------------
        framed = d / "steps.msgpack"
        with StepLogWriter(framed) as w:
            for r in records:
                w.write(r)
        plain = d / "plain.msgpack"
        with open(plain, "wb") as f:
            for r in records:
                f.write(packb(r, use_bin_type=True, use_single_float=False))
        jl = d / "steps.jsonl"
        with JsonlWriter(jl) as w:
            for r in records:
                w.write(r)

        def r_plain():
            with open(plain, "rb") as f:
                data = f.read()
            u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
            u.feed(data)
            out = list(u)
            assert len(out) == n

        def r_framed():
            out, stats = read_steplog(framed)
            assert len(out) == n and stats.corrupt_frames == 0

        def r_jsonl():
            out = read_jsonl(jl)
            assert len(out) == n

        t_plain = best_of(r_plain, args.repeat)
        t_framed = best_of(r_framed, args.repeat)
        t_jsonl = best_of(r_jsonl, args.repeat)

        # a live tailer reading the same log in polls of whatever has arrived
        def r_tailer():
            t = StepLogTailer(framed)
            got = 0
            while True:
                b = t.poll(max_records=5000)
                if not b:
                    break
                got += len(b)
            assert got == n

        t_tailer = best_of(r_tailer, args.repeat)
        results["rate_plain"] = n / t_plain
        results["rate_framed"] = n / t_framed
        results["rate_tailer"] = n / t_tailer
        results["rate_jsonl"] = n / t_jsonl

        # ---- a 100k-step log ---------------------------------------------------------
        big = d / "big.msgpack"
        frames = []
        from protocol.steplog import encode_frame

        for i in range(args.big):
            r = records[i % n]
            r = dict(r, step=i + 1)
            frames.append(encode_frame(r))
        big.write_bytes(b"".join(frames))
        del frames
        big_mb = big.stat().st_size / 2**20
        big_plain = d / "big_plain.msgpack"
        big_plain.write_bytes(
            b"".join(
                packb(dict(records[i % n], step=i + 1), use_bin_type=True, use_single_float=False)
                for i in range(args.big)
            )
        )

        def r_big_plain():
            with open(big_plain, "rb") as f:
                u = msgpack.Unpacker(f, raw=False, strict_map_key=False)
                assert sum(1 for _ in u) == args.big

        def r_big():
            out, stats = read_steplog(big)
            assert len(out) == args.big and stats.corrupt_frames == 0

        t_big = best_of(r_big, max(1, args.repeat - 2))
        t_big_plain = best_of(r_big_plain, max(1, args.repeat - 2))

    ratio_framed = results["rate_framed"] / results["rate_plain"]
    ratio_tailer = results["rate_tailer"] / results["rate_plain"]
    ratio_jsonl = results["rate_jsonl"] / results["rate_plain"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print(
        f"protocol benchmark: {n} records ({len(records[0])} keys, {float_fields} floats + stage_s map), "
        f"python {sys.version.split()[0]}, msgpack {'.'.join(map(str, msgpack.version))}, best of {args.repeat}"
    )
    print()
    print(f"{'write':<34}{'us/record':>12}{'x plain packb':>16}")
    wp = results["write_plain"]
    for key, label in (
        ("write_plain", "plain msgpack.packb (baseline)"),
        ("write_framed", "framed msgpack (StepLogWriter)"),
        ("write_jsonl", "JSONL (JsonlWriter)"),
    ):
        print(f"{label:<34}{results[key]:>12.2f}{results[key] / wp:>15.2f}x")
    print()
    print(f"{'read (crc checked where framed)':<34}{'records/s':>12}{'x Unpacker':>16}{'target':>10}{'':>6}")
    print(f"{'plain msgpack.Unpacker (baseline)':<34}{results['rate_plain']:>12,.0f}{1.0:>15.2f}x")
    print(
        f"{'framed: read_steplog':<34}{results['rate_framed']:>12,.0f}{ratio_framed:>15.2f}x"
        f"{'>= 0.5x':>10}{verdict(ratio_framed >= 0.5):>6}"
    )
    print(f"{'framed: StepLogTailer.poll(5000)':<34}{results['rate_tailer']:>12,.0f}{ratio_tailer:>15.2f}x")
    print(f"{'JSONL: read_jsonl':<34}{results['rate_jsonl']:>12,.0f}{ratio_jsonl:>15.2f}x")
    print()
    print(
        f"{'read a ' + format(args.big, ',') + '-step log':<34}{t_big:>11.3f}s{'':>16}{'< 1 s':>10}"
        f"{verdict(t_big < 1.0):>6}   ({big_mb:.1f} MiB, framed, crc checked)"
    )
    print(
        f"{'  same records, plain Unpacker':<34}{t_big_plain:>11.3f}s{t_big / t_big_plain:>15.2f}x"
        f"{'':>16}(floor set by msgpack decoding on this machine)"
    )
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: timings are noisy")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
