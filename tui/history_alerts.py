"""Alerts over a whole history in well under a second: numpy finds where a rule could fire, and
the one streaming engine (`protocol.alerts.AlertEngine`) decides there.

The streaming engine costs ~40 us a record, ~40 s for a 1M-step run. Most records cannot
change any alert: no alert is open, no bad streak is under way, and the value is on the good
side of every bar the rule has (its threshold, its hard threshold, a spike bar, a trend bar).
For each rule, a vectorised pass marks the records that might be bad, using bounds that can
only over-mark (a spike over factor x the rolling median is also over factor x the rolling
minimum; a trend is taken with a margin). Around each marked stretch the engine runs on its
own for that rule: it starts far enough back to refill the rule's rolling window (its events
there are discarded), and runs past the stretch until it is quiet again (no alert open, no
streak). A fresh engine that is not quiet where the stretch begins (its window was still
filling) is not trusted: the gap is then streamed in full. So the alerts, their first and
clear steps, are the engine's own; tests compare them with a full streaming pass.

Each rule's engine is brought to the history's last record the same way, and the rules' end
states make one engine: what a streaming pass holds there (open alerts, streaks under way,
rolling windows). The monitor's live engine goes on from it, so an episode that straddles the
end of the history is neither told twice nor started late.
"""

from __future__ import annotations

import dataclasses

from protocol.alerts import Alert, AlertEngine, Rule
from protocol.columns import MISSING_BITS

from .fastload import heap_temporaries
from .store import RunStore

TREND_MARGIN = 0.02  # the vectorised trend r may differ from the engine's in the last digits
TREND_KINDS = ("diverging_trends", "rising_together", "growing")


def evaluate_history(rules, store: RunStore, should_stop=lambda: False):
    """([(event, alert)] in the order a streaming engine emits them, the engine as a streaming
    pass leaves it after the last record), or None when `should_stop()` turned true."""
    import numpy as np

    engine = AlertEngine(rules)
    n = len(store)
    if not n:
        return [], engine
    with heap_temporaries():  # the screens' 1M-value temporaries: heap memory used again, not fresh pages
        return _evaluate(np, engine, store, should_stop)


def _evaluate(np, engine: AlertEngine, store: RunStore, should_stop):
    steps = np.frombuffer(store.steps, dtype=np.int64)
    found: list[tuple[int, int, str, Alert]] = []  # (record, rule order, event, alert)
    ends: list[tuple[int, int, str, AlertEngine]] = []  # (record its open alert fired at, rule order, rule, engine)
    for order, rule in enumerate(engine.rules):
        got = _one_rule(np, rule, store, steps, should_stop)
        if got is None:
            return None
        events, rule_engine = got
        found.extend((i, order, ev, a) for i, ev, a in events)
        fired_at = max((i for i, ev, _a in events if ev == "alert"), default=-1)
        ends.append((fired_at if rule.name in rule_engine.open else -1, order, rule.name, rule_engine))
    found.sort(key=lambda t: (t[0], t[1]))
    for _fired_at, _order, name, rule_engine in sorted(ends, key=lambda t: (t[0], t[1])):
        engine.carry_on(name, rule_engine)  # open alerts in the order they fired, as in one pass
    return [(ev, a) for _i, _o, ev, a in found], engine


def _col(np, store: RunStore, key: str | None):
    """(values, present) of a column; absent keys are all missing."""
    c = store.columns.get(key) if key else None
    if c is None:
        return None, None
    v = np.frombuffer(c.values, dtype=np.float64)
    return v, v.view(np.uint64) != MISSING_BITS


def _one_rule(np, rule: Rule, store: RunStore, steps, should_stop):
    n = len(store)
    need = {rule.metric, *rule.metrics, rule.pushback, rule.relative_to, rule.critical_factor_of, rule.only_without}
    cols = {k: _col(np, store, k) for k in need if k}
    if rule.kind == "rank_imbalance":
        cand, fed = _rank_candidates(np, rule, store, n), None
    else:
        cand, fed = _candidates(np, rule, cols, n)
    marked = np.flatnonzero(cand)
    lead = rule.window + 10 if (rule.spike_factor is not None or rule.kind in TREND_KINDS) else 2
    keys = [(k, cols[k][0], cols[k][1]) for k in need if k and cols[k][0] is not None]
    maps = {k: _map_columns(np, store, k) for k in need if k and cols[k][0] is None}
    maps = {k: m for k, m in maps.items() if m}

    def record(i: int) -> dict:
        """Record i as the engine needs it: the rule's keys, absent where the record lacked them
        (a per-rank map from its "key.rank" columns)."""
        r: dict = {"step": int(steps[i])}
        for k, v, present in keys:
            if present[i]:
                r[k] = float(v[i])
        for k, m in maps.items():
            d = {sub: float(v[i]) for sub, v, present in m if present[i]}
            if d:
                r[k] = d
        return r

    def lead_start(i: int) -> int:
        """Where a fresh engine must start to have the rule's window full at record i."""
        if fed is None:
            return max(0, i - lead)
        j = int(np.searchsorted(fed, i))  # fed values before record i
        return int(fed[j - lead]) if j >= lead else 0

    events: list[tuple[int, str, Alert]] = []
    engine: AlertEngine | None = None
    i = 0  # next record the current engine would see

    def catch_up(c: int) -> AlertEngine:
        """An engine that has seen the records before c as one streaming pass would have."""
        nonlocal engine, i
        if engine is None or c - i > 4 * lead:
            start = lead_start(c)
            fresh = AlertEngine((rule,))
            for j in range(start, c):
                fresh.update(record(j))  # nothing before c can be bad: no events to keep
            if start == 0 or fresh.quiet:
                engine, i = fresh, c  # its window is the full stream's; nothing open, no streak
            elif engine is None:
                engine, i = AlertEngine((rule,)), 0  # not trusted: stream from the start
            # else: not trusted; the engine that left off at i streams the gap below
        while i < c:  # a short gap (or a fresh start that was not trusted): stream it
            events.extend((i, ev, dataclasses.replace(a)) for ev, a in engine.update(record(i)))
            i += 1
        return engine

    k = 0  # next marked record not yet covered
    while k < len(marked):
        if should_stop():
            return None
        c = int(marked[k])
        engine = catch_up(c)
        while i < n:  # the marked stretch, and on until the rule is quiet again
            events.extend((i, ev, dataclasses.replace(a)) for ev, a in engine.update(record(i)))
            i += 1
            while k < len(marked) and marked[k] < i:
                k += 1
            if engine.quiet and (k == len(marked) or marked[k] - i > lead):
                break
            if not i % 4096 and should_stop():
                return None
    return events, catch_up(n)  # the live engine goes on from here


def _map_columns(np, store: RunStore, key: str) -> list:
    """[(sub, values, present)] of the columns "key.sub" the store made of a per-rank map."""
    out = []
    for name in store.extra:
        if name.startswith(key + "."):
            v, present = _col(np, store, name)
            out.append((name[len(key) + 1 :], v, present))
    return out


def _rank_candidates(np, rule: Rule, store: RunStore, n: int):
    """Records where one rank could be over threshold x the other ranks' median: the slowest over
    the fastest (a median of the others is never under the fastest), and as much slower."""
    ranks = [v for _sub, v, _present in _map_columns(np, store, rule.metric)]
    if len(ranks) < 2:
        return np.zeros(n, dtype=bool)
    stacked = np.vstack([np.where(np.isfinite(v), v, np.nan) for v in ranks])
    with np.errstate(invalid="ignore"):
        hi, lo = np.fmax.reduce(stacked), np.fmin.reduce(stacked)
        cand = (hi > rule.threshold * lo) & (hi - lo > rule.spike_floor)
    evaluated = np.isfinite(stacked).sum(axis=0) >= 2
    return _streaks(np, cand & evaluated, evaluated, rule.consecutive, np.zeros(n, dtype=bool))


def _candidates(np, rule: Rule, cols: dict, n: int):
    """(records where the rule might be bad, record indices that feed its rolling window or None)."""
    skip = np.zeros(n, dtype=bool)
    if rule.only_without and cols.get(rule.only_without, (None, None))[1] is not None:
        skip = cols[rule.only_without][1]
    if rule.kind == "non_finite":
        cand = np.zeros(n, dtype=bool)
        for m in rule.metrics or (rule.metric,):
            v, present = cols.get(m, (None, None))
            if v is not None:
                cand |= present & ~np.isfinite(v)
        return cand & ~skip, None
    if rule.kind == "growing":
        return _growth_candidates(np, rule, cols, n, skip)
    if rule.kind in TREND_KINDS:
        return _trend_candidates(np, rule, cols, n, skip)
    v, present = cols.get(rule.metric, (None, None))
    if v is None:
        return np.zeros(n, dtype=bool), None
    if rule.relative_to:
        ref, ref_present = cols.get(rule.relative_to, (None, None))
        if ref is None:
            return np.zeros(n, dtype=bool), None
        ok = ref_present & np.isfinite(ref) & (ref != 0)
        with np.errstate(all="ignore"):
            v = np.where(ok, v / np.where(ok, ref, 1.0), np.nan)
        if rule.spike_factor is not None:  # a spike of a ratio: no cheap bound; stream it all
            return ~skip, None
    fin = np.isfinite(v) & ~skip
    bars = [rule.threshold] + ([rule.hard_threshold] if rule.hard_threshold is not None else [])
    with np.errstate(invalid="ignore"):
        if rule.kind == "above":
            cand = v > min(bars)
        elif rule.kind == "below":
            cand = v < max(bars)
        elif rule.kind == "abs_above":
            cand = np.abs(v) > min(bars)
        else:
            return ~skip, None  # a kind this module does not know: stream every record
    fed = None
    if rule.spike_factor is not None:
        fed = np.flatnonzero(fin).astype(np.int32)
        cand |= _spike_candidates(np, rule, v[fed], fed, n)
    cand &= fin
    urgent = cand if rule.pushback else np.zeros(n, dtype=bool)  # a controller that stops pushing: no streak
    if rule.hard_threshold is not None and not rule.pushback:
        with np.errstate(invalid="ignore"):
            urgent = fin & (np.abs(v) > rule.hard_threshold if rule.kind == "abs_above" else _past(rule, v))
    evaluated = present & ~skip & ~np.isnan(v) if rule.relative_to else present & ~skip
    return _streaks(np, cand, evaluated, rule.consecutive, urgent), fed


def _past(rule: Rule, v):
    return v > rule.hard_threshold if rule.kind == "above" else v < rule.hard_threshold


def _streaks(np, cand, evaluated, need: int, urgent):
    """The candidates that can fire: in a run of at least `need` evaluated candidates in a row
    (a shorter bad streak ends in a good step and leaves nothing behind), or urgent ones.
    Records the rule does not evaluate (its metric absent) neither extend nor break a run.
    A run still under way at the last record is kept whatever its length: the records after
    the history may go on with it (and the engine brought to the end streams it anyway)."""
    if need <= 1:
        return cand
    idx = np.flatnonzero(evaluated).astype(np.int32)
    c = cand[idx].astype(np.int8)
    edges = np.diff(np.concatenate([[0], c, [0]]).astype(np.int8))
    del c
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    del edges
    long = (ends - starts >= need) | (ends == len(idx))
    mark = np.zeros(len(idx) + 1, dtype=np.int32)
    np.add.at(mark, starts[long], 1)
    np.add.at(mark, ends[long], -1)
    out = np.zeros(len(cand), dtype=bool)
    out[idx[np.cumsum(mark, dtype=np.int32)[:-1] > 0]] = True
    return out | (urgent & cand)


def _spike_candidates(np, rule: Rule, y, fed, n: int):
    """Records whose value could be past the spike bar: factor x the rolling median is bounded by
    factor x the rolling minimum (a rise) or maximum / factor (a fall) of the same window."""
    out = np.zeros(n, dtype=bool)
    w, f, floor = rule.window, rule.spike_factor or 0.0, rule.spike_floor
    m = len(y)
    if m < 2 or f <= 0:
        return out
    reduce = np.minimum if rule.kind != "below" else np.maximum
    prev = np.empty(m)  # min (max) of the up-to-w values fed before each one
    prev[0] = np.nan
    lim = min(w, m - 1)
    prev[1 : lim + 1] = reduce.accumulate(y[:lim])
    if m > w:  # the window's min (max), in O(m) whatever w
        prev[w:] = _sliding(np, reduce, y, w)[: m - w]
    enough = np.ones(m, dtype=bool)
    enough[: min(w, 10)] = False  # the engine needs this many values for a median
    with np.errstate(invalid="ignore"):
        if rule.kind == "below":
            hit = y < prev / f
            if floor > 0:
                hit &= y < floor
        else:
            hit = (y > f * prev) & (y > floor)
    out[fed[hit & enough]] = True
    return out


def _sliding(np, reduce, y, w: int):
    """reduce (np.minimum or np.maximum) of each full window of w values: [r(y[0:w]), r(y[1:w+1]),
    ...], in O(len(y)) whatever w (van Herk / Gil-Werman: per block of w, running reductions from
    its start and from its end; a window spans at most two blocks). Exactly the values a window's
    min/max gives: a reduction only picks one of its values. y holds no NaN."""
    m = len(y)
    pad = -m % w
    g = np.empty(m + pad)
    g[:m] = y
    g[m:] = np.inf if reduce is np.minimum else -np.inf
    g = g.reshape(-1, w)
    ahead = reduce.accumulate(g, axis=1).ravel()  # block start .. i
    behind = reduce.accumulate(g[:, ::-1], axis=1)[:, ::-1].ravel()  # i .. block end
    k = m - w + 1
    return reduce(behind[:k], ahead[w - 1 : w - 1 + k])


def _trend_candidates(np, rule: Rule, cols: dict, n: int, skip):
    """Records where every trend the rule needs could be past its bar (r within a margin). The
    trends are taken one metric at a time; once no record is left, the rest are not computed."""
    w = rule.window
    bar = rule.threshold - TREND_MARGIN
    value = None  # the weakest trend so far (diverging: the second metric's counts negated)
    all_present = ~skip
    all_fed = ~skip
    for i, m in enumerate(rule.metrics):
        v, present = cols.get(m, (None, None))
        if v is None:
            return np.zeros(n, dtype=bool), None
        all_present &= present
        finite = np.isfinite(v) & ~skip
        all_fed &= finite
        r_fed = _rolling_r(np, v[finite], w)  # r of the window ending at each fed value (NaN: not full)
        if rule.kind == "diverging_trends" and i == 1:
            r_fed = -r_fed
        count = np.cumsum(finite, dtype=np.int32)  # fed values up to and including each record
        r = np.full(n, np.nan, dtype=np.float32)  # a screen with a margin: float32 is plenty
        has = count > 0
        r[has] = r_fed[count[has] - 1]
        del r_fed, count, has
        value = r if value is None else np.minimum(value, r)
        with np.errstate(invalid="ignore"):
            if not (value > bar).any():
                return np.zeros(n, dtype=bool), None
    with np.errstate(invalid="ignore"):
        cand = value > bar
    cand = _streaks(np, cand & all_present, all_present, rule.consecutive, np.zeros(n, dtype=bool))
    return cand, np.flatnonzero(all_fed).astype(np.int32)  # a lead-in over these fills every window


def _window_sums(np, y, w: int, squares: bool, block: int = 1 << 16):
    """For each block of full windows of w values: (first, last + 1 window end, sum of y, sum of
    squared deviations or None, sum of position x deviation), each window centred on itself.
    A block at a time, from running sums of the block's values centred on their mean: memory stays
    small, and the sums short enough to keep their digits (a 1M-step run's byte counts)."""
    pos = np.arange(block + w, dtype=np.float64)
    for a0 in range(w - 1, len(y), block):
        a1 = min(len(y), a0 + block)
        seg = y[a0 - w + 1 : a1]
        n = len(seg)
        z = seg - seg.mean()
        c1, ci = _cumsum0(np, z), _cumsum0(np, pos[:n] * z)
        k = n - w + 1  # windows in the block: [s, s + w) for s in 0..k-1
        sy = c1[w:] - c1[:k]
        sxy = ci[w:] - ci[:k] - pos[:k] * sy - (w - 1) / 2.0 * sy  # positions 0..w-1 within the window
        syy = None
        if squares:
            c2 = _cumsum0(np, z * z)
            syy = c2[w:] - c2[:k] - sy * sy / w
        yield a0, a1, sy, syy, sxy


def _rolling_r(np, y, w: int):
    """Pearson r of each full window of w values against their position (NaN before the first)."""
    out = np.full(len(y), np.nan, dtype=np.float32)
    if len(y) < w or w < 3:
        return out
    sxx = w * (w * w - 1) / 12.0
    for a0, a1, _sy, syy, sxy in _window_sums(np, y, w, squares=True):
        with np.errstate(all="ignore"):
            r = sxy / np.sqrt(sxx * np.maximum(syy, 0.0))
        out[a0:a1] = np.where(np.isfinite(r), np.clip(r, -1.0, 1.0), 1.0)  # flat: let the engine judge
    return out


def _growth_candidates(np, rule: Rule, cols: dict, n: int, skip):
    """Kind "growing" (a leak): records where some metric's window could show a growth past the
    threshold along a line straighter than trend_r (both within a margin)."""
    w = rule.window
    cand = np.zeros(n, dtype=bool)
    evaluated = np.zeros(n, dtype=bool)
    any_fed = np.zeros(n, dtype=bool)
    for m in rule.metrics or (rule.metric,):
        v, present = cols.get(m, (None, None))
        if v is None:
            continue
        evaluated |= present & ~skip
        finite = np.isfinite(v) & ~skip
        any_fed |= finite
        y = v[finite]
        bar = rule.threshold * (1 - 1e-3) if rule.threshold > 0 else rule.threshold - 1e-3  # float32, a margin
        g_fed = _rolling_growth(np, y, w)
        with np.errstate(invalid="ignore"):
            if not (g_fed > bar).any():
                continue  # nowhere grown enough: the straightness need not be computed
        r_fed = _rolling_r(np, y, w)
        del y
        count = np.cumsum(finite, dtype=np.int32)
        has = count > 0
        r, g = np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
        r[has], g[has] = r_fed[count[has] - 1], g_fed[count[has] - 1]
        del r_fed, g_fed, count, has
        with np.errstate(invalid="ignore"):
            cand |= (r > rule.trend_r - TREND_MARGIN) & (g > bar)
        del r, g
    cand = _streaks(np, cand & evaluated, evaluated, rule.consecutive, np.zeros(n, dtype=bool))
    return cand, np.flatnonzero(any_fed).astype(np.int32)


def _rolling_growth(np, y, w: int):
    """Least-squares slope x (w - 1) of each full window of w values (NaN before the first)."""
    out = np.full(len(y), np.nan, dtype=np.float32)
    if len(y) < w or w < 3:
        return out
    sxx = w * (w * w - 1) / 12.0
    for a0, a1, _sy, _syy, sxy in _window_sums(np, y, w, squares=False):
        out[a0:a1] = sxy / sxx * (w - 1)
    return out


def _cumsum0(np, x):
    """[0, x0, x0 + x1, ...]: running sums with a leading zero, in one buffer."""
    out = np.empty(len(x) + 1)
    out[0] = 0.0
    np.cumsum(x, out=out[1:])
    return out
