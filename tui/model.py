"""The run the monitor shows: its state in one object, changed only by the feed's batches.

The app applies what the readers post (`apply_batch`, `apply_history`) and each apply says
which parts of the screen changed; widgets are handed the model and read it when they draw.
No Textual and no file IO here: every value that came from a run file is checked (a
`started_at` of "yesterday", a status that is a number) before anything does arithmetic on it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.alerts import DEFAULT_RULES, Alert, Rule, most_severe
from protocol.catalogue import finite_value
from protocol.events import alert_timeline
from protocol.health import Verdict, fork_step, fork_suggestion, run_verdict, worst_severity
from protocol.rundir import RunPaths, run_elapsed
from protocol.text import safe_text

from .adapted import header_suffix
from .braille import fmt_value
from .store import CHART_METRICS, RunStore

# An alert on a metric without its own chart jumps to the chart that tells its story.
CHART_OF = {
    "kl_target_error": "kl",
    "explained_variance": "value_loss",
    "reward_std": "reward_mean",
    "policy_loss": "grad_norm",
    "approx_kl": "clip_frac",
    "gold_reward_mean": "reward_mean",
}
MAX_EVENTS = 500  # the events panel shows the last ones only


def _shown_dir(root: Path) -> str:
    """A run dir as a command to copy names it: relative to the working directory when it is
    under it (where the user pastes it: `runs/<id>`), else absolute."""
    try:
        rel = os.path.relpath(root)
    except (OSError, ValueError):
        return os.fspath(root)
    return rel if not rel.startswith("..") else os.fspath(root)


def chart_of(metric: str) -> str:
    return CHART_OF.get(metric, metric)


@dataclass
class HeaderInfo:
    run_id: str = "—"
    status: str = "…"
    step: int | None = None
    total_steps: int | None = None
    steps_per_s: float | None = None
    elapsed_s: float | None = None
    age_s: float | None = None
    corrupt: int = 0
    loading: str = ""  # "history 40%" while the background load runs
    phase: str = ""  # before the first step: what the trainer does ("warm start", "reward model")
    verdict: Verdict = field(default_factory=lambda: run_verdict([], "…", ""))  # the run's health


class RunModel:
    def __init__(self):
        self.store = RunStore()
        self.acked: set[str] = set()  # the user's acknowledged alerts (all runs; protocol.health)
        self.link = ""  # an ssh:// run's link when it is down ("link ... down since ..."), else ""
        self.reset(None)

    def reset(self, paths: RunPaths | None) -> None:
        """Forget the run shown (the store is cleared in place: widgets keep their reference)."""
        self.paths = paths
        self.store.clear()
        self.open_alerts: list[Alert] = []
        self.alert_history: list[tuple[str, Alert]] = []
        self.events: list[dict] = []
        self.manifest: dict = {}
        self.status = "…"
        self.corrupt = 0
        self.history_corrupt = 0
        self.skipped = 0  # records without a placeable step
        self.problem = ""  # a run file that cannot be read, from the feed (one line)
        self.loading = ""
        self.last_arrival: float | None = None  # wall clock of the last batch with records
        self.history_done = False  # the whole log is in the store
        self.alerts_step: int | None = None  # the last step the live alert engine has evaluated
        # the rules the alerts are evaluated with: the run's alerts.json (defaults until it is read)
        self.rules: tuple[Rule, ...] = DEFAULT_RULES
        self.rules_note = ""  # why the defaults are used (a damaged alerts.json)
        self.alerts_version = 0  # bumped when alert_history changes (episodes are cached on it)
        self._episodes: tuple[tuple, list[dict[str, Any]]] | None = None
        self.checkpoint_steps: list[int] = []  # complete checkpoints (listed by the app off the UI thread)

    @property
    def run_id(self) -> str:
        """The run's name; for another framework's run also which one and what it lacks."""
        return safe_text(self.paths.run_id, 80) + header_suffix(self.manifest) if self.paths else "—"

    # -- changes ------------------------------------------------------------------------

    def apply_batch(self, batch, now: float) -> set[str]:
        """Take in a `feed.Batch`; return what changed: data, alerts, events, header, notice."""
        changed: set[str] = set()
        if batch.rules is not None:
            self.rules = tuple(batch.rules)
            self.rules_note = batch.rules_note or ""
            changed |= {"alerts", "data"}  # thresholds and colours follow the run's rules
        if batch.reset:
            self.store.clear()
            self.alert_history = []
            self.alerts_version += 1
            changed |= {"data", "alerts", "reset"}
        if batch.cols and batch.cols["step"]:
            self.store.extend(batch.cols)
            self.last_arrival = now
            changed.add("data")
        if batch.alerts:
            self.alert_history.extend(batch.alerts)
            self.alerts_version += 1
        if batch.alerts or [a.rule for a in batch.open_alerts] != [a.rule for a in self.open_alerts]:
            changed.add("alerts")
        self.open_alerts = batch.open_alerts
        if batch.evaluated_step is not None:
            self.alerts_step = batch.evaluated_step
        if batch.alerts_only:
            return changed
        if batch.events:
            self.events.extend(batch.events)
            del self.events[:-MAX_EVENTS]
            changed.add("events")
        if batch.manifest is not None:
            self.manifest = batch.manifest if isinstance(batch.manifest, dict) else {}
            changed |= {"header", "events"}  # the events' times are relative to started_at
        if batch.status is not None:
            self.status = safe_text(str(batch.status), 20) or "?"
            changed.add("header")
        if batch.corrupt_frames + self.history_corrupt != self.corrupt:
            self.corrupt = batch.corrupt_frames + self.history_corrupt
            changed.add("alerts")
        if batch.skipped_records != self.skipped:
            self.skipped = batch.skipped_records
            changed.add("alerts")
        if batch.problem is not None and batch.problem != self.problem:
            self.problem = batch.problem
            changed.add("alerts")
        return changed

    def apply_history(self, result, tail=None) -> set[str]:
        """Take in `feed.load_history`'s result. `tail` (a `feed.Batch`): the alerts of the records
        shown before the history came, evaluated again by an engine that saw the history first
        (they replace the ones shown, from an engine that began at the tail), and what is open;
        None when they could not be: the history's alerts are put before the ones shown."""
        older, alerts, _engine, corrupt = result[:4]
        self.store.prepend(older)
        if tail is None:
            self.alert_history[:0] = alerts
        else:
            self.alert_history = list(alerts) + tail.alerts
            self.open_alerts = tail.open_alerts
            if tail.evaluated_step is not None:
                self.alerts_step = tail.evaluated_step
        self.alerts_version += 1
        self.history_corrupt = corrupt
        self.corrupt += corrupt
        self.loading = ""
        self.history_done = True
        return {"data", "alerts", "header"}

    def fail(self, text: str) -> None:
        """The reader stopped on something it could not handle: say so, keep what is shown."""
        self.problem = text

    # -- what is shown ------------------------------------------------------------------

    @property
    def started_at(self) -> float | None:
        return finite_value(self.manifest.get("started_at"))

    @property
    def total_steps(self) -> int | None:
        cfg = self.manifest.get("config")
        steps = cfg.get("steps") if isinstance(cfg, dict) else None
        return steps if isinstance(steps, int) and not isinstance(steps, bool) and 0 < steps < 1 << 63 else None

    def phase(self, status: str) -> str:
        """What a running trainer is doing before its first PPO step (run.json's `phase`)."""
        ph = self.manifest.get("phase")
        if len(self.store) or status != "running" or not isinstance(ph, str) or not ph or ph == "ppo":
            return ""
        return f"setup: {safe_text(ph, 40)}"

    def most_severe(self) -> Alert | None:
        return most_severe(self.open_alerts)

    def notice(self) -> str:
        """One line on what could not be read, "" when everything could."""
        parts = [self.link] if self.link else []
        if self.rules_note:
            parts.append(safe_text(self.rules_note, 200))
        if self.problem:
            parts.append(safe_text(self.problem, 200))
        if self.skipped:
            parts.append(f"{self.skipped:,} record{'s' * (self.skipped != 1)} without a usable step skipped")
        return "; ".join(parts)

    def alert_marks(self, metric: str) -> list[tuple[int, str]]:
        """(first step, severity) of the alerts drawn under `metric`'s detail chart."""
        return [
            (a.first_step, a.severity) for ev, a in self.alert_history if ev == "alert" and chart_of(a.metric) == metric
        ]

    def header_info(self, now: float, stall_after: float) -> HeaderInfo:
        s = self.store
        last_time = s.times[-1] if len(s) and math.isfinite(s.times[-1]) else self.last_arrival
        age = now - last_time if last_time is not None else None
        status = self.status
        if status == "running" and age is not None and age > stall_after:
            status = "stalled"
        live = status in ("running", "stalled", "…")  # "…": not read yet
        elapsed = run_elapsed(self.manifest, "running" if live else status, last_time, now)
        return HeaderInfo(
            run_id=self.run_id,
            status=status,
            step=s.last_step,
            total_steps=self.total_steps,
            steps_per_s=s.steps_per_second(),
            elapsed_s=elapsed,
            age_s=age,
            corrupt=self.corrupt,
            loading=self.loading,
            phase=self.phase(status),
            verdict=self.verdict(status),
        )

    # -- the run's health: what happened, not only what is open now ----------------------------

    def episodes(self) -> list[dict[str, Any]]:
        """The alert episodes of the run as the live engine saw them, in the shape of
        `protocol.events.alert_timeline` (the same replay, fed the engine's events). An episode
        the alert history leaves open is open only if the live engine still has it open (the
        history's alerts put before a log that was read again from its start)."""
        live = {(a.rule, a.first_step) for a in self.open_alerts}
        key = (self.alerts_version, frozenset(live))
        if self._episodes is None or self._episodes[0] != key:
            events = [{"event": ev, **a.to_event(ev)} for ev, a in self.alert_history]
            eps = alert_timeline(events)
            for ep in eps:
                if ep["open"] and (ep["rule"], ep["first_step"]) not in live:
                    ep["open"] = False
            self._episodes = (key, eps)
        return self._episodes[1]

    def verdict(self, status: str | None = None) -> Verdict:
        """`protocol.health.run_verdict` of the run (status as shown: 'stalled' included)."""
        run_id = self.paths.run_id if self.paths else ""
        root = self.paths.root if self.paths else None
        return run_verdict(self.episodes(), status or self.status, run_id, self.acked, root)

    def rule(self, name: object) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def now_text(self, ep: dict[str, Any]) -> str:
        """The current values of the metrics an episode's rule looks at ('reward_mean 1.126,
        gold_reward_mean -0.377'), "" when the store has none."""
        rule = self.rule(ep.get("rule"))
        metrics = list(rule.metrics) if rule is not None and rule.metrics else [ep.get("metric")]
        parts = []
        for m in metrics:
            if isinstance(m, str) and m in self.store.columns and self.store.columns[m].present:
                parts.append(f"{safe_text(m, 40)} {fmt_value(self.store.value(m))}")
        return ", ".join(parts)

    def fork_episode(self, verdict: Verdict) -> dict[str, Any] | None:
        """The open critical alert a fork is suggested for: the cause if critical, else the
        first critical consequence (None for another framework's run: no `trainerd fork`)."""
        if self.paths is None or self.manifest.get("adapter"):
            return None
        eps = [verdict.cause] if verdict.cause is not None else []
        for ep in eps + list(verdict.consequences):
            if worst_severity(ep) == "critical" and ep.get("severity") == "critical":
                return dict(ep)
        return None

    def fork_hint(self, verdict: Verdict) -> str | None:
        """`trainerd fork RUN --from-step K --set key=value` for the verdict's critical alert
        (`protocol.health.fork_suggestion`): K is the last complete checkpoint at or before the
        alert's first step (else that step), the value from the last record or the config."""
        ep = self.fork_episode(verdict)
        if ep is None or self.paths is None:
            return None
        steps = list(self.checkpoint_steps)
        last = self.manifest.get("last_checkpoint")
        if isinstance(last, str):
            name = last.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step_") and name[5:].isdigit():
                steps.append(int(name[5:]))
        step = fork_step(steps, ep.get("first_step"))
        record = {k: self.store.value(k) for k in ("kl_coef", "learning_rate") if k in self.store.columns}
        cfg = self.manifest.get("config")
        cfg = cfg if isinstance(cfg, dict) else None
        return fork_suggestion(ep.get("rule"), _shown_dir(self.paths.root), step, record, cfg)

    def open_alert(self, rule: object) -> Alert | None:
        return next((a for a in self.open_alerts if a.rule == rule), None)

    def selected_chart(self, alert: Alert) -> int | None:
        """The grid index of the chart that shows `alert`, if it has one."""
        metric = chart_of(alert.metric)
        return CHART_METRICS.index(metric) if metric in CHART_METRICS else None
