"""The alert rule engine (SPEC section 8), shared by the trainer and the monitor.

Feed it step records in order with `AlertEngine.update(record)`; it returns the
alerts that fired, escalated or cleared at that step. A rule can ask for N
consecutive bad steps before it fires, and clears with hysteresis (the value must
come back past `clear_threshold` for `clear_consecutive` steps). A relative (spike) bar
has an absolute floor (`spike_floor`); past a stricter `hard_threshold` a rule fires at
once, even during its warm-up and without waiting for `consecutive` steps. Every alert says
what it compared (`Alert.compared`, in words in `Alert.message()`). Rules are data: the
defaults below can be overridden, disabled or extended from a TOML file:

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

from .catalogue import METRICS, as_number

SEVERITIES = ("info", "warning", "critical")
KINDS = (
    "above",
    "below",
    "abs_above",
    "non_finite",
    "diverging_trends",
    "rising_together",
    "growing",
    "rank_imbalance",
)
TREND_KINDS = ("diverging_trends", "rising_together", "growing")  # judged on rolling windows of `metrics`


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
    warmup_steps: int = 0  # ignore steps before this one (but see hard_threshold)
    hard_threshold: float | None = None  # past this stricter bar: fire at once, warm-up or not
    # a metric that pushes back (a controller's coefficient): the warm-up and the streak of
    # `consecutive` steps are waited out only while it rises from step to step; when it does not,
    # the threshold fires at once
    pushback: str | None = None
    # also fire above this many times the rolling median (kind "below": under median / factor)...
    spike_factor: float | None = None
    spike_floor: float = 0.0  # ...when the value is also past this absolute bar (above it; "below": under it)
    relative_to: str | None = None  # compare metric / this metric (e.g. an error relative to its target)
    window: int = 50  # rolling median window / trend window
    critical_factor_of: str | None = None  # escalate when metric > critical_factor x this metric
    critical_factor: float = 0.0
    critical_consecutive: int = 5
    only_without: str | None = None  # skip the rule on records that carry this metric
    # kind "growing": the metric's trend over `window` steps must also be this straight (Pearson r
    # with the step), so a single jump or noise is not a leak; `threshold` is the growth over the window
    trend_r: float = 0.9
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
        # Warm-up: the adaptive controller starts from a guessed kl_coef and legitimately
        # overshoots its target while it adapts (to ~4.4x in clean runs). After it, 2 steps in a
        # row: one noisy step over 0.2 is not a runaway. Both are waited out only while kl_coef
        # rises (the controller raises it every step KL was over target): a penalty that stays put
        # (zero, fixed, clamped) while KL is over 0.2 fires at once. Past 1.0 (10x the usual
        # target) it fires at once too.
        consecutive=2,
        clear_threshold=0.15,
        clear_consecutive=5,
        warmup_steps=100,
        pushback="kl_coef",
        hard_threshold=1.0,
        critical_factor_of="kl_target",
        critical_factor=3.0,
        critical_consecutive=5,
    ),
    Rule(
        "kl_control",
        "kl_target_error",
        "abs_above",
        0.2,
        "warning",
        "the KL controller is saturated: KL has stayed over 20% off its target (the controller's error "
        "pinned at its +-0.2 clip) for many steps: the target may be unreachable or the controller horizon "
        "too long; change the target, the initial kl_coef or kl_horizon",
        relative_to="kl_target",  # kl / kl_target - 1: the controller's own (unclipped) error
        consecutive=30,
        clear_consecutive=5,
        warmup_steps=100,
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
        # a collapse from a high level can stop short of 0.1 (2.4 -> 0.22 nats/token in one step):
        # a fall under a fifth of the rolling median, to under 0.5 nats/token, is one too
        spike_factor=5.0,
        spike_floor=0.5,
        window=50,
    ),
    Rule(
        "exploding_gradients",
        "grad_norm",
        "above",
        1000.0,
        "critical",
        "gradient norm spiked: instability or a train/inference mismatch; clip harder, lower the LR",
        spike_factor=10.0,
        # a spike must also exceed the usual clipping norm (max_grad_norm = 1.0): below it the
        # update is applied as computed and 10x a tiny median (a policy that stopped learning,
        # grad norms ~1e-4) is still a tiny gradient
        spike_floor=1.0,
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
        "reward-model score rises while the true (gold) score falls (value: the weaker of the two trends, "
        "as a correlation with the step): the policy is exploiting the reward model; stop, raise the KL "
        "coefficient, improve or retrain the reward model, read samples",
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
        "reward, KL and response length all climb together (value: the weakest of the three trends, as a "
        "correlation with the step; no gold score to check): a common sign of reward hacking; read samples, "
        "raise the KL coefficient",
        metrics=("reward_mean", "kl", "response_length_mean"),
        window=30,
        consecutive=5,
        clear_consecutive=5,
        only_without="gold_reward_mean",
    ),
    Rule(
        "memory_leak",
        "rss_bytes",
        "growing",
        float(64 << 20),
        "warning",
        "memory grows step over step (a leak): something keeps tensors from every step alive, e.g. a loss "
        "or a rollout appended to a list without .detach() (it holds the whole autograd graph) or a cache "
        "that is never cleared; find what holds them with `trainerd memory RUN`, or a CUDA memory snapshot",
        # the end-of-step memory (rss; on a GPU also the step's CUDA peak) rose by more than 64 MiB over
        # the last 20 steps, in a straight line (r > 0.9): allocator warm-up in the first steps and
        # one-off jumps (a checkpoint, the profiler window) are not leaks
        metrics=("rss_bytes", "cuda_max_allocated_bytes"),
        window=20,
        warmup_steps=10,
        consecutive=3,
        clear_consecutive=5,
    ),
    Rule(
        "memory_near_limit",
        "peak_rss_bytes",
        "above",
        0.9,
        "warning",
        "the trainer's peak memory is over 90% of memory_limit: the next larger batch, longer response or "
        "checkpoint may not fit; see `trainerd memory RUN --suggest --budget SIZE` for the knobs that shrink "
        "it (micro_batch_size, gradient_checkpointing, ...)",
        relative_to="memory_limit_bytes",  # only runs with a memory_limit carry it
        clear_threshold=0.85,
    ),
    Rule(
        "straggler",
        "rank_compute_s",
        "rank_imbalance",
        1.25,
        "warning",
        "one rank computes much longer than the others before each collective, so every rank waits for "
        "it: a slower or busier GPU/host, thermal throttling, an uneven share of long responses or a noisy "
        "neighbour; check that rank's device and host (nvidia-smi, top), balance the batch, or move that rank",
        # value: the slowest rank's compute time before it enters the collectives (its stages'
        # seconds outside collectives) over the median of the other ranks'; 5 steps in a row, and at least
        # spike_floor seconds slower (a tiny step's jitter is not a straggler)
        consecutive=5,
        clear_threshold=1.15,
        clear_consecutive=5,
        spike_floor=0.01,
    ),
    # the GPU box (fields sampled from NVML by the trainer on CUDA; absent elsewhere: never fire)
    Rule(
        "gpu_memory_near_full",
        "gpu_mem_used_peak_bytes",
        "above",
        0.95,
        "warning",
        "GPU memory was over 95% full during the step (NVML: every process, PyTorch's cached blocks "
        "included): the next longer response or larger batch may run out of memory (CUDA OOM); lower "
        "micro_batch_size or the response length, turn on gradient_checkpointing, or check for another "
        "process on the GPU (nvidia-smi)",
        relative_to="gpu_mem_total_bytes",
        clear_threshold=0.9,
        clear_consecutive=5,
    ),
    Rule(
        "gpu_underused",
        "gpu_util_mean",
        "below",
        40.0,
        "warning",
        "the GPU sat mostly idle for many PPO steps (mean utilisation under 40%): the run is bound by "
        "something else, usually generation (small token-by-token kernels, see rollout in the stage "
        "breakdown), the reward model or data on the CPU, or host-device copies; batch generation "
        "(a larger batch), move scoring to the GPU, overlap data loading",
        consecutive=20,
        warmup_steps=5,
        clear_threshold=50.0,
        clear_consecutive=5,
    ),
    Rule(
        "gpu_thermal_slowdown",
        "gpu_temp_margin_c",
        "below",
        1.0,
        "critical",
        "the GPU reached its slowdown temperature: it throttles its clocks and every step gets slower; "
        "check the cooling (fans, airflow, a blocked intake), the room or rack temperature, and "
        "nvidia-smi -q -d PERFORMANCE for the throttle reasons",
        consecutive=2,
        clear_threshold=3.0,
        clear_consecutive=5,
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
    # what the rule really compared at `step`, by name (e.g. a spike's median and factor, each
    # trend of a trend rule); `detail` says it in words. Empty for a plain threshold rule.
    compared: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def message(self) -> str:
        what = self.detail or f"{self.metric}={_fmt(self.value)} (threshold {_fmt(self.threshold)})"
        return f"{self.severity.upper()} {self.rule}: {what} since step {self.first_step} - {self.explanation}"

    def to_event(self, event: str) -> dict[str, Any]:
        d: dict[str, Any] = {
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
        if self.compared:
            d["compared"] = dict(self.compared)
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

    def slope(self) -> float:
        """Least-squares slope of the window, per position (per step when fed every step)."""
        n = len(self.values)
        if n < 2:
            return 0.0
        sxx = n * (n * n - 1) / 12.0
        return (self._siy - (n - 1) / 2.0 * self._sy) / sxx

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


@dataclass
class _Verdict:
    bad: bool
    value: float
    metric: str
    threshold: float  # the bar crossed (or that would be)
    critical: bool = False
    compared: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    urgent: bool = False  # past the rule's hard threshold: fires without waiting


def _past(kind: str, v: float, bar: float) -> bool:
    if kind == "above":
        return v > bar
    if kind == "below":
        return v < bar
    if kind == "abs_above":
        return abs(v) > bar
    raise ValueError(kind)


@dataclass
class _RuleState:
    bad_run: int = 0
    good_run: int = 0
    critical_run: int = 0
    first_bad_step: int | None = None
    history: deque[float] = field(default_factory=deque)  # rolling values (spike median)
    sorted_hist: list[float] = field(default_factory=list)
    trends: dict[str, RollingTrend] = field(default_factory=dict)  # metric -> RollingTrend for trend kinds
    watched: float | None = None  # the pushback metric at the previous step


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
            warming = step < rule.warmup_steps and rule.kind != "non_finite"
            idle: tuple[float, float] | None = None  # (before, now) of a controller that stopped pushing
            if rule.pushback:
                st0 = self._state[rule.name]
                now, before = as_number(record.get(rule.pushback)), st0.watched
                st0.watched = now
                if now is not None and before is not None and not now > before:
                    warming, idle = False, (before, now)
            if warming and rule.hard_threshold is None:
                self._feed_history(rule, record)
                continue
            trend_rule = rule.kind in TREND_KINDS
            if trend_rule:
                self._feed_history(rule, record)
            res = self._evaluate(rule, record, warming, idle)
            if res is None:
                continue  # the metric is absent: nothing to say
            st = self._state[rule.name]
            alert = self.open.get(rule.name)
            if res.bad:
                st.bad_run += 1
                st.good_run = 0
                if st.first_bad_step is None:
                    st.first_bad_step = step
                st.critical_run = st.critical_run + 1 if res.critical else 0
                if alert is None and (st.bad_run >= rule.consecutive or res.urgent):
                    alert = Alert(
                        rule.name,
                        res.metric,
                        rule.severity,
                        res.value,
                        res.threshold,
                        st.first_bad_step,
                        step,
                        rule.explanation,
                        compared=res.compared,
                        detail=res.detail,
                    )
                    self.open[rule.name] = alert
                    events.append(("alert", alert))
                elif alert is not None:
                    alert.value, alert.step, alert.metric = res.value, step, res.metric
                    alert.compared, alert.detail = res.compared, res.detail
                escalate = (
                    alert is not None
                    and alert.severity != "critical"
                    and rule.critical_factor_of
                    and st.critical_run >= rule.critical_consecutive
                )
                if alert is not None and rule.critical_factor_of and res.critical and st.critical_run > 0:
                    if escalate or alert.severity == "critical":
                        alert.detail = (
                            f"{res.metric}={_fmt(res.value)} (threshold {_fmt(res.threshold)}; over "
                            f"{_fmt(rule.critical_factor)}x {rule.critical_factor_of} = "
                            f"{_fmt(rule.critical_factor * res.compared.get(rule.critical_factor_of, math.nan))} "
                            f"for {st.critical_run} steps in a row)"
                        )
                if alert is not None and escalate:
                    alert.severity = "critical"
                    events.append(("alert_escalated", alert))
            else:
                st.good_run += 1
                st.critical_run = 0
                # hysteresis: a value between clear_threshold and threshold neither fires nor clears
                recovered = self._recovered(rule, res.value)
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

    def carry_on(self, name: str, other: AlertEngine) -> None:
        """Go on with rule `name` from where `other` left it: its open alert, its streaks, its
        rolling windows (the whole-history evaluator runs each rule on an engine of its own;
        the monitor's live engine goes on from their end)."""
        self._state[name] = other._state[name]
        alert = other.open.get(name)
        if alert is not None:
            self.open[name] = alert

    @property
    def quiet(self) -> bool:
        """No alert open and no bad streak under way: what comes next depends only on the rolling
        windows (a whole-history evaluator may skip records known to be good from here)."""
        return not self.open and all(st.bad_run == 0 for st in self._state.values())

    # -- internals -------------------------------------------------------------------

    def _recovered(self, rule: Rule, value: float) -> bool:
        if rule.kind in ("non_finite", *TREND_KINDS):
            return True
        ct = rule.threshold if rule.clear_threshold is None else rule.clear_threshold
        if not math.isfinite(value):
            return False
        if rule.kind in ("above", "rank_imbalance"):
            return value <= ct
        if rule.kind == "below":
            return value >= ct
        if rule.kind == "abs_above":
            return abs(value) <= ct
        return True

    def _feed_history(self, rule: Rule, record: dict) -> None:
        st = self._state[rule.name]
        if rule.spike_factor is not None:
            v = as_number(record.get(rule.metric))
            if v is not None and math.isfinite(v):
                st.history.append(v)
                insort(st.sorted_hist, v)
                if len(st.history) > rule.window:
                    old = st.history.popleft()
                    st.sorted_hist.pop(_index(st.sorted_hist, old))
        if rule.kind in TREND_KINDS:
            for m in rule.metrics or (rule.metric,):
                v = as_number(record.get(m))
                if v is not None and math.isfinite(v):
                    trend = st.trends.get(m)
                    if trend is None:
                        trend = st.trends[m] = RollingTrend(rule.window)
                    trend.push(v)

    def _evaluate(
        self, rule: Rule, record: dict[str, Any], warming: bool = False, idle: tuple[float, float] | None = None
    ) -> _Verdict | None:
        """The verdict on this record, or None when the rule's metric is absent. During the
        rule's warm-up (`warming`) only `hard_threshold` counts; `idle` (the watched metric's
        previous and current value) means the warm-up was waived: no streak needed."""
        if rule.kind == "non_finite":
            seen = False
            for m in rule.metrics or (rule.metric,):
                v = as_number(record.get(m))
                if v is None:
                    continue
                seen = True
                if not math.isfinite(v):
                    return _Verdict(True, v, m, rule.threshold, critical=True, detail=f"{m}={_fmt(v)} (not finite)")
            return _Verdict(False, 0.0, rule.metric, rule.threshold) if seen else None
        if rule.kind == "growing":
            return self._evaluate_growth(rule, record)
        if rule.kind in ("diverging_trends", "rising_together"):
            return self._evaluate_trends(rule, record)
        if rule.kind == "rank_imbalance":
            return _evaluate_ranks(rule, record)
        v = as_number(record.get(rule.metric))
        if v is None:
            return None
        raw, ref = v, None
        if rule.relative_to:
            ref = as_number(record.get(rule.relative_to))
            if ref is None or not math.isfinite(ref) or ref == 0:
                return None  # no reference: nothing to compare
            v = v / ref
        threshold = rule.threshold
        if not math.isfinite(v):
            return _Verdict(False, v, rule.metric, threshold)  # non-finite: the non_finite rule's job
        bad = not warming and _past(rule.kind, v, threshold)
        urgent = rule.hard_threshold is not None and _past(rule.kind, v, rule.hard_threshold)
        hard_only = urgent  # past the hard threshold: report that bar (the one that needs no streak)
        if hard_only and rule.hard_threshold is not None:
            bad, threshold = True, rule.hard_threshold
        waived = idle is not None and bad and not hard_only
        urgent = urgent or waived
        compared: dict[str, float] = {}
        detail = ""
        if bad:  # put in words only when it is shown (a good step's verdict never is)
            compared, detail = self._described(rule, v, raw, ref, threshold, hard_only, waived, idle)
        st = self._state[rule.name]
        if not bad and rule.spike_factor is not None and len(st.history) >= min(rule.window, 10):
            med = st.sorted_hist[len(st.sorted_hist) // 2]
            f, floor = rule.spike_factor, rule.spike_floor
            if rule.kind == "below":  # a sudden drop: under median / factor (and under the floor, if set)
                bar = med / f if f > 0 else 0.0
                bar = min(bar, floor) if floor > 0 else bar
                hit, where = v < bar, f"below the median / {_fmt(f)}" + (f" and below {_fmt(floor)}" if floor else "")
            else:  # a spike: over factor x median and over the absolute floor
                bar = max(f * med, floor)
                hit, where = v > bar, f"above {_fmt(f)}x the median and above {_fmt(floor)}"
            if med > 0 and hit:
                bad = True
                threshold = bar  # the alert reports the bar it crossed
                compared = {"median": med, "factor": v / med, "spike_factor": f, "spike_floor": floor}
                detail = (
                    f"{rule.metric}={_fmt(v)} is {_fmt(v / med)}x its rolling median {_fmt(med)} of the last "
                    f"{len(st.history)} steps (fires {where}; absolute threshold {_fmt(rule.threshold)})"
                )
        critical = False
        if rule.critical_factor_of:
            ref = as_number(record.get(rule.critical_factor_of))
            critical = bool(ref is not None and math.isfinite(ref) and v > rule.critical_factor * ref)
            if ref is not None:
                compared[rule.critical_factor_of] = ref
        return _Verdict(bad, v, rule.metric, threshold, critical, compared, detail, urgent)

    def _described(
        self,
        rule: Rule,
        v: float,
        raw: float,
        ref: float | None,
        threshold: float,
        hard_only: bool,
        waived: bool,
        idle: tuple[float, float] | None,
    ) -> tuple[dict[str, float], str]:
        """What a bad threshold verdict compared, by name and in words."""
        compared: dict[str, float] = {}
        detail = ""
        if rule.relative_to and ref is not None:
            compared = {rule.metric: raw, rule.relative_to: ref}
            shown = f"{'+-' if rule.kind == 'abs_above' else ''}{_fmt(threshold)}"
            detail = (
                f"{rule.metric} / {rule.relative_to} = {v:+.3g} ({rule.metric}={_fmt(raw)}, "
                f"{rule.relative_to}={_fmt(compared[rule.relative_to])}; threshold {shown}"
                f"{f' for {rule.consecutive} steps in a row' if rule.consecutive > 1 else ''})"
            )
        elif rule.consecutive > 1:
            detail = f"{rule.metric}={_fmt(v)} (threshold {_fmt(threshold)}, crossed {rule.consecutive} steps in a row)"
        if hard_only and rule.hard_threshold is not None:
            after = f" after step {rule.warmup_steps}" if rule.warmup_steps else ""
            steps = f" for {rule.consecutive} steps in a row" if rule.consecutive > 1 else ""
            detail = (
                f"{rule.metric}={_fmt(v)} (past the hard threshold {_fmt(rule.hard_threshold)}, no streak needed; "
                f"{_fmt(rule.threshold)}{steps}{after})"
            )
        if waived and idle is not None:
            compared[f"{rule.pushback}_before"], compared[str(rule.pushback)] = idle
            detail = (
                f"{rule.metric}={_fmt(v)} (threshold {_fmt(threshold)}, and {rule.pushback} is not rising: "
                f"{_fmt(idle[0])} -> {_fmt(idle[1])}, nothing pushes back)"
            )
        return compared, detail

    def _evaluate_trends(self, rule: Rule, record: dict[str, Any]) -> _Verdict | None:
        """Judged on the window that includes this step (fed before evaluation, in update).
        The value is the weakest of the trends the rule needs (diverging: min(r of the first
        metric, -r of the second); rising together: min of every r), so value > threshold is
        exactly the condition; `compared` has each metric's trend r and slope."""
        st = self._state[rule.name]
        if any(as_number(record.get(m)) is None for m in rule.metrics):
            return None
        windows = [st.trends.get(m) for m in rule.metrics]
        ready = [w for w in windows if w is not None and len(w) >= rule.window]
        if len(ready) < len(windows):
            return _Verdict(False, 0.0, rule.metric, rule.threshold)
        trends = [w.r() for w in ready]
        slopes = [w.slope() for w in ready]
        t = rule.threshold
        if rule.kind == "diverging_trends":
            value = min(trends[0], -trends[1])
        else:
            value = min(trends)
        bad = value > t
        compared: dict[str, float] = {}
        parts = []
        for m, r, b in zip(rule.metrics, trends, slopes):
            compared[f"{m}_trend_r"] = r
            compared[f"{m}_slope_per_step"] = b
            parts.append(f"{m} trend r={r:+.2f} (slope {b:+.3g}/step)")
        if rule.kind == "diverging_trends":
            detail = (
                f"{parts[0]} while {parts[1]} over the last {rule.window} steps "
                f"(fires when the first r > +{_fmt(t)} and the second r < -{_fmt(t)})"
            )
        else:
            detail = f"{', '.join(parts)} over the last {rule.window} steps (fires when every r > +{_fmt(t)})"
        return _Verdict(bad, value, rule.metric, t, False, compared, detail)

    def _evaluate_growth(self, rule: Rule, record: dict[str, Any]) -> _Verdict | None:
        """Kind "growing" (a leak): for each of the rule's metrics present in the record, the
        growth over its last `window` values (least-squares slope x (window - 1)) and how straight
        it is (Pearson r with the step). Bad when some metric grew by more than `threshold` with
        r > `trend_r`; the value is the largest such growth (else the largest growth seen)."""
        st = self._state[rule.name]
        present = [m for m in rule.metrics or (rule.metric,) if as_number(record.get(m)) is not None]
        if not present:
            return None
        seen: list[tuple[bool, float, str, float, float]] = []  # (bad, growth, metric, r, slope)
        compared: dict[str, float] = {}
        for m in present:
            w = st.trends.get(m)
            if w is None or len(w) < rule.window:
                continue
            slope, r = w.slope(), w.r()
            growth = slope * (len(w) - 1)
            compared[f"{m}_growth"], compared[f"{m}_trend_r"] = growth, r
            seen.append((r > rule.trend_r and growth > rule.threshold, growth, m, r, slope))
        if not seen:
            return _Verdict(False, 0.0, present[0], rule.threshold)
        bad, growth, m, r, slope = max(seen, key=lambda t: (t[0], t[1]))
        detail = (
            f"{m} grew by {_fmt_bytes(growth)} over the last {rule.window} steps ({_fmt_bytes(slope)}/step, "
            f"trend r={r:+.2f}; fires over {_fmt_bytes(rule.threshold)} with r > {_fmt(rule.trend_r)})"
        )
        return _Verdict(bad, growth, m, rule.threshold, False, compared, detail)


def _fmt_bytes(n: float) -> str:
    """Bytes in MiB or GiB (the memory rules' values are bytes)."""
    if not math.isfinite(n):
        return _fmt(n)
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _median(values: list[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def _evaluate_ranks(rule: Rule, record: dict[str, Any]) -> _Verdict | None:
    """rank_imbalance: the metric is a map rank -> seconds (a data-parallel run's per-rank
    compute time before the collectives). The value is the slowest rank's time over the median
    of the other ranks' times; bad past the threshold when the rank is also `spike_floor`
    seconds slower. `compared` names the rank (and, from `rank_stage_s`, the stage where it
    lost the most time). None when the record has no such map or fewer than two ranks."""
    times = record.get(rule.metric)
    if not isinstance(times, dict):
        return None
    ranks = {str(k): f for k, v in times.items() if (f := as_number(v)) is not None and math.isfinite(f)}
    if len(ranks) < 2:
        return None
    ratios = {}
    for r, v in ranks.items():
        med = _median([x for k, x in ranks.items() if k != r])
        ratios[r] = (v / med if med > 0 else math.inf if v > 0 else 1.0, med)
    rank = max(ratios, key=lambda k: (ratios[k][0], ranks[k]))
    ratio, med = ratios[rank]
    bad = ratio > rule.threshold and ranks[rank] - med > rule.spike_floor
    compared: dict[str, float] = {"rank": float(rank) if rank.isdigit() else math.nan}
    compared.update({"rank_s": ranks[rank], "median_other_ranks_s": med})
    stage, lost = _slowest_stage(record.get("rank_stage_s"), rank)
    where = ""
    if stage is not None:
        compared[f"stage_{stage}_excess_s"] = lost
        where = f"; it loses most in stage {stage} (+{lost:.3g} s over the others' median)"
    detail = (
        f"rank {rank} computes {ranks[rank]:.3g} s before the collectives, {_fmt(ratio)}x the median "
        f"{med:.3g} s of the other ranks (threshold {_fmt(rule.threshold)}x"
        f"{f' for {rule.consecutive} steps in a row' if rule.consecutive > 1 else ''}){where}"
    )
    return _Verdict(bad, ratio, rule.metric, rule.threshold, False, compared, detail)


def _slowest_stage(stage_times: object, rank: str) -> tuple[str | None, float]:
    """The stage where `rank` spends the most time over the other ranks' median, from a map of
    "RANK.STAGE" -> seconds; (None, 0.0) without one."""
    if not isinstance(stage_times, dict):
        return None, 0.0
    per: dict[str, dict[str, float]] = {}
    for key, v in stage_times.items():
        r, _, stage = str(key).partition(".")
        f = as_number(v)
        if stage and f is not None and math.isfinite(f):
            per.setdefault(stage, {})[r] = f
    best, lost = None, 0.0
    for stage, by_rank in per.items():
        others = [x for k, x in by_rank.items() if k != rank]
        if rank in by_rank and others:
            excess = by_rank[rank] - _median(others)
            if excess > lost:
                best, lost = stage, excess
    return best, lost


def _index(sorted_list: list, value: float) -> int:
    from bisect import bisect_left

    return bisect_left(sorted_list, value)


_RULE_FIELDS = {f.name: f for f in fields(Rule)}
_FLOAT_KEYS = {
    "threshold",
    "clear_threshold",
    "hard_threshold",
    "spike_factor",
    "spike_floor",
    "critical_factor",
    "trend_r",
}
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
    if key in ("only_without", "relative_to", "critical_factor_of", "pushback") and v in ("", None):
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
    refs = (r.critical_factor_of, r.only_without, r.relative_to, r.pushback)
    for m in (r.metric, *r.metrics, *(x for x in refs if x)):
        if m not in METRICS:
            raise AlertConfigError(f"{where}: unknown metric {m!r} (see protocol.catalogue)")
    if "\n" in r.explanation or "\r" in r.explanation:
        raise AlertConfigError(f"{where}.explanation must be one line")
    if r.consecutive < 1 or r.clear_consecutive < 1:
        raise AlertConfigError(f"{where}: consecutive and clear_consecutive must be at least 1")
    if r.kind in ("diverging_trends", "rising_together") and len(r.metrics) < 2:
        raise AlertConfigError(f"{where}: kind {r.kind} needs at least two metrics")
    if r.kind in TREND_KINDS and r.window < 3:
        raise AlertConfigError(f"{where}.window must be at least 3")


def thresholds_for(metric: str, rules: tuple[Rule, ...] | list[Rule] = DEFAULT_RULES) -> list[tuple[str, str, float]]:
    """(kind, severity, threshold) of every enabled single-metric rule on `metric` (for colouring charts);
    a rule relative to another metric has no fixed line in `metric`'s units and is left out."""
    return [
        (r.kind, r.severity, r.threshold)
        for r in rules
        if r.enabled and r.metric == metric and r.kind in ("above", "below", "abs_above") and not r.relative_to
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
