"""Whole histories from the columnar side file (steps.cols): the same store as decoding the log,
and never a value the log does not hold (damaged side file, damaged log, resume, no side file)."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import pytest
from tui_helpers import ROOT, make_run

from protocol.alerts import DEFAULT_RULES, AlertEngine
from protocol.columns import columns_path
from protocol.rundir import RunPaths
from protocol.steplog import StepLogWriter, read_steplog, truncate_after_step
from tui.fastload import load_columns
from tui.feed import load_history
from tui.history_alerts import evaluate_history
from tui.store import RunStore, is_placeable


def decoded(paths: RunPaths) -> RunStore:
    """The store the monitor builds by decoding every frame of the log (the reference)."""
    s = RunStore()
    s.extend(RunStore.columnize(read_steplog(paths.steps)[0]))
    return s


def assert_same(a: RunStore, b: RunStore) -> None:
    assert list(a.steps) == list(b.steps)
    assert bytes(a.times) == bytes(b.times)
    assert set(a.columns) == set(b.columns)
    for k, c in b.columns.items():
        mine = a.columns[k]
        assert bytes(mine.values) == bytes(c.values), k  # bit for bit: NaN payloads, -0.0, Inf
        assert (list(mine.bmin), list(mine.bmax), list(mine.bflags)) == (list(c.bmin), list(c.bmax), list(c.bflags))
        assert mine.present == c.present, k
    for k, c in b.stages.items():
        assert bytes(a.stages[k].values) == bytes(c.values), k
        assert list(a.stages[k].bflags) == list(c.bflags)
        assert a.stages[k].bsum == pytest.approx(c.bsum, rel=1e-9)


def history(paths: RunPaths) -> tuple:
    *_, last = load_history(paths, paths.steps.stat().st_size)
    return last


@pytest.fixture()
def odd_run(runs_dir) -> RunPaths:
    """A generated run plus records a schema change, non-numbers and a float step bring."""
    paths = make_run(runs_dir, "odd", 1500, unstable=True)
    with StepLogWriter(paths.steps) as w:
        w.write({"step": 1501, "time": 1.0, "new_metric": 5, "kl": "text", "stage_s": {"rollout": 1}})
        w.write({"step": 1502.0, "time": 2.0, "kl": 0.1})  # a float step: not placeable
        w.write({"step": 1503, "flag": True, "kl": 2**63 - 1, "grad_norm": math.nan, "entropy": -0.0})
        ranks = {"0": 0.1, "1": 0.3}  # a data-parallel run's per-rank maps
        w.write({"step": 1504, "rank_compute_s": ranks, "rank_stage_s": {"1.rollout": 0.2}, "world_size": 2})
    return paths


def test_side_file_gives_the_store_decoding_gives(odd_run):
    loaded = load_columns(odd_run, 1 << 60)
    assert loaded is not None and loaded.rows == 1504 and loaded.skipped == 1
    assert loaded.end == odd_run.steps.stat().st_size
    assert "new_metric" in loaded.store.extra and "rank_compute_s.1" in loaded.store.extra
    assert_same(loaded.store, decoded(odd_run))


def test_a_flipped_bit_in_the_side_file_ends_what_is_trusted(odd_run):
    cols = Path(columns_path(odd_run.steps))
    data = bytearray(cols.read_bytes())
    data[len(data) // 2] ^= 0x10
    cols.write_bytes(bytes(data))
    loaded = load_columns(odd_run, 1 << 60)
    assert loaded is not None and 0 < loaded.rows < 1504
    store, _alerts, _open, corrupt, _end = history(odd_run)
    assert corrupt == 0
    assert_same(store, decoded(odd_run))  # the rest came from the log


def test_a_damaged_log_frame_is_counted_and_never_shown_from_the_side_file(odd_run):
    data = bytearray(odd_run.steps.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some frame: its crc no longer matches
    odd_run.steps.write_bytes(bytes(data))
    store, _alerts, _open, corrupt, _end = history(odd_run)
    assert corrupt == 1
    records, stats = read_steplog(odd_run.steps)
    assert stats.corrupt_frames == 1
    assert_same(store, decoded(odd_run))


def test_resume_truncation_and_a_run_without_side_file(runs_dir):
    paths = make_run(runs_dir, "resumed", 800)
    truncate_after_step(paths.steps, 500)  # a resume from step 500's checkpoint
    with StepLogWriter(paths.steps) as w:  # the resumed trainer writes steps 501.. again
        for s in range(501, 701):
            w.write({"step": s, "time": float(s), "kl": 0.05 + s * 1e-4})
    loaded = load_columns(paths, 1 << 60)
    assert loaded is not None and loaded.rows == 700
    assert_same(loaded.store, decoded(paths))
    Path(columns_path(paths.steps)).unlink()  # a run from before the side file
    assert load_columns(paths, 1 << 60) is None
    assert_same(history(paths)[0], decoded(paths))
    with StepLogWriter(paths.steps):  # the next writer rebuilds it from the log
        pass
    loaded = load_columns(paths, 1 << 60)
    assert loaded is not None and loaded.rows == 700


# -- alerts over the whole history ----------------------------------------------------------


def _key(event, a):
    return (event, a.rule, a.severity, a.first_step, a.cleared_step if event == "alert_cleared" else a.step)


def _compare(records, rules=DEFAULT_RULES) -> int:
    records = [r for r in records if is_placeable(r)]
    engine = AlertEngine(rules)
    full = [_key(ev, a) for r in records for ev, a in engine.update(r)]
    store = RunStore()
    store.extend(RunStore.columnize(records))
    got, at_end = evaluate_history(rules, store)
    assert [_key(ev, a) for ev, a in got] == full
    assert [_key("alert", a) for a in at_end.open.values()] == [_key("alert", a) for a in engine.open.values()]
    assert at_end.quiet == engine.quiet
    return len(full)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_history_alerts_equal_a_full_streaming_pass_on_generated_runs(runs_dir, seed):
    for unstable in (False, True):
        paths = make_run(runs_dir, f"g{seed}{unstable}", 3000, unstable=unstable, seed=seed)
        n = _compare(read_steplog(paths.steps)[0])
        assert n > 0 or not unstable


def test_history_alerts_equal_a_full_streaming_pass_on_real_trainer_runs(tmp_path):
    """The committed logs of real trainer runs: clean ones and every injected fault."""
    fixtures = sorted((ROOT / "tests" / "fixtures" / "alert_quality").glob("*.msgpack.gz"))
    assert len(fixtures) >= 10
    fired = 0
    for f in fixtures:
        plain = tmp_path / f.stem
        plain.write_bytes(gzip.decompress(f.read_bytes()))
        fired += _compare(read_steplog(plain)[0])
    assert fired > 20


def test_the_engine_a_history_leaves_goes_on_as_one_pass_would(tmp_path):
    """Cut real trainer runs where alerts fire, clear and escalate (a streak under way, an
    episode open, a spike's or a trend's window full): the history's alerts, then the rest fed
    to the engine the history left, are one streaming pass's alerts."""
    cuts = 0
    for f in sorted((ROOT / "tests" / "fixtures" / "alert_quality").glob("*.msgpack.gz")):
        plain = tmp_path / f.stem
        plain.write_bytes(gzip.decompress(f.read_bytes()))
        records = [r for r in read_steplog(plain)[0] if is_placeable(r)]
        engine = AlertEngine(DEFAULT_RULES)
        full, changed_at = [], set()
        for i, r in enumerate(records):
            for ev, a in engine.update(r):
                full.append(_key(ev, a))
                changed_at.add(i)
        near = sorted({i + d for i in changed_at for d in (-2, 0, 1)} & set(range(1, len(records))))
        for k in near[:: max(1, len(near) // 6)]:  # a few, from the first to the last
            store = RunStore()
            store.extend(RunStore.columnize(records[:k]))
            got, history_engine = evaluate_history(DEFAULT_RULES, store)
            after = [_key(ev, a) for r in records[k:] for ev, a in history_engine.update(r)]
            assert [_key(ev, a) for ev, a in got] + after == full, (f.name, k)
            cuts += 1
    assert cuts > 30


def test_a_side_file_that_cannot_be_written_never_costs_the_log(tmp_path):
    """steps.cols a FIFO (or a directory): the log is written in full, nothing hangs."""
    os.mkfifo(tmp_path / "steps.cols")
    with StepLogWriter(tmp_path / "steps.msgpack") as w:
        assert w.columns is not None and w.columns.broken
        for s in range(1, 51):
            w.write({"step": s, "kl": 0.1})
    assert [r["step"] for r in read_steplog(tmp_path / "steps.msgpack")[0]] == list(range(1, 51))


def test_a_torn_row_or_a_damaged_log_is_where_the_rebuilt_side_file_stops(runs_dir):
    paths = make_run(runs_dir, "torn", 300)
    cols = Path(columns_path(paths.steps))
    with open(cols, "r+b") as f:  # a crash in the middle of the last row
        f.truncate(cols.stat().st_size - 5)
    with StepLogWriter(paths.steps) as w:  # the next writer drops the torn row, writes it again
        w.write({"step": 301, "kl": 0.2})
    loaded = load_columns(paths, 1 << 60)
    assert loaded is not None and loaded.rows == 301
    data = bytearray(paths.steps.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the log
    paths.steps.write_bytes(bytes(data))
    cols.unlink()
    with StepLogWriter(paths.steps) as w:  # rebuilt from the log: up to the damaged frame only
        assert w.columns is not None and w.columns.broken
    loaded = load_columns(paths, 1 << 60)
    assert loaded is not None and 100 < loaded.rows < 200
    store, _alerts, _open, corrupt, _end = history(paths)
    assert corrupt == 1 and len(store) == 300  # 301 records, one lost to the flipped bit


class _Source:
    """An adapted run's source (adapters.sources.Source's interface) over given records."""

    format = "test"

    def __init__(self, batches):
        self.batches = list(batches)

    def poll(self):
        return self.batches.pop(0) if self.batches else []

    def manifest(self):
        adapter = {"label": "test", "missing": [], "extra": []}
        return {"status": "live", "adapter": adapter, "started_at": 0.0}


def test_an_adapted_history_gets_the_array_evaluator_and_live_alerts_go_on_exactly(runs_dir):
    from tui.adapted import BULK_RECORDS, AdaptedFeed, AdaptedPaths

    paths = make_run(runs_dir, "adapted", 12000, unstable=True, seed=3)  # a gradient spike before the cut
    records = read_steplog(paths.steps)[0]
    probe = AlertEngine(DEFAULT_RULES)
    quiet = [i + 1 for i, r in enumerate(records) if probe.update(r) is not None and probe.quiet]
    cut = next(i for i in quiet if i >= 6000)  # where nothing is open and no streak runs
    assert cut >= BULK_RECORDS
    feed = AdaptedFeed(AdaptedPaths(paths.root, "test"), _Source([records[:cut], records[cut:]]))
    bulk = []
    real_bulk = feed._bulk
    feed._bulk = lambda batch: bulk.append(real_bulk(batch)) or bulk[-1]  # type: ignore[method-assign]
    got = []
    for _ in range(2):
        batch = feed.poll()
        got += [_key(ev, a) for ev, a in feed.evaluate(batch).alerts]
    engine = AlertEngine(DEFAULT_RULES)
    assert got == [_key(ev, a) for r in records for ev, a in engine.update(r)]
    assert got  # the unstable run fires alerts after the cut too
    assert len(bulk) == 1 and bulk[0] is not None  # the first batch took the array path


def test_history_alerts_equal_a_full_streaming_pass_on_a_straggler(runs_dir):
    """A data-parallel run's per-rank maps (columns "rank_compute_s.R" in the store) and the
    straggler rule: rank 1 slow for stretches, short ones (under `consecutive`) included."""
    records = []
    for s in range(1, 3001):
        slow = 0.3 if (500 <= s < 560 or 900 <= s < 903 or 2000 <= s < 2100) else 0.1
        ranks = {"0": 0.1 + 0.001 * (s % 7), "1": slow, "2": 0.1}
        records.append({"step": s, "kl": 0.1, "rank_compute_s": ranks, "rank_stage_s": {"1.rollout": slow}})
    assert _compare(records) == 4  # fired and cleared twice; the 3-step blip fires nothing


@pytest.mark.asyncio
async def test_the_monitor_shows_a_whole_history_with_its_alerts_in_its_first_screen(runs_dir):
    """A run past the tail size with a side file: the first screen already holds every step and
    the history's alerts (no second pass); without the side file, the tail comes first."""
    from tui_helpers import T0, wait_for

    from tui.app import MonitorApp

    paths = make_run(runs_dir, "whole", 6000, unstable=True)
    app = MonitorApp(paths.root, clock=lambda: T0 + 10_000, tail_bytes=256 << 10)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.first_full_screen_at is not None, timeout=20, what="the first screen")
        assert len(app.model.store) == 6000 and app.model.history_done
        assert {a.rule for _ev, a in app.model.alert_history} >= {"exploding_gradients", "non_finite"}
    (paths.root / "steps.cols").unlink()
    app = MonitorApp(paths.root, clock=lambda: T0 + 10_000, tail_bytes=256 << 10)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: app.first_full_screen_at is not None, timeout=20, what="the first screen")
        assert len(app.model.store) < 6000  # the tail first
        await wait_for(pilot, lambda: app.model.history_done, timeout=30, what="the history")
        assert len(app.model.store) == 6000


@pytest.mark.parametrize("frame", [0, 1, 9, 10, 11, 777, 1499, 1500, 1502, 1503])
def test_a_flipped_log_bit_with_the_crc_checked_beside_the_rows(odd_run, monkeypatch, frame):
    """The log's crc32 runs in a thread while the rows are taken: a pass whose crc does not hold
    is taken back and only its rows before the damaged frame are kept, whatever pass it is in
    (small passes here: ~10 rows each, and a segment that starts after the damage)."""
    import tui.fastload as fastload
    from protocol.steplog import StepLogTailer

    monkeypatch.setattr(fastload, "CHUNK_BYTES", 2048)
    frames = StepLogTailer(odd_run.steps, with_offsets=True).poll(10_000)
    assert len(frames) == 1504
    start, end, _r = frames[frame]
    data = bytearray(odd_run.steps.read_bytes())
    data[(start + end) // 2] ^= 0x04
    odd_run.steps.write_bytes(bytes(data))
    loaded = load_columns(odd_run, 1 << 60)
    if frame == 0:
        assert loaded is None
        return
    assert loaded is not None and loaded.rows == frame and loaded.end == start
    want = RunStore()
    want.extend(RunStore.columnize([r for _s, _e, r in frames[:frame]]))
    assert_same(loaded.store, want)


def test_many_passes_give_the_store_one_pass_gives(odd_run, monkeypatch):
    import tui.fastload as fastload

    whole = load_columns(odd_run, 1 << 60)
    monkeypatch.setattr(fastload, "CHUNK_BYTES", 1000)
    small = load_columns(odd_run, 1 << 60)
    assert whole is not None and small is not None and (small.rows, small.end) == (whole.rows, whole.end)
    assert_same(small.store, whole.store)
    assert small.store.stage_peaks == whole.store.stage_peaks


def test_the_sliding_window_min_max_of_the_spike_screen_is_the_windows_own():
    np = pytest.importorskip("numpy")
    from numpy.lib.stride_tricks import sliding_window_view

    from tui.history_alerts import _sliding

    rng = np.random.default_rng(7)
    for m in (2, 3, 49, 50, 51, 1000, 4099):
        for w in (1, 2, 3, 7, 50):
            if m < w:
                continue
            y = rng.normal(size=m) * 10.0 ** rng.integers(-5, 5, size=m)
            y[rng.random(m) < 0.1] = 0.0
            y[rng.random(m) < 0.05] = math.inf
            for reduce, name in ((np.minimum, "min"), (np.maximum, "max")):
                want = getattr(sliding_window_view(y, w), name)(axis=1)
                assert np.array_equal(_sliding(np, reduce, y, w), want), (m, w, name)


@pytest.mark.parametrize("typecode", ["d", "f"])
def test_array_block_summaries_are_the_python_ones_bit_for_bit(monkeypatch, typecode):
    """A big batch's block summaries come from numpy (tui/store.py `_summarize_blocks`): the same
    bytes as `summarize`/`finite_sum` block by block: finite min/max (a zero's sign is the first
    zero's), NaN/+Inf/-Inf flags (MISSING is not a NaN marker), nothing finite as (inf, -inf)."""
    np = pytest.importorskip("numpy")
    import tui.store as store_mod
    from tui.store import MISSING, Column

    rng = np.random.default_rng(11)
    n = 256 * 40 + 77
    v = rng.normal(size=n) * 10.0 ** rng.integers(-3, 300, size=n)  # some sums overflow
    specials = [math.nan, MISSING, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308]
    for b in range(0, n, 256):  # each block its own mix: none, a few, or all of one kind
        kind = b // 256 % 12
        if kind < len(specials):
            pick = rng.random(256) < (1.0 if kind in (0, 1, 2) and b // 256 % 3 == 0 else 0.05)
            v[b : b + 256][pick[: len(v[b : b + 256])]] = specials[kind]
        elif kind == 9:
            v[b : b + 256] = rng.choice([0.0, -0.0, 1.0], size=len(v[b : b + 256]))
        elif kind == 10:
            v[b : b + 256] = rng.choice([math.nan, MISSING, -0.0, 0.0], size=len(v[b : b + 256]))
    values = list(v)

    def built(array_blocks: int) -> Column:
        monkeypatch.setattr(store_mod, "ARRAY_BLOCKS", array_blocks)
        monkeypatch.setattr(store_mod, "_NUMPY", np)
        c = Column(typecode, sums=typecode == "f")
        for a, b in ((0, 100), (100, 256 * 9 + 3), (256 * 9 + 3, 256 * 30), (256 * 30, n)):
            c.extend(values[a:b])
        return c

    py, arr = built(1 << 30), built(1)
    assert len(py.bmin) == n // 256 == len(arr.bmin)
    assert bytes(arr.bmin) == bytes(py.bmin)
    assert bytes(arr.bmax) == bytes(py.bmax)
    assert bytes(arr.bflags) == bytes(py.bflags)
    assert 0 in py.bflags and all(any(f & bit for f in py.bflags) for bit in (1, 2, 4))
    if typecode == "f":
        assert bytes(arr.bsum) == bytes(py.bsum)
    assert any(math.copysign(1, x) < 0 for x in py.bmin if x == 0)  # a -0.0 kept, as min gives it
    assert any(math.copysign(1, x) > 0 for x in py.bmax if x == 0)
