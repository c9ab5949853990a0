"""protocol/FORMAT.md's minimal reader is real: extract it and run it against a real log."""

from __future__ import annotations

import random
import re
import runpy
import subprocess
import sys
from pathlib import Path

from protocol_helpers import exactly_equal, make_record

from protocol.steplog import StepLogWriter, encode_frame, read_steplog

FORMAT = Path(__file__).resolve().parents[2] / "protocol" / "FORMAT.md"


def snippet() -> str:
    text = FORMAT.read_text()
    section = text.split("### A minimal reader", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block under 'A minimal reader'"
    return m.group(1)


def test_reader_snippet_is_small_and_uses_only_zlib_struct_msgpack():
    code = snippet()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 30
    imports = set(re.findall(r"^\s*import (.+)$", code, re.M))
    mods = {m.strip() for imp in imports for m in imp.split(",")}
    assert mods <= {"struct", "sys", "zlib", "msgpack"}, mods


def _real_log(path: Path) -> list[dict]:
    rng = random.Random(11)
    recs = [make_record(s, rng) for s in range(1, 31)]
    recs[4]["kl"] = float("nan")
    with StepLogWriter(path) as w:
        for r in recs:
            w.write(r)
    data = bytearray(path.read_bytes())
    frames = [len(encode_frame(r)) for r in recs]
    starts = [sum(frames[:i]) for i in range(len(frames))]
    data[starts[7] + 40] ^= 0x10  # payload of step 8: skipped by trusted length
    data[starts[15] + 2] ^= 0x01  # length of step 16: resynchronise
    data += encode_frame(make_record(31))[:25]  # torn tail
    path.write_bytes(bytes(data))
    return recs


def test_reader_snippet_reads_a_real_log_like_the_kit(tmp_path):
    p = tmp_path / "steps.msgpack"
    recs = _real_log(p)
    script = tmp_path / "reader.py"
    script.write_text(snippet())
    ns = runpy.run_path(str(script), run_name="format_doc_reader")
    theirs = list(ns["read_steps"](str(p)))
    ours, stats = read_steplog(p)
    assert [r["step"] for r in theirs] == [r["step"] for r in ours] == [s for s in range(1, 31) if s not in (8, 16)]
    assert all(exactly_equal(a, b) for a, b in zip(theirs, ours))
    assert all(exactly_equal(r, recs[r["step"] - 1]) for r in theirs)
    assert stats.corrupt_frames == 2
    out = subprocess.run([sys.executable, str(script), str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [int(ln.split()[0]) for ln in out.stdout.splitlines()] == [r["step"] for r in ours]
