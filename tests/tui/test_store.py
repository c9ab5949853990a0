"""The monitor's compact history: decimation keeps NaN/Inf visible, resumes cut history."""

from __future__ import annotations

import math

from tui.braille import ChartSpec, Line, draw
from tui.store import BLOCK, FLAG_NAN, FLAG_POS_INF, RunStore


def _recs(n, start=1, special=None):
    out = []
    for s in range(start, start + n):
        r = {"step": s, "time": float(s), "kl": 0.1 + s * 1e-4, "stage_s": {"rollout": 0.3, "other": 0.1}}
        r.update((special or {}).get(s, {}))
        out.append(r)
    return out


def test_decimation_keeps_non_finite_markers_and_extremes():
    store = RunStore()
    n = 50 * BLOCK
    store.extend(
        RunStore.columnize(_recs(n, special={1234: {"kl": math.nan}, 9000: {"kl": math.inf}, 7000: {"kl": 55.0}}))
    )
    buckets = store.decimate("kl", 0, n, 40)
    flags = 0
    for b in buckets:
        flags |= b.flags
    assert flags & FLAG_NAN and flags & FLAG_POS_INF
    assert max(b.hi for b in buckets) == 55.0
    text = "".join(str(t) for t in draw(ChartSpec(20, 4, [Line(buckets, "cyan")])))
    assert "N" in text and "▲" in text


def test_missing_field_is_not_a_nan_marker():
    store = RunStore()
    store.extend(RunStore.columnize(_recs(10)))
    assert store.columns["gold_reward_mean"].present == 0
    assert store.value("gold_reward_mean") is None
    assert all(b.flags == 0 for b in store.decimate("gold_reward_mean", 0, 10, 5))


def test_a_step_going_back_cuts_the_later_history():
    store = RunStore()
    store.extend(RunStore.columnize(_recs(600)))
    store.extend(RunStore.columnize(_recs(10, start=300)))
    assert list(store.steps) == list(range(1, 310))
    assert len(store.columns["kl"].bmin) == len(store) // BLOCK


def test_prepend_history():
    tail, older = RunStore(), RunStore()
    tail.extend(RunStore.columnize(_recs(100, start=901)))
    older.extend(RunStore.columnize(_recs(905)))  # overlaps the tail by 5 steps
    tail.prepend(older)
    assert list(tail.steps) == list(range(1, 1001))
    assert len(tail.stages["rollout"]) == 1000
