"""What events.jsonl says, replayed: the alert episodes of a run and the alerts still open.

The one place that turns alert events into episodes: `trainerd status`, `trainerd report`,
the verify checks and the monitor's run picker all read alerts through here."""

from __future__ import annotations

ALERT_EVENTS = ("alert", "alert_escalated", "alert_cleared")


def alert_timeline(events: list[dict], last_step: int | None = None) -> list[dict]:
    """One entry per alert episode (fired .. cleared), in firing order, from events.jsonl's
    alert, alert_escalated and alert_cleared events. An episode still open has `open` True
    and, given the run's last step, a duration up to it."""
    out: list[dict] = []
    open_: dict[str, dict] = {}
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
            ep = open_[rule]
            ep["severity"] = e.get("severity", ep["severity"])
            ep["escalated_step"] = e.get("step")
            ep["value"] = e.get("value", ep["value"])
        elif kind == "alert_cleared":
            ep = open_.pop(rule, None)
            if ep is None:
                continue
            ep["open"] = False
            ep["cleared_step"] = e.get("step")
            ep["duration_steps"] = e.get("duration_steps")
            if (
                ep["duration_steps"] is None
                and isinstance(ep["cleared_step"], int)
                and isinstance(ep["first_step"], int)
            ):
                ep["duration_steps"] = ep["cleared_step"] - ep["first_step"]
    for ep in open_.values():
        if isinstance(last_step, int) and isinstance(ep["first_step"], int):
            ep["duration_steps"] = last_step - ep["first_step"] + 1
    return out


def open_alerts(events: list[dict]) -> list[dict]:
    """The episodes fired and not cleared, in firing order."""
    return [ep for ep in alert_timeline(events) if ep["open"]]
