"""What events.jsonl says, replayed: the alert episodes of a run and the alerts still open.

The one place that turns alert events into episodes: `trainerd status`, `trainerd report`,
the verify checks and the monitor's run picker all read alerts through here."""

from __future__ import annotations

from typing import Any

ALERT_EVENTS = ("alert", "alert_escalated", "alert_cleared")


def alert_timeline(events: list[dict[str, Any]], last_step: int | None = None) -> list[dict[str, Any]]:
    """One entry per alert episode (fired .. cleared), in firing order, from events.jsonl's
    alert, alert_escalated and alert_cleared events. An episode still open has `open` True
    and, given the run's last step, a duration up to it."""
    out: list[dict[str, Any]] = []
    open_: dict[str, dict[str, Any]] = {}
    for e in events:
        kind = e.get("event")
        if kind not in ALERT_EVENTS:
            continue
        rule = str(e.get("rule", "?"))
        if kind == "alert" or (rule not in open_ and kind == "alert_escalated"):
            ep = {
                "rule": rule,
                "metric": e.get("metric"),
                "severity": e.get("severity"),
                "fired_severity": e.get("severity"),
                "first_step": e.get("first_step"),
                "fired_step": e.get("step", e.get("first_step")),
                "value": e.get("value"),
                "threshold": e.get("threshold"),
                "escalated_step": e.get("step") if kind == "alert_escalated" else None,
                "cleared_step": None,
                "duration_steps": None,
                "open": True,
                "message": e.get("message"),
                "explanation": e.get("explanation"),
            }
            open_[rule] = ep
            out.append(ep)
        elif kind == "alert_escalated":
            cur = open_[rule]
            cur["severity"] = e.get("severity", cur["severity"])
            cur["escalated_step"] = e.get("step")
            cur["value"] = e.get("value", cur["value"])
        elif kind == "alert_cleared":
            done = open_.pop(rule, None)
            if done is None:
                continue
            done["open"] = False
            done["cleared_step"] = e.get("step")
            done["duration_steps"] = e.get("duration_steps")
            if (
                done["duration_steps"] is None
                and isinstance(done["cleared_step"], int)
                and isinstance(done["first_step"], int)
            ):
                done["duration_steps"] = done["cleared_step"] - done["first_step"]
    for ep in open_.values():
        if isinstance(last_step, int) and isinstance(ep["first_step"], int):
            ep["duration_steps"] = last_step - ep["first_step"] + 1
    return out


def open_alerts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The episodes fired and not cleared, in firing order."""
    return [ep for ep in alert_timeline(events) if ep["open"]]
