"""A run's verdict at a glance, remembering everything that happened, not only what is open now.

Used by `trainerd status` and the monitor's header and banner, so both say the same thing:

- an alert that fired and cleared stays in the verdict ("was critical at steps 22-32") until a
  user acknowledges it; a run that had a critical alert is never shown as healthy before that;
- open alerts are ordered root cause first: the alert whose first step came first leads, and the
  others are named as its likely consequences;
- a crashed, stopped or stalled run says what to do next, with the exact command.

Acknowledgements are per user, never written into the run dir (a run dir has one writer, and a
copy may be read-only): `$XDG_STATE_HOME/rlhf-kit/acks.json` (default `~/.local/state/...`),
keyed by run id, rule and first step, so an alert that fires again is a new, unacknowledged one.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalogue import finite_value

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
MAX_ACK_BYTES = 4 << 20


def _rank(severity: object) -> int:
    return SEVERITY_RANK.get(severity if isinstance(severity, str) else "", 0)


def _step(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 1 << 62


def ack_key(run_id: str, episode: Mapping[str, Any]) -> str:
    return f"{run_id}\t{episode.get('rule')}\t{episode.get('first_step')}"


def root_cause_first(episodes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Earliest first step first (the likely cause); on a tie, the more severe first."""
    return sorted(episodes, key=lambda e: (_step(e.get("first_step")), -_rank(e.get("severity"))))


def worst_severity(episode: Mapping[str, Any]) -> str:
    """The most severe level an episode reached (it may have escalated, then cleared)."""
    levels = [episode.get("severity"), episode.get("fired_severity")]
    best = max(levels, key=_rank)
    return best if isinstance(best, str) else "warning"


@dataclass
class Verdict:
    level: str  # healthy | warning | critical: the worst unacknowledged severity, open or past
    headline: str  # one line
    cause: Mapping[str, Any] | None = None  # the open alert to read first
    consequences: list[Mapping[str, Any]] = field(default_factory=list)  # other open alerts
    past: list[Mapping[str, Any]] = field(default_factory=list)  # cleared, not acknowledged
    next_step: str | None = None  # what to do about the run's state, with the command
    unacknowledged: list[str] = field(default_factory=list)  # ack keys a user can acknowledge


def describe_past(ep: Mapping[str, Any]) -> str:
    """'reward_hacking was critical at steps 22-32 (value 0.93, now cleared)'."""
    first, cleared = ep.get("first_step"), ep.get("cleared_step")
    span = f"steps {first}-{cleared}" if cleared is not None else f"step {first}"
    value = ep.get("value")
    at = f", value then {value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"{ep.get('rule')} was {worst_severity(ep)} at {span}{at}"


def next_step_for(status: str, run_dir: str | os.PathLike[str] | None) -> str | None:
    """What a user does next about a run in this state (the exact command where there is one)."""
    where = shlex.quote(os.fspath(run_dir)) if run_dir is not None else "RUN"
    if status == "crashed":
        return f"the trainer died; resume with: trainerd resume {where}"
    if status == "stopped":
        return f"stopped; continue with: trainerd resume {where}"
    if status == "failed":
        return f"stopped at a non-finite value; read the alert, change the config, then: trainerd resume {where}"
    if status == "stalled":
        return f"no new step for a while; check the trainer: trainerd status {where} (its log: trainerd.log)"
    return None


def run_verdict(
    episodes: Iterable[Mapping[str, Any]],
    status: str,
    run_id: str,
    acked: set[str] | frozenset[str] = frozenset(),
    run_dir: str | os.PathLike[str] | None = None,
) -> Verdict:
    """The verdict from a run's alert episodes (`protocol.events.alert_timeline`, or the
    monitor's own live ones in the same shape), its effective status and the user's acks."""
    eps = list(episodes)
    open_eps = root_cause_first(e for e in eps if e.get("open"))
    past = [e for e in eps if not e.get("open") and ack_key(run_id, e) not in acked]
    past.sort(key=lambda e: (-_rank(worst_severity(e)), _step(e.get("first_step"))))
    unacked_open = [e for e in open_eps if ack_key(run_id, e) not in acked]
    ranks = [_rank(worst_severity(e)) for e in unacked_open + past]
    level = {2: "critical", 1: "warning"}.get(max(ranks, default=0), "healthy")
    cause = open_eps[0] if open_eps else None
    consequences = open_eps[1:]
    if cause is not None:
        headline = f"{cause.get('rule')} since step {cause.get('first_step')}"
        if consequences:
            headline += f"; likely consequences: {', '.join(str(e.get('rule')) for e in consequences)}"
    elif past:
        headline = describe_past(past[0]) + (f" (+{len(past) - 1} more)" if len(past) > 1 else "")
        headline += "; cleared, not acknowledged"
    else:
        headline = "no alerts" if not eps else "no open alerts (all acknowledged)"
    return Verdict(
        level=level,
        headline=headline,
        cause=cause,
        consequences=consequences,
        past=past,
        next_step=next_step_for(status, run_dir),
        unacknowledged=[ack_key(run_id, e) for e in unacked_open + past],
    )


# -- acknowledgements: per-user state --------------------------------------------------------------


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "rlhf-kit"


def load_acks(path: Path | None = None) -> set[str]:
    """The acknowledged alert keys; an unreadable or damaged file counts as none (never raises)."""
    p = path or state_dir() / "acks.json"
    try:
        with open(p, "rb") as f:
            data = json.loads(f.read(MAX_ACK_BYTES + 1)[:MAX_ACK_BYTES])
    except (OSError, ValueError):
        return set()
    keys = data.get("acknowledged") if isinstance(data, dict) else None
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


def acknowledge(keys: Iterable[str], path: Path | None = None) -> set[str]:
    """Add `keys` to the user's acknowledgements (written atomically); returns the new set."""
    p = path or state_dir() / "acks.json"
    acked = load_acks(p) | set(keys)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".acks-", dir=p.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"acknowledged": sorted(acked)}, f)
    os.replace(tmp, p)
    return acked


# -- what to try next: the fork an alert's advice implies ------------------------------------------

# The one source of "which config change does this alert's advice mean": rule -> (key, factor).
# kl_coef is the KL penalty (raised against a runaway or a hacked reward); learning_rate the step
# size (lowered against a policy that moves too fast, exploding gradients, a collapse, NaNs).
FORK_CHANGES: dict[str, tuple[str, float]] = {
    "kl_runaway": ("kl_coef", 2.0),
    "reward_hacking": ("kl_coef", 2.0),
    "reward_hacking_proxy": ("kl_coef", 2.0),
    "policy_moving_too_fast": ("learning_rate", 0.5),
    "exploding_gradients": ("learning_rate", 0.5),
    "entropy_collapse": ("learning_rate", 0.5),
    "non_finite": ("learning_rate", 0.5),
}


def _positive(v: object) -> float | None:
    f = finite_value(v)
    return f if f is not None and f > 0.0 else None


def fork_step(checkpoint_steps: Iterable[object], first_step: object) -> int | None:
    """The step to fork from: the last complete checkpoint at or before the alert's first step,
    else the first step itself (None if that is not a step)."""
    if not isinstance(first_step, int) or isinstance(first_step, bool) or first_step < 0:
        return None
    before = [s for s in checkpoint_steps if isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= first_step]
    return max(before, default=first_step)


def fork_suggestion(
    rule: object,
    run_dir: str | os.PathLike[str],
    from_step: object,
    record: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> str | None:
    """The `trainerd fork` command an alert's advice implies (text to copy, never run), or None
    when the rule implies no config change or the value to change is not known. kl_coef: twice
    the run's current one (the last record's, the adaptive controller moves it; else the
    config's); learning_rate: half the config's (the base `--set` changes; else the record's)."""
    change = FORK_CHANGES.get(rule) if isinstance(rule, str) else None
    if change is None or not isinstance(from_step, int) or isinstance(from_step, bool) or from_step < 0:
        return None
    key, factor = change
    rec = record if isinstance(record, Mapping) else {}
    cfg = config if isinstance(config, Mapping) else {}
    sources = (rec, cfg) if key == "kl_coef" else (cfg, rec)
    current = next((v for v in (_positive(s.get(key)) for s in sources) if v is not None), None)
    if current is None:
        return None
    new = current * factor
    if not 0.0 < new < float("inf"):
        return None
    where = shlex.quote(os.fspath(run_dir))
    return f"trainerd fork {where} --from-step {from_step} --set {key}={new:.4g}"
