"""Live tailing: a writer in another process, torn tails, files that shrink or are rewritten."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from protocol_helpers import exactly_equal, make_record

from protocol.steplog import StepLogTailer, StepLogWriter, encode_frame, read_steplog, truncate_after_step

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# A writer process driven line by line over stdin, so the test decides exactly what is on disk.
DRIVEN_WRITER = textwrap.dedent(
    """
    import os, sys
    from protocol.steplog import encode_frame
    from protocol_helpers import make_record
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for line in sys.stdin:
        cmd, step = line.split()
        frame = encode_frame(make_record(int(step)))
        half = len(frame) // 2
        if cmd == "full":
            os.write(fd, frame)
        elif cmd == "half":
            os.write(fd, frame[:half])
        elif cmd == "rest":
            os.write(fd, frame[half:])
        print("ok", flush=True)
    """
)

# A free-running writer: every record in random pieces with tiny pauses, as fast as it can.
FREE_WRITER = textwrap.dedent(
    """
    import os, random, sys, time
    from protocol.steplog import StepLogWriter, encode_frame
    from protocol_helpers import make_record
    n = int(sys.argv[2])
    rng = random.Random(0)
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for step in range(1, n + 1):
        frame = encode_frame(make_record(step))
        if step % 3 == 0:  # torn on purpose: a reader may see any prefix of the frame
            cut = sorted(rng.sample(range(1, len(frame)), 2))
            for a, b in ((0, cut[0]), (cut[0], cut[1]), (cut[1], len(frame))):
                os.write(fd, frame[a:b])
                time.sleep(0.0002)
        else:
            os.write(fd, frame)
        if step % 50 == 0:
            time.sleep(0.005)
    """
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return env


def test_torn_tail_from_another_process_waits_then_completes(tmp_path):
    p = tmp_path / "steps.msgpack"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVEN_WRITER, str(p)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )

    def do(cmd):
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"

    try:
        t = StepLogTailer(p)
        do("full 1")
        do("full 2")
        got = t.poll()
        assert [r["step"] for r in got] == [1, 2]
        off = t.offset
        do("half 3")
        for _ in range(3):  # an incomplete frame is "not yet": nothing, same offset, no error
            assert t.poll() == []
            assert t.offset == off
        assert t.stats.corrupt_frames == 0
        do("rest 3")
        got = t.poll()
        assert len(got) == 1 and exactly_equal(got[0], make_record(3))
        do("half 4")
        assert t.poll() == []
        do("rest 4")
        do("full 5")
        assert [r["step"] for r in t.poll()] == [4, 5]
        assert t.stats.corrupt_frames == 0 and t.stats.records == 5
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_tailer_sees_every_record_in_order_while_another_process_appends(tmp_path):
    n = 1500
    p = tmp_path / "steps.msgpack"
    p.write_bytes(b"")
    t = StepLogTailer(p)
    proc = subprocess.Popen([sys.executable, "-c", FREE_WRITER, str(p), str(n)], env=_env())
    got: list = []
    polls = 0
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        batch = t.poll()
        polls += 1
        got += batch
        if not batch:
            time.sleep(0.001)
        if proc.poll() is not None and not batch and len(got) < n:
            got += t.poll()
            break
    proc.wait(timeout=30)
    assert proc.returncode == 0
    assert [r["step"] for r in got] == list(range(1, n + 1))
    assert all(exactly_equal(r, make_record(r["step"])) for r in got[::7])
    assert t.stats.corrupt_frames == 0 and t.stats.resets == 0
    assert polls > 10  # it really read while the file grew


def _write(p, recs):
    with StepLogWriter(p) as w:
        for r in recs:
            w.write(r)


def test_shrunk_file_is_read_again_from_the_start(tmp_path):
    p = tmp_path / "steps.msgpack"
    _write(p, [make_record(s) for s in range(1, 51)])
    t = StepLogTailer(p)
    assert len(t.poll()) == 50
    removed = truncate_after_step(p, 20)  # a resume from the checkpoint at step 20
    assert [r["step"] for r in removed] == list(range(21, 51))
    again = t.poll()
    assert [r["step"] for r in again] == list(range(1, 21))
    assert t.stats.resets == 1
    new = [dict(make_record(s), time=2e9 + s) for s in range(21, 31)]
    _write(p, new)
    got = t.poll()
    assert len(got) == 10 and all(exactly_equal(a, b) for a, b in zip(new, got))
    assert t.stats.resets == 1 and t.stats.corrupt_frames == 0


def test_shrunk_then_regrown_past_old_size_before_a_poll_is_read_again(tmp_path):
    p = tmp_path / "steps.msgpack"
    _write(p, [make_record(s) for s in range(1, 31)])
    t = StepLogTailer(p)
    assert len(t.poll()) == 30
    truncate_after_step(p, 10)
    new = [dict(make_record(s), time=3e9 + s) for s in range(11, 61)]
    _write(p, new)  # now bigger than what the tailer had read
    got = t.poll()
    assert [r["step"] for r in got] == list(range(1, 61))
    assert all(exactly_equal(a, b) for a, b in zip(new, got[10:]))
    assert t.stats.resets == 1


def test_rewritten_to_the_same_size_with_different_content(tmp_path):
    p = tmp_path / "steps.msgpack"
    old = [make_record(s) for s in range(1, 11)]
    new = [dict(r, kl=r["kl"] + 1.0, time=r["time"] + 7.0) for r in old]  # same encoded size
    data_old = b"".join(encode_frame(r) for r in old)
    data_new = b"".join(encode_frame(r) for r in new)
    assert len(data_old) == len(data_new) and data_old != data_new
    p.write_bytes(data_old)
    t = StepLogTailer(p)
    assert len(t.poll()) == 10
    with open(p, "r+b") as f:  # same inode, same size
        f.write(data_new)
    got = t.poll()
    assert len(got) == 10 and all(exactly_equal(a, b) for a, b in zip(new, got))
    assert t.stats.resets == 1
    assert t.poll() == []  # and it does not keep resetting


def test_replaced_file_is_read_again(tmp_path):
    p = tmp_path / "steps.msgpack"
    _write(p, [make_record(s) for s in range(1, 6)])
    t = StepLogTailer(p)
    assert len(t.poll()) == 5
    tmp = tmp_path / "new.msgpack"
    _write(tmp, [make_record(s) for s in range(1, 9)])
    os.replace(tmp, p)
    assert [r["step"] for r in t.poll()] == list(range(1, 9))
    assert t.stats.resets == 1


def test_file_deleted_under_the_tailer_is_not_an_error(tmp_path):
    p = tmp_path / "steps.msgpack"
    _write(p, [make_record(1)])
    t = StepLogTailer(p)
    assert len(t.poll()) == 1
    p.unlink()
    assert t.poll() == []
    new = [dict(make_record(s), time=5e9) for s in (1, 2)]  # a new run, new content
    _write(p, new)
    got = t.poll()
    assert [r["step"] for r in got] == [1, 2] and all(exactly_equal(a, b) for a, b in zip(new, got))


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_writer_survives_sigkill_without_close(tmp_path, interval):
    """Each write reaches the OS at once: a SIGKILLed writer loses nothing it wrote."""
    p = tmp_path / "steps.msgpack"
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from protocol.steplog import StepLogWriter
        from protocol_helpers import make_record
        w = StepLogWriter(sys.argv[1], sync_interval_s={interval})
        for s in range(1, 41):
            w.write(make_record(s))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], env=_env(), timeout=60)
    assert r.returncode == -9
    got, stats = read_steplog(p)
    assert [x["step"] for x in got] == list(range(1, 41)) and stats.corrupt_frames == 0
