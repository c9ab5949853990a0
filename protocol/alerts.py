"""The alert rule engine (SPEC section 8), shared by the trainer and the monitor.

Feed it step records in order with `AlertEngine.update(record)`; it returns the
alerts that fired, escalated or cleared at that step. A rule can ask for N
consecutive bad steps before it fires, and clears with hysteresis (the value must
come back past `clear_threshold` for `clear_consecutive` steps). Rules are data:
the defaults below can be overridden, disabled or extended from a TOML file:

    [rules.kl_runaway]
    threshold = 0.3
    consecutive = 2

    [rules.my_length_floor]          # a new rule
    metric = "response_length_mean"
    kind = "below"
    threshold = 4.0
    severity = "warning"
    explanation = "responses got very short: check for EOS exploitation"
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from bisect import insort
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .catalogue import METRICS

SEVERITIES = ("info", "warning", "critical")
KINDS = ("above", "below", "abs_above", "non_finite", "diverging_trends", "rising_together")


class AlertConfigError(Exception):
    """A bad alerts file; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str  # the metric the rule reads (the first of `metrics` for multi-metric kinds)
    kind: str  # one of KINDS
    threshold: float
    severity: str
    explanation: str  # one line: what it means, likely causes, what to try
    metrics: tuple[str, ...] = ()  # non_finite / trend kinds: every metric checked
    consecutive: int = 1  # bad steps in a row before it fires
    clear_threshold: float | None = None  # hysteresis; default: the threshold itself
    clear_consecutive: int = 3  # good steps in a row before it clears
    warmup_steps: int = 0  # ignore steps before this one
    spike_factor: float | None = None  # also fire above this many times the rolling median
    window: int = 50  # rolling median window / trend window
    critical_factor_of: str | None = None  # escalate when metric > critical_factor x this metric
    critical_factor: float = 0.0
    critical_consecutive: int = 5
    only_without: str | None = None  # skip the rule on records that carry this metric
    enabled: bool = True


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(
        "non_finite",
        "policy_loss",
        "non_finite",
        0.0,
        "critical",
        "a loss, KL, entropy, grad norm or reward is NaN/Inf: likely fp overflow in log-probs or the "
        "ratio, an empty minibatch or a NaN reward; stop, restore the last checkpoint, lower the LR, check the reward",
        metrics=("policy_loss", "value_loss", "kl", "entropy", "grad_norm", "reward_mean"),
        clear_consecutive=1,
    ),
    Rule(
        "kl_runaway",
        "kl",
        "above",
        0.2,
        "warning",
        "KL to the reference keeps rising: KL penalty too weak, LR too high or an exploitable reward "
        "model; raise kl_coef or the target, lower the LR, read samples",
        clear_threshold=0.18,
        critical_factor_of="kl_target",
        critical_factor=3.0,
        critical_consecutive=5,
    ),
    Rule(
        "kl_control",
        "kl_target_error",
        "abs_above",
        0.15,
        "warning",
        "the KL controller is not holding KL near its target: the target may be unreachable or the "
        "controller horizon too long; change the target or the initial kl_coef",
        clear_threshold=0.12,
        consecutive=3,
    ),
    Rule(
        "entropy_collapse",
        "entropy",
        "below",
        0.1,
        "critical",
        "policy entropy collapsed: over-confident updates or too many PPO epochs; add an entropy bonus, "
        "raise the sampling temperature, lower the LR",
        clear_threshold=0.12,
    ),
    Rule(
        "exploding_gradients",
        "grad_norm",
        "above",
        1000.0,
        "critical",
        "gradient norm spiked: instability or a train/inference mismatch; clip harder, lower the LR",
        spike_factor=10.0,
        window=50,
    ),
    Rule(
        "reward_variance",
        "reward_std",
        "above",
        2.0,
        "warning",
        "reward spread is very wide: unscaled or noisy reward model scores; normalise or clip rewards",
        clear_threshold=1.8,
        consecutive=2,
    ),
    Rule(
        "policy_moving_too_fast",
        "clip_frac",
        "above",
        0.3,
        "warning",
        "many PPO ratios are clipped: LR or epochs too high or batch too small; lower the LR or epochs, "
        "use a larger batch",
        clear_threshold=0.25,
        consecutive=2,
    ),
    Rule(
        "value_diverging",
        "explained_variance",
        "below",
        0.0,
        "warning",
        "the value function explains none of the returns: returns drift or rewards are unscaled; warm up "
        "the critic, scale rewards, clip values",
        clear_threshold=0.05,
        consecutive=5,
        warmup_steps=20,
    ),
    Rule(
        "reward_hacking",
        "reward_mean",
        "diverging_trends",
        0.5,
        "critical",
        "reward-model score rises while the true (gold) score falls (value: trend r of reward_mean over the "
        "window): the policy is exploiting the reward model; stop, raise the KL coefficient, improve or "
        "retrain the reward model, read samples",
        metrics=("reward_mean", "gold_reward_mean"),
        window=20,
        consecutive=3,
        clear_consecutive=5,
    ),
    Rule(
        "reward_hacking_proxy",
        "reward_mean",
        "rising_together",
        0.6,
        "warning",
        "reward, KL and response length all climb together (value: trend r of reward_mean; no gold score "
        "to check): a common sign of reward hacking; read samples, raise the KL coefficient",
        metrics=("reward_mean", "kl", "response_length_mean"),
        window=30,
        consecutive=5,
        clear_consecutive=5,
        only_without="gold_reward_mean",
    ),
)


@dataclass
class Alert:
    """One open (or just cleared) alert."""

    rule: str
    metric: str
    severity: str
    value: float
    threshold: float
    first_step: int
    step: int  # last step the condition held
    explanation: str
    cleared_step: int | None = None

    def message(self) -> str:
        return (
            f"{self.severity.upper()} {self.rule}: {self.metric}={_fmt(self.value)} "
            f"(threshold {_fmt(self.threshold)}) since step {self.first_step} - {self.explanation}"
        )

    def to_event(self, event: str) -> dict[str, Any]:
        d = {
            "rule": self.rule,
            "metric": self.metric,
            "severity": self.severity,
            "value": self.value,
            "threshold": self.threshold,
            "first_step": self.first_step,
            "step": self.step if event != "alert_cleared" else self.cleared_step,
            "message": self.message(),
            "explanation": self.explanation,
        }
        if event == "alert_cleared":
            d["duration_steps"] = (self.cleared_step or self.step) - self.first_step
        return d


def most_severe(alerts: Iterable[Alert]) -> Alert | None:
    """The alert to show first: the most severe and, among those, the one that began first
    (the earliest is usually the cause; later ones are often its consequences)."""
    found = list(alerts)
    if not found:
        return None
    return min(found, key=lambda a: (-SEVERITIES.index(a.severity), a.first_step))


def _fmt(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    return f"{v:.4g}"


def _num(v: object) -> float | None:
    """A record's value as a float; None if it is not a number. An int too large for a float
    (a hostile record) is +-inf, so it trips the non-finite rule instead of raising."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _trend(values: list[float]) -> float:
    """Pearson correlation of values with their index: +1 rising steadily, -1 falling."""
    t = RollingTrend(max(len(values), 1))
    for v in values:
        t.push(v)
    return t.r()


class RollingTrend:
    """Pearson r of the last `window` values against their position, kept in O(1) per value.

    Running sums of y, y^2 and i*y are updated as the window slides (dropping the oldest
    value moves every other one down a position); they are recomputed exactly every few
    windows so rounding cannot drift.
    """

    def __init__(self, window: int):
        self.window = window
        self.values: deque = deque()
        self._sy = self._syy = self._siy = 0.0
        self._pushes = 0

    def __len__(self) -> int:
        return len(self.values)

    def push(self, y: float) -> None:
        vals = self.values
        if len(vals) == self.window:
            y0 = vals.popleft()
            self._siy -= self._sy - y0  # every remaining value moves down one position
            self._sy -= y0
            self._syy -= y0 * y0
        self._siy += len(vals) * y
        vals.append(y)
        self._sy += y
        self._syy += y * y
        self._pushes += 1
        if self._pushes % (4 * self.window) == 0:
            self._sy = math.fsum(vals)
            self._syy = math.fsum(v * v for v in vals)
            self._siy = math.fsum(i * v for i, v in enumerate(vals))

    def r(self) -> float:
        n = len(self.values)
        if n < 3:
            return 0.0
        mean_y = self._sy / n
        syy = self._syy - self._sy * mean_y
        if syy <= 1e-12 * max(self._syy, 1e-300):
            return 0.0  # (numerically) constant: no trend
        sxx = n * (n * n - 1) / 12.0
        sxy = self._siy - (n - 1) / 2.0 * self._sy
        return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


# (bad, value, metric, critical, threshold crossed)
_Verdict = tuple[bool, float, str, bool, float]


@dataclass
class _RuleState:
    bad_run: int = 0
    good_run: int = 0
    critical_run: int = 0
    first_bad_step: int | None = None
    history: deque[float] = field(default_factory=deque)  # rolling values (spike median)
    sorted_hist: list[float] = field(default_factory=list)
    trends: dict[str, RollingTrend] = field(default_factory=dict)  # metric -> RollingTrend for trend kinds


class AlertEngine:
    def __init__(self, rules: tuple[Rule, ...] | list[Rule] = DEFAULT_RULES):
        self.rules = [r for r in rules if r.enabled]
        self.open: dict[str, Alert] = {}
        self._state = {r.name: _RuleState() for r in self.rules}
        self.history: list[tuple[str, Alert]] = []  # ("alert"|"alert_escalated"|"alert_cleared", alert)

    def update(self, record: dict) -> list[tuple[str, Alert]]:
        """Evaluate one step; return [(event, alert)] with event in alert, alert_escalated, alert_cleared."""
        step = record.get("step")
        step = step if isinstance(step, int) else 0
        events: list[tuple[str, Alert]] = []
        for rule in self.rules:
            if rule.only_without and rule.only_without in record:
                continue
            if step < rule.warmup_steps and rule.kind not in ("non_finite",):
                self._feed_history(rule, record)
                continue
            trend_rule = rule.kind in ("diverging_trends", "rising_together")
            if trend_rule:
                self._feed_history(rule, record)
            res = self._evaluate(rule, record)
            if res is None:
                continue  # the metric is absent: nothing to say
            bad, value, metric, critical, threshold = res
            st = self._state[rule.name]
            alert = self.open.get(rule.name)
            if bad:
                st.bad_run += 1
                st.good_run = 0
                if st.first_bad_step is None:
                    st.first_bad_step = step
                st.critical_run = st.critical_run + 1 if critical else 0
                if alert is None and st.bad_run >= rule.consecutive:
                    alert = Alert(
                        rule.name, metric, rule.severity, value, threshold, st.first_bad_step, step, rule.explanation
                    )
                    self.open[rule.name] = alert
                    events.append(("alert", alert))
                elif alert is not None:
                    alert.value, alert.step, alert.metric = value, step, metric
                if (
                    alert is not None
                    and alert.severity != "critical"
                    and rule.critical_factor_of
                    and st.critical_run >= rule.critical_consecutive
                ):
                    alert.severity = "critical"
                    events.append(("alert_escalated", alert))
            else:
                st.good_run += 1
                st.critical_run = 0
                # hysteresis: a value between clear_threshold and threshold neither fires nor clears
                recovered = self._recovered(rule, value)
                if alert is None:
                    st.bad_run = 0  # a streak that never reached `consecutive` starts over
                    st.first_bad_step = None
                elif recovered and st.good_run >= rule.clear_consecutive:
                    alert.cleared_step = step
                    del self.open[rule.name]
                    events.append(("alert_cleared", alert))
                    st.bad_run = 0
                    st.first_bad_step = None
                elif not recovered:
                    st.good_run = 0
            if not trend_rule:
                self._feed_history(rule, record)
        self.history.extend(events)
        return events

    def most_severe(self) -> Alert | None:
        return most_severe(self.open.values())

    # -- internals -------------------------------------------------------------------

    def _recovered(self, rule: Rule, value: float) -> bool:
        if rule.kind in ("non_finite", "diverging_trends", "rising_together"):
            return True
        ct = rule.threshold if rule.clear_threshold is None else rule.clear_threshold
        if not math.isfinite(value):
            return False
        if rule.kind == "above":
            return value <= ct
        if rule.kind == "below":
            return value >= ct
        if rule.kind == "abs_above":
            return abs(value) <= ct
        return True

    def _feed_history(self, rule: Rule, record: dict) -> None:
        st = self._state[rule.name]
        if rule.spike_factor is not None:
            v = _num(record.get(rule.metric))
            if v is not None and math.isfinite(v):
                st.history.append(v)
                insort(st.sorted_hist, v)
                if len(st.history) > rule.window:
                    old = st.history.popleft()
                    st.sorted_hist.pop(_index(st.sorted_hist, old))
        if rule.kind in ("diverging_trends", "rising_together"):
            for m in rule.metrics:
                v = _num(record.get(m))
                if v is not None and math.isfinite(v):
                    trend = st.trends.get(m)
                    if trend is None:
                        trend = st.trends[m] = RollingTrend(rule.window)
                    trend.push(v)

    def _evaluate(self, rule: Rule, record: dict[str, Any]) -> _Verdict | None:
        """(bad, value, metric, critical, threshold crossed) or None when the rule's metric is absent."""
        if rule.kind == "non_finite":
            seen = False
            for m in rule.metrics or (rule.metric,):
                v = _num(record.get(m))
                if v is None:
                    continue
                seen = True
                if not math.isfinite(v):
                    return True, v, m, True, rule.threshold
            return (False, 0.0, rule.metric, False, rule.threshold) if seen else None
        if rule.kind in ("diverging_trends", "rising_together"):
            return self._evaluate_trends(rule, record)
        v = _num(record.get(rule.metric))
        if v is None:
            return None
        if not math.isfinite(v):
            return False, v, rule.metric, False, rule.threshold  # non-finite: the non_finite rule's job
        if rule.kind == "above":
            bad = v > rule.threshold
        elif rule.kind == "below":
            bad = v < rule.threshold
        elif rule.kind == "abs_above":
            bad = abs(v) > rule.threshold
        else:
            raise ValueError(rule.kind)
        st = self._state[rule.name]
        threshold = rule.threshold
        if not bad and rule.spike_factor is not None and len(st.history) >= min(rule.window, 10):
            med = st.sorted_hist[len(st.sorted_hist) // 2]
            if med > 0 and v > rule.spike_factor * med:
                bad = True
                threshold = rule.spike_factor * med  # the alert reports the bar it crossed
        critical = False
        if rule.critical_factor_of:
            ref = _num(record.get(rule.critical_factor_of))
            critical = bool(ref is not None and math.isfinite(ref) and v > rule.critical_factor * ref)
        return bad, v, rule.metric, critical, threshold

    def _evaluate_trends(self, rule: Rule, record: dict[str, Any]) -> _Verdict | None:
        """Judged on the window that includes this step (fed before evaluation, in update)."""
        st = self._state[rule.name]
        if any(_num(record.get(m)) is None for m in rule.metrics):
            return None
        windows = [st.trends.get(m) for m in rule.metrics]
        ready = [w for w in windows if w is not None and len(w) >= rule.window]
        if len(ready) < len(windows):
            return False, 0.0, rule.metric, False, rule.threshold
        trends = [w.r() for w in ready]
        t = rule.threshold
        if rule.kind == "diverging_trends":
            bad = trends[0] > t and trends[1] < -t
        else:
            bad = all(x > t for x in trends)
        return bad, trends[0], rule.metric, False, rule.threshold


def _index(sorted_list: list, value: float) -> int:
    from bisect import bisect_left

    return bisect_left(sorted_list, value)


_RULE_FIELDS = {f.name: f for f in fields(Rule)}
_FLOAT_KEYS = {"threshold", "clear_threshold", "spike_factor", "critical_factor"}
_INT_KEYS = {"consecutive", "clear_consecutive", "warmup_steps", "window", "critical_consecutive"}


def rules_from_toml(path: str | Path, base: tuple[Rule, ...] = DEFAULT_RULES) -> tuple[Rule, ...]:
    """The default rules with a TOML file's overrides and additions applied."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise AlertConfigError(f"alerts file {p} does not exist") from None
    except OSError as e:
        raise AlertConfigError(f"cannot read alerts file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise AlertConfigError(f"alerts file {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise AlertConfigError(f"alerts file {p} is not valid TOML: {e}") from None
    return rules_from_dict(data, base, source=str(p))


def rules_from_dict(
    data: dict[str, Any], base: tuple[Rule, ...] = DEFAULT_RULES, source: str = "alerts"
) -> tuple[Rule, ...]:
    extra = set(data) - {"rules"}
    if extra:
        raise AlertConfigError(f"{source}: unknown top-level key(s) {sorted(extra)}; expected [rules.NAME] tables")
    table = data.get("rules", {})
    if not isinstance(table, dict):
        raise AlertConfigError(f"{source}: 'rules' must be a table of [rules.NAME] tables")
    rules = {r.name: r for r in base}
    for name, over in table.items():
        if not isinstance(over, dict):
            raise AlertConfigError(f"{source}: rules.{name} must be a table")
        changes = {}
        for k, v in over.items():
            if k not in _RULE_FIELDS or k == "name":
                known = ", ".join(sorted(set(_RULE_FIELDS) - {"name"}))
                raise AlertConfigError(f"{source}: rules.{name} has unknown key {k!r} (known: {known})")
            changes[k] = _coerce(source, name, k, v)
        if name in rules:
            rule = replace(rules[name], **changes)
        else:
            missing = [k for k in ("metric", "kind", "threshold", "severity") if k not in changes]
            if missing:
                raise AlertConfigError(
                    f"{source}: new rule rules.{name} needs {', '.join(missing)} (known rules: {', '.join(rules)})"
                )
            changes.setdefault("explanation", f"{changes['metric']} crossed {changes['threshold']}")
            rule = Rule(name=name, **changes)
        _validate(source, rule)
        rules[name] = rule
    return tuple(rules.values())


def _coerce(source: str, name: str, key: str, v: object) -> Any:
    where = f"{source}: rules.{name}.{key}"
    if key in _FLOAT_KEYS:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AlertConfigError(f"{where} must be a finite number, got {v!r}")
        return float(v)
    if key in _INT_KEYS:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AlertConfigError(f"{where} must be a non-negative integer, got {v!r}")
        return v
    if key == "enabled":
        if not isinstance(v, bool):
            raise AlertConfigError(f"{where} must be true or false, got {v!r}")
        return v
    if key == "only_without" and v in ("", None):
        return None
    if key == "metrics":
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise AlertConfigError(f"{where} must be a list of metric names")
        return tuple(v)
    if not isinstance(v, str):
        raise AlertConfigError(f"{where} must be a string, got {v!r}")
    return v


def _validate(source: str, r: Rule) -> None:
    where = f"{source}: rules.{r.name}"
    if r.kind not in KINDS:
        raise AlertConfigError(f"{where}.kind must be one of {', '.join(KINDS)}, got {r.kind!r}")
    if r.severity not in SEVERITIES:
        raise AlertConfigError(f"{where}.severity must be one of {', '.join(SEVERITIES)}, got {r.severity!r}")
    for m in (r.metric, *r.metrics, *(x for x in (r.critical_factor_of, r.only_without) if x)):
        if m not in METRICS:
            raise AlertConfigError(f"{where}: unknown metric {m!r} (see protocol.catalogue)")
    if "\n" in r.explanation or "\r" in r.explanation:
        raise AlertConfigError(f"{where}.explanation must be one line")
    if r.consecutive < 1 or r.clear_consecutive < 1:
        raise AlertConfigError(f"{where}: consecutive and clear_consecutive must be at least 1")
    if r.kind in ("diverging_trends", "rising_together") and len(r.metrics) < 2:
        raise AlertConfigError(f"{where}: kind {r.kind} needs at least two metrics")
    if r.kind in ("diverging_trends", "rising_together") and r.window < 3:
        raise AlertConfigError(f"{where}.window must be at least 3")


def thresholds_for(metric: str, rules: tuple[Rule, ...] | list[Rule] = DEFAULT_RULES) -> list[tuple[str, str, float]]:
    """(kind, severity, threshold) of every enabled single-metric rule on `metric` (for colouring charts)."""
    return [
        (r.kind, r.severity, r.threshold)
        for r in rules
        if r.enabled and r.metric == metric and r.kind in ("above", "below", "abs_above")
    ]


# -- the rules a run was started with, saved in its run dir ------------------------------------------
# The trainer writes them when a run starts; the monitor, `trainerd status` and `trainerd report`
# evaluate with them, so their verdicts agree with the run's own events.jsonl (the defaults only
# for runs that have none, e.g. runs from before this file existed or from other frameworks).


def rules_to_dict(rules: Iterable[Rule]) -> dict[str, Any]:
    """Every rule in full (not as overrides of the defaults): `rules_from_dict(d, base=())` reads it back."""
    out: dict[str, Any] = {}
    for r in rules:
        d = {f.name: getattr(r, f.name) for f in fields(Rule) if f.name != "name"}
        d["metrics"] = list(r.metrics)
        out[r.name] = {k: v for k, v in d.items() if v is not None}
    return {"rules": out}


def save_run_rules(rules: Iterable[Rule], run_dir: str | Path) -> Path:
    """Write the resolved rules to `<run_dir>/alerts.json` (atomically, never through a link)."""
    from .safeio import open_run_file

    root = Path(run_dir)
    tmp = f".alerts.json.{os.getpid()}.tmp"
    with open_run_file(root, tmp, "x") as f:
        json.dump(rules_to_dict(rules), f, indent=1)  # in order: rules are evaluated in this order
        f.flush()
        os.fsync(f.fileno())
    os.replace(root / tmp, root / RULES_FILE)
    return root / RULES_FILE


def load_run_rules(run_dir: str | Path) -> tuple[tuple[Rule, ...], str | None]:
    """(rules, note): the run's saved rules, or the defaults with a one-line note saying why
    (none saved: note None). Never raises: a damaged file falls back to the defaults."""
    from .safeio import read_run_file

    root = Path(run_dir)
    try:
        raw = read_run_file(root, RULES_FILE, MAX_RULES_BYTES)
    except FileNotFoundError:
        return DEFAULT_RULES, None
    except OSError as e:
        return DEFAULT_RULES, f"{RULES_FILE}: {e}; evaluating with the default rules"
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise AlertConfigError("not a JSON object")
        return rules_from_dict(data, base=(), source=RULES_FILE), None
    except (ValueError, AlertConfigError) as e:
        return DEFAULT_RULES, f"{RULES_FILE} is damaged ({str(e)[:120]}); evaluating with the default rules"


RULES_FILE = "alerts.json"
MAX_RULES_BYTES = 1 << 20

