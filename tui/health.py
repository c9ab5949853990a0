"""Green / yellow / red for a metric's current value, from the alert rules' thresholds."""

from __future__ import annotations

import math

from protocol.alerts import DEFAULT_RULES, Alert, thresholds_for

NEAR = 0.8  # within 80% of the way to a threshold counts as "watch it"
SEVERITY_LEVEL = {"info": "ok", "warning": "warning", "critical": "critical"}
_RANK = {"ok": 0, "none": 0, "warning": 1, "critical": 2}


def level_for(metric: str, value: float | None, open_alerts: list[Alert] = (), rules=DEFAULT_RULES) -> str:
    """'ok' | 'warning' | 'critical' | 'none' (no value yet)."""
    if value is None:
        return "none"
    if not math.isfinite(value):
        return "critical"
    level = "ok"
    for kind, severity, thr in thresholds_for(metric, rules):
        bad = {"above": value > thr, "below": value < thr, "abs_above": abs(value) > thr}[kind]
        if bad:
            lv = SEVERITY_LEVEL.get(severity, "warning")
        else:
            near = {
                "above": value > thr * NEAR,
                "below": value < thr / NEAR if thr > 0 else value < thr + 0.05,
                "abs_above": abs(value) > thr * NEAR,
            }[kind]
            lv = "warning" if near else "ok"
        if _RANK[lv] > _RANK[level]:
            level = lv
    for a in open_alerts:
        if a.metric == metric:
            lv = SEVERITY_LEVEL.get(a.severity, "warning")
            if _RANK[lv] > _RANK[level]:
                level = lv
    return level


def threshold_values(metric: str, rules=DEFAULT_RULES) -> list[tuple[float, str]]:
    """(y, severity) lines to draw on a metric's chart."""
    out = []
    for kind, severity, thr in thresholds_for(metric, rules):
        out.append((thr, severity))
        if kind == "abs_above":
            out.append((-thr, severity))
    return out
